"""The fused kernels of lesson 08 (rmsnorm, swiglu, softmax, rope) against their PyTorch references:
in Triton's interpreter on CPU (small shapes: it is numpy underneath), compiled on a GPU (`gpu` tests).

Every kernel writes into an output buffer filled with nan first, so an element it fails to write fails
the comparison."""
import importlib

import pytest
import torch

# llmopt.kernels first: on a machine without CUDA it sets TRITON_INTERPRET=1, and that must happen before
# triton is first imported. triton.language decorates its helpers (tl.sum, tl.max, tl.zeros, tl.sigmoid...)
# when imported; imported before the flag, they stay compiled-only and fail inside an interpreted kernel.
from llmopt.kernels import common  # noqa: F401

pytest.importorskip("triton")

from llmopt.kernels.rmsnorm import rmsnorm, rmsnorm_reference, rmsnorm_triton  # noqa: E402
from llmopt.kernels.rope import rope, rope_reference, rope_triton  # noqa: E402
from llmopt.kernels.softmax import softmax, softmax_reference, softmax_triton  # noqa: E402
from llmopt.kernels.swiglu import swiglu, swiglu_reference, swiglu_triton  # noqa: E402

# Kernel and reference do the same float32 arithmetic and round once to the output dtype, so they differ
# by the order of a float32 sum (~1e-7 relative) and, in a 16-bit dtype, by at most one unit in the last
# place where the two land either side of a rounding boundary: 2**-10 (~1e-3) relative in fp16, 2**-7
# (~8e-3) in bf16. Each tolerance is about twice that; float32 gets 1e-5, a hundred times its sum-order noise.
TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.float16: dict(atol=2e-3, rtol=2e-3),
       torch.bfloat16: dict(atol=1.6e-2, rtol=1.6e-2)}
DTYPES = [torch.float32, torch.float16]  # the interpreter has no bf16 arithmetic: bf16 runs in the gpu tests
SHAPES = [(3, 1), (5, 37), (2, 300), (4, 1000), (2, 3, 37)]  # rows x odd widths (masked tails), and a 3-D input
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
NAN = float("nan")


def randn(*shape, dtype=torch.float32, scale=1.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g) * scale).to(DEVICE, dtype)


def poisoned(shape, dtype):
    return torch.full(shape, NAN, dtype=dtype, device=DEVICE)


# ---------------------------------------------------------------- rmsnorm

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_rmsnorm_matches_reference(shape, dtype):
    x, w = randn(*shape, dtype=dtype, scale=3.0), randn(shape[-1], dtype=dtype, seed=1)
    out = poisoned(shape, dtype)
    got = rmsnorm_triton(x, w, eps=1e-5, out=out)
    assert got is out
    torch.testing.assert_close(got, rmsnorm_reference(x, w, eps=1e-5), **TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(3, 300), (2, 3, 37), (1, 1000)])
def test_rmsnorm_fused_residual_returns_both(shape, dtype):
    x, r, w = randn(*shape, dtype=dtype), randn(*shape, dtype=dtype, seed=1), randn(shape[-1], dtype=dtype, seed=2)
    out, res_out = poisoned(shape, dtype), poisoned(shape, dtype)
    got, h = rmsnorm_triton(x, w, residual=r, out=out, residual_out=res_out)
    want, want_h = rmsnorm_reference(x, w, residual=r)
    assert got is out and h is res_out
    torch.testing.assert_close(h, want_h, rtol=0, atol=0)  # one add in x's dtype on both sides: exact
    torch.testing.assert_close(got, want, **TOL[dtype])
    torch.testing.assert_close(want, rmsnorm_reference(x + r, w), rtol=0, atol=0)


def test_rmsnorm_strided_rows_and_mixed_weight_dtype():
    big = randn(4, 400, dtype=torch.float16)
    x = big[:, 5:305]  # rows 400 apart, last dim contiguous
    w = randn(300, seed=1)  # float32 weight: the output promotes to float32, as `weight * h.to(x.dtype)` does
    got = rmsnorm_triton(x, w, out=poisoned((4, 300), torch.float32))
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, rmsnorm_reference(x, w), **TOL[torch.float32])


