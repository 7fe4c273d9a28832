import copy

import pytest
import torch
from transformers import AutoModelForCausalLM

from llmopt.prune.structured import ffn_importance, prune_ffn, prune_heads
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


def test_structured_pruning_refuses_quantized_low_rank_and_moe_layers_before_cutting(tiny):
    """Rows and columns are cut from float nn.Linear weights: a quantized, factorised or Mixture-of-
    Experts layer is named (the first layer of each kind here) and nothing is changed."""
    from llmopt import moe
    from llmopt.lowrank import factorize
    from llmopt.quant import QuantConfig, quantize

    model = tiny[0]
    late = copy.deepcopy(model)         # only the last layer's MLP is quantized: layer 0 must stay whole
    quantize(late, QuantConfig(bits=8, skip=("lm_head", r"layers\.0\.", r"self_attn")))
    cases = [(late, prune_ffn, 0.25, r"layer 1 has QuantLinear, QuantLinear, QuantLinear"),
             (factorize(copy.deepcopy(model), "svd", ratio=0.5), prune_heads, 1, r"layer 0 has LowRankLinear"),
             (moe.upcycle(copy.deepcopy(model), num_experts=2, top_k=1), prune_ffn, 0.25,
              r"layer 0 has MoEFeedForward.*Mixture-of-Experts")]
    for m, fn, amount, why in cases:
        before = {n: t.clone() for n, t in m.state_dict().items()}
        with pytest.raises(ValueError, match=fn.__name__ + r" cuts rows and columns .*" + why):
            fn(m, amount)
        after = m.state_dict()
        assert set(after) == set(before) and all(torch.equal(after[n], t) for n, t in before.items())


def llama(**overrides):
    from transformers import LlamaForCausalLM

    from llmopt.models import tiny_config

    torch.manual_seed(0)
    return LlamaForCausalLM(tiny_config(512, **overrides)).eval()


@pytest.mark.parametrize("kv_heads, remove, calibrated", [(2, 1, False), (4, 2, True), (4, 3, False)])
def test_prune_heads_equals_zeroing_those_heads(kv_heads, remove, calibrated):
    from llmopt.prune.structured import prune_heads

    model = llama(num_attention_heads=8, num_key_value_heads=kv_heads)
    hd, rep = 64 // 8, 8 // kv_heads
    calib = ids(512, 1) if calibrated else None
    p = prune_heads(copy.deepcopy(model), remove, calibration=calib)
    assert (p.config.num_key_value_heads, p.config.num_attention_heads, p.config.head_dim) == \
        (kv_heads - remove, (kv_heads - remove) * rep, hd)
    ref = copy.deepcopy(model)
    for lp, lr in zip(calibrate.decoder_layers(p), calibrate.decoder_layers(ref)):
        assert lp.self_attn.q_proj.weight.shape == ((kv_heads - remove) * rep * hd, 64)
        assert lp.self_attn.k_proj.weight.shape == ((kv_heads - remove) * hd, 64)
        kept_kv = [int((lr.self_attn.k_proj.weight.reshape(kv_heads, hd, 64) == h).all((1, 2)).nonzero()[0])
                   for h in lp.self_attn.k_proj.weight.reshape(-1, hd, 64)]
        for g in sorted(set(range(kv_heads)) - set(kept_kv)):  # a removed group's query heads write nothing
            lr.self_attn.o_proj.weight.data[:, g * rep * hd:(g + 1) * rep * hd] = 0
    x = ids(512)
    with torch.no_grad():
        assert torch.allclose(p(x).logits, ref(x).logits, atol=1e-5)


def test_head_pruned_model_round_trips(tmp_path):
    from llmopt.prune.structured import prune_heads

    p = prune_ffn(prune_heads(llama(num_attention_heads=8, num_key_value_heads=4), 2), 0.25)
    p.save_pretrained(tmp_path / "p")
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "p").eval()
    x = ids(512)
    with torch.no_grad():
        assert torch.equal(p(x).logits, back(x).logits)
    assert back.generate(x[:1, :6], max_new_tokens=4, do_sample=False).shape == (1, 10)


def test_prune_heads_bad_input(tiny):
    from llmopt.prune.structured import prune_heads

    for bad in (2, 5, -1, 0.5):  # the tiny model has 2 key/value groups
        with pytest.raises(ValueError, match="more heads than exist"):
            prune_heads(copy.deepcopy(tiny[0]), bad)
    with pytest.raises(ValueError, match="divide hidden_size"):  # 8 query heads -> 6 of hidden 64
        prune_heads(llama(num_attention_heads=8, num_key_value_heads=4), 1)
