"""The web page (web/index.html): the exported model generating in headless Chromium with
Transformers.js (WASM), served from localhost. Greedy, the fp32 file's completion equals onnxruntime's
in Python; the 4-bit file completes too. Needs playwright, a Chromium (Debian's `chromium`, or
LLMOPT_CHROMIUM=path) and js/node_modules (`cd js && npm ci --ignore-scripts`); skipped otherwise."""
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
    pytest.skip("js/node_modules is missing (cd js && npm ci --ignore-scripts)", allow_module_level=True)
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
    """Open the page, type the prompt, press generate; the page's text and tokens/s."""
    errors = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        page = browser.new_page()
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto(f"{base}/web/index.html?dtype={dtype}&models=/models/")
        page.wait_for_selector("#go:not([disabled])", timeout=120_000)
        page.fill("#prompt", prompt)
        page.fill("#max", str(n))
        page.click("#go")
        page.wait_for_function("document.getElementById('stats').dataset.tokensPerS", timeout=120_000)
        text, tok_s = page.inner_text("#out"), float(page.get_attribute("#stats", "data-tokens-per-s"))
        if screenshot:
            page.screenshot(path=str(screenshot), full_page=True)
        browser.close()
    assert not errors, errors
    return text, tok_s


def test_fp32_in_the_browser_equals_onnxruntime_in_python(site, bundled):
    base, files = site
    tok = bundled[1]
    prompt = "def fibonacci(n):\n"
    ids = tok(prompt).input_ids
    want, _ = onnx_generate(files["fp32"], ids, 32)
    text, tok_s = complete(base, "fp32", prompt, 32)
    assert text == prompt + tok.decode(want)
    assert tok_s > 0


def test_q4_in_the_browser_completes(site, tmp_path):
    base, _ = site
    text, tok_s = complete(base, "q4", "import os\n", 24, screenshot=tmp_path / "page.png")
    assert text.startswith("import os\n") and len(text) > len("import os\n") and tok_s > 0
    assert (tmp_path / "page.png").stat().st_size > 5000
