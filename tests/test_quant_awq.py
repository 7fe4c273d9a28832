import copy

import pytest
import torch

from llmopt.quant import QuantConfig, QuantLinear, fake_quantize, quantize
from llmopt.quant.awq import (
    apply_scale,
    awq_model,
    awq_quantize,
    clip_weight,
    scale_groups,
    search_scale,
    weight_absmean,
)
from llmopt.quant.primitives import dequantize


def loud_inputs(n, d, seed):
    """Samples (by `seed`) of one distribution: correlated channels, a few of them loud,
    as the inputs of LLM linears are."""
    mix = torch.randn(d, d, generator=torch.Generator().manual_seed(12345)) / d**0.5 + torch.eye(d)
    x = torch.randn(n, d, generator=torch.Generator().manual_seed(seed)) @ mix
    x[:, :8] *= 10
    return x


def out_err(x, w, w_eff):
    return (x @ (w_eff - w).T).pow(2).mean().item()


@pytest.mark.parametrize("bits, group, symmetric", [(4, 128, False), (4, 64, True), (3, 128, False),
                                                    (4, None, False)])
def test_awq_beats_rtn_on_held_out_inputs(bits, group, symmetric):
    w = torch.randn(64, 256, generator=torch.Generator().manual_seed(0))
    calib, held_out = loud_inputs(2048, 256, 1), loud_inputs(1024, 256, 2)
    gran = "channel" if group is None else group
    rtn = out_err(held_out, w, fake_quantize(w, bits, gran, symmetric))
    qt, s = awq_quantize(w, calib, bits, group, symmetric, clip=False)
    scaled = out_err(held_out, w, dequantize(qt) / s)  # what (x / s) @ Q(w s)^T computes
    qt, s = awq_quantize(w, calib, bits, group, symmetric)
    full = out_err(held_out, w, dequantize(qt) / s)
    assert qt.bits == bits and qt.granularity == gran and (qt.zero is None) == symmetric
    assert scaled < 0.8 * rtn, (scaled, rtn)
    assert full < scaled, (full, scaled)


def test_alpha_zero_is_rtn_and_search_keeps_the_best():
    w, x = torch.randn(32, 128), loud_inputs(512, 128, 0)
    H = x.T @ x / len(x)
    loss = lambda wq: ((wq - w) @ H * (wq - w)).sum().item()  # noqa: E731
    s, alpha, losses = search_scale(w, x.abs().mean(0), loss, 4, 32, True, n_grid=10)
    assert len(losses) == 10 and losses[0] == pytest.approx(loss(fake_quantize(w, 4, 32, True)))
    assert loss(fake_quantize(w * s, 4, 32, True) / s) == pytest.approx(min(losses))
    assert alpha == losses.index(min(losses)) / 10 and alpha > 0  # loud channels: scaling pays
    assert s.max() * s.min() == pytest.approx(1, rel=1e-4)
    s, alpha, _ = search_scale(w, torch.ones(128), loss, 4, 32, True)  # flat activations: nothing to do
    assert torch.equal(s, torch.ones(128))


def test_weight_absmean_by_hand():
    w = torch.tensor([[1.0, -2.0, 4.0, 0.0], [3.0, 3.0, -1.0, 2.0]])
    # groups of 2: |w| / its group's max, then the mean over rows
    want = torch.tensor([(0.5 + 1) / 2, (1 + 1) / 2, (1 + 0.5) / 2, (0 + 1) / 2])
    assert torch.allclose(weight_absmean(w, 2), want)
    assert torch.allclose(weight_absmean(w, None), torch.tensor([(0.25 + 1) / 2, (0.5 + 1) / 2, (1 + 1 / 3) / 2,
                                                                 (0 + 2 / 3) / 2]))


def test_duo_scaling_keeps_rtn_as_a_candidate():
    w, x = torch.randn(32, 128), loud_inputs(512, 128, 0)
    H = x.T @ x / len(x)
    loss = lambda wq: ((wq - w) @ H * (wq - w)).sum().item()  # noqa: E731
    s, alpha, losses = search_scale(w, x.abs().mean(0), loss, 4, 32, True, n_grid=10, duo=True)
    assert len(losses) == 11 and losses[0] == pytest.approx(loss(fake_quantize(w, 4, 32, True)))
    assert loss(fake_quantize(w * s, 4, 32, True) / s) == pytest.approx(min(losses))
    assert min(losses) < losses[0]
    assert alpha == (losses.index(min(losses)) - 1) / 10
    wm = weight_absmean(w, 32)
    s0 = 1 / (wm + 1e-4)  # alpha = 0 under duo scaling: the weights' statistic alone
    assert losses[1] == pytest.approx(loss(fake_quantize(w * s0, 4, 32, True) / s0), rel=1e-4)


