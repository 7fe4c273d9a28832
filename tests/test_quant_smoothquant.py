import copy

import pytest
import torch
from torch import nn
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from llmopt.bench import model_size_bytes
from llmopt.data import calibration_batches
from llmopt.eval import perplexity
from llmopt.quant import QuantConfig, quantize
from llmopt.quant import smoothquant as sq

CFG = QuantConfig(bits=8)


def int8(*shape, seed=0):
    return torch.randint(-127, 128, shape, generator=torch.Generator().manual_seed(seed), dtype=torch.int8)


def exact(a, w):
    """The integer product computed in float64, where every partial sum here is exact."""
    return (a.double() @ w.double().T).long()


# --------------------------------------------------------------------------- integer matmul

@pytest.mark.parametrize("int8_dot", [True, False], ids=["int_mm", "fp32-slices"])
@pytest.mark.parametrize("m, k, n", [(1, 256, 768), (7, 3, 5), (17, 256, 768), (33, 255, 100), (64, 768, 256),
                                     (5, 2500, 7)])
def test_int8_matmul_is_exact(m, k, n, int8_dot, monkeypatch):
    monkeypatch.setattr(sq, "cpu_has_int8_dot", lambda: int8_dot)  # both CPU paths, whatever this CPU has
    a, w = int8(m, k, seed=1), int8(n, k, seed=2)
    out = sq.int8_matmul(a, w)
    assert out.dtype == torch.int32 and out.shape == (m, n)
    assert torch.equal(out.long(), exact(a, w))
    assert torch.equal(sq.int8_matmul_reference(a, w).long(), exact(a, w))


@pytest.mark.parametrize("k", [1024, 1041, 4099])
def test_fp32_slices_stay_exact_at_the_largest_sums(k):
    # 127 * 127 = 16129 is odd: 1041 of them sum past 2^24 to an odd number, which float32 rounds;
    # 1024 of -128 * -128 sum to exactly 2^24. Slices of 1024 columns keep every partial sum exact.
    a = torch.stack([torch.full((k,), 127), torch.full((k,), -128)]).to(torch.int8)
    w = torch.stack([torch.full((k,), 127), torch.full((k,), -128), torch.arange(k) % 255 - 127]).to(torch.int8)
    assert torch.equal(sq.int8_matmul_reference(a, w).long(), exact(a, w))


def test_int8_matmul_extremes_accumulate_in_int32():
    a, w = torch.full((3, 4096), 127, dtype=torch.int8), torch.full((2, 4096), -127, dtype=torch.int8)
    assert torch.all(sq.int8_matmul(a, w) == -127 * 127 * 4096)  # needs more than 16 bits, fits in 32


@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 16, 17, 64])
def test_int8_matmul_cuda_small_and_large_batches(m):
    a, w = int8(m, 256, seed=3).cuda(), int8(72, 256, seed=4).cuda()
    assert torch.equal(sq.int8_matmul(a, w).long().cpu(), exact(a.cpu(), w.cpu()))


# --------------------------------------------------------------------------- W8A8Linear

def test_per_token_codes_and_scales():
    x = torch.randn(5, 64)
    x[2] = 0  # an all-zero token must not give NaN
    q, s = sq.quantize_per_token(x)
    assert q.dtype == torch.int8 and s.shape == (5, 1)
    assert torch.equal(q[2], torch.zeros(64, dtype=torch.int8))
    assert torch.all(q.abs().amax(dim=1)[[0, 1, 3, 4]] == 127)  # each row's absmax maps to 127
    assert torch.all((q * s - x).abs() <= s / 2 + 1e-6)


def test_forward_is_the_integer_product_rescaled():
    torch.manual_seed(0)
    lin = nn.Linear(96, 40)
    m = sq.W8A8Linear.from_linear(lin, CFG)
    x = torch.randn(2, 9, 96)
    x2 = x.reshape(-1, 96)
    sx = x2.abs().amax(dim=1, keepdim=True) / 127
    qx = torch.round(x2 / sx).to(torch.int8)
    assert torch.equal(m.qweight, torch.round(lin.weight / m.weight_scale[:, None]).to(torch.int8))
    ref = exact(qx, m.qweight).double() * sx.double() * m.weight_scale.double() + lin.bias.double()
    torch.testing.assert_close(m(x).double(), ref.reshape(2, 9, 40), rtol=1e-6, atol=1e-6)


