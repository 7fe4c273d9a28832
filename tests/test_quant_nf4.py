import copy

import pytest
import torch
from torch import nn

from llmopt import bench
from llmopt.quant import QuantConfig, dequantize_nf4, quantize, quantize_nf4
from llmopt.quant.nf4 import DQ_BLOCK, NF4Linear, double_dequantize, double_quantize, dynamic_map


def test_dynamic_map_is_the_signed_8bit_dynamic_type():
    m = dynamic_map()
    assert m.shape == (256,) and m.dtype == torch.float32
    assert torch.all(m[1:] > m[:-1])  # sorted, no duplicates
    assert m.max() == 1.0 and 0.0 in m
    pos = m[m > 0]
    # decade 10^(e-6) holds 2^e positive levels (the 1.0 on top of the last one)
    for e in range(7):
        lo, hi = 10.0 ** (e - 6) * 0.1, 10.0 ** (e - 6)
        assert int(((pos > lo) & (pos < hi)).sum()) == 2**e
    assert torch.allclose(m[m < 0].sort().values, -pos[pos < 1].flip(0))  # symmetric but for 1.0


@pytest.mark.parametrize("n", [1024, 3072, 300, 5])
def test_double_quantize_round_trip(n):
    torch.manual_seed(n)
    absmax = torch.rand(n) * 0.05 + 0.01
    codes, scales, offset = double_quantize(absmax)
    assert codes.dtype == torch.uint8 and codes.shape == absmax.shape
    assert scales.shape == (-(n // -DQ_BLOCK),) and scales.dtype == torch.float32
    assert torch.allclose(offset, absmax.mean())
    back = double_dequantize(codes, scales, offset)
    # nearest level: the error is at most half the widest gap of the map (0.9/64 near 1) times the scale
    per_block = scales.repeat_interleave(DQ_BLOCK)[:n]
    bound = 0.5 * (dynamic_map().diff().max()) * per_block + 1e-7
    assert torch.all((back - absmax).abs() <= bound)
    # and it really is nearest: no other code decodes closer
    cand = dynamic_map()[None, :] * per_block[:, None] + offset
    best = (cand - absmax[:, None]).abs().min(dim=1).values
    assert torch.allclose((back - absmax).abs(), best, atol=1e-7)


def test_double_quantize_constant_input_is_exact():
    absmax = torch.full((512,), 0.25)
    back = double_dequantize(*double_quantize(absmax))
    assert torch.equal(back, absmax)


def _lin(out_f, in_f, bias=False, seed=0):
    torch.manual_seed(seed)
    lin = nn.Linear(in_f, out_f, bias=bias)
    nn.init.normal_(lin.weight, std=0.02)
    return lin


@pytest.mark.parametrize("block", [64, 32, 128])
def test_nf4_linear_matches_the_nf4_primitive(block):
    lin = _lin(48, 256, bias=True)
    q = NF4Linear.from_linear(lin, QuantConfig(bits=4, method="nf4", group_size=block))
    codes, absmax = quantize_nf4(lin.weight, block)
    ref = dequantize_nf4(codes, absmax, block)
    assert torch.equal(q.codes(), codes) and torch.equal(q.dequantized_weight(), ref)
    x = torch.randn(3, 7, 256)
    assert torch.allclose(q(x), nn.functional.linear(x, ref, lin.bias), atol=1e-6)
    assert q(x.to(torch.bfloat16)).dtype == torch.bfloat16
    assert "nf4" in repr(q) and f"block {block}" in repr(q)


def test_nf4_double_quant_linear_decodes_its_scales():
    lin = _lin(64, 512)
    plain = NF4Linear.from_linear(lin, QuantConfig(bits=4, method="nf4"))
    dq = NF4Linear.from_linear(lin, QuantConfig(bits=4, method="nf4", double_quant=True))
    assert torch.equal(plain.codes(), dq.codes())  # the 4-bit codes use the exact absmax
    assert torch.allclose(dq.block_absmax(), plain.absmax, rtol=0.02, atol=1e-4)
    w = lin.weight.detach()
    err_plain = (plain.dequantized_weight() - w).pow(2).mean()
    err_dq = (dq.dequantized_weight() - w).pow(2).mean()
    assert err_dq < 1.1 * err_plain  # scales cost 8 bits instead of 32, at almost no error
    assert "double-quantized" in repr(dq)


@pytest.mark.parametrize("double_quant, bits", [(False, 4.5), (True, 4 + 8 / 64 + 32 / (64 * 256))])
def test_nf4_bits_per_weight_from_the_buffers(double_quant, bits):
    lin = _lin(256, 1024)
    q = NF4Linear.from_linear(lin, QuantConfig(bits=4, method="nf4", double_quant=double_quant))
    n = lin.weight.numel()
    held = bench.model_size_bytes(q)
    assert held == sum(b.numel() * b.element_size() for b in q.buffers())
    bpw = held * 8 / n
    offset_bits = 32 / n if double_quant else 0  # one float32 offset per layer
    assert bpw == pytest.approx(bits + offset_bits, abs=1e-9)
    assert bpw == pytest.approx(4.127 if double_quant else 4.5, abs=1e-3)


@pytest.mark.parametrize("double_quant", [False, True])
def test_nf4_linear_rebuilds_from_an_empty_skeleton(double_quant):
    cfg = QuantConfig(bits=4, method="nf4", double_quant=double_quant)
    q = NF4Linear.from_linear(_lin(40, 64, bias=True), cfg)  # 40 blocks: one short DQ block
    empty = NF4Linear(64, 40, cfg, bias=True)
    assert {k: (v.shape, v.dtype) for k, v in empty.state_dict().items()} == \
           {k: (v.shape, v.dtype) for k, v in q.state_dict().items()}
    empty.load_state_dict(q.state_dict())
    assert torch.equal(empty.dequantized_weight(), q.dequantized_weight())


def test_nf4_bad_inputs():
    with pytest.raises(ValueError, match="block size"):
        NF4Linear.from_linear(nn.Linear(100, 3), QuantConfig(bits=4, method="nf4"))  # 300 % 64
    with pytest.raises(ValueError, match="block size"):
        NF4Linear(64, 8, QuantConfig(bits=4, method="nf4", group_size=48))
    with pytest.raises(ValueError, match="bits"):
        NF4Linear(64, 8, QuantConfig(bits=8))
    with pytest.raises(ValueError, match="bits"):
        QuantConfig(bits=8, method="nf4")
    with pytest.raises(ValueError, match="block_size"):
        double_quantize(torch.rand(10), block_size=0)


def test_quantize_model_nf4_double_quant_generates_close_to_float(bundled):
    model, tok = bundled
    q = quantize(copy.deepcopy(model), QuantConfig(bits=4, method="nf4", double_quant=True))
    layers = [m for m in q.modules() if isinstance(m, NF4Linear)]
    assert len(layers) == 7 * model.config.num_hidden_layers
    assert all(m.cfg.double_quant and m.absmax.dtype == torch.uint8 for m in layers)
    assert bench.model_size_bytes(q) < 0.75 * bench.model_size_bytes(model)
    # two prompts cut to one length: no padding=True, which (transformers 5) leaves padding
    # switched on in the shared tokenizer's backend and so changes later encodings
    rows = tok(["def parse(self, text):\n    return", "import os\nimport sys\nfrom typing import"])["input_ids"]
    n = min(map(len, rows))
    ids = torch.tensor([r[:n] for r in rows])
    with torch.no_grad():
        a = model(ids).logits.flatten(0, 1)
        b = q(ids).logits.flatten(0, 1)
    assert (a - b).abs().max() < 0.15 * a.abs().max()
    assert (a.argmax(-1) == b.argmax(-1)).float().mean() > 0.8
    p, r = a.log_softmax(-1), b.log_softmax(-1)
    assert (p.exp() * (p - r)).sum(-1).mean() < 0.1  # KL(float || nf4) in nats per token
    out = q.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False,
                     pad_token_id=tok.pad_token_id)
    assert out.shape == (2, n + 8)
    assert torch.equal(out[:, :n], ids)
    with pytest.raises(ValueError, match="already quantized"):
        quantize(q, QuantConfig(bits=4, method="nf4"))
