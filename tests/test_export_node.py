"""js/generate.mjs: Transformers.js in Node loads an `llmopt export onnx` folder offline, its tokenizer gives
Python's prompt ids (with the <|endoftext|> in front), greedy fp32 generation gives HF generate's tokens
exactly, and the int8 file generates its tokens and text. Skipped without `node` or `cd js && npm ci`."""
import json
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")

JS = Path(__file__).resolve().parents[1] / "js"
PROMPT = "def fibonacci(n):\n    "
N = 24

if shutil.which("node") is None:
    pytest.skip("node is not on PATH", allow_module_level=True)
if not (JS / "node_modules" / "@huggingface" / "transformers").is_dir():
    pytest.skip("js/node_modules lacks @huggingface/transformers: run `cd js && npm ci`", allow_module_level=True)


@pytest.fixture(scope="module")
def exported(tmp_path_factory, bundled):
    from llmopt.export import export_onnx

    model, tok = bundled
    out = tmp_path_factory.mktemp("node") / "tinypy"
    export_onnx(model, out, tokenizer=tok, quantize=("q8",))
    return out


def node_generate(model_dir, dtype):
    r = subprocess.run(["node", str(JS / "generate.mjs"), str(model_dir), PROMPT, str(N), dtype],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_fp32_greedy_tokens_equal_hf_generate(exported, bundled):
    model, tok = bundled
    got = node_generate(exported, "fp32")
    ids = tok(PROMPT, return_tensors="pt").input_ids   # the tokenizer puts <|endoftext|> (id 0) in front
    assert got["prompt_ids"] == ids[0].tolist() and got["prompt_ids"][0] == tok.bos_token_id
    with torch.no_grad():
        want = model.generate(ids, max_new_tokens=N, min_new_tokens=N, do_sample=False, pad_token_id=0)
    assert got["generated_ids"] == want[0, ids.shape[1]:].tolist()
    # the pipeline's text is the decoded tokens of model.generate in Node
    assert got["text"] == tok.decode(got["generated_ids"], skip_special_tokens=True)
    assert got["tokens_per_s"] > 0


def test_q8_generates_its_tokens_and_text(exported, bundled):
    _, tok = bundled
    got = node_generate(exported, "q8")
    assert got["dtype"] == "q8" and got["prompt_ids"] == tok(PROMPT).input_ids
    assert len(got["generated_ids"]) == N
    assert got["text"].strip() and got["text"] == tok.decode(got["generated_ids"], skip_special_tokens=True)
