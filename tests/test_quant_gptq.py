import pytest
import torch

from llmopt.quant import fake_quantize
from llmopt.quant.gptq import gptq_quantize, hessian
from llmopt.quant.primitives import dequantize


def correlated_inputs(n, d, seed):
    """Samples (by `seed`) of one distribution with correlated channels and a few loud ones,
    as LLM activations have."""
    mix = torch.randn(d, d, generator=torch.Generator().manual_seed(12345)) / d**0.5 + torch.eye(d)
    x = torch.randn(n, d, generator=torch.Generator().manual_seed(seed)) @ mix
    x[:, :4] *= 8
    return x


@pytest.mark.parametrize("bits, group, symmetric, act_order", [
    (4, None, True, False), (3, 32, True, False), (4, 32, False, False), (3, 32, True, True), (2, 64, False, True),
])
def test_gptq_beats_rtn_on_held_out_inputs(bits, group, symmetric, act_order):
    torch.manual_seed(0)
    w = torch.randn(48, 128)
    calib, held_out = correlated_inputs(2048, 128, 1), correlated_inputs(1024, 128, 2)
    qt = gptq_quantize(w, hessian(calib), bits, group, symmetric, act_order=act_order)
    gran = "channel" if group is None else group
    out_err = lambda wq: (held_out @ (w - wq).T).pow(2).mean().item()  # noqa: E731
    gptq_err, rtn_err = out_err(dequantize(qt)), out_err(fake_quantize(w, bits, gran, symmetric))
    assert gptq_err < 0.8 * rtn_err, (gptq_err, rtn_err)


@pytest.mark.parametrize("group", [None, 32])
def test_uncorrelated_inputs_reduce_to_rtn(group):
    """With H = I no column carries information about another: GPTQ is round-to-nearest."""
    w = torch.randn(16, 64)
    qt = gptq_quantize(w, torch.eye(64), 4, group, block_size=16)
    assert torch.equal(dequantize(qt), fake_quantize(w, 4, "channel" if group is None else group))


def test_dead_inputs_and_codes_in_range():
    w = torch.randn(8, 64)
    x = correlated_inputs(256, 64, 0)
    x[:, 5] = 0
    qt = gptq_quantize(w, hessian(x), 4, 32, symmetric=False)
    assert int(qt.q.min()) >= 0 and int(qt.q.max()) <= 15 and torch.all(dequantize(qt)[:, 5] == 0)


def test_gptq_bad_input():
    w = torch.randn(8, 64)
    with pytest.raises(ValueError, match="empty"):
        hessian(torch.empty(0, 64))
    with pytest.raises(ValueError, match="H must be"):
        gptq_quantize(w, torch.eye(32))
    with pytest.raises(ValueError, match="does not divide"):
        gptq_quantize(w, torch.eye(64), group_size=48)
    with pytest.raises(ValueError, match="bits"):
        gptq_quantize(w, torch.eye(64), bits=5)


def test_gptq_codes_load_into_quant_linear():
    from llmopt.quant import QuantConfig, QuantLinear

    w = torch.randn(16, 64)
    qt = gptq_quantize(w, hessian(correlated_inputs(512, 64, 0)), 4, 32)
    layer = QuantLinear.from_qtensor(qt, QuantConfig(bits=4, group_size=32))
    assert torch.allclose(layer.dequantized_weight(), dequantize(qt), rtol=2e-3, atol=1e-6)  # fp16 scales
    with pytest.raises(ValueError, match="do not match"):
        QuantLinear.from_qtensor(qt, QuantConfig(bits=8))
