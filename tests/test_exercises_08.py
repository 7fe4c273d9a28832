"""Lesson 08's checks: each passes on a learner's Triton kernel written here from the definitions
(run by the interpreter on a CPU), fails with a useful message on a plausible mistake, and says
"not attempted yet" for the notebook's stub, including a stub raised inside a kernel."""
import pytest
import torch

triton = pytest.importorskip("triton")
import triton.language as tl  # noqa: E402

import llmopt.kernels  # noqa: E402, F401  (sets TRITON_INTERPRET=1 on a machine without CUDA)
from llmopt.exercises import lesson08 as exercises  # noqa: E402


@triton.jit
def _rmsnorm_kernel(x_ptr, w_ptr, y_ptr, N, stride, eps, BLOCK: tl.constexpr, DIVIDE_BY_BLOCK: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < N
    x = tl.load(x_ptr + row * stride + cols, mask=mask, other=0.0).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    if DIVIDE_BY_BLOCK:
        ms = tl.sum(x * x, axis=0) / BLOCK
    else:
        ms = tl.sum(x * x, axis=0) / N
    y = (x / tl.sqrt(ms + eps)) * w
    tl.store(y_ptr + row * stride + cols, y.to(y_ptr.dtype.element_ty), mask=mask)


def rmsnorm(x, w, eps, divide_by_block=False):
    y = torch.empty_like(x)
    block = triton.next_power_of_2(x.shape[1])
    _rmsnorm_kernel[(x.shape[0],)](x, w, y, x.shape[1], x.stride(0), eps, BLOCK=block,
                                   DIVIDE_BY_BLOCK=divide_by_block)
    return y


@triton.jit
def _swiglu_kernel(g_ptr, u_ptr, y_ptr, n, SWAP: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if SWAP:
        g, u = u, g
    tl.store(y_ptr + offs, (g / (1.0 + tl.exp(-g)) * u).to(y_ptr.dtype.element_ty), mask=mask)


def swiglu(gate, up, swap=False):
    y = torch.empty_like(gate)
    _swiglu_kernel[(triton.cdiv(gate.numel(), 64),)](gate, up, y, gate.numel(), SWAP=swap, BLOCK=64)
    return y


@triton.jit
def _gemv_kernel(x_ptr, q_ptr, s_ptr, z_ptr, y_ptr, N, K, G, group_size, HAS_ZERO: tl.constexpr,
                 MISTAKE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    m, pid = tl.program_id(0), tl.program_id(1)
    n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.full((BLOCK_N,), 0.0, tl.float32)
    for k0 in range(0, K, BLOCK_K):
        j = k0 // 2 + tl.arange(0, BLOCK_K // 2)   # byte columns: weights 2j (low nibble) and 2j+1 (high)
        mask = (n[:, None] < N) & (j[None, :] < K // 2)
        packed = tl.load(q_ptr + n[:, None] * (K // 2) + j[None, :], mask=mask, other=0)
        group = (2 * j[None, :]) // group_size
        scale = tl.load(s_ptr + n[:, None] * G + group, mask=mask, other=0.0).to(tl.float32)
        if HAS_ZERO:
            zero = tl.load(z_ptr + n[:, None] * G + group, mask=mask, other=0).to(tl.float32)
        else:
            zero = 8.0
        if MISTAKE == 1:      # nibbles swapped
            w_even = ((packed >> 4).to(tl.float32) - zero) * scale
            w_odd = ((packed & 15).to(tl.float32) - zero) * scale
        elif MISTAKE == 2:    # zero point forgotten
            w_even = (packed & 15).to(tl.float32) * scale
            w_odd = (packed >> 4).to(tl.float32) * scale
        else:
            w_even = ((packed & 15).to(tl.float32) - zero) * scale
            w_odd = ((packed >> 4).to(tl.float32) - zero) * scale
        x_even = tl.load(x_ptr + m * K + 2 * j, mask=2 * j < K, other=0.0).to(tl.float32)
        x_odd = tl.load(x_ptr + m * K + 2 * j + 1, mask=2 * j + 1 < K, other=0.0).to(tl.float32)
        acc += tl.sum(w_even * x_even[None, :] + w_odd * x_odd[None, :], axis=1)
    tl.store(y_ptr + m * N + n, acc.to(y_ptr.dtype.element_ty), mask=n < N)


def gemv(x, qweight, scales, zeros, group_size, mistake=0):
    M, K = x.shape
    N = qweight.shape[0]
    y = torch.empty(M, N, dtype=x.dtype)
    _gemv_kernel[(M, triton.cdiv(N, 16))](x, qweight, scales, zeros if zeros is not None else scales, y, N, K,
                                          scales.shape[1], group_size, HAS_ZERO=zeros is not None,
                                          MISTAKE=mistake, BLOCK_N=16, BLOCK_K=32)
    return y


@triton.jit
def _stub_kernel(x_ptr, BLOCK: tl.constexpr):
    # YOUR CODE HERE (Exercise 8.1). Hint: ...
    raise NotImplementedError("Exercise 8.1: see the text above")


def stub_in_kernel(x, *args):
    _stub_kernel[(1,)](x, BLOCK=16)
    return x


def stub(*args):
    raise NotImplementedError("Exercise 8.x: see the text above")


def test_rmsnorm_kernel(capsys):
    assert exercises.check_rmsnorm_kernel(rmsnorm)
    assert not exercises.check_rmsnorm_kernel(lambda x, w, eps: rmsnorm(x, w, eps, divide_by_block=True))
    assert "divide the sum of squares by N" in capsys.readouterr().out
    assert not exercises.check_rmsnorm_kernel(lambda x, w, eps: rmsnorm(x, w, 0.0))
    assert "eps is missing" in capsys.readouterr().out


def test_swiglu_kernel(capsys):
    assert exercises.check_swiglu_kernel(swiglu)
    assert not exercises.check_swiglu_kernel(lambda g, u: swiglu(g, u, swap=True))
    assert "SiLU goes on the gate" in capsys.readouterr().out
    assert not exercises.check_swiglu_kernel(lambda g, u: swiglu(g, u).float())
    assert "dtype" in capsys.readouterr().out


def test_int4_gemv(capsys):
    assert exercises.check_int4_gemv(gemv)
    assert not exercises.check_int4_gemv(lambda *a: gemv(*a, mistake=1))
    assert "nibbles are swapped" in capsys.readouterr().out
    assert not exercises.check_int4_gemv(lambda *a: gemv(*a, mistake=2))
    assert "zero point is missing" in capsys.readouterr().out


@pytest.mark.parametrize("check", [exercises.check_rmsnorm_kernel, exercises.check_swiglu_kernel,
                                   exercises.check_int4_gemv])
def test_stubs_say_not_attempted(check, capsys):
    assert not check(stub)
    assert "not attempted yet" in capsys.readouterr().out
    assert not check(stub_in_kernel)
    assert "not attempted yet" in capsys.readouterr().out


def test_unmasked_tail_is_named(capsys):
    def no_mask(x, w, eps):
        y = rmsnorm(x, w, eps)
        y[:, -1] = float("nan")   # what an unmasked store past the row's end leaves behind
        return y

    assert not exercises.check_rmsnorm_kernel(no_mask)
    assert "masked" in capsys.readouterr().out