def test_rmsnorm_bad_input():
    with pytest.raises(ValueError, match="last dim"):
        rmsnorm_triton(torch.zeros(1, 65537), torch.ones(65537))
    with pytest.raises(ValueError, match="weight"):
        rmsnorm_triton(torch.zeros(2, 8), torch.ones(7))
    with pytest.raises(ValueError, match="residual"):
        rmsnorm_triton(torch.zeros(2, 8), torch.ones(8), residual=torch.zeros(2, 8, dtype=torch.float16))
    with pytest.raises(ValueError, match="out"):
        rmsnorm_triton(torch.zeros(2, 8), torch.ones(8), out=torch.empty(2, 9))


# ---------------------------------------------------------------- swiglu

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("block", [None, 64])  # 64: several column blocks per row, the last one partial
def test_swiglu_matches_reference(shape, dtype, block):
    gate, up = randn(*shape, dtype=dtype, scale=4.0), randn(*shape, dtype=dtype, seed=1)  # scale 4: silu's tails
    out = poisoned(shape, dtype)
    got = swiglu_triton(gate, up, out=out, block=block)
    assert got is out
    torch.testing.assert_close(got, swiglu_reference(gate, up), **TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(5, 300), (2, 3, 37)])
def test_swiglu_on_the_halves_of_merged_gate_up(shape, dtype):
    *lead, inter = shape
    gate_up = randn(*lead, 2 * inter, dtype=dtype, scale=3.0)
    gate, up = gate_up.chunk(2, dim=-1)  # strided views: rows 2 * inter apart
    assert not gate.is_contiguous() and gate.data_ptr() == gate_up.data_ptr()
    got = swiglu_triton(gate, up, out=poisoned(shape, dtype), block=64)
    torch.testing.assert_close(got, swiglu_reference(gate, up), **TOL[dtype])


@pytest.mark.filterwarnings("ignore:overflow encountered in exp")  # numpy's exp(1e4) = inf, on purpose
def test_swiglu_extreme_gates_and_bad_shapes():
    gate = torch.tensor([[-1e4, -100.0, -20.0, 0.0, 20.0, 100.0, 1e4]], device=DEVICE)
    up = torch.full_like(gate, 2.0)
    got = swiglu_triton(gate, up, out=poisoned(gate.shape, gate.dtype))
    torch.testing.assert_close(got, swiglu_reference(gate, up), **TOL[torch.float32])  # no nan from exp overflow
    with pytest.raises(ValueError, match="same shape"):
        swiglu_triton(torch.zeros(2, 8), torch.zeros(2, 9))
    with pytest.raises(ValueError, match="power of 2"):
        swiglu_triton(torch.zeros(2, 8), torch.zeros(2, 8), block=48)


# ---------------------------------------------------------------- softmax

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("block", [None, 64])  # 64: rows longer than one block go through the online rescaling
def test_softmax_matches_reference(shape, dtype, block):
    x = randn(*shape, dtype=dtype, scale=5.0)
    out = poisoned(shape, dtype)
    got = softmax_triton(x, out=out, block=block)
    assert got is out
    torch.testing.assert_close(got, softmax_reference(x), **TOL[dtype])


def test_softmax_rescales_when_a_later_block_raises_the_max():
    # increasing rows: every block has a larger max than all before it, so d is rescaled at every step;
    # scale 80 would overflow exp() without the max subtracted
    x = torch.linspace(-80, 80, 300, device=DEVICE).repeat(3, 1)
    x[1] = x[1].flip(0)  # and decreasing: the max comes first and never changes
    got = softmax_triton(x, out=poisoned(x.shape, x.dtype), block=32)
    torch.testing.assert_close(got, softmax_reference(x), **TOL[torch.float32])


