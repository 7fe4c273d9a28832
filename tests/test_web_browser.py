"""The web page (web/index.html): the exported model generating in headless Chromium with
Transformers.js (WASM), served from localhost. Greedy, the fp32 file's completion equals onnxruntime's
in Python, and the 4-bit file's starts as onnxruntime's does; a model that is not there, or a bad
?dtype=, is said on the page. Needs playwright, a Chromium (Debian's `chromium`, or LLMOPT_CHROMIUM=path)
and js/node_modules (`make js/node_modules`); skipped otherwise."""
import functools
import http.server
import os
import shutil
import threading
from pathlib import Path

import pytest

pytestmark = pytest.mark.browser
ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = os.environ.get("LLMOPT_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
if not CHROMIUM:
    pytest.skip("no Chromium (apt-get install chromium, or set LLMOPT_CHROMIUM)", allow_module_level=True)
if not (ROOT / "js" / "node_modules" / "@huggingface" / "transformers").is_dir():
    pytest.skip("js/node_modules is missing (make js/node_modules)", allow_module_level=True)
sync_playwright = pytest.importorskip("playwright.sync_api").sync_playwright
pytest.importorskip("onnxruntime")

from llmopt.export.onnx import export_onnx, onnx_generate  # noqa: E402


class Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def site(tmp_path_factory, bundled):
    """A folder served on a free port: web/ and js/node_modules from the repository, models/ the export."""
    model, tok = bundled
    root = tmp_path_factory.mktemp("site")
    files = export_onnx(model, root / "models" / "tinypy", tokenizer=tok, quantize=("q4",))
    (root / "web").symlink_to(ROOT / "web")
    (root / "js").mkdir()
    (root / "js" / "node_modules").symlink_to(ROOT / "js" / "node_modules")
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(root)))
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}", files
    httpd.shutdown()


def complete(base: str, dtype: str, prompt: str, n: int, screenshot=None) -> tuple[str, float]:
    """Open the page, type the prompt, press generate; the page's text and tokens/s. The page shows its
    errors in #out (marked data-error): a failed load or generation fails here at once, with its message."""
    errors = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        page = browser.new_page()
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto(f"{base}/web/index.html?dtype={dtype}&models=/models/")
        page.wait_for_selector("#go:not([disabled]), #out[data-error]", timeout=120_000)
        assert page.get_attribute("#out", "data-error") is None, page.inner_text("#out")
        page.fill("#prompt", prompt)
        page.fill("#max", str(n))
        page.click("#go")
        page.wait_for_function("document.getElementById('stats').dataset.tokensPerS"
                               " || document.getElementById('out').dataset.error", timeout=120_000)
        assert page.get_attribute("#out", "data-error") is None, page.inner_text("#out")
        text, tok_s = page.inner_text("#out"), float(page.get_attribute("#stats", "data-tokens-per-s"))
        if screenshot:
            page.screenshot(path=str(screenshot), full_page=True)
        browser.close()
    assert not errors, errors
    return text, tok_s


def test_fp32_in_the_browser_equals_onnxruntime_in_python(site, bundled):
    """The page stops at end-of-text and drops it from the text: the reference does the same."""
    base, files = site
    tok = bundled[1]
    prompt = "def fibonacci(n):\n"
    ids = tok(prompt).input_ids
    want, _ = onnx_generate(files["fp32"], ids, 32, eos_token_id=tok.eos_token_id)
    text, tok_s = complete(base, "fp32", prompt, 32)
    assert text == prompt + tok.decode(want, skip_special_tokens=True)
    assert tok_s > 0


def test_q4_in_the_browser_starts_as_onnxruntime_in_python(site, bundled, tmp_path):
    """The 4-bit file's completion begins with the tokens onnxruntime gives it in Python. Only the first 8
    are compared: ONNX Runtime Web's 4-bit matmul is not Python's, and after a near tie the rest differ."""
    base, files = site
    tok = bundled[1]
    prompt = "import os\n"
    want, _ = onnx_generate(files["q4"], tok(prompt).input_ids, 24, eos_token_id=tok.eos_token_id)
    text, tok_s = complete(base, "q4", prompt, 24, screenshot=tmp_path / "page.png")
    assert text.startswith(prompt + tok.decode(want[:8], skip_special_tokens=True)) and tok_s > 0
    assert (tmp_path / "page.png").stat().st_size > 5000


@pytest.mark.parametrize("query, needles", [
    ("models=/nonexistent/", ["loading the model failed", "llmopt export onnx --out web/models/tinypy"]),
    ("dtype=q3", ["loading the model failed", "?dtype=q3: use fp32, q8 or q4"]),
])
def test_a_model_that_does_not_load_is_said_on_the_page(site, query, needles):
    """It once left the button at "loading the model…" with the reason in the DevTools console only."""
    base, _ = site
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        page = browser.new_page()
        page.goto(f"{base}/web/index.html?{query}")
        page.wait_for_selector("#out[data-error]", timeout=60_000)
        text, button = page.inner_text("#out"), page.inner_text("#go")
        assert page.is_disabled("#go")
        browser.close()
    assert all(n in text for n in needles), text
    assert button == "the model did not load"
