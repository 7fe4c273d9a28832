"""Lesson 08: Triton kernels (RMSNorm, SwiGLU, the dequantization inside an INT4 GEMV).

The learner's function launches their kernel; on a CPU it runs under Triton's interpreter, so the
checks use small shapes with tails (sizes that are not a power of two) to catch missing masks.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ._common import _call, _result

TOL = {torch.float32: 1e-5, torch.float16: 2e-3}  # fp16: one rounding of the output (~5e-4 relative) with margin


def _device() -> torch.device:
    # kernels need CUDA tensors on a GPU machine, CPU tensors under the interpreter
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _compare(name, fn, args, want, what, hints=()):
    """Run fn(*args) on the kernel's device; (ok, message). `hints`: (wrong_output, message) pairs
    tried on a mismatch. `want` and the hints are computed on the CPU."""
    dev = _device()
    args = [a.clone().to(dev) if isinstance(a, torch.Tensor) else a for a in args]
    ok, got = _call(name, fn, *args)
    if not ok:
        return False, got
    if isinstance(got, torch.Tensor):
        got = got.cpu()
    if not isinstance(got, torch.Tensor) or got.shape != want.shape:
        shape = tuple(got.shape) if isinstance(got, torch.Tensor) else type(got).__name__
        return False, f"expected a tensor of shape {tuple(want.shape)} for {what}, got {shape}"
    if got.dtype != want.dtype:
        return False, f"return the input's dtype ({want.dtype}) for {what}, got {got.dtype}"
    tol = TOL[want.dtype]
    got, want = got.float(), want.float()
    if not torch.isfinite(got).all() and torch.isfinite(want).all():
        return False, f"nan or inf in the output for {what}: are the loads and stores masked past the row's end?"
    if torch.allclose(got, want, rtol=tol, atol=tol):
        return True, ""
    for wrong, hint in hints:
        if torch.allclose(got, wrong.float(), rtol=tol, atol=tol):
            return False, f"{hint} ({what})"
    err = (got - want).abs().max().item()
    return False, f"max |error| {err:.3g} for {what} (tolerance {tol:g})"


def check_rmsnorm_kernel(fn) -> bool:
    """Exercise 8.1: fn(x (rows, N), weight (N,), eps) -> y = x / sqrt(mean(x^2) + eps) * weight, via a kernel."""
    from ..kernels import rmsnorm_reference

    name = "Exercise 8.1 (RMSNorm kernel)"
    g = torch.Generator().manual_seed(0)
    for rows, N, dtype in ((4, 64, torch.float32), (3, 37, torch.float32), (5, 300, torch.float16),
                           (1, 1000, torch.float32)):
        x = (torch.randn(rows, N, generator=g) * 2).to(dtype)
        w = (torch.rand(N, generator=g) + 0.5).to(dtype)
        eps = 0.05  # large enough that forgetting it shows
        want = rmsnorm_reference(x, w, eps)
        block = 1 << (N - 1).bit_length()
        xf = x.float()
        hints = [(xf * torch.rsqrt(xf.pow(2).sum(-1, keepdim=True) / block + eps) * w.float(),
                  "the mean divides by the block size: divide the sum of squares by N, the row length"),
                 (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps), "the weight is missing"),
                 (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True)) * w.float(), "eps is missing")]
        ok, msg = _compare(name, fn, (x, w, eps), want, f"{rows}x{N} {dtype}", hints)
        if not ok:
            return _result(name, False, msg)
    return _result(name, True, "one program per row reads it once, reduces in float32 and writes once: "
                               "4 bytes per element in bf16 (read x, write y) where eager PyTorch moves about 36")


def check_swiglu_kernel(fn) -> bool:
    """Exercise 8.2: fn(gate, up) -> silu(gate) * up (computed in float32, returned in the inputs' dtype)."""
    from ..kernels import swiglu_reference

    name = "Exercise 8.2 (SwiGLU kernel)"
    g = torch.Generator().manual_seed(1)
    for shape, dtype in (((4, 64), torch.float32), ((3, 100), torch.float32), ((7, 129), torch.float16)):
        gate = (torch.randn(*shape, generator=g) * 3).to(dtype)
        up = torch.randn(*shape, generator=g).to(dtype)
        want = swiglu_reference(gate, up)
        gf, uf = gate.float(), up.float()
        hints = [(F.silu(uf) * gf, "SiLU goes on the gate, not on up"),
                 (torch.sigmoid(gf) * uf, "SiLU(x) is x * sigmoid(x), not sigmoid(x)"),
                 (gf * uf, "the SiLU is missing")]
        ok, msg = _compare(name, fn, (gate, up), want, f"{shape} {dtype}", hints)
        if not ok:
            return _result(name, False, msg)
    return _result(name, True, "three tensors touched once each instead of the five passes of SiLU, then the product")


def check_int4_gemv(fn) -> bool:
    """Exercise 8.3: fn(x (M, K), qweight (N, K/2) uint8, scales (N, G) fp16, zeros (N, G) uint8 or None,
    group_size) -> x @ W.T with W[n, k] = (code - zero) * scale, zero = 8 when `zeros` is None."""
    from ..kernels import w4a16_reference
    from ..quant import QuantConfig, QuantLinear

    name = "Exercise 8.3 (dequantize inside the INT4 GEMV)"
    g = torch.Generator().manual_seed(2)
    for N, K, group, symmetric, M in ((48, 64, 32, True, 1), (37, 128, 64, False, 1), (64, 96, 32, True, 3)):
        lin = torch.nn.Linear(K, N, bias=False)
        with torch.no_grad():
            lin.weight.copy_(torch.randn(N, K, generator=g) * 0.1)
        q = QuantLinear.from_linear(lin, QuantConfig(bits=4, group_size=group, symmetric=symmetric))
        x = torch.randn(M, K, generator=g)
        args = (x, q.qweight, q.scales, q.zeros, group)
        want = w4a16_reference(*args)
        zero = (torch.full_like(q.scales, 8.0) if q.zeros is None else q.zeros.float()).repeat_interleave(group, 1)
        s = q.scales.float().repeat_interleave(group, 1)
        codes = torch.stack([q.qweight & 15, q.qweight >> 4], -1).reshape(N, K).float()
        swapped = torch.stack([q.qweight >> 4, q.qweight & 15], -1).reshape(N, K).float()
        hints = [(x @ ((swapped - zero) * s).T,
                  "the nibbles are swapped: element 2i is the LOW nibble (byte & 15), 2i+1 the high one"),
                 (x @ (codes * s).T, "the zero point is missing: subtract it (8 for symmetric codes) before scaling")]
        what = f"M={M}, {K}->{N}, group {group}, {'symmetric' if symmetric else 'zero-point'}"
        ok, msg = _compare(name, fn, args, want, what, hints)
        if not ok:
            return _result(name, False, msg)
    return _result(name, True, "the weight travels as 4-bit codes and becomes floats only in registers: "
                               "a quarter of bf16's bytes for a memory-bound GEMV")