@pytest.mark.filterwarnings("ignore:invalid value encountered")  # numpy's 0 / 0 in the interpreter, the all -inf row
@pytest.mark.parametrize("dtype", DTYPES)
def test_softmax_with_minus_inf(dtype):
    T = 300
    x = randn(5, T, dtype=dtype, scale=3.0)
    x[0] = x[0].masked_fill(torch.arange(T, device=DEVICE) > 40, float("-inf"))  # causal row: masked tail
    x[1, :200] = float("-inf")  # the first blocks entirely masked, the later ones not
    x[2, ::3] = float("-inf")
    x[3] = float("-inf")  # nothing left to attend to: nan, as torch gives
    got = softmax_triton(x, out=poisoned(x.shape, dtype), block=64)
    want = softmax_reference(x)
    assert torch.isnan(want[3]).all() and torch.isnan(got[3]).all()
    assert not torch.isnan(got[[0, 1, 2, 4]]).any()
    assert (got[:3][x[:3] == float("-inf")] == 0).all()  # masked scores give exactly 0
    torch.testing.assert_close(got, want, equal_nan=True, **TOL[dtype])


def test_softmax_bad_block():
    with pytest.raises(ValueError, match="power of 2"):
        softmax_triton(torch.zeros(2, 8), block=100)
    with pytest.raises(ValueError, match="out"):
        softmax_triton(torch.zeros(2, 8), out=torch.zeros(2, 8, dtype=torch.float16))


# ---------------------------------------------------------------- rope

def rope_inputs(B, Hq, Hk, T, D, dtype, cos_batch=None, seed=0):
    """q and k as transformers has them: (B, T, H, D) projections transposed to (B, H, T, D) views;
    cos/sin of Llama's angles, cat(freqs, freqs), per sequence (positions offset by b) or shared (cos_batch=1)."""
    q = randn(B, T, Hq, D, dtype=dtype, seed=seed).transpose(1, 2)
    k = randn(B, T, Hk, D, dtype=dtype, seed=seed + 1).transpose(1, 2)
    inv_freq = 1.0 / 10000 ** (torch.arange(0, D, 2, dtype=torch.float32) / D)
    nb = cos_batch or B
    pos = torch.arange(T, dtype=torch.float32)[None, :] + 7 * torch.arange(nb)[:, None]
    emb = torch.cat([pos[..., None] * inv_freq] * 2, dim=-1)
    return q, k, emb.cos().to(DEVICE, dtype), emb.sin().to(DEVICE, dtype)


def f32(*ts):
    return [t.float() for t in ts]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,Hq,Hk,T,D", [(1, 1, 1, 1, 2), (2, 4, 2, 5, 32), (2, 6, 3, 7, 20), (1, 5, 1, 9, 128)])
def test_rope_matches_reference(B, Hq, Hk, T, D, dtype):
    q, k, cos, sin = rope_inputs(B, Hq, Hk, T, D, dtype)
    assert q.stride(2) == Hq * D  # a transposed view of (B, T, Hq, D)
    q_out, k_out = poisoned(q.shape, dtype), poisoned(k.shape, dtype)
    got_q, got_k = rope_triton(q, k, cos, sin, q_out=q_out, k_out=k_out)
    assert got_q is q_out and got_k is k_out
    # the kernel computes in float32 and rounds once: the reference run in float32, rounded, is its spec
    want_q, want_k = rope_reference(*f32(q, k, cos, sin))
    torch.testing.assert_close(got_q, want_q.to(dtype), **TOL[dtype])
    torch.testing.assert_close(got_k, want_k.to(dtype), **TOL[dtype])
    # the reference in fp16 rounds three times (x*cos, rotate_half(x)*sin, their sum), each up to half an
    # ulp of a term of size |x| < 5 (ulp 2**-8 in [4, 8)): ~6e-3 apart at most, so 1e-2 against it
    tol = TOL[dtype] if dtype == torch.float32 else dict(atol=1e-2, rtol=1e-2)
    torch.testing.assert_close(got_q, rope_reference(q, k, cos, sin)[0], **tol)


