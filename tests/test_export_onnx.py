"""`llmopt export onnx`: the Transformers.js folder layout; the exported graph in onnxruntime gives the
model's logits for a prompt and for a step with a KV cache, and HF generate's greedy tokens; the int8
and 4-bit files keep the perplexity close; the CLI; bad arguments."""
import json

import numpy as np
import pytest
import torch

ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")

from llmopt.export.onnx import (  # noqa: E402
    OnnxDecoder,
    export_onnx,
    onnx_generate,
    onnx_logits,
    onnx_perplexity,
)


@pytest.fixture(scope="module")
def exported(tmp_path_factory, bundled):
    model, tok = bundled
    out = tmp_path_factory.mktemp("export") / "tinypy"
    files = export_onnx(model, out, tokenizer=tok, quantize=("q8", "q4"))
    return out, files


def feed_for(sess, ids, past=None, start=0):
    feed = {"input_ids": np.array([ids], dtype=np.int64),
            "attention_mask": np.ones((1, start + len(ids)), dtype=np.int64),
            "position_ids": np.arange(start, start + len(ids), dtype=np.int64)[None]}
    for i, inp in enumerate(x for x in sess.get_inputs() if x.name.startswith("past_key_values.")):
        feed[inp.name] = past[i] if past is not None else np.zeros((1, inp.shape[1], 0, inp.shape[3]), np.float32)
    return feed


def test_layout_transformers_js_loads(exported, bundled):
    out, files = exported
    for name in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                 "onnx/model.onnx", "onnx/model_quantized.onnx", "onnx/model_q4.onnx"):
        assert (out / name).is_file(), name
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"] and cfg["model_type"] == "llama"
    # the bundled tokenizer starts every prompt with BOS; Transformers.js needs the config to say so
    assert json.loads((out / "tokenizer_config.json").read_text())["add_bos_token"] is True
    sess = ort.InferenceSession(str(files["fp32"]))
    n = bundled[0].config.num_hidden_layers
    assert [i.name for i in sess.get_inputs()][:3] == ["input_ids", "attention_mask", "position_ids"]
    assert [i.name for i in sess.get_inputs()][3:5] == ["past_key_values.0.key", "past_key_values.0.value"]
    assert [o.name for o in sess.get_outputs()] == ["logits"] + [f"present.{i}.{kv}" for i in range(n)
                                                                  for kv in ("key", "value")]


def test_logits_with_and_without_a_kv_cache_equal_the_model(exported, bundled):
    model, tok = bundled
    _, files = exported
    sess = ort.InferenceSession(str(files["fp32"]))
    ids = tok("def fibonacci(n):\n    ", return_tensors="pt").input_ids[0].tolist()
    with torch.no_grad():
        want = model(torch.tensor([ids])).logits[0].numpy()
    # the whole prompt at once, then its last 3 tokens again as steps on top of the cache of the rest
    got = sess.run(None, feed_for(sess, ids))
    assert np.abs(got[0][0] - want).max() < 1e-3
    head = sess.run(None, feed_for(sess, ids[:-3]))
    past = head[1:]
    for j in range(len(ids) - 3, len(ids)):
        step = sess.run(None, feed_for(sess, [ids[j]], past, start=j))
        assert np.abs(step[0][0, -1] - want[j]).max() < 1e-3
        assert step[1].shape[2] == j + 1          # the cache grew by one position
        past = step[1:]


def test_decoder_module_equals_the_model_in_pytorch(bundled):
    model, tok = bundled
    dec = OnnxDecoder(model)
    ids = torch.tensor([[5, 17, 99, 3, 250, 7]])
    with torch.no_grad():
        want = model(ids).logits
        got, *present = dec(ids, torch.ones_like(ids), torch.arange(6)[None], *dec.empty_past())
        # a left-padded batch row: the padding is masked, its positions start after it
        pad = torch.tensor([[0, 0, 5, 17, 99, 3, 250, 7]])
        mask = torch.tensor([[0, 0, 1, 1, 1, 1, 1, 1]])
        got_pad, *_ = dec(pad, mask, torch.tensor([[0, 0, 0, 1, 2, 3, 4, 5]]), *dec.empty_past())
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(got_pad[:, 2:], want, rtol=1e-4, atol=1e-4)
    assert len(present) == 2 * model.config.num_hidden_layers and present[0].shape[2] == 6


