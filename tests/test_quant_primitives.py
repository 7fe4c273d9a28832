import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from llmopt import quant
from llmopt.quant.primitives import _groups

shapes = st.tuples(st.integers(1, 12), st.sampled_from([32, 64, 128, 256]))
granularities = st.sampled_from(["tensor", "channel", 32])
bits_ = st.sampled_from([2, 3, 4, 8])


def weight(shape, seed, outliers=True):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(*shape, generator=g)
    if outliers:  # a few large values, as real LLM weights have
        w.view(-1)[torch.randint(0, w.numel(), (3,), generator=g)] *= 20
    return w


@settings(max_examples=150, deadline=None)
@given(shape=shapes, gran=granularities, bits=bits_, symmetric=st.booleans(), seed=st.integers(0, 10**6))
def test_uniform_error_at_most_half_a_step(shape, gran, bits, symmetric, seed):
    w = weight(shape, seed)
    qt = quant.quantize_tensor(w, bits, gran, symmetric)
    err = (w - qt.dequantize()).abs()
    step = qt.scale.expand(_groups(w, gran).shape).reshape(w.shape)
    assert torch.all(err <= step / 2 + 1e-6 * w.abs().max())
    qmin, qmax = quant.qrange(bits, symmetric)
    codes = qt.q.to(torch.int16)
    assert int(codes.min()) >= qmin and int(codes.max()) <= qmax


@settings(max_examples=80, deadline=None)
@given(shape=shapes, gran=granularities, bits=bits_, symmetric=st.booleans(), seed=st.integers(0, 10**6))
def test_zero_stays_exact(shape, gran, bits, symmetric, seed):
    w = weight(shape, seed)
    w.view(-1)[::7] = 0.0
    deq = quant.fake_quantize(w, bits, gran, symmetric)
    assert torch.all(deq.view(-1)[::7] == 0)


def test_asymmetric_uses_the_range_of_skewed_data():
    w = torch.rand(4, 64) * 3 + 1  # all positive: absmax wastes half of its codes
    sym = (w - quant.fake_quantize(w, 4, "channel", True)).abs().mean()
    asym = (w - quant.fake_quantize(w, 4, "channel", False)).abs().mean()
    assert asym < 0.75 * sym


def test_finer_granularity_and_more_bits_lower_the_error():
    w = weight((16, 256), 0)
    err = {g: (w - quant.fake_quantize(w, 4, g)).pow(2).mean().item() for g in ("tensor", "channel", 128, 32)}
    assert err["tensor"] > err["channel"] > err[128] > err[32]
    by_bits = [(w - quant.fake_quantize(w, b, 32)).pow(2).mean().item() for b in (2, 3, 4, 8)]
    assert by_bits == sorted(by_bits, reverse=True)


def test_dtype_round_trip_and_all_zero_rows():
    w = torch.zeros(3, 64, dtype=torch.bfloat16)
    w[1] = 1.5
    deq = quant.quantize_tensor(w, 8, 32).dequantize()
    assert deq.dtype == torch.bfloat16 and torch.equal(deq, w)


@pytest.mark.parametrize("kw, match", [
    ({"bits": 5}, "bits"), ({"bits": 16}, "bits"),
    ({"granularity": 48}, "does not divide"), ({"granularity": "row"}, "granularity"),
    ({"granularity": 0}, "granularity"),
])
def test_bad_arguments(kw, match):
    with pytest.raises(ValueError, match=match):
        quant.quantize_tensor(torch.randn(4, 64), **kw)
    with pytest.raises(ValueError, match="2-D"):
        quant.quantize_tensor(torch.randn(64))


