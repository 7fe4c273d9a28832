"""SwiGLU, silu(gate) * up, as one Triton kernel: kernel, reference, wrapper.

Llama's MLP is down(silu(gate(x)) * up(x)). Between the matmuls, eager PyTorch runs two
elementwise kernels: `silu(gate)` reads gate and writes a temporary, `* up` reads the temporary
and up and writes the result: five passes over a (tokens, intermediate) tensor, the widest
activation in the model (bf16: 10 bytes per element). The kernel reads gate and up once and
writes once: three passes, 6 bytes per element, no temporary. When gate and up are the two halves
of one merged gate_up matmul's output (vLLM's MergedColumnParallelLinear), they are strided views
and the kernel reads them in place: no copy to split them.

The reference rounds once (silu and the product in float32); transformers' LlamaMLP computes
`act(gate) * up` in the model's dtype and rounds twice, so in bf16 the two differ by bf16
rounding only.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .common import check_block, compiler_opaque, next_power_of_2, output_buffer, tl, triton, use_triton


def swiglu_reference(gate, up):
    """silu(gate) * up computed in float32, rounded once to gate's dtype."""
    return (F.silu(gate.float()) * up.float()).to(gate.dtype)


@triton.jit
def _swiglu_kernel(gate_ptr, up_ptr, out_ptr, N, stride_g, stride_u, stride_o, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < N
    g = tl.load(gate_ptr + row * stride_g + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(up_ptr + row * stride_u + cols, mask=mask, other=0.0).to(tl.float32)
    # silu(g) = g * sigmoid(g); written out because tl.sigmoid fails under the interpreter
    # (Triton <= 3.9). For g -> -inf, exp(-g) = inf and g / inf = -0: no nan.
    y = g / (1.0 + tl.exp(-g)) * u
    tl.store(out_ptr + row * stride_o + cols, y.to(out_ptr.dtype.element_ty), mask=mask)


def _check_args(gate, up) -> None:
    """What every backend takes, checked before one is picked (so a call fails alike on a CPU and a GPU)."""
    if not isinstance(gate, torch.Tensor) or not gate.is_floating_point() or gate.dim() < 1:
        raise ValueError(f"gate must be a floating-point tensor (..., N), got "
                         f"{getattr(gate, 'dtype', type(gate).__name__)} {tuple(getattr(gate, 'shape', ()))}")
    if not isinstance(up, torch.Tensor) or not up.is_floating_point() or up.dim() < 1:
        raise ValueError(f"up must be a floating-point tensor (..., N), got "
                         f"{getattr(up, 'dtype', type(up).__name__)} {tuple(getattr(up, 'shape', ()))}")
    if gate.shape != up.shape:
        raise ValueError(f"gate and up must have the same shape, got {tuple(gate.shape)} and {tuple(up.shape)}")


def _rows(t, N: int):
    """(rows, N) view of t, last dim contiguous; rows may be strided (a half of gate_up is)."""
    if t.stride(-1) != 1:
        t = t.contiguous()
    try:
        return t.view(-1, N)
    except RuntimeError:  # leading dims that cannot merge into one row stride
        return t.reshape(-1, N)


@compiler_opaque
def swiglu_triton(gate, up, out=None, block=None):
    """The kernel; same contract as `swiglu_reference`. `block`: columns per program (a power of 2)."""
    _check_args(gate, up)
    N = gate.shape[-1]
    out = output_buffer(out, gate)
    block = check_block(block or min(next_power_of_2(N), 1024))
    if gate.numel():
        g2, u2, o2 = _rows(gate, N), _rows(up, N), out.view(-1, N)
        # rows on grid axis 0 (up to 2**31 - 1 programs); axis 1 is capped at 65535 on CUDA
        grid = (g2.shape[0], triton.cdiv(N, block))
        _swiglu_kernel[grid](g2, u2, o2, N, g2.stride(0), u2.stride(0), o2.stride(0), BLOCK=block,
                             num_warps=min(max(block // 256, 1), 8))
    return out


def swiglu(gate, up, backend: str = "auto"):
    """silu(gate) * up. backend: "triton" (the kernel), "torch" (the reference), "auto" (the kernel on a GPU)."""
    _check_args(gate, up)
    if use_triton(gate, backend):
        return swiglu_triton(gate, up)
    return swiglu_reference(gate, up)