def test_rope_keeps_layout_and_shares_batch_one_angles():
    q, k, cos, sin = rope_inputs(3, 4, 2, 6, 16, torch.float32, cos_batch=1)
    got_q, got_k = rope_triton(q, k, cos, sin)  # cos/sin (1, T, D) broadcast over the batch
    assert got_q.stride() == q.stride() and got_k.stride() == k.stride()  # the transposed layout, no copy
    want_q, want_k = rope_reference(q, k, cos, sin)
    torch.testing.assert_close(got_q, want_q, **TOL[torch.float32])
    torch.testing.assert_close(got_k, want_k, **TOL[torch.float32])


def test_rope_uses_both_halves_of_cos_and_sin():
    q, k, _, _ = rope_inputs(2, 3, 1, 4, 12, torch.float32)
    cos, sin = randn(2, 4, 12, seed=5), randn(2, 4, 12, seed=6)  # halves differ: not Llama's layout
    got_q, got_k = rope_triton(q, k, cos, sin, q_out=poisoned(q.shape, q.dtype), k_out=poisoned(k.shape, k.dtype))
    want_q, want_k = rope_reference(q, k, cos, sin)
    torch.testing.assert_close(got_q, want_q, **TOL[torch.float32])
    torch.testing.assert_close(got_k, want_k, **TOL[torch.float32])


def test_rope_reference_is_transformers():
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    q, k, cos, sin = rope_inputs(2, 4, 2, 5, 16, torch.float32)
    q, k = q + 0.5, k * 2  # inputs no rotation leaves unchanged
    want_q, want_k = apply_rotary_pos_emb(q, k, cos, sin)
    got_q, got_k = rope_reference(q, k, cos, sin)
    assert not torch.allclose(got_q, q)
    torch.testing.assert_close(got_q, want_q, rtol=0, atol=0)
    torch.testing.assert_close(got_k, want_k, rtol=0, atol=0)


def test_rope_bad_input():
    q, k, cos, sin = rope_inputs(2, 4, 2, 5, 16, torch.float32)
    with pytest.raises(ValueError, match="even"):
        rope_triton(q[..., :15], k[..., :15], cos[..., :15], sin[..., :15])
    with pytest.raises(ValueError, match="k must be"):
        rope_triton(q, k[:, :, :4], cos, sin)
    with pytest.raises(ValueError, match="cos must be"):
        rope_triton(q, k, cos[:, :4], sin)
    with pytest.raises(ValueError, match="4-D"):
        rope_triton(q[0], k[0], cos, sin)


# ---------------------------------------------------------------- wrappers

def _cases():
    x, w = randn(3, 40), randn(40, seed=1)
    q, k, cos, sin = rope_inputs(1, 2, 1, 3, 8, torch.float32)
    return {
        "rmsnorm": ((x, w), rmsnorm, rmsnorm_reference),
        "swiglu": ((x, randn(3, 40, seed=2)), swiglu, swiglu_reference),
        "softmax": ((x,), softmax, softmax_reference),
        "rope": ((q, k, cos, sin), rope, rope_reference),
    }


@pytest.mark.parametrize("name", ["rmsnorm", "swiglu", "softmax", "rope"])
def test_wrapper_backends(name, monkeypatch):
    args, op, reference = _cases()[name]
    want = reference(*args)
    same = (lambda a, b: all(torch.equal(u, v) for u, v in zip(a, b))) if name == "rope" else torch.equal

    def kernel_must_not_run(*a, **kw):
        raise AssertionError("the kernel ran")

    module = importlib.import_module(f"llmopt.kernels.{name}")
    monkeypatch.setattr(module, f"{name}_triton", kernel_must_not_run)
    assert same(op(*args, backend="torch"), want)
    if DEVICE == "cpu":
        assert same(op(*args), want)  # auto on a CPU tensor: the reference
    with pytest.raises(AssertionError, match="the kernel ran"):
        op(*args, backend="triton")
    with pytest.raises(ValueError, match="backend"):
        op(*args, backend="cuda")


