import json
import shutil

import pytest
import torch

import llmopt
from llmopt import models


def test_bundled_model_is_a_small_gqa_llama(bundled):
    model, tok = bundled
    cfg = model.config
    assert cfg.model_type == "llama"
    assert cfg.num_key_value_heads < cfg.num_attention_heads  # grouped-query attention
    assert cfg.hidden_act == "silu"  # SwiGLU
    assert type(model.model.norm).__name__ == "LlamaRMSNorm"
    assert hasattr(model.model, "rotary_emb")
    assert 5e6 <= models.param_count(model) <= 10e6
    assert 4000 <= len(tok) <= 8192
    assert model.device.type == "cpu" and model.dtype == torch.float32 and not model.training


def test_bundled_files_are_standard_hf_and_small():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = models.bundled_path()
    for f in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
              "generation_config.json", "training_record.json", "loss_curve.png"):
        assert (path / f).exists(), f
    assert (path / "model.safetensors").stat().st_size <= 25e6
    model = AutoModelForCausalLM.from_pretrained(path)  # plain transformers, no llmopt
    AutoTokenizer.from_pretrained(path)
    assert next(model.parameters()).dtype == torch.bfloat16  # shipped as bf16
    record = json.loads((path / "training_record.json").read_text())
    for key in ("recipe", "tokens_seen", "perplexity_bf16_weights", "corpus", "machine"):
        assert key in record
    assert record["recipe"]["seed"] == 1337


def test_bundled_model_writes_python(bundled):
    model, tok = bundled
    ids = tok("def fibonacci(n):", return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=40, do_sample=False, pad_token_id=tok.pad_token_id)
    text = tok.decode(out[0], skip_special_tokens=True)
    assert text.startswith("def fibonacci(n):\n")
    assert "    " in text and any(w in text for w in ("return", "if ", "for ", "=", '"""'))


def test_tiny_random_builds_fast(tiny):
    model, tok = tiny
    assert model.config.num_hidden_layers == 2 and models.param_count(model) < 1e6
    assert model.config.vocab_size == len(tok)


def test_tinyllama_shape_for_gpu_timing():
    from transformers import LlamaForCausalLM

    cfg = models.tinyllama_config()
    with torch.device("meta"):  # no memory: just count
        n = models.param_count(LlamaForCausalLM(cfg))
    assert 1.09e9 < n < 1.11e9 and cfg.num_key_value_heads == 4


def test_load_local_directory_and_dtype(tmp_path):
    model, tok = llmopt.load(models.bundled_path(), dtype="bf16", device="cpu")
    assert model.dtype == torch.bfloat16
    assert tok.padding_side == "left" and tok.pad_token is not None


@pytest.mark.parametrize("name, err, match", [
    ("no-such-model", ValueError, "unknown model"),
    ("./missing/dir", FileNotFoundError, "does not exist"),
    ("some-org/some-model", ValueError, "offline"),
])
def test_load_errors_are_clear(name, err, match):
    with pytest.raises(err, match=match):
        llmopt.load(name, device="cpu")


def test_load_dir_without_config(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        llmopt.load(tmp_path)


def test_load_corrupted_safetensors(tmp_path):
    dst = tmp_path / "broken"
    shutil.copytree(models.bundled_path(), dst)
    data = (dst / "model.safetensors").read_bytes()
    (dst / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="corrupted"):
        llmopt.load(dst)


@pytest.mark.parametrize("kw, match", [({"dtype": "int3"}, "dtype"), ({"dtype": torch.int8}, "dtype"),
                                       ({"device": "tpu"}, "device")])
def test_bad_dtype_or_device(kw, match):
    with pytest.raises(ValueError, match=match):
        llmopt.load("tiny-random", **kw)


def test_device_and_dtype_choice():
    assert models.pick_device("cpu").type == "cpu"
    assert models.pick_dtype(None, torch.device("cpu")) == torch.float32
    assert models.pick_dtype(None, torch.device("cuda")) == torch.bfloat16
    assert models.pick_dtype("fp16", torch.device("cpu")) == torch.float16
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA"):
            models.pick_device("cuda")


def test_env_var_picks_default_model(monkeypatch):
    monkeypatch.setenv("LLMOPT_MODEL", "tiny-random")
    model, _ = llmopt.load(device="cpu")
    assert model.config.num_hidden_layers == 2
    monkeypatch.delenv("LLMOPT_MODEL")
    assert models.default_model() == "tinypy"


def test_trust_remote_code_off_by_default():
    import inspect

    assert inspect.signature(llmopt.load).parameters["trust_remote_code"].default is False
