import copy

import pytest
import torch
from torch import nn

from llmopt import bench, data
from llmopt.quant import QuantConfig, QuantLinear, fake_quantize, quantize
from llmopt.quant.primitives import _groups, from_codes, scale_zero, to_codes
from llmopt.quant.qat import (
    FakeQuantLinear,
    convert,
    distillation_loss,
    fake_quant,
    grad_scale,
    prepare_qat,
    qat_finetune,
    ste_round,
)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """These are tiny matmuls: on a busy 2-core machine a second OpenMP thread only spins."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


FORMATS = [(2, 64, True), (2, 32, False), (3, 32, True), (4, None, False), (8, 16, True)]


def test_ste_round_rounds_forward_and_passes_gradient():
    x = torch.cat([torch.randn(1000) * 7, torch.tensor([0.5, 1.5, 2.5, -0.5, -1.5, 0.49999997, 1e9])])
    x.requires_grad_(True)
    y = ste_round(x)
    assert torch.equal(y, torch.round(x.detach()))  # bit for bit, ties to even like torch.round
    (y * torch.arange(len(x))).sum().backward()
    assert torch.equal(x.grad, torch.arange(len(x), dtype=torch.float32))  # d round / dx := 1


def test_fake_quant_values_and_lsq_gradients():
    torch.manual_seed(0)
    w = (torch.randn(8, 4, 16) * 2).requires_grad_(True)
    s, _ = scale_zero(w.detach(), 3, True)
    s = (s * 0.7).requires_grad_(True)  # a small scale: some weights fall outside the range and clamp
    out = fake_quant(w, s, None, 3)
    assert torch.equal(out, from_codes(to_codes(w.detach(), s.detach(), None, 3), s.detach(), None))
    out.sum().backward()
    v = w.detach() / s.detach()
    inside = (v.round() >= -3) & (v.round() <= 3)
    assert torch.equal(w.grad, inside.float())  # STE inside, nothing where the clamp bites
    # LSQ: d/ds of s * clamp(round(w/s)) is round(w/s) - w/s inside, the clamp bound outside
    want = torch.where(inside, v.round() - v, v.round().clamp(-3, 3)).sum(-1, keepdim=True)
    assert torch.allclose(s.grad, want, atol=1e-4)
    assert not inside.all()


@pytest.mark.parametrize("bits, group, symmetric", FORMATS)
def test_fake_quant_linear_matches_fake_quantize(bits, group, symmetric):
    torch.manual_seed(0)
    lin = nn.Linear(128, 48, bias=True)
    cfg = QuantConfig(bits=bits, group_size=group, symmetric=symmetric)
    fq = FakeQuantLinear.from_linear(lin, cfg)
    gran = cfg.granularity
    # the exact reference: RTN codes under float16-rounded scales (what QuantLinear stores)
    g = _groups(lin.weight.detach(), gran)
    s, z = scale_zero(g, bits, symmetric)
    s = s.half().float()
    ref = from_codes(to_codes(g, s, z, bits), s, z).reshape(lin.weight.shape)
    x = torch.randn(5, 128)
    with torch.no_grad():
        assert torch.equal(fq.fake_weight(), ref)
        assert torch.equal(fq(x), nn.functional.linear(x, ref, lin.bias))
        # and RTN's fake_quantize up to those float16 scales (relative error < 2^-11), but for
        # the odd weight so close to a rounding boundary that the scale's rounding moves it a step
        loose = fake_quantize(lin.weight.detach(), bits, gran, symmetric)
        diff, fp16 = (fq.fake_weight() - loose).abs(), 1e-3 * loose.abs() + 1e-7
        step = s.expand_as(g).reshape(lin.weight.shape)
        assert (diff > fp16).float().mean() < 0.05 and (diff <= 1.01 * step + fp16).all()
        assert not torch.allclose(fq(x), lin(x), atol=1e-3)  # it really is quantized


@pytest.mark.parametrize("symmetric", [True, False])
def test_lsq_scales_get_scaled_gradients_and_weights_get_ste(symmetric):
    torch.manual_seed(0)
    lin = nn.Linear(64, 16, bias=False)
    cfg = QuantConfig(bits=2, group_size=32, symmetric=symmetric)
    fq = FakeQuantLinear.from_linear(lin, cfg, learn_scales=True)
    plain = FakeQuantLinear.from_linear(lin, cfg)
    x = torch.randn(10, 64)
    with torch.no_grad():  # learned scales start where absmax puts them
        assert torch.equal(fq(x), plain(x))
    fq(x).pow(2).sum().backward()
    assert fq.scale.grad is not None and fq.scale.grad.abs().sum() > 0
    assert torch.isfinite(fq.scale.grad).all() and fq.weight.grad.abs().sum() > 0
    # the gradient is LSQ's, scaled by 1/sqrt(n * qmax): compare with an unscaled autograd run
    s = fq.scale.detach().clone().requires_grad_(True)
    sz = s.half().float()[..., None]
    z = None if fq.zero is None else fq.zero[..., None]
    w_q = fake_quant(_groups(fq.weight.detach(), 32), s[..., None] + (sz - s[..., None]).detach(), z, 2)
    nn.functional.linear(x, w_q.reshape(16, 64)).pow(2).sum().backward()
    qmax = 1 if symmetric else 3
    assert fq.grad_factor == pytest.approx(1 / (32 * qmax) ** 0.5)
    assert torch.allclose(fq.scale.grad, s.grad * fq.grad_factor, rtol=1e-4, atol=1e-6)


def test_grad_scale_keeps_the_value_and_scales_the_gradient():
    s = (torch.rand(50) * 3).requires_grad_(True)
    y = grad_scale(s, 0.37)
    assert torch.equal(y, s.detach())  # the value untouched, to the bit
    y.sum().backward()
    assert torch.allclose(s.grad, torch.full_like(s, 0.37))


def perturb(model, seed=0):
    """Move weights and learned scales off their RTN start, as training would."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, FakeQuantLinear):
                m.weight.add_(torch.randn(m.weight.shape, generator=g) * m.weight.std() * 0.3)
                if m.scale is not None:
                    m.scale.mul_(1 + 0.2 * torch.rand(m.scale.shape, generator=g) - 0.1)


