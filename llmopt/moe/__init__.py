"""Mixture of Experts (lesson 07): routing, balancing losses, dispatch paths, sparse upcycling.

    from llmopt import moe
    layer = moe.MoEFeedForward(hidden_size=256, intermediate_size=96, num_experts=64, top_k=8)
    y = layer(x)                                   # (..., 256); layer.last_routing has the decisions
    layer.experts.dispatch = "loop"                # "dense", "loop", "sorted" or "triton": same output
    big = moe.upcycle(model, num_experts=8, top_k=2)   # a transformers Mixtral, equal to `model` at start
    moe.use_llmopt_moe(mixtral_model, "sorted")    # our layer inside any Mixtral / Qwen3-MoE model
"""
from .dispatch import (
    DISPATCH,
    dense_dispatch,
    expert_ffn,
    get_dispatch,
    grouped_mm,
    loop_dispatch,
    sort_by_expert,
    sorted_dispatch,
)
from .layer import Experts, MoEFeedForward, Router, moe_layers, set_dispatch, use_llmopt_moe
from .routing import Routing, apply_capacity, capacity, expert_load, load_balancing_loss, route, router_z_loss
from .speed import dispatch_times, expert_decode_times, model_dispatch_times, random_problem
from .stats import expert_loads, flops_per_token, load_imbalance, param_counts
from .upcycle import aux_losses, mixtral_config, moe_lm_loss, upcycle

__all__ = [
    "DISPATCH", "Experts", "MoEFeedForward", "Router", "Routing", "apply_capacity", "aux_losses", "capacity",
    "dense_dispatch", "dispatch_times", "expert_decode_times", "expert_ffn", "expert_load", "expert_loads",
    "flops_per_token",
    "get_dispatch", "grouped_mm", "load_balancing_loss", "load_imbalance", "loop_dispatch", "mixtral_config",
    "model_dispatch_times", "moe_layers", "moe_lm_loss", "param_counts", "random_problem", "route",
    "router_z_loss", "set_dispatch", "sort_by_expert", "sorted_dispatch", "upcycle", "use_llmopt_moe",
]
