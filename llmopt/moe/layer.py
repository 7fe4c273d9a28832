"""The MoE feed-forward layer: a router and E SwiGLU experts, in Hugging Face's Mixtral layout.

Parameter names and shapes are Mixtral's (`gate.weight` (E, H), `experts.gate_up_proj`
(E, 2I, H), `experts.down_proj` (E, H, I)), so this module can stand in for a Mixtral or
Qwen3-MoE block of a loaded `transformers` model (`use_llmopt_moe`) and the model still saves
and reloads as the stock architecture. What it adds: a choice of dispatch path, a capacity
factor, and a record of the last batch's routing (`last_routing`, from which the balancing
losses and the load histogram are read).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .dispatch import DispatchChoice
from .routing import Routing, apply_capacity, check_capacity_factor, check_top_k, route


class Router(nn.Module):
    """hidden -> E logits -> softmax -> top-k (renormalised if `normalize`)."""

    def __init__(self, hidden_size: int, num_experts: int, top_k: int, normalize: bool = True):
        super().__init__()
        check_top_k(top_k, num_experts)
        self.num_experts, self.top_k, self.normalize = num_experts, top_k, normalize
        self.weight = nn.Parameter(torch.empty(num_experts, hidden_size))
        nn.init.normal_(self.weight, std=0.02)

    def forward(self, x: torch.Tensor) -> Routing:
        return route(F.linear(x, self.weight), self.top_k, self.normalize)


class Experts(DispatchChoice, nn.Module):
    """E SwiGLU FFNs as stacked weights; `dispatch` picks how tokens reach them (see dispatch.py)."""

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int, dispatch: str = "sorted"):
        super().__init__()
        self.num_experts, self.hidden_size, self.intermediate_size = num_experts, hidden_size, intermediate_size
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, 2 * intermediate_size, hidden_size))
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden_size, intermediate_size))
        for w in (self.gate_up_proj, self.down_proj):
            nn.init.normal_(w, std=1 / math.sqrt(w.shape[-1]))
        self.act = F.silu
        self.dispatch = dispatch

    def forward(self, x: torch.Tensor, experts: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        return self._fn(x, experts, weights, self.gate_up_proj, self.down_proj, self.act)

    @property
    def graph_safe(self) -> bool:
        """Whether this dispatch path reads nothing back to the host, so a CUDA graph can record it:
        "dense" (every expert on every token) and "triton" (shapes fixed by `triton_moe.padded_length`)."""
        from ..kernels.common import HAS_TRITON

        return self.dispatch == "dense" or (self.dispatch == "triton" and HAS_TRITON)

    def extra_repr(self) -> str:
        return (f"num_experts={self.num_experts}, hidden={self.hidden_size}, "
                f"intermediate={self.intermediate_size}, dispatch={self.dispatch!r}")


class MoEFeedForward(nn.Module):
    """The MoE layer: route each token to its top-k experts and sum their outputs by gate weight.

    Input and output (..., H). After each forward pass `last_routing` holds the routing of that
    batch (logits, probabilities, chosen experts, weights, dropped count), so a training loss can
    add `load_balancing_loss` and `router_z_loss` (see `llmopt.moe.aux_losses`)."""

    def __init__(self, hidden_size: int, intermediate_size: int, num_experts: int, top_k: int,
                 normalize: bool = True, capacity_factor: float | None = None, dispatch: str = "sorted"):
        super().__init__()
        check_capacity_factor(capacity_factor)
        self.gate = Router(hidden_size, num_experts, top_k, normalize)
        self.experts = Experts(num_experts, hidden_size, intermediate_size, dispatch)
        self.capacity_factor = capacity_factor
        self.last_routing: Routing | None = None

    @property
    def num_experts(self) -> int:
        return self.experts.num_experts

    @property
    def top_k(self) -> int:
        return self.gate.top_k

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        shape = hidden_states.shape
        x = hidden_states.reshape(-1, shape[-1])
        routing = apply_capacity(self.gate(x), self.capacity_factor)
        self.last_routing = routing
        return self.experts(x, routing.experts, routing.weights).reshape(shape)

    def __getstate__(self):
        # last_routing is one batch's record and, after a training step, part of its autograd graph,
        # which copy.deepcopy and pickle refuse: a copy starts without it.
        return {**super().__getstate__(), "last_routing": None}

    @classmethod
    def from_hf(cls, block: nn.Module, dispatch: str = "sorted", capacity_factor: float | None = None):
        """This layer sharing the weights of a Mixtral / Qwen3-MoE sparse block (`block.gate`,
        `block.experts`)."""
        router, experts = getattr(block, "gate", None), getattr(block, "experts", None)
        if router is None or experts is None or not hasattr(experts, "gate_up_proj"):
            raise ValueError(f"{type(block).__name__} is not a Mixtral-style MoE block (gate + experts "
                             f"with gate_up_proj/down_proj); Qwen2-MoE's shared expert is not supported")
        quantized = getattr(experts, "quantized", False)   # llmopt.quant.QuantExperts: kept as it is
        if quantized:
            E, H, inter = experts.num_experts, experts.hidden_size, experts.intermediate_size
        else:
            E, two_i, H = experts.gate_up_proj.shape
            inter = two_i // 2
        with torch.device("meta"):  # no memory for weights that are replaced at once by the block's
            layer = cls(H, inter, E, router.top_k, getattr(router, "norm_topk_prob", True),
                        capacity_factor, dispatch)
        layer.gate.weight = router.weight
        if quantized:
            experts.dispatch, layer.experts = dispatch, experts
            return layer
        layer.experts.gate_up_proj, layer.experts.down_proj = experts.gate_up_proj, experts.down_proj
        act = getattr(experts, "act_fn", None) or getattr(experts, "act", None)  # transformers' or ours
        if act is not None:
            layer.experts.act = act
        return layer


def moe_layers(model: nn.Module) -> list[MoEFeedForward]:
    """The model's `MoEFeedForward` layers, in order."""
    return [m for m in model.modules() if isinstance(m, MoEFeedForward)]


def is_hf_moe_block(module: nn.Module) -> bool:
    return (hasattr(module, "gate") and hasattr(getattr(module, "experts", None), "gate_up_proj")
            and not isinstance(module, MoEFeedForward))


def use_llmopt_moe(model: nn.Module, dispatch: str = "sorted", capacity_factor: float | None = None) -> nn.Module:
    """Swap every Mixtral-style MoE block of a `transformers` model (Mixtral, Qwen3-MoE, an
    upcycled model) for `MoEFeedForward` sharing its weights; already swapped ones get the new
    `dispatch` and `capacity_factor`. In place; returns the model. State-dict keys do not change,
    so `save_pretrained` writes the stock architecture."""
    check_capacity_factor(capacity_factor)
    found = 0
    for name, module in list(model.named_modules()):
        if isinstance(module, MoEFeedForward):
            module.experts.dispatch, module.capacity_factor = dispatch, capacity_factor
            found += 1
        elif is_hf_moe_block(module):
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name), child, MoEFeedForward.from_hf(module, dispatch, capacity_factor))
            found += 1
    if not found:
        raise ValueError(f"{type(model).__name__} has no Mixtral-style MoE blocks to swap")
    return model


def set_dispatch(model: nn.Module, dispatch: str) -> nn.Module:
    """Switch every `MoEFeedForward` of the model to another dispatch path."""
    layers = moe_layers(model)
    if not layers:
        raise ValueError("the model has no MoEFeedForward layers (call use_llmopt_moe first)")
    for layer in layers:
        layer.experts.dispatch = dispatch
    return model