@pytest.mark.parametrize("bits, group, symmetric", FORMATS)
@pytest.mark.parametrize("learn_scales", [False, True])
def test_convert_gives_real_bits_that_compute_exactly_the_fake_model(tiny, bits, group, symmetric, learn_scales):
    model, _ = tiny
    cfg = QuantConfig(bits=bits, group_size=group, symmetric=symmetric)
    fake = prepare_qat(copy.deepcopy(model), cfg, learn_scales=learn_scales)
    perturb(fake)
    ids = torch.randint(1, 4000, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = fake(ids).logits
        real = convert(fake)
        got = real(ids).logits
    assert torch.equal(got, want)
    assert not any(isinstance(m, FakeQuantLinear) for m in real.modules())
    qls = [m for m in real.modules() if isinstance(m, QuantLinear)]
    assert len(qls) == 7 * model.config.num_hidden_layers
    assert all(m.scales.dtype == torch.float16 for m in qls)
    if bits < 8:
        assert bench.model_size_bytes(real) < bench.model_size_bytes(model)


def test_state_dict_round_trips_into_an_empty_skeleton():
    torch.manual_seed(0)
    lin = nn.Linear(64, 8, bias=True)
    cfg = QuantConfig(bits=3, group_size=32, symmetric=False)
    fq = FakeQuantLinear.from_linear(lin, cfg, learn_scales=True)
    empty = FakeQuantLinear(64, 8, cfg, bias=True, learn_scales=True)
    empty.load_state_dict(fq.state_dict())
    x = torch.randn(3, 64)
    with torch.no_grad():
        assert torch.equal(empty(x), fq(x))
    assert set(fq.state_dict()) == {"weight", "bias", "scale", "zero"}


def test_qat_lowers_the_fake_quant_loss(tiny):
    model, tok = tiny
    cfg = QuantConfig(bits=2, group_size=32)
    qat = prepare_qat(copy.deepcopy(model), cfg)
    held = data.token_stream("validation", tok)[: 4 * 65].long().reshape(4, 65)

    def loss():
        with torch.no_grad():
            logits = qat(held[:, :-1]).logits
        return nn.functional.cross_entropy(logits.flatten(0, 1), held[:, 1:].flatten()).item()

    before = loss()
    w0 = qat.model.layers[0].mlp.up_proj.weight.detach().clone()
    log = qat_finetune(qat, tok, steps=20, lr=3e-3, batch_size=4, seq_len=64, seed=0, progress=False,
                       autocast="none")
    assert log.tokens_seen == 20 * 4 * 64
    assert loss() < before - 0.5  # from ~8.3 nats (random weights) by a clear margin
    assert not torch.equal(qat.model.layers[0].mlp.up_proj.weight, w0)  # the float weights moved
    assert isinstance(qat.model.layers[0].mlp.up_proj, FakeQuantLinear)


def test_distillation_pulls_a_2bit_student_toward_its_float_teacher(bundled):
    model, tok = bundled
    teacher = copy.deepcopy(model)
    kd = distillation_loss(teacher)
    held = data.token_stream("validation", tok)[: 4 * 128].long().reshape(4, 128)
    with torch.no_grad():
        assert kd(copy.deepcopy(model), held, held).item() == pytest.approx(0, abs=1e-5)
        qat = prepare_qat(copy.deepcopy(model), QuantConfig(bits=2, group_size=64))
        before = kd(qat, held, held).item()
    log = qat_finetune(qat, tok, steps=10, lr=1e-3, batch_size=4, seq_len=64, teacher=teacher,
                       progress=False, autocast="none")
    with torch.no_grad():
        after = kd(qat, held, held).item()
    assert before > 0.3 and after < 0.8 * before, (before, after)  # measured: 0.66 -> ~0.42 in 15 steps
    assert log.tokens_seen == 10 * 4 * 64


def test_bad_inputs(tiny):
    model, tok = tiny
    with pytest.raises(ValueError, match="QuantConfig"):
        prepare_qat(copy.deepcopy(model), {"bits": 2})
    with pytest.raises(ValueError, match="method"):
        prepare_qat(copy.deepcopy(model), QuantConfig(bits=4, method="gptq"))
    with pytest.raises(ValueError, match="group_size 48 does not divide"):
        prepare_qat(copy.deepcopy(model), QuantConfig(bits=4, group_size=48))
    with pytest.raises(ValueError, match="learn_scales"):
        prepare_qat(copy.deepcopy(model), QuantConfig(bits=4), learn_scales="yes")
    with pytest.raises(ValueError, match="already quantized"):
        prepare_qat(quantize(copy.deepcopy(model), QuantConfig(bits=4)), QuantConfig(bits=4))
    prepared = prepare_qat(copy.deepcopy(model), QuantConfig(bits=4))
    with pytest.raises(ValueError, match="already quantized"):
        prepare_qat(prepared, QuantConfig(bits=4))
    with pytest.raises(ValueError, match="already quantized"):
        quantize(prepared, QuantConfig(bits=4))
    with pytest.raises(ValueError, match="prepare_qat"):
        convert(copy.deepcopy(model))
    from llmopt.quant import save_quantized

    with pytest.raises(ValueError, match=r"cannot save a FakeQuantLinear .*quant\.convert\(model\)"):
        save_quantized(prepared, tok, "unused-folder")
    with pytest.raises(ValueError, match="prepare_qat"):
        qat_finetune(copy.deepcopy(model), tok, steps=1)
    with pytest.raises(ValueError, match="steps"):
        qat_finetune(prepared, tok, steps=0)
    with pytest.raises(ValueError, match="lr"):
        qat_finetune(prepared, tok, lr=-1.0)
    with pytest.raises(ValueError, match="unknown TrainConfig fields"):
        qat_finetune(prepared, tok, step=3)
    with pytest.raises(ValueError, match="temperature"):
        distillation_loss(model, temperature=0)
    with pytest.raises(ValueError, match="kd_weight"):
        distillation_loss(model, kd_weight=2)
    with pytest.raises(ValueError, match="method='rtn'"):
        FakeQuantLinear(64, 8, QuantConfig(bits=4, method="nf4"))
