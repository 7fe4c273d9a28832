import copy

import pytest
import torch
from transformers import AutoModelForCausalLM

from llmopt.prune.structured import ffn_importance, prune_ffn
from llmopt.quant import calibrate


def ids(vocab, seed=0):
    return torch.randint(0, vocab, (2, 24), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("calibrated", [False, True])
def test_prune_ffn_equals_zeroing_those_channels(tiny, calibrated):
    model, _ = tiny
    calib = ids(model.config.vocab_size, 1) if calibrated else None
    size = model.config.intermediate_size
    p = prune_ffn(copy.deepcopy(model), 0.25, calibration=calib)
    keep = size - round(0.25 * size)
    assert p.config.intermediate_size == keep
    ref = copy.deepcopy(model)
    for lp, lr in zip(calibrate.decoder_layers(p), calibrate.decoder_layers(ref)):
        assert lp.mlp.gate_proj.weight.shape == (keep, model.config.hidden_size)
        assert lp.mlp.down_proj.weight.shape == (model.config.hidden_size, keep)
        # the kept channels are rows of the original: zero every other row of up_proj in the reference
        kept = [int((lr.mlp.up_proj.weight == row).all(1).nonzero()[0]) for row in lp.mlp.up_proj.weight]
        gone = sorted(set(range(size)) - set(kept))
        assert len(gone) == size - keep and kept == sorted(kept)
        lr.mlp.up_proj.weight.data[gone] = 0
    x = ids(model.config.vocab_size)
    with torch.no_grad():
        assert torch.allclose(p(x).logits, ref(x).logits, atol=1e-5)


def test_importance_keeps_the_loudest_channels(tiny):
    mlp = copy.deepcopy(calibrate.decoder_layers(tiny[0])[0].mlp)
    mlp.down_proj.weight.data[:, 7] *= 100  # channel 7 now writes 100x more
    mlp.up_proj.weight.data[3] = 0          # channel 3 never fires
    score = ffn_importance(mlp)
    assert score.argmax() == 7 and score.argmin() == 3
    activity = torch.ones(mlp.down_proj.in_features)
    activity[7] = 0                         # ...unless the calibration data says it never fires
    assert ffn_importance(mlp, activity)[7] == 0


def test_pruned_model_round_trips_and_generates(tiny, tmp_path):
    p = prune_ffn(copy.deepcopy(tiny[0]), 0.5)
    p.save_pretrained(tmp_path / "p")
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "p").eval()
    x = ids(p.config.vocab_size)
    with torch.no_grad():
        assert torch.equal(p(x).logits, back(x).logits)
    out = back.generate(x[:1, :8], max_new_tokens=5, do_sample=False)
    assert out.shape == (1, 13)
    assert sum(t.numel() for t in back.parameters()) < sum(t.numel() for t in tiny[0].parameters())


def test_prune_ffn_bad_ratio(tiny):
    for bad in (1.0, -0.2, "half"):
        with pytest.raises(ValueError, match="ratio must be"):
            prune_ffn(copy.deepcopy(tiny[0]), bad)
    with pytest.raises(ValueError, match="every one"):
        prune_ffn(copy.deepcopy(tiny[0]), 0.999)