@pytest.mark.parametrize("symmetric", [True, False])
def test_clipping_never_worse_per_group(symmetric):
    w, x = torch.randn(16, 128), loud_inputs(512, 128, 3)
    w[:, 5] *= 6  # an outlier weight per row, for clipping to trade against
    H = x.T @ x / len(x)
    c = clip_weight(w, H, 3, 64, symmetric)

    def group_err(w_eff):
        d = (w_eff - w).reshape(16, 2, 64)
        return torch.stack([torch.einsum("rk,kl,rl->r", d[:, g], H[g * 64:(g + 1) * 64, g * 64:(g + 1) * 64],
                                         d[:, g]) for g in range(2)], 1)

    clipped, rtn = group_err(fake_quantize(c, 3, 64, symmetric)), group_err(fake_quantize(w, 3, 64, symmetric))
    assert torch.all(clipped <= rtn * (1 + 1e-5)) and clipped.sum() < 0.95 * rtn.sum()
    assert torch.all(c.abs() <= w.abs() + 1e-6) and not torch.equal(c, w)
    assert torch.equal(clip_weight(w, H, 3, 64, symmetric, max_shrink=0.0), w)


def mha_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=4)
    return LlamaForCausalLM(cfg).eval()


@pytest.mark.parametrize("which", ["bundled", "mha"])
def test_folding_scales_keeps_the_float_model(which, bundled):
    model = bundled[0] if which == "bundled" else mha_llama()
    folded = copy.deepcopy(model)
    g = torch.Generator().manual_seed(0)
    for layer in folded.model.layers:
        groups = scale_groups(layer)
        assert len(groups) == (3 if which == "bundled" else 4)  # GQA: no v_proj -> o_proj scale
        for group in groups:
            n = layer.get_submodule(group.consumers[0]).in_features
            apply_scale(layer, group, torch.rand(n, generator=g) * 4 + 0.1)
    ids = torch.randint(0, 128, (2, 48), generator=g)
    with torch.no_grad():
        ref, out = model(ids).logits, folded(ids).logits
    assert not torch.equal(folded.model.layers[0].input_layernorm.weight, model.model.layers[0].input_layernorm.weight)
    assert torch.allclose(out, ref, atol=1e-4, rtol=1e-4), (out - ref).abs().max()


def test_one_point_grid_without_clipping_is_rtn():
    """alpha = 0 only (the paper's scales, no duo), no clipping: s = 1 everywhere, so AWQ's
    codes are RTN's, bit for bit, on a model whose v_proj -> o_proj scale is folded too."""
    model = mha_llama()
    calib = torch.randint(0, 128, (4, 32), generator=torch.Generator().manual_seed(1))
    cfg = QuantConfig(bits=4, group_size=32, symmetric=False, method="awq")
    a = awq_model(copy.deepcopy(model), calib, cfg, n_grid=1, clip=False, duo=False)
    b = quantize(copy.deepcopy(model), QuantConfig(bits=4, group_size=32, symmetric=False))
    qa, qb = dict(a.named_modules()), dict(b.named_modules())
    names = [n for n, m in qb.items() if isinstance(m, QuantLinear)]
    assert len(names) == 14 and all(isinstance(qa[n], QuantLinear) for n in names)
    for n in names:
        assert torch.equal(qa[n].qweight, qb[n].qweight) and torch.equal(qa[n].scales, qb[n].scales)


def test_awq_model_on_mha_lowers_output_error():
    model = mha_llama()
    gen = torch.Generator().manual_seed(2)
    calib, held_out = torch.randint(0, 128, (16, 64), generator=gen), torch.randint(0, 128, (4, 64), generator=gen)
    cfg = QuantConfig(bits=3, group_size=32, symmetric=False, method="awq")
    awq = quantize(copy.deepcopy(model), cfg, calib)
    rtn = quantize(copy.deepcopy(model), QuantConfig(bits=3, group_size=32, symmetric=False))
    assert isinstance(awq.model.layers[1].self_attn.o_proj, QuantLinear)
    assert isinstance(awq.lm_head, torch.nn.Linear) and not isinstance(awq.lm_head, QuantLinear)  # skipped
    with torch.no_grad():
        ref = model(held_out).logits
        err = lambda m: (m(held_out).logits - ref).pow(2).mean().item()  # noqa: E731
        assert err(awq) < err(rtn), (err(awq), err(rtn))


def with_outlier_channels(model, n=4, factor=16.0):
    """The same function with a few loud input channels, as real LLMs have and the bundled
    model lacks: each norm's weight x factor on `n` channels, the columns that read them
    / factor (a power of two: the float model is unchanged bit for bit)."""
    model = copy.deepcopy(model)
    for layer in model.model.layers:
        for group in scale_groups(layer):
            if group.prev.endswith("layernorm"):
                d = layer.get_submodule(group.consumers[0]).in_features
                s = torch.ones(d)
                s[torch.randperm(d, generator=torch.Generator().manual_seed(0))[:n]] = 1 / factor
                apply_scale(layer, group, s)
    return model