@settings(max_examples=100, deadline=None)
@given(bits=st.sampled_from([2, 4, 8]), rows=st.integers(0, 5), cols=st.integers(1, 16), seed=st.integers(0, 10**6))
def test_packing_round_trip_is_exact(bits, rows, cols, seed):
    per_byte = 8 // bits
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 2**bits, (rows, cols * per_byte), generator=g, dtype=torch.uint8)
    packed = quant.pack(codes, bits)
    assert packed.dtype == torch.uint8 and packed.shape == (rows, cols)
    assert torch.equal(quant.unpack(packed, bits), codes)


def test_packing_layout_and_signed_codes():
    assert quant.pack(torch.tensor([[0x3, 0xA]], dtype=torch.uint8), 4).item() == 0xA3  # low nibble first
    assert quant.pack(torch.tensor([[1, 2, 3, 0]], dtype=torch.uint8), 2).item() == 0b00111001
    q = torch.arange(-8, 8, dtype=torch.int8).reshape(2, 8)
    assert torch.equal(quant.to_signed(quant.unpack(quant.pack(quant.to_unsigned(q, 4), 4), 4), 4), q)
    w = torch.randn(8, 64)
    qt = quant.quantize_tensor(w, 4, 32)
    assert quant.pack(quant.to_unsigned(qt.q, 4), 4).numel() == w.numel() // 2  # the bytes really halve


@pytest.mark.parametrize("codes, bits, match", [
    (torch.zeros(2, 3, dtype=torch.uint8), 4, "multiple of 2"),
    (torch.full((1, 4), 16, dtype=torch.uint8), 4, r"\[0, 16\)"),
    (torch.zeros(1, 4, dtype=torch.uint8), 3, "bits"),
])
def test_packing_bad_input(codes, bits, match):
    with pytest.raises(ValueError, match=match):
        quant.pack(codes, bits)


def test_nf4_codebook_matches_qlora():
    code = quant.nf4_codebook()
    assert code.shape == (16,) and code[0] == -1 and code[-1] == 1 and (code == 0).sum() == 1
    assert torch.all(code[1:] > code[:-1])
    # values published with QLoRA (and in bitsandbytes), to 4 decimals
    published = [-1.0, -0.6962, -0.5251, -0.3949, -0.2844, -0.1848, -0.0911, 0.0,
                 0.0796, 0.1609, 0.2461, 0.3379, 0.4407, 0.5626, 0.7230, 1.0]
    assert torch.allclose(code, torch.tensor(published), atol=1e-4)


def test_nf4_round_trip_picks_the_nearest_level():
    w = torch.randn(16, 128)
    codes, absmax = quant.quantize_nf4(w, 64)
    assert codes.dtype == torch.uint8 and int(codes.max()) < 16 and absmax.shape == (32,)
    deq = quant.dequantize_nf4(codes, absmax, 64)
    code = quant.nf4_codebook()
    normed = (w.reshape(-1, 64) / absmax[:, None]).reshape(-1)
    nearest = code[(normed[:, None] - code).abs().argmin(1)]
    assert torch.allclose(deq.reshape(-1), (nearest.reshape(-1, 64) * absmax[:, None]).reshape(-1))
    # normal weights: NF4 beats uniform 4-bit absmax with the same block size
    int4 = quant.fake_quantize(w, 4, 64)
    assert (w - deq).pow(2).mean() < (w - int4).pow(2).mean()
    with pytest.raises(ValueError, match="block_size"):
        quant.quantize_nf4(torch.randn(3, 10), 64)


@pytest.mark.skipif(not quant.primitives.has_fp8(), reason="torch has no float8_e4m3fn")
def test_fp8_relative_error():
    w = weight((8, 64), 1)
    q, s = quant.quantize_fp8(w)
    assert q.dtype == torch.float8_e4m3fn
    deq = quant.dequantize_fp8(q, s)
    big = w.abs() > 1e-2 * w.abs().amax(dim=1, keepdim=True)
    rel = ((w - deq).abs() / w.abs())[big]
    assert rel.max() <= 2**-4 + 1e-6  # e4m3 keeps 3 mantissa bits: half an ulp is 2^-4
