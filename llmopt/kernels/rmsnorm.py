"""RMSNorm (and the fused residual add + RMSNorm) as one Triton kernel: kernel, reference, wrapper.

Llama normalises every hidden state twice per layer. Eager PyTorch (transformers' LlamaRMSNorm)
runs it as eight small kernels, most of them a full trip through GPU memory. Per element of a
bf16 row, that is: `.float()` reads 2 bytes and writes 4, `pow(2)` reads 4 and writes 4, `mean`
reads 4, `h * rsqrt` reads 4 and writes 4, `.to(bf16)` reads 4 and writes 2, `weight *` reads 2
and writes 2: about 36 bytes. The kernel reads the row once and writes it once: 4 bytes, since a
whole row (up to 65536 elements) fits in one program's registers and the float32 copies never
leave the chip. With `residual`, vLLM's fused add-norm: eager adds another kernel (read 4, write
2: 42 bytes in all); the kernel reads x and residual, writes the new residual stream h = x + residual
and the normed output in the same pass: 8 bytes.

The kernel does the reference's steps in the reference's order (add in x's dtype, sum of squares and
rsqrt in float32, round to x's dtype, then times weight), so the two agree up to the order of the
float32 sum.
"""
from __future__ import annotations

import torch

from .common import compiler_opaque, next_power_of_2, tl, triton, use_triton

MAX_N = 65536  # one row per program, whole in registers; beyond this a looped kernel would be needed


def rmsnorm_reference(x, weight, eps: float = 1e-6, residual=None):
    """transformers' LlamaRMSNorm; with `residual`, returns (rmsnorm(x + residual), x + residual)."""
    if residual is not None:
        h = x + residual
        return rmsnorm_reference(h, weight, eps), h
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


@triton.jit
def _rmsnorm_kernel(x_ptr, r_ptr, w_ptr, out_ptr, rout_ptr, N, eps,
                    stride_x, stride_r, stride_out, stride_rout,
                    HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)  # int64: row * stride can pass 2**31 on big batches
    cols = tl.arange(0, BLOCK)
    mask = cols < N
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        x = x + tl.load(r_ptr + row * stride_r + cols, mask=mask, other=0.0)  # in x's dtype, as eager does
        tl.store(rout_ptr + row * stride_rout + cols, x, mask=mask)
    h = x.to(tl.float32)
    var = tl.sum(h * h, axis=0) / N  # masked tail loaded as 0: adds nothing to the sum
    h = h * tl.rsqrt(var + eps)
    # round to x's dtype before the weight, as the reference does; the product of two 16-bit floats
    # is exact in float32, so this rounds once, like PyTorch's bf16/fp16 multiply
    h = h.to(x_ptr.dtype.element_ty).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * stride_out + cols, (w * h).to(out_ptr.dtype.element_ty), mask=mask)


def _check_args(x, weight, residual=None) -> None:
    """What every backend takes, checked before one is picked (so a call fails alike on a CPU and a GPU)."""
    if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.dim() < 1:
        raise ValueError(f"x must be a floating-point tensor (..., N), got "
                         f"{getattr(x, 'dtype', type(x).__name__)} {tuple(getattr(x, 'shape', ()))}")
    N = x.shape[-1]
    if not isinstance(weight, torch.Tensor) or weight.shape != (N,):
        raise ValueError(f"weight must have shape ({N},), got {tuple(getattr(weight, 'shape', ()))}")
    if residual is not None and (not isinstance(residual, torch.Tensor) or residual.shape != x.shape
                                 or residual.dtype != x.dtype):
        raise ValueError(f"residual must match x ({x.dtype} {tuple(x.shape)}), "
                         f"got {getattr(residual, 'dtype', type(residual).__name__)} "
                         f"{tuple(getattr(residual, 'shape', ()))}")


def _rows(t, name: str, N: int):
    """`t` as a (rows, N) view: any leading dims, last dim contiguous (rows may be strided)."""
    if t.stride(-1) != 1:
        t = t.contiguous()
    try:
        return t.view(-1, N)
    except RuntimeError:  # leading dims that cannot merge into one row stride
        if name.endswith("out"):
            raise ValueError(f"{name} must be viewable as (rows, {N}) with a contiguous last dim") from None
        return t.reshape(-1, N)


def _output(buf, name: str, shape, dtype, like):
    if buf is None:
        return torch.empty(shape, dtype=dtype, device=like.device)
    if tuple(buf.shape) != tuple(shape) or buf.dtype != dtype or buf.stride(-1) != 1:
        raise ValueError(f"{name} must be a {dtype} tensor of shape {tuple(shape)} with a contiguous last dim, "
                         f"got {buf.dtype} {tuple(buf.shape)} strides {buf.stride()}")
    return buf


@compiler_opaque
def rmsnorm_triton(x, weight, eps: float = 1e-6, residual=None, out=None, residual_out=None):
    """The kernel; same contract as `rmsnorm_reference`. `out`/`residual_out` may be given pre-allocated."""
    _check_args(x, weight, residual)
    N = x.shape[-1]
    if N > MAX_N:
        raise ValueError(f"x's last dim must be at most {MAX_N} for the one-block kernel, got {N}")
    out = _output(out, "out", x.shape, torch.promote_types(x.dtype, weight.dtype), x)
    if residual is not None:
        residual_out = _output(residual_out, "residual_out", x.shape, x.dtype, x)
    if x.numel():
        x2, o2 = _rows(x, "x", N), _rows(out, "out", N)
        if residual is not None:
            r2, ro2 = _rows(residual, "residual", N), _rows(residual_out, "residual_out", N)
        else:
            r2 = ro2 = x2  # never touched: HAS_RESIDUAL=False compiles the branch away
        M, BLOCK = x2.shape[0], next_power_of_2(N)
        _rmsnorm_kernel[(M,)](x2, r2, weight.contiguous(), o2, ro2, N, float(eps),
                              x2.stride(0), r2.stride(0), o2.stride(0), ro2.stride(0),
                              HAS_RESIDUAL=residual is not None, BLOCK=BLOCK,
                              num_warps=min(max(BLOCK // 256, 1), 16))
    return (out, residual_out) if residual is not None else out


def rmsnorm(x, weight, eps: float = 1e-6, residual=None, backend: str = "auto"):
    """RMSNorm of x (with `residual`: of x + residual, returning (normed, x + residual)).

    backend: "triton" (the kernel), "torch" (the reference), "auto" (the kernel on a GPU)."""
    _check_args(x, weight, residual)
    if use_triton(x, backend):
        return rmsnorm_triton(x, weight, eps, residual)
    return rmsnorm_reference(x, weight, eps, residual)
