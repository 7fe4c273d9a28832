import json

import pytest
import torch

from llmopt import models, train


def test_lr_schedule():
    cfg = train.TrainConfig(steps=100, warmup=10, lr=1.0, min_lr_ratio=0.1)
    assert train.lr_at(0, cfg) == pytest.approx(0.1)
    assert train.lr_at(9, cfg) == pytest.approx(1.0)
    assert train.lr_at(10, cfg) == pytest.approx(1.0)
    assert train.lr_at(99, cfg) == pytest.approx(0.1, abs=1e-3)
    lrs = [train.lr_at(s, cfg) for s in range(10, 100)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))
    with pytest.raises(ValueError, match="autocast"):
        train.TrainConfig(autocast="fp8")


@pytest.mark.parametrize("fast", [True, False])
def test_autocast_auto_takes_bf16_only_where_it_is_fast(fast, monkeypatch):
    monkeypatch.setattr(train, "fast_bf16", lambda device: fast)
    assert train.use_autocast(train.TrainConfig(), "cpu") is fast  # "auto" is the default
    assert train.use_autocast(train.TrainConfig(autocast="bf16"), "cpu") is True
    assert train.use_autocast(train.TrainConfig(autocast="none"), "cpu") is False
    seen = []
    real = torch.autocast

    def spy(*args, enabled=True, **kwargs):
        seen.append(enabled)
        return real(*args, enabled=enabled, **kwargs)

    monkeypatch.setattr(torch, "autocast", spy)
    model = torch.nn.Linear(4, 4)
    cfg = train.TrainConfig(steps=1, batch_size=1, seq_len=4, warmup=1)
    train.train(model, torch.arange(16), cfg, loss_fn=lambda m, x, y: m(x.float()).sum(), progress=False)
    assert seen == [fast]


def test_fast_bf16_answers_for_this_machine():
    assert train.fast_bf16("cpu") == torch.ops.mkldnn._is_mkldnn_bf16_supported()
    assert train.fast_bf16("meta") is False


def test_training_lowers_the_loss():
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(models.tiny_config(vocab_size=64))
    stream = torch.arange(64).repeat(50)  # a pattern a model can learn in a few steps
    cfg = train.TrainConfig(steps=60, batch_size=4, seq_len=32, lr=3e-3, warmup=5, eval_every=30, eval_tokens=256)
    log = train.train(model, stream, cfg, val_stream=stream, progress=False)
    assert log.tokens_seen == 60 * 4 * 32
    assert log.loss[-1] < 0.5 * log.loss[0]
    assert log.eval_loss[-1] < log.eval_loss[0]
    assert not model.training


@pytest.mark.slow
def test_recipe_writes_a_loadable_model(tmp_path):
    from transformers import AutoModelForCausalLM

    import llmopt

    cfg = train.TrainConfig(steps=4, batch_size=2, seq_len=32, warmup=1, eval_every=2, eval_tokens=256)
    record = train.build_bundled(tmp_path / "m", cfg, tiny=True, progress=False, ppl_tokens=2048)
    saved = json.loads((tmp_path / "m" / "training_record.json").read_text())
    assert saved["tokens_seen"] == 4 * 2 * 32 == record["tokens_seen"]
    assert saved["recipe"]["steps"] == 4 and saved["corpus"].startswith("python-")
    assert set(saved["perplexity_bf16_weights"]) == {"validation", "test"}
    assert "2,048 tokens" in saved["perplexity_note"]
    assert (tmp_path / "m" / "loss_curve.png").exists()
    assert "Llama" in (tmp_path / "m" / "README.md").read_text()
    m = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    assert next(m.parameters()).dtype == torch.bfloat16
    model, tok = llmopt.load(tmp_path / "m")
    assert len(tok) == model.config.vocab_size == 4096
