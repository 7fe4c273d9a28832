"""js/generate.mjs: Transformers.js in Node loads an `llmopt export onnx` folder offline, its tokenizer gives
Python's prompt ids (with the <|endoftext|> in front), greedy fp32 generation gives HF generate's tokens
exactly, and the int8 file's tokens are its greedy tokens in onnxruntime in Python. Skipped without
`node` or js/node_modules (`make js/node_modules`)."""
import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
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
    pytest.skip("js/node_modules lacks @huggingface/transformers: run `make js/node_modules`", allow_module_level=True)


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


def stepped_logits(path, prompt_ids: list[int], tokens: list[int]) -> np.ndarray:
    """The file's next-token logits at each step of a run that generated `tokens` after `prompt_ids`, in
    onnxruntime in Python, called as Transformers.js' generate calls it: the prompt in one call, then one
    token a call on the KV cache (int8 activations are quantized per call, so the calls must match).
    Row j: the logits that picked tokens[j]."""
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    past = {i.name: np.zeros((1, i.shape[1], 0, i.shape[3]), np.float32) for i in sess.get_inputs()
            if i.name.startswith("past_key_values.")}
    rows, step, start = [], list(prompt_ids), 0
    for t in tokens:
        out = sess.run(None, {"input_ids": np.array([step], np.int64),
                              "attention_mask": np.ones((1, start + len(step)), np.int64),
                              "position_ids": np.arange(start, start + len(step), dtype=np.int64)[None], **past})
        rows.append(out[0][0, -1])
        past = dict(zip(past, out[1:]))
        start, step = start + len(step), [t]
    return np.stack(rows)


def test_q8_tokens_are_the_q8_files_greedy_tokens_in_python(exported, bundled):
    """Each token Node's q8 run picked is the q8 file's greedy choice in onnxruntime in Python, given the
    same tokens before it (end-of-text excluded: min_new_tokens holds it back). Node's onnxruntime is not
    Python's: a near tie may go either way, so a token within 0.05 of the best logit counts, and a tie
    does not derail the rest (each step is checked on Node's own tokens)."""
    _, tok = bundled
    got = node_generate(exported, "q8")
    ids = got["generated_ids"]
    assert got["dtype"] == "q8" and got["prompt_ids"] == tok(PROMPT).input_ids and len(ids) == N
    assert got["text"] == tok.decode(ids, skip_special_tokens=True)
    logits = stepped_logits(exported / "onnx" / "model_quantized.onnx", got["prompt_ids"], ids)
    logits[:, tok.eos_token_id] = -np.inf
    best, chosen = logits.max(axis=1), logits[np.arange(N), ids]
    assert (chosen >= best - 0.05).all(), list(zip(ids, logits.argmax(axis=1).tolist(), (best - chosen).round(3)))
    assert np.mean(logits.argmax(axis=1) == np.array(ids)) >= 0.9