def test_error_within_the_quantization_step_bound():
    """x_hat w_hat - x w = e_x w + x e_w + e_x e_w with |e_x| <= s_x/2, |e_w| <= s_w/2, per term."""
    torch.manual_seed(1)
    lin = nn.Linear(128, 64)
    m = sq.W8A8Linear.from_linear(lin, CFG)
    x = torch.randn(32, 128) * torch.rand(1, 128) * 4
    sx = x.abs().amax(dim=1, keepdim=True) / 127
    sw = lin.weight.abs().amax(dim=1) / 127
    torch.testing.assert_close(m.weight_scale, sw)
    with torch.no_grad():
        w_l1, x_l1 = lin.weight.abs().sum(dim=1), x.abs().sum(dim=1, keepdim=True)
        bound = sx / 2 * w_l1 + x_l1 * sw / 2 + 128 * sx * sw / 4  # (tokens, out) by broadcasting
        err = (m(x) - lin(x)).abs()
        assert torch.all(err <= bound + 1e-5)
        assert err.max() > 0  # it is quantized, not a float pass-through
        assert err.max() < 0.05 * lin(x).abs().max()


def test_empty_skeleton_loads_the_state_dict():
    lin = nn.Linear(64, 24, bias=True)
    m = sq.W8A8Linear.from_linear(lin, CFG)
    empty = sq.W8A8Linear(64, 24, CFG, bias=True)
    assert {k: (v.dtype, v.shape) for k, v in empty.state_dict().items()} == \
        {k: (v.dtype, v.shape) for k, v in m.state_dict().items()}
    assert m.qweight.dtype == torch.int8 and set(m.state_dict()) == {"qweight", "weight_scale", "bias"}
    empty.load_state_dict(m.state_dict())
    x = torch.randn(3, 64)
    assert torch.equal(empty(x), m(x))
    torch.testing.assert_close(m.dequantized_weight(), lin.weight, atol=lin.weight.abs().max().item() / 254,
                               rtol=0)
    assert sq.W8A8Linear.quantized and "int8" in repr(m)
    assert sq.W8A8Linear.from_linear(nn.Linear(64, 8, bias=False), CFG).bias is None


# --------------------------------------------------------------------------- smoothing

def norm_and_linears(d=128, outliers=(3, 40, 77), factor=100.0, seed=0):
    torch.manual_seed(seed)
    norm = LlamaRMSNorm(d)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
        norm.weight[list(outliers)] *= factor  # outliers come from the norm's gain, as in LLMs
    return norm, [nn.Linear(d, 96, bias=False), nn.Linear(d, 48, bias=False)]


def test_smoothing_scales_formula_and_its_ends():
    norm, lins = norm_and_linears()
    h = torch.randn(256, 128)
    x = norm(h).detach()
    amax = x.abs().amax(dim=0)
    w_amax = torch.cat([lin.weight for lin in lins]).abs().amax(dim=0).detach()
    torch.testing.assert_close(sq.smoothing_scales(amax, [lin.weight for lin in lins], 0.5),
                               (amax / w_amax).sqrt())
    # alpha=1: every activation channel ends with absmax 1; alpha=0: every weight column does
    s1 = sq.smoothing_scales(amax, [lin.weight for lin in lins], 1.0)
    torch.testing.assert_close((x / s1).abs().amax(dim=0), torch.ones(128))
    s0 = sq.smoothing_scales(amax, [lin.weight for lin in lins], 0.0)
    torch.testing.assert_close((torch.cat([lin.weight for lin in lins]) * s0).abs().amax(dim=0).detach(),
                               torch.ones(128))