def test_greedy_generation_equals_hf_generate_and_quantized_files_keep_perplexity(exported, bundled):
    from llmopt import data

    model, tok = bundled
    _, files = exported
    ids = tok("class Stack:\n    def __init__(self):\n", return_tensors="pt").input_ids
    with torch.no_grad():
        want = model.generate(ids, max_new_tokens=24, min_new_tokens=24, do_sample=False, pad_token_id=0)
    got, seconds = onnx_generate(files["fp32"], ids[0].tolist(), 24)
    assert got == want[0, ids.shape[1]:].tolist() and seconds > 0
    stream = data.token_stream("test", tok)[:2048 + 1]
    ppl = {k: onnx_perplexity(f, stream, window=512) for k, f in files.items()}
    assert 1 < ppl["fp32"] < 100
    assert ppl["q8"] < 1.03 * ppl["fp32"] and ppl["q4"] < 1.05 * ppl["fp32"], ppl
    assert files["q8"].stat().st_size < 0.35 * files["fp32"].stat().st_size
    assert files["q4"].stat().st_size < 0.35 * files["fp32"].stat().st_size


def test_bad_quantize_argument(tmp_path, bundled):
    with pytest.raises(ValueError, match="q8"):
        export_onnx(bundled[0], tmp_path, tokenizer=bundled[1], quantize=("int3",))
    with pytest.raises(ValueError, match="tokenizer"):
        export_onnx(bundled[0], tmp_path)


def test_cli_exports_and_measures(tmp_path):
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "llmopt.cli", "export", "onnx", "--out", str(tmp_path / "m"),
                        "--quantize", "q8", "--new-tokens", "8"], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    assert "model_quantized.onnx" in r.stdout and "perplexity" in r.stdout
    onnx_dir = tmp_path / "m" / "onnx"
    assert (onnx_dir / "model.onnx").is_file() and not (onnx_dir / "model_q4.onnx").exists()


@pytest.mark.parametrize("n", ["0", "1"])
def test_cli_rejects_too_few_new_tokens_before_exporting(tmp_path, capsys, n):
    """`--new-tokens 0` or `1` once wrote the files and then crashed timing a decode it had not run."""
    from llmopt.cli import main

    assert main(["export", "onnx", "--out", str(tmp_path / "m"), "--new-tokens", n]) == 2
    assert "--new-tokens must be >= 2" in capsys.readouterr().err and not (tmp_path / "m").exists()


def test_one_new_token_is_measured_without_a_speed(exported):
    """The library's own path: one token times no decode step (tok/s shown as "-"); none is an error."""
    from llmopt.export.onnx import format_export, measure_export

    _, files = exported
    r = measure_export({"fp32": files["fp32"]}, new_tokens=1, eval_tokens=600)
    assert r["rows"][0]["tok_s"] is None and "| - |" in format_export(r)
    with pytest.raises(ValueError, match="new_tokens"):
        measure_export({"fp32": files["fp32"]}, new_tokens=0)


@pytest.mark.parametrize("merge", [False, True], ids=["fused", "fused-merged"])
def test_a_w4_quantized_and_fused_model_exports_what_it_computes(tmp_path, bundled, merge):
    """The quantized linears are written dequantized (the bit unpacking does not trace): the fp32 file's
    logits equal the W4 model's, not the float model's; measure_export reads the export's own tokenizer.
    `fuse(merge=True)` (lesson 11's bfloat16 stack) merges q, k and v into one `qkv_proj`: exported split."""
    import copy

    from llmopt.export.onnx import measure_export
    from llmopt.kernels import fuse
    from llmopt.quant import QuantConfig, quantize

    model, tok = bundled
    w4 = quantize(copy.deepcopy(model), QuantConfig(bits=4, group_size=32, method="rtn"))
    w4 = fuse(w4, merge=merge)
    assert hasattr(w4.model.layers[0].self_attn, "qkv_proj") == merge
    files = export_onnx(w4, tmp_path / "w4", tokenizer=tok, quantize=())
    ids = tok("import os\nfor name in", return_tensors="pt").input_ids
    with torch.no_grad():
        want, plain = w4(ids).logits[0].numpy(), model(ids).logits[0].numpy()
    got = onnx_logits(files["fp32"], ids.numpy())[0]
    assert np.abs(got - want).max() < 1e-3 < np.abs(got - plain).max()
    r = measure_export(files, new_tokens=4, eval_tokens=600)
    assert r["model"] == "w4" and r["rows"][0]["perplexity"] > 1 and r["rows"][0]["same_tokens_as_fp32"] == 1


