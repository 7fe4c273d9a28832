"""The decode GEMV with the op before it fused in: RMSNorm -> matmul, SwiGLU -> matmul, as one kernel.

At batch-1 decode a Llama layer is a chain of small launches: norm, qkv matmul, rotary, attention,
o matmul, add + norm, gate/up matmul, SwiGLU, down matmul. On a GPU each costs a couple of
microseconds however little it does (CUDA graphs remove the CPU's launch cost, not the kernel's
own start and drain), and at a 1B model's sizes the matmuls themselves take only 2-12 us, so the
small kernels between them are a big share of a step. Their work is tiny and can ride along:

- `norm_linear`: y = rmsnorm(x [+ residual]) @ W.T. Every program streams its own columns of W
  and reads the whole (short) x row anyway; it also adds the residual, sums h = x + residual's
  squares and multiplies by the norm weight on the way. The norm's 1 / rms is one number per row,
  so it multiplies the finished dot products at the end instead of x at the start. Program 0 also
  writes h, the residual stream the next layer needs.
- `swiglu_linear`: y = (silu(gate) * up) @ W.T: each program computes silu(gate) * up for the
  k-tile it is about to multiply, from the gate/up matmul's output (the two halves of a merged
  gate_up projection are read in place).

Three kernels fewer per layer (both norms and the SwiGLU), for at most 8 rows (decode); the x
side is recomputed by every program, which costs nothing next to the weights each one streams.
With more rows the wrappers take the separate kernels (`rmsnorm`, `swiglu`) and PyTorch's matmul.
`gemv` is the plain kernel (no prologue: the o projection). A fused kernel must also match cuBLAS
on the matmul itself, so on a GPU each wrapper times its tiles and the separate ops once per shape,
on weights coming from memory (`pick_config(cold=True)`), and runs the faster.

Rounding differs from the separate ops in one place: their normed / SwiGLU activations are
rounded to x's dtype before the matmul; here they stay float32. In fp32 the two agree to float
order; in bf16 by the rounding of the activations.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .common import compiler_opaque, interpreted, next_power_of_2, pdl, pdl_launch, pick_config, tl, triton, use_triton
from .rmsnorm import rmsnorm, rmsnorm_reference
from .swiglu import swiglu, swiglu_reference

MAX_ROWS = 8      # rows a GEMV takes; more, and the matmul is a GEMM (the separate ops then)

PLAIN, NORM, SWIGLU = 0, 1, 2

# Candidate tiles (`pick_config` times them per shape on a GPU; the interpreter takes its own).
# Tiles are BLOCK_N weight rows by BLOCK_K columns: 4-16 KB of bf16 weights in flight per program
# and iteration, and N / BLOCK_N programs: 256 for a 2048-wide output with BLOCK_N = 8, two per SM.
GEMV_CONFIGS = [
    dict(BLOCK_N=8, BLOCK_K=256, num_warps=4),
    dict(BLOCK_N=4, BLOCK_K=512, num_warps=4),
    dict(BLOCK_N=8, BLOCK_K=512, num_warps=4),
    dict(BLOCK_N=16, BLOCK_K=256, num_warps=4),
    dict(BLOCK_N=16, BLOCK_K=512, num_warps=8),
    dict(BLOCK_N=4, BLOCK_K=1024, num_warps=8),
    dict(BLOCK_N=32, BLOCK_K=128, num_warps=4),
    dict(BLOCK_N=2, BLOCK_K=1024, num_warps=4),
    # the next tile loaded while this one is used (see the kernel)
    dict(BLOCK_N=8, BLOCK_K=256, num_warps=4, PREFETCH=True),
    dict(BLOCK_N=4, BLOCK_K=512, num_warps=4, PREFETCH=True),
    dict(BLOCK_N=8, BLOCK_K=512, num_warps=4, PREFETCH=True),
    dict(BLOCK_N=16, BLOCK_K=256, num_warps=8, PREFETCH=True),
    # for 2-8 rows (the accumulator grows with the rows: `configs_for` keeps the ones that fit)
    dict(BLOCK_N=4, BLOCK_K=128, num_warps=4),
    dict(BLOCK_N=8, BLOCK_K=128, num_warps=8),
    dict(BLOCK_N=16, BLOCK_K=64, num_warps=4),
]


# --------------------------------------------------------------------------- references (the spec)

def norm_linear_reference(x, norm_weight, eps: float, weight, bias=None, residual=None):
    """linear(rmsnorm(x [+ residual])): the separate ops. With `residual`: (y, x + residual)."""
    if residual is None:
        return F.linear(rmsnorm_reference(x, norm_weight, eps), weight, bias)
    h, res = rmsnorm_reference(x, norm_weight, eps, residual)
    return F.linear(h, weight, bias), res


def swiglu_linear_reference(gate, up, weight, bias=None):
    """linear(silu(gate) * up)."""
    return F.linear(swiglu_reference(gate, up), weight, bias)


# --------------------------------------------------------------------------- the kernel

@triton.jit
def _gemv_kernel(x_ptr, u_ptr, r_ptr, nw_ptr, w_ptr, b_ptr, out_ptr, h_ptr, M, N, K, eps,
                 stride_xm, stride_um, stride_rm, stride_wn, stride_om, stride_hm,
                 PROLOGUE: tl.constexpr, HAS_RESIDUAL: tl.constexpr, HAS_BIAS: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PREFETCH: tl.constexpr,
                 PDL: tl.constexpr = False):
    # One program per BLOCK_N output columns, all M rows, all of K (the norm needs the whole row).
    # The products are kept per k lane (acc) and summed across threads once, after the loop.
    pid = tl.program_id(0)
    rows = tl.arange(0, BLOCK_M)
    cols = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok, col_ok = rows < M, cols < N
    # x-side tensors are 3-D, (BLOCK_M, 1, BLOCK_K), broadcast against the (1, BLOCK_N, BLOCK_K) weight
    # tile: compiled for sm_90 this takes fewer instructions per byte than 2-D x tiles did
    r3, c3 = rows[:, None, None], cols[None, :, None]
    acc = tl.zeros((BLOCK_M, BLOCK_N, BLOCK_K), dtype=tl.float32)
    squares = tl.zeros((BLOCK_M, 1, BLOCK_K), dtype=tl.float32)
    # PREFETCH: the next weight tile is loaded before this one is used, two tiles in flight per
    # program instead of one (Triton does not pipeline loads that feed no tl.dot by itself)
    w_ptrs = w_ptr + c3 * stride_wn + tl.arange(0, BLOCK_K)[None, None, :]
    if PREFETCH:
        w_next = tl.load(w_ptrs, mask=(c3 < N) & (tl.arange(0, BLOCK_K)[None, None, :] < K), other=0.0)
    # PDL: programmatic dependent launch (common.py). Wait for the kernel before to finish only now:
    # with PREFETCH the first weight tile is on its way already (no kernel writes weights)
    if PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)[None, None, :]
        k_ok = ks < K
        x_mask = (r3 < M) & k_ok
        x = tl.load(x_ptr + r3 * stride_xm + ks, mask=x_mask, other=0.0)
        if PROLOGUE == 1:        # RMSNorm: add the residual in x's dtype (as the norm kernel does)
            if HAS_RESIDUAL:
                x = x + tl.load(r_ptr + r3 * stride_rm + ks, mask=x_mask, other=0.0)
                if pid == 0:
                    tl.store(h_ptr + r3 * stride_hm + ks, x, mask=x_mask)
            a = x.to(tl.float32)
            squares += a * a
            a = a * tl.load(nw_ptr + ks, mask=k_ok, other=0.0).to(tl.float32)
        elif PROLOGUE == 2:      # SwiGLU: silu(gate) * up (silu written out: see swiglu.py)
            g = x.to(tl.float32)
            u = tl.load(u_ptr + r3 * stride_um + ks, mask=x_mask, other=0.0).to(tl.float32)
            a = g / (1.0 + tl.exp(-g)) * u
        else:
            a = x.to(tl.float32)
        if PREFETCH:
            w = w_next
            w_next = tl.load(w_ptrs + (k0 + BLOCK_K), mask=(c3 < N) & (ks + BLOCK_K < K), other=0.0)
        else:
            w = tl.load(w_ptrs + k0, mask=(c3 < N) & k_ok, other=0.0)
        acc += a * w.to(tl.float32)
    y = tl.sum(acc, axis=2)
    if PROLOGUE == 1:            # the norm's 1 / rms, one per row, on the finished sums
        y = y * tl.rsqrt(tl.sum(tl.sum(squares, axis=2), axis=1) / K + eps)[:, None]
    if HAS_BIAS:
        y += tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(out_ptr + rows[:, None] * stride_om + cols[None, :], y.to(out_ptr.dtype.element_ty),
             mask=row_ok[:, None] & col_ok[None, :])


def _matrix(t, name: str, K: int):
    """`t` as (rows, K) with a contiguous last dim (rows may be strided: half of a merged output)."""
    if t.shape[-1] != K:
        raise ValueError(f"{name}'s last dim must be {K} (the weight's in_features), got {tuple(t.shape)}")
    if t.stride(-1) != 1:
        t = t.contiguous()
    return t.reshape(-1, K)


def _buffer(buf, name: str, shape, like):
    if buf is None:
        return torch.empty(shape, dtype=like.dtype, device=like.device)
    if tuple(buf.shape) != tuple(shape) or buf.dtype != like.dtype or not buf.is_contiguous():
        raise ValueError(f"{name} must be a contiguous {like.dtype} tensor of shape {tuple(shape)}, "
                         f"got {buf.dtype} {tuple(buf.shape)}")
    return buf


# Under the interpreter every program is a Python loop over numpy tiles: few, wide programs run
# fastest there, and the tile changes no result (tests run each GPU config on its own).
INTERPRETER_CONFIG = dict(BLOCK_N=64, BLOCK_K=256, num_warps=4)


def fitting_configs(rows: int) -> list[dict]:
    """The candidates whose float32 accumulator (rows x BLOCK_N x BLOCK_K) fits 64 registers a thread."""
    m = next_power_of_2(rows)
    return [c for c in GEMV_CONFIGS if m * c["BLOCK_N"] * c["BLOCK_K"] <= 64 * 32 * c["num_warps"]]


def configs_for(rows: int) -> list[dict]:
    """What `pick_config` chooses from: `fitting_configs` (for 2-8 rows at most five, without PREFETCH:
    the three small-tile ones meant for several rows and the first two others; each candidate is a
    compile, and batch-1 decode is where the choice matters most), or under the interpreter
    `INTERPRETER_CONFIG`."""
    if interpreted() and not torch.cuda.is_available():
        return [INTERPRETER_CONFIG]
    fit = fitting_configs(rows)
    if rows == 1:
        return fit
    plain = [c for c in fit if not c.get("PREFETCH")]
    return plain[-3:] + plain[:-3][:2]


# A candidate beside the tiles: the separate ops (the norm or SwiGLU kernel, then cuBLAS). Timed with
# them on a GPU, so a wrapper never runs the fused GEMV where it would lose.
SEPARATE = dict(SEPARATE=True)


@compiler_opaque
def gemv_triton(x, weight, bias=None, *, prologue: int = PLAIN, up=None, norm_weight=None, eps: float = 1e-6,
                residual=None, out=None, residual_out=None, config: dict | None = None, separate=None):
    """The kernel. x: (..., K) with at most MAX_ROWS rows; weight (N, K). `prologue`: PLAIN (y = x @ W.T),
    NORM (rmsnorm(x [+ residual]) @ W.T, needs `norm_weight`), SWIGLU (silu(x) * up @ W.T, x the
    gate). Returns y, and with a residual also h = x + residual. `config`: one of GEMV_CONFIGS
    (default: `pick_config`'s). `separate`: a function computing the same with the separate ops,
    timed as one more candidate and returned from where it wins (its own tensors, not `out`)."""
    N, K = weight.shape
    x2 = _matrix(x, "x", K)
    M = x2.shape[0]
    if M > MAX_ROWS:
        raise ValueError(f"the GEMV takes at most {MAX_ROWS} rows, got {M}")
    if weight.stride(-1) != 1:
        weight = weight.contiguous()
    if prologue == NORM and (norm_weight is None or norm_weight.shape != (K,)):
        raise ValueError(f"norm_weight must have shape ({K},) for the norm prologue")
    if prologue == SWIGLU and (up is None or up.shape != x.shape):
        raise ValueError(f"up must have x's shape {tuple(x.shape)} for the SwiGLU prologue")
    if bias is not None and bias.shape != (N,):
        raise ValueError(f"bias must have shape ({N},), got {tuple(bias.shape)}")
    has_res = prologue == NORM and residual is not None
    if has_res and (residual.shape != x.shape or residual.dtype != x.dtype):
        raise ValueError(f"residual must match x ({x.dtype} {tuple(x.shape)})")
    out = _buffer(out, "out", (*x.shape[:-1], N), x)
    residual_out = _buffer(residual_out, "residual_out", x.shape, x) if has_res else None
    if M == 0:
        return (out, residual_out) if has_res else out
    u2 = _matrix(up, "up", K) if prologue == SWIGLU else x2
    r2 = _matrix(residual, "residual", K) if has_res else x2
    h2 = residual_out.view(-1, K) if has_res else x2    # unused pointers: any tensor will do
    o2 = out.view(-1, N)
    nw = norm_weight.contiguous() if prologue == NORM else weight
    b = weight if bias is None else bias

    on = pdl(x2)

    def launch(BLOCK_N, BLOCK_K, num_warps, PREFETCH=False):
        _gemv_kernel[(triton.cdiv(N, BLOCK_N),)](
            x2, u2, r2, nw, weight, b, o2, h2, M, N, K, float(eps),
            x2.stride(0), u2.stride(0), r2.stride(0), weight.stride(0), o2.stride(0), h2.stride(0),
            PROLOGUE=prologue, HAS_RESIDUAL=has_res, HAS_BIAS=bias is not None,
            BLOCK_M=next_power_of_2(M), BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K, PREFETCH=PREFETCH, PDL=on,
            num_warps=num_warps, **pdl_launch(on))

    if config is None:
        candidates = configs_for(M) + ([SEPARATE] if separate is not None else [])
        config = pick_config(("gemv", prologue, has_res, bias is not None, next_power_of_2(M), N, K, x.dtype,
                              weight.dtype, separate is not None), candidates,
                             lambda SEPARATE=False, **c: separate() if SEPARATE else launch(**c), cold=True)
    if config.get("SEPARATE"):
        return separate()
    launch(**config)
    return (out, residual_out) if has_res else out


def _gemv_ok(x, weight, backend: str) -> bool:
    rows = x.numel() // max(x.shape[-1], 1)
    return use_triton(x, backend) and rows <= MAX_ROWS and weight.dtype == x.dtype


# --------------------------------------------------------------------------- wrappers

def gemv(x, weight, bias=None, backend: str = "auto"):
    """x @ weight.T (+ bias): the kernel for up to MAX_ROWS rows where it beats `F.linear` (timed on a
    GPU), else `F.linear`."""
    if _gemv_ok(x, weight, backend):
        return gemv_triton(x, weight, bias, separate=lambda: F.linear(x, weight, bias))
    return F.linear(x, weight, bias)


def _norm_then_linear(x, norm_weight, eps, weight, bias, residual, backend):
    if residual is None:
        return F.linear(rmsnorm(x, norm_weight, eps, backend=backend), weight, bias)
    h, res = rmsnorm(x, norm_weight, eps, residual, backend=backend)
    return F.linear(h, weight, bias), res


def norm_linear(x, norm_weight, eps: float, weight, bias=None, residual=None, backend: str = "auto"):
    """linear(rmsnorm(x [+ residual]), weight, bias) as one kernel for up to MAX_ROWS rows (on a GPU,
    where it beats the separate ops: both are timed once per shape); more rows, or a CPU, take
    `rmsnorm` (its kernel or reference) and `F.linear`. With `residual`, returns (y, x + residual),
    like `rmsnorm`."""
    args = (x, norm_weight, eps, weight, bias, residual, backend)
    if _gemv_ok(x, weight, backend):
        return gemv_triton(x, weight, bias, prologue=NORM, norm_weight=norm_weight, eps=eps, residual=residual,
                           separate=lambda: _norm_then_linear(*args))
    return _norm_then_linear(*args)


def swiglu_linear(gate, up, weight, bias=None, backend: str = "auto"):
    """linear(silu(gate) * up, weight, bias) as one kernel for up to MAX_ROWS rows (where it wins, as
    `norm_linear`); else `swiglu` and `F.linear`."""
    if _gemv_ok(gate, weight, backend):
        return gemv_triton(gate, weight, bias, prologue=SWIGLU, up=up,
                           separate=lambda: F.linear(swiglu(gate, up, backend=backend), weight, bias))
    return F.linear(swiglu(gate, up, backend=backend), weight, bias)