def test_awq_model_protects_outlier_channels(bundled):
    import llmopt

    model, tok = bundled
    loud = with_outlier_channels(model)
    calib = llmopt.data.calibration_batches(tok, n_samples=8, seq_len=128)
    held_out = llmopt.data.calibration_batches(tok, n_samples=2, seq_len=128, seed=1)
    kw = dict(bits=4, group_size=128, symmetric=False)
    awq = awq_model(copy.deepcopy(loud), calib, QuantConfig(**kw, method="awq"), n_grid=10, search_batches=1)
    rtn = quantize(copy.deepcopy(loud), QuantConfig(**kw))
    with torch.no_grad():
        ref = model(held_out).logits
        assert torch.equal(loud(held_out).logits, ref)
        err = lambda m: (m(held_out).logits - ref).pow(2).mean().item()  # noqa: E731
        assert err(awq) < 0.5 * err(rtn), (err(awq), err(rtn))
    ids = tok("def ", return_tensors="pt").input_ids
    out = awq.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, min_new_tokens=8,
                       do_sample=False, pad_token_id=0)
    assert out.shape == (1, ids.shape[1] + 8) and torch.equal(out[:, : ids.shape[1]], ids)


@pytest.mark.slow
@pytest.mark.parametrize("outliers, bits", [(True, 4), (False, 3)])
def test_awq_perplexity_below_rtn_on_the_bundled_model(bundled, outliers, bits):
    import llmopt
    from llmopt.eval import perplexity

    model, tok = bundled
    model = with_outlier_channels(model) if outliers else model
    calib = llmopt.data.calibration_batches(tok, n_samples=32, seq_len=128)  # AWQ beats RTN by 1.1% and 0.8% here
    kw = dict(bits=bits, group_size=128, symmetric=False)
    awq = quantize(copy.deepcopy(model), QuantConfig(**kw, method="awq"), calib)
    rtn = quantize(copy.deepcopy(model), QuantConfig(**kw))
    ppl = lambda m: perplexity(m, tokenizer=tok, split="test", max_tokens=20000, progress=False)  # noqa: E731
    assert ppl(awq) < ppl(rtn)


def test_awq_bad_input(tiny):
    w = torch.randn(8, 64)
    with pytest.raises(ValueError, match="x must be"):
        awq_quantize(w, torch.randn(10, 32))
    with pytest.raises(ValueError, match="x must be"):
        awq_quantize(w, torch.empty(0, 64))
    with pytest.raises(ValueError, match="n_grid"):
        awq_quantize(w, torch.randn(10, 64), group_size=32, n_grid=0)
    with pytest.raises(ValueError, match="bits"):
        awq_quantize(w, torch.randn(10, 64), bits=5)
    with pytest.raises(ValueError, match="does not divide"):
        awq_quantize(w, torch.randn(10, 64), group_size=48)
    with pytest.raises(ValueError, match="absmean"):
        search_scale(w, torch.ones(32), lambda wq: 0.0, group_size=32)
    with pytest.raises(ValueError, match="H must be"):
        clip_weight(w, torch.eye(32), group_size=32)
    with pytest.raises(ValueError, match="max_shrink"):
        clip_weight(w, torch.eye(64), group_size=32, max_shrink=1.0)
    cfg = QuantConfig(bits=4, group_size=32, method="awq")
    with pytest.raises(ValueError, match="calibration"):
        quantize(copy.deepcopy(tiny[0]), cfg)
    with pytest.raises(ValueError, match="search_batches"):
        awq_model(copy.deepcopy(tiny[0]), torch.zeros(2, 8, dtype=torch.long), cfg, search_batches=0)


def test_unknown_architecture_and_unfoldable_norm():
    from transformers import OPTConfig, OPTForCausalLM

    opt = OPTForCausalLM(OPTConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, ffn_dim=64,
                                   num_attention_heads=2, word_embed_proj_dim=32, max_position_embeddings=64))
    before = copy.deepcopy(opt.state_dict())
    with pytest.raises(ValueError, match="Llama-family"):
        quantize(opt, QuantConfig(bits=4, group_size=32, method="awq"), torch.zeros(1, 8, dtype=torch.long))
    assert all(torch.equal(v, opt.state_dict()[k]) for k, v in before.items())  # nothing changed

    class OnePlusNorm(torch.nn.Module):  # Gemma's style: x * (1 + w) does not scale with w
        def __init__(self, d):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.zeros(d))

        def forward(self, x):
            return x * (1 + self.weight)

    layer = copy.deepcopy(mha_llama().model.layers[0])
    layer.input_layernorm = OnePlusNorm(64)
    with pytest.raises(ValueError, match="cannot fold"):
        apply_scale(layer, scale_groups(layer)[0], torch.rand(64) + 0.5)
    assert torch.equal(layer.input_layernorm.weight, torch.zeros(64))


def test_folding_into_a_layernorm_with_bias():
    from llmopt.quant.awq import ScaleGroup

    layer = torch.nn.Module()
    layer.norm, layer.fc = torch.nn.LayerNorm(16), torch.nn.Linear(16, 4)
    with torch.no_grad():
        layer.norm.weight.uniform_(0.5, 2)
        layer.norm.bias.normal_()
    x = torch.randn(3, 16)
    with torch.no_grad():
        ref = layer.fc(layer.norm(x))
        apply_scale(layer, ScaleGroup("norm", ("fc",), "fc"), torch.rand(16) + 0.5)
        assert torch.allclose(layer.fc(layer.norm(x)), ref, atol=1e-5)