def _small(family: str, **kw):
    import transformers as tf

    base = dict(vocab_size=97, hidden_size=64, intermediate_size=40, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=64)
    cfg = getattr(tf, f"{family}Config")(**{**base, **kw})
    torch.manual_seed(0)
    return getattr(tf, f"{family}ForCausalLM")(cfg).eval()


def assert_export_is_the_model(files, model, prompt, n):
    """The fp32 file's logits are the model's, and its greedy tokens HF generate's."""
    ids = torch.tensor([prompt])
    with torch.no_grad():
        want = model(ids).logits
        greedy = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                                do_sample=False, pad_token_id=0)[0, len(prompt):].tolist()
    torch.testing.assert_close(torch.as_tensor(onnx_logits(files["fp32"], ids)), want, rtol=1e-4, atol=1e-4)
    assert onnx_generate(files["fp32"], prompt, n)[0] == greedy


@pytest.mark.parametrize("family, kw", [
    ("Qwen2", {}),                                                     # biases on q/k/v
    ("Mistral", {"head_dim": 24, "num_key_value_heads": 1}),           # head_dim not hidden / heads, one KV head
    ("Llama", {"attention_bias": True, "mlp_bias": True, "rope_scaling": {
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 16}}),
], ids=["qwen2", "mistral", "llama3-rope"])
def test_other_llama_family_models_export_what_they_compute(tmp_path, bundled, family, kw):
    _, tok = bundled
    model = _small(family, **kw)
    files = export_onnx(model, tmp_path, tokenizer=tok, quantize=())
    assert_export_is_the_model(files, model, [5, 17, 60, 3, 25, 7, 90], 5)


@pytest.mark.parametrize("family", ["Mixtral", "Qwen3Moe", "upcycled", "Mixtral_w4"])
def test_mixture_of_experts_models_export_every_expert(tmp_path, bundled, family):
    """A traced MoE layer would keep the first run's routing (and the stock blocks' histc has no ONNX
    op): the export runs every expert, weighted by the router, so the graph is the model for any input.
    The caller's model keeps its own blocks. Quantized experts (`QuantExperts`) are written dequantized."""
    from llmopt import moe

    _, tok = bundled
    experts = {"Mixtral": {"num_local_experts": 4}, "Qwen3Moe": {"num_experts": 4, "moe_intermediate_size": 24,
                                                                "head_dim": 16}}
    if family == "upcycled":
        model = moe.upcycle(_small("Llama"), num_experts=4, top_k=2).eval()
    else:
        model = _small(family.removesuffix("_w4"), num_experts_per_tok=2, **experts[family.removesuffix("_w4")])
    with torch.no_grad():   # routers with opinions, experts that differ: routing decides the output
        for name, p in model.named_parameters():
            if name.endswith("mlp.gate.weight") or "experts" in name:
                p.normal_(std=0.5 if name.endswith("gate.weight") else 0.2)
    if family.endswith("_w4"):
        from llmopt.quant import QuantConfig, quantize

        quantize(model, QuantConfig(bits=4, group_size=8))
    block = type(model.model.layers[0].mlp)
    files = export_onnx(model, tmp_path, tokenizer=tok, quantize=())
    assert type(model.model.layers[0].mlp) is block
    assert_export_is_the_model(files, model, [5, 17, 60, 3, 25, 7, 90, 11, 42], 6)


def test_a_rope_that_changes_with_the_context_warns(tmp_path, bundled):
    """Dynamic NTK scaling recomputes the rotary frequencies past max_position_embeddings; a traced
    graph cannot, so the export says so (within that length the logits are the model's)."""
    _, tok = bundled
    model = _small("Llama", rope_scaling={"rope_type": "dynamic", "factor": 2.0})
    with pytest.warns(UserWarning, match="past 64 tokens"):
        files = export_onnx(model, tmp_path, tokenizer=tok, quantize=())
    ids = torch.randint(0, 97, (1, 40))
    with torch.no_grad():
        torch.testing.assert_close(torch.as_tensor(onnx_logits(files["fp32"], ids)), model(ids).logits,
                                   rtol=1e-4, atol=1e-4)
