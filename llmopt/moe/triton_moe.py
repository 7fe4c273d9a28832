"""Dispatch path 3: the experts' grouped GEMMs as Triton kernels (kernel, reference, benchmark).

Path 2 (`sorted_dispatch`) already sorts the assignments by expert; a GPU still pays for the
gathered copy of x, one matmul launch per expert (or a grouped GEMM) and separate passes for
SiLU, the product with `up`, and the gate weight. Here:

- the host sorts the assignments by expert and pads each expert's segment to a multiple of
  BLOCK_M, so every BLOCK_M-row tile belongs to one expert (`block_expert[tile]`); padding rows
  point past the end and are masked (vLLM's `moe_align_block_size` does the same);
- `_gate_up_kernel`: one program per (row tile, column tile of the intermediate size) reads its rows of x straight
  from the token ids (no gathered copy), multiplies by that expert's gate and up columns and
  writes silu(gate) * up;
- `_down_kernel`: the same tiling over the down projection, times each row's gate weight;
- the host adds each row back onto its token (`index_add_`, summing the k slots).

On a machine without CUDA the kernels run in Triton's interpreter (TRITON_INTERPRET=1, set by
`llmopt.kernels.common` before `triton` is imported): numpy under the hood, exact but slow, so only
for small tests.
The reference is `dispatch.sorted_dispatch`; the tests compare the two.
"""
from __future__ import annotations

import torch

from ..kernels.common import interpreted, precision, tl, triton
from .dispatch import sort_by_expert


@triton.jit
def _gate_up_kernel(x_ptr, w_ptr, h_ptr, token_ptr, block_expert_ptr,
                    H, INTER, stride_x, stride_we, stride_wn, stride_h,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr):
    pid_m, pid_n = tl.program_id(0), tl.program_id(1)
    e = tl.load(block_expert_ptr + pid_m)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)           # positions in the padded sorted order
    token = tl.load(token_ptr + rows)                         # -1 on padding rows
    valid = token >= 0
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)            # columns of the intermediate size
    acc_gate = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)
    acc_up = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)
    w_e = w_ptr + e * stride_we
    for k0 in range(0, H, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        a = tl.load(x_ptr + token[:, None] * stride_x + ks[None, :],
                    mask=valid[:, None] & (ks[None, :] < H), other=0.0)
        wmask = (ks[:, None] < H) & (cols[None, :] < INTER)
        w_gate = tl.load(w_e + cols[None, :] * stride_wn + ks[:, None], mask=wmask, other=0.0)
        w_up = tl.load(w_e + (INTER + cols[None, :]) * stride_wn + ks[:, None], mask=wmask, other=0.0)
        acc_gate += tl.dot(a, w_gate, input_precision=PRECISION)  # float32 accumulator
        acc_up += tl.dot(a, w_up, input_precision=PRECISION)
    h = acc_gate / (1.0 + tl.exp(-acc_gate)) * acc_up          # silu(gate) * up
    tl.store(h_ptr + rows[:, None] * stride_h + cols[None, :], h.to(h_ptr.dtype.element_ty),
             mask=valid[:, None] & (cols[None, :] < INTER))


@triton.jit
def _down_kernel(h_ptr, w_ptr, y_ptr, weight_ptr, token_ptr, block_expert_ptr,
                 H, INTER, stride_h, stride_we, stride_wn, stride_y,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr):
    pid_m, pid_n = tl.program_id(0), tl.program_id(1)
    e = tl.load(block_expert_ptr + pid_m)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    valid = tl.load(token_ptr + rows) >= 0
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)            # columns of H
    acc = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)
    w_e = w_ptr + e * stride_we
    for k0 in range(0, INTER, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        a = tl.load(h_ptr + rows[:, None] * stride_h + ks[None, :],
                    mask=valid[:, None] & (ks[None, :] < INTER), other=0.0)
        w = tl.load(w_e + cols[None, :] * stride_wn + ks[:, None],
                    mask=(ks[:, None] < INTER) & (cols[None, :] < H), other=0.0)
        acc += tl.dot(a, w, input_precision=PRECISION)
    gate_weight = tl.load(weight_ptr + rows, mask=valid, other=0.0).to(tl.float32)
    y = acc * gate_weight[:, None]
    tl.store(y_ptr + rows[:, None] * stride_y + cols[None, :], y.to(y_ptr.dtype.element_ty),
             mask=valid[:, None] & (cols[None, :] < H))


def align_blocks(experts: torch.Tensor, weights: torch.Tensor, num_experts: int, block_m: int):
    """Sort the assignments by expert and pad every expert's segment to a multiple of block_m.

    Returns (token, weight, block_expert): token (P,) the row of x for each padded position (-1 on
    padding), weight (P,) its gate weight, block_expert (P // block_m,) the expert of each tile."""
    order, token, counts = sort_by_expert(experts, num_experts)
    padded = (counts + block_m - 1) // block_m * block_m
    P = int(padded.sum())
    seg_start = torch.cumsum(padded, 0) - padded              # where each expert's padded segment begins
    rank = torch.arange(order.numel(), device=order.device) - torch.repeat_interleave(
        torch.cumsum(counts, 0) - counts, counts)             # place within its own segment
    pos = torch.repeat_interleave(seg_start, counts) + rank
    token_p = torch.full((P,), -1, dtype=torch.int64, device=experts.device)
    weight_p = torch.zeros(P, dtype=weights.dtype, device=experts.device)
    token_p[pos] = token
    weight_p[pos] = weights.flatten()[order]
    block_expert = torch.repeat_interleave(torch.arange(num_experts, device=experts.device), padded // block_m)
    return token_p, weight_p, block_expert


def triton_dispatch(x, experts, weights, gate_up, down, act=None, block_m: int = 16, block_n: int = 32,
                    block_k: int = 32):
    """Same contract as the other dispatch paths (SiLU experts only: `act` must be SiLU or None)."""
    if act is not None and getattr(act, "__name__", "") != "silu" and type(act).__name__ != "SiLUActivation":
        raise ValueError(f"the Triton MoE kernel fuses SiLU; got activation {act!r}")
    if x.device.type == "cpu" and not interpreted():
        raise ValueError("Triton kernels need a CUDA tensor, or TRITON_INTERPRET=1 set before llmopt.moe.triton_moe "
                         "is imported to run them on CPU")
    E, two_i, H = gate_up.shape
    INTER = two_i // 2
    x, gate_up, down = x.contiguous(), gate_up.contiguous(), down.contiguous()
    token, weight, block_expert = align_blocks(experts, weights, E, block_m)
    P = token.numel()
    h = torch.empty(P, INTER, device=x.device, dtype=x.dtype)
    y = torch.empty(P, H, device=x.device, dtype=x.dtype)
    if P:
        tiles = P // block_m
        _gate_up_kernel[(tiles, triton.cdiv(INTER, block_n))](
            x, gate_up, h, token, block_expert, H, INTER, x.stride(0), gate_up.stride(0), gate_up.stride(1),
            h.stride(0), BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, PRECISION=precision(x.dtype))
        _down_kernel[(tiles, triton.cdiv(H, block_n))](
            h, down, y, weight, token, block_expert, H, INTER, h.stride(0), down.stride(0), down.stride(1),
            y.stride(0), BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, PRECISION=precision(x.dtype))
    valid = token >= 0
    return torch.zeros_like(x).index_add_(0, token[valid], y[valid])
