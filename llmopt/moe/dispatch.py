"""Dispatch: running each token through its k experts. Same answer four ways, very different speed.

Every path takes the same arguments, in the layout Hugging Face's Mixtral and Qwen3-MoE use:

    x        (T, H)      the tokens' hidden states
    experts  (T, k)      chosen expert per slot (E = dropped by the capacity limit: skip it)
    weights  (T, k)      the gate weight of each slot
    gate_up  (E, 2I, H)  each expert's gate and up projections, stacked
    down     (E, H, I)   each expert's down projection

and returns (T, H) = sum over slots of weight * expert(x), expert(x) = down(act(gate x) * up x).

0. `dense_dispatch`: every expert on every token, multiplied by a (T, E) gate matrix that is zero
   off the top-k. E/k times the arithmetic: what an MoE costs if dispatch is not solved.
1. `loop_dispatch`: for each expert, find its tokens (`torch.where`), gather them, run the expert,
   scatter-add back (Hugging Face's eager Mixtral). Right FLOPs, but 2E small matmuls (gate/up, then
   down), E searches over all T*k assignments and E gathers; with many small experts the overhead
   dominates.
2. `sorted_dispatch`: sort the T*k assignments by expert once, gather the rows in that order so
   each expert's tokens are one contiguous segment, run a grouped matmul over the segments, then
   weight and scatter-add back. One sort, one gather, one scatter, whatever E is.
3. the Triton kernels (`llmopt.moe.triton_moe`): the grouped matmuls as two kernel launches, gate/up
   with SiLU and the product fused in, then down with the gate weight, each over a (row tile, column
   tile) grid whose row tiles each belong to one expert's padded segment.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def _project(x: torch.Tensor, w) -> torch.Tensor:
    """x @ w^T for a weight matrix, or w(x) for a module or function that applies one (a quantized
    expert matrix: `QuantExperts`, or a CPU kernel's call in `kernels.KernelQuantExperts`)."""
    return F.linear(x, w) if isinstance(w, torch.Tensor) else w(x)


def expert_ffn(x: torch.Tensor, gate_up, down, act=F.silu) -> torch.Tensor:
    """One SwiGLU expert on rows x: (n, H) -> (n, H), with gate_up (2I, H) and down (H, I), weight
    matrices or modules (functions) that apply them."""
    gate, up = _project(x, gate_up).chunk(2, dim=-1)
    return _project(act(gate) * up, down)


def dense_dispatch(x, experts, weights, gate_up, down, act=F.silu):
    E = gate_up.shape[0]
    gates = x.new_zeros(x.shape[0], E + 1).scatter_add_(1, experts, weights.to(x.dtype))[:, :E]
    out = torch.zeros_like(x)
    for e in range(E):
        out += gates[:, e, None] * expert_ffn(x, gate_up[e], down[e], act)
    return out


def hit_experts(experts: torch.Tensor, num_experts: int) -> list[int]:
    """The expert ids that have at least one token, ascending (a dropped slot, id E, is none): the
    only experts a quantized layer dequantizes. One read back to the host."""
    return [e for e in torch.unique(experts).tolist() if e < num_experts]


def loop_dispatch(x, experts, weights, gate_up, down, act=F.silu, only=None):
    # gate_up / down: stacked weights, or one module (function) per expert (`QuantExperts`), indexed by
    # expert id; `only`: the expert ids to visit, when the caller knows which ones have tokens
    out = torch.zeros_like(x)
    for e in range(len(gate_up)) if only is None else only:
        token, slot = torch.where(experts == e)
        if token.numel() == 0:
            continue
        y = expert_ffn(x[token], gate_up[e], down[e], act) * weights[token, slot, None]
        out.index_add_(0, token, y.to(x.dtype))
    return out


def _has_grouped_mm(device: torch.device) -> bool:
    # torch._grouped_mm (PyTorch >= 2.8) runs float32 on CPU; on CUDA it wants bf16 and
    # aligned shapes, so there the segment loop (or the Triton kernel) is used instead.
    return hasattr(torch, "_grouped_mm") and device.type == "cpu"


def grouped_mm(a: torch.Tensor, w: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Rows of `a` in consecutive segments, counts[e] rows for expert e, each times w[e]^T:
    a (M, K), w (E, N, K) -> (M, N). One call to torch's grouped GEMM where it has one on this
    device, else one matmul per non-empty segment."""
    if _has_grouped_mm(a.device) and a.dtype == w.dtype:
        offsets = counts.cumsum(0).to(torch.int32)
        return torch._grouped_mm(a, w.transpose(1, 2), offs=offsets)
    out = a.new_empty(a.shape[0], w.shape[1])
    start = 0
    for e, n in enumerate(counts.tolist()):
        if n:
            torch.matmul(a[start:start + n], w[e].t(), out=out[start:start + n])
            start += n
    return out


def sort_by_expert(experts: torch.Tensor, num_experts: int):
    """The (token, slot) assignments ordered by expert: (order, token, counts), where order indexes
    the flattened (T*k) assignments, token = order // k is the row of x each one reads, and
    counts[e] is the length of expert e's segment. Dropped assignments (index E) are cut off."""
    k = experts.shape[1]
    flat = experts.flatten()
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=num_experts + 1)[:num_experts]
    order = order[: int(counts.sum())]
    return order, order // k, counts


def sorted_dispatch(x, experts, weights, gate_up, down, act=F.silu):
    E = gate_up.shape[0]
    order, token, counts = sort_by_expert(experts, E)
    xs = x.index_select(0, token)                                  # gather: segments by expert
    gate, up = grouped_mm(xs, gate_up, counts).chunk(2, dim=-1)
    # The gate weight scales the row before the down projection (it is linear), where rows are
    # I wide instead of H: one pass fewer over the widest buffer.
    h = act(gate) * up * weights.flatten()[order, None].to(xs.dtype)
    ys = grouped_mm(h, down, counts)
    return torch.zeros_like(x).index_add_(0, token, ys)           # scatter back, summing the k slots


DISPATCH = {"dense": dense_dispatch, "loop": loop_dispatch, "sorted": sorted_dispatch}


class DispatchChoice:
    """A `dispatch` attribute holding a path's name, checked when set; `self._fn` is that path."""

    @property
    def dispatch(self) -> str:
        return self._dispatch

    @dispatch.setter
    def dispatch(self, name: str) -> None:
        self._fn = get_dispatch(name)  # raises ValueError for an unknown name
        self._dispatch = name


def get_dispatch(name: str):
    """The dispatch function called `name`: "dense", "loop", "sorted" or "triton"."""
    if name == "triton":
        from .triton_moe import triton_dispatch
        return triton_dispatch
    if name not in DISPATCH:
        raise ValueError(f"dispatch must be one of {sorted(DISPATCH) + ['triton']}, got {name!r}")
    return DISPATCH[name]