def test_smooth_keeps_the_product_and_flattens_the_outliers():
    norm, lins = norm_and_linears()
    h = torch.randn(256, 128)
    with torch.no_grad():
        x = norm(h)
        before = [lin(x) for lin in lins]
        amax = x.abs().amax(dim=0)
        s = sq.smooth(norm, lins, amax, alpha=0.5)
        x2 = norm(h)
        after = [lin(x2) for lin in lins]
    for b, a in zip(before, after, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    ratio = lambda t: (t.abs().amax(0).max() / t.abs().amax(0).median()).item()  # noqa: E731
    assert ratio(x2) < ratio(x) / 5
    assert s.shape == (128,) and torch.all(s > 0)


def test_smoothing_rescues_w8a8_from_outlier_channels():
    norm, lins = norm_and_linears()
    h = torch.randn(512, 128)
    with torch.no_grad():
        x = norm(h)
        ref = lins[0](x)
        plain_err = (sq.W8A8Linear.from_linear(lins[0], CFG)(x) - ref).pow(2).mean()
        norm2, lins2 = copy.deepcopy(norm), copy.deepcopy(lins)
        sq.smooth(norm2, lins2, x.abs().amax(dim=0), alpha=0.5)
        smooth_err = (sq.W8A8Linear.from_linear(lins2[0], CFG)(norm2(h)) - ref).pow(2).mean()
    assert smooth_err < 0.1 * plain_err, (smooth_err.item(), plain_err.item())


# --------------------------------------------------------------------------- whole models

@pytest.fixture(scope="module")
def calib(bundled):
    return calibration_batches(bundled[1], n_samples=8, seq_len=128)


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def test_smoothing_alone_leaves_the_bundled_model_unchanged(bundled, calib):
    model = copy.deepcopy(bundled[0])
    before = logits(model, calib[:2, :64])
    w0 = model.model.layers[0].input_layernorm.weight.clone()
    scales = sq.smooth_model(model, calib, alpha=0.5)
    assert len(scales) == len(model.model.layers) and set(scales[0]) == {"input_layernorm",
                                                                         "post_attention_layernorm"}
    assert not torch.allclose(model.model.layers[0].input_layernorm.weight, w0)  # it did change the weights
    torch.testing.assert_close(logits(model, calib[:2, :64]), before, rtol=1e-4, atol=2e-4)


def test_smoothquant_bundled_model_generates_and_keeps_perplexity(bundled, calib):
    model, tok = bundled
    q = quantize(copy.deepcopy(model), QuantConfig(method="smoothquant", alpha=0.5), calib)
    layer = q.model.layers[0]
    assert all(isinstance(m, sq.W8A8Linear) for m in (layer.self_attn.q_proj, layer.mlp.down_proj))
    assert type(q.lm_head) is nn.Linear  # skipped by the default cfg.skip
    assert model_size_bytes(q) < 0.5 * model_size_bytes(model)
    ids = tok("def main(", return_tensors="pt").input_ids
    with torch.no_grad():
        ref = model.generate(ids, max_new_tokens=12, do_sample=False)
        out = q.generate(ids, max_new_tokens=12, do_sample=False)
    assert out.shape == ref.shape and (out[0, -12:] == ref[0, -12:]).float().mean() >= 0.75
    p_float = perplexity(model, tokenizer=tok, max_tokens=4000, progress=False)
    p_q = perplexity(q, tokenizer=tok, max_tokens=4000, progress=False)
    assert p_q < 1.02 * p_float, (p_q, p_float)


def test_planted_outliers_hurt_plain_w8a8_and_smoothquant_recovers(bundled, calib):
    model = copy.deepcopy(bundled[0])
    ids = calib[:2, :96]
    ref = logits(model, ids)
    before = sq.activation_outliers(model, calib[:2])
    sq.plant_outliers(model, n_channels=4, factor=100.0)
    torch.testing.assert_close(logits(model, ids), ref, rtol=1e-4, atol=2e-4)  # the same function
    after = sq.activation_outliers(model, calib[:2])
    name = "self_attn.q_proj"
    assert after[0][name] > 10 * before[0][name]
    plain = sq.w8a8_model(copy.deepcopy(model))
    smoothed = quantize(copy.deepcopy(model), QuantConfig(method="smoothquant", alpha=0.5), calib)
    err = lambda m: (logits(m, ids) - ref).pow(2).mean().item()  # noqa: E731
    assert err(smoothed) < 0.2 * err(plain), (err(smoothed), err(plain))


def test_skip_and_lm_head_on_the_tiny_model(tiny):
    model, tok = tiny
    calib = calibration_batches(tok, n_samples=4, seq_len=32)
    q = quantize(copy.deepcopy(model), QuantConfig(method="smoothquant", skip=("q_proj",)), calib)
    assert type(q.model.layers[0].self_attn.q_proj) is nn.Linear  # skipped, yet smoothed with k/v
    assert isinstance(q.lm_head, sq.W8A8Linear) and isinstance(q.model.layers[1].self_attn.k_proj, sq.W8A8Linear)
    ref, out = logits(model, calib), logits(q, calib)
    assert (out - ref).pow(2).mean() < 0.01 * ref.pow(2).mean()


# --------------------------------------------------------------------------- bad input

def test_bad_input(tiny):
    model = tiny[0]
    cfg = QuantConfig(method="smoothquant")
    for bad, match in [(None, "calibration"), (torch.empty(0, 16, dtype=torch.long), "empty"),
                       (torch.arange(16), "2-D")]:
        with pytest.raises(ValueError, match=match):
            quantize(copy.deepcopy(model), cfg, bad)
    with pytest.raises(ValueError, match="alpha"):
        QuantConfig(method="smoothquant", alpha=1.5)
    norm, lins = norm_and_linears()
    with pytest.raises(ValueError, match="alpha"):
        sq.smooth(norm, lins, torch.ones(128), alpha=-0.1)
    with pytest.raises(ValueError, match="act_absmax"):
        sq.smooth(norm, lins, torch.ones(64))
    with pytest.raises(ValueError, match="in_features"):
        sq.smooth(norm, [nn.Linear(64, 8)], torch.ones(128))
    with pytest.raises(ValueError, match="group_size"):
        sq.W8A8Linear(64, 8, QuantConfig(bits=8, group_size=32))
    with pytest.raises(ValueError, match="int8"):
        sq.int8_matmul(torch.zeros(2, 4), torch.zeros(3, 4, dtype=torch.int8))
    with pytest.raises(ValueError, match="already quantized"):
        sq.w8a8_model(sq.w8a8_model(copy.deepcopy(model)))
    with pytest.raises(ValueError, match="factor"):
        sq.plant_outliers(copy.deepcopy(model), factor=0)