@pytest.mark.parametrize("backend", ["torch", "auto", "triton"])
def test_every_backend_rejects_the_same_bad_input(backend):
    # checked before the backend is picked: the reference would broadcast (or round to integers) silently
    x = randn(4, 64)
    q, k, cos, sin = rope_inputs(1, 4, 2, 8, 16, torch.float32)
    bad = [
        ("weight must have shape", lambda: rmsnorm(x, torch.ones(1, device=DEVICE), backend=backend)),
        ("residual must match", lambda: rmsnorm(x, torch.ones(64, device=DEVICE), residual=randn(1, 64),
                                                backend=backend)),
        ("x must be a floating-point", lambda: rmsnorm(x.long(), torch.ones(64, device=DEVICE), backend=backend)),
        ("same shape", lambda: swiglu(x, randn(1, 64), backend=backend)),
        ("gate must be a floating-point", lambda: swiglu(x.long(), x, backend=backend)),
        ("x must be a floating-point", lambda: softmax(torch.arange(8, device=DEVICE).reshape(2, 4), backend=backend)),
        ("cos must be", lambda: rope(q, k, cos[..., :8], sin[..., :8], backend=backend)),
    ]
    for match, call in bad:
        with pytest.raises(ValueError, match=match):
            call()


def test_interpreter_clash_names_the_versions_that_fail_together():
    # measured here: Triton 3.6.0's interpreter fails with numpy 2.4.6 and runs with 2.3.5; 3.7 and 3.8 run with 2.4
    assert "numpy<2.4" in common.interpreter_clash("3.6.0", "2.4.6")
    assert common.interpreter_clash("3.6.0", "2.3.5") is None
    assert common.interpreter_clash("3.7.0", "2.4.6") is None
    assert common.interpreter_clash("3.9.0+git1a2b", "2.4.0") is None


# ---------------------------------------------------------------- on a GPU, in bfloat16

BF16 = TOL[torch.bfloat16]


@pytest.mark.gpu
def test_gpu_rmsnorm_bf16():
    x, r, w = (randn(65, 4096, dtype=torch.bfloat16, seed=s) for s in (0, 1, 2))
    w = w[0]
    torch.testing.assert_close(rmsnorm(x, w, backend="triton"), rmsnorm_reference(x, w), **BF16)
    got, h = rmsnorm(x, w, residual=r, backend="triton")
    want, want_h = rmsnorm_reference(x, w, residual=r)
    torch.testing.assert_close(h, want_h, rtol=0, atol=0)
    torch.testing.assert_close(got, want, **BF16)


@pytest.mark.gpu
def test_gpu_swiglu_bf16():
    gate, up = randn(33, 2 * 5504, dtype=torch.bfloat16, scale=3.0).chunk(2, dim=-1)
    torch.testing.assert_close(swiglu(gate, up, backend="triton"), swiglu_reference(gate, up), **BF16)


@pytest.mark.gpu
def test_gpu_softmax_bf16():
    x = randn(17, 5000, dtype=torch.bfloat16, scale=5.0)
    x[:, 4000:] = float("-inf")
    for block in (None, 1024):
        torch.testing.assert_close(softmax_triton(x, block=block), softmax_reference(x), **BF16)


@pytest.mark.gpu
def test_gpu_rope_bf16():
    q, k, cos, sin = rope_inputs(2, 32, 8, 17, 128, torch.bfloat16)
    got_q, got_k = rope(q, k, cos, sin, backend="triton")
    want_q, want_k = rope_reference(*f32(q, k, cos, sin))
    torch.testing.assert_close(got_q, want_q.to(torch.bfloat16), **BF16)
    torch.testing.assert_close(got_k, want_k.to(torch.bfloat16), **BF16)
