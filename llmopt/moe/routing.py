"""Routing: which experts each token goes to, with what weights, and the losses that keep the
router honest.

A router is one linear layer, hidden -> E logits per token. Softmax turns them into
probabilities; each token keeps its top-k experts, and (Mixtral, Qwen3-MoE with
`norm_topk_prob`) the k kept probabilities are renormalised to sum to 1, so an MoE layer
whose experts are all the same FFN computes exactly that FFN.

Left alone, a router collapses: the experts that win early get the gradient, get better and
win more. Two auxiliary losses push back:

- load balancing (Switch Transformer, eq. 4-6; Mixtral uses the same form):
  E * sum_i f_i * P_i, with f_i the share of the T*k assignments that went to expert i and
  P_i the mean router probability of expert i. Both are 1/E when the load is even, so the loss
  is 1 there, and it grows when the probable experts are also the busy ones. (Hugging Face's
  `load_balancing_loss_func` counts f_i per token instead of per assignment: k times this.)
- router z-loss (ST-MoE): mean over tokens of logsumexp(logits)^2, which keeps the logits
  small so the softmax stays in a range where bf16 rounding does not flip the top-k.

Capacity: with a capacity factor c each expert takes at most ceil(c * T * k / E) assignments
per batch (fixed-size buffers, as on TPUs and in expert parallelism); the rest are dropped and
the token's residual connection carries it through. First choices are served before second
choices, each in token order (GShard). A dropped assignment's expert index is set to E,
"no expert", the same convention Hugging Face's expert modules use.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


def check_top_k(top_k, num_experts) -> None:
    if not isinstance(num_experts, int) or num_experts < 1:
        raise ValueError(f"num_experts must be a positive int, got {num_experts!r}")
    if not isinstance(top_k, int) or not 1 <= top_k <= num_experts:
        raise ValueError(f"top_k must be an int in [1, num_experts={num_experts}], got {top_k!r}")


def check_capacity_factor(capacity_factor) -> None:
    if capacity_factor is not None and not (isinstance(capacity_factor, (int, float)) and capacity_factor > 0):
        raise ValueError(f"capacity_factor must be None (no limit) or a number > 0, got {capacity_factor!r}")


@dataclass
class Routing:
    """What the router decided for T tokens.

    logits: (T, E) raw router outputs; probs: (T, E) their softmax;
    experts: (T, k) chosen expert per slot, best first (E where capacity dropped it);
    weights: (T, k) the gate weight of each slot (0 where dropped)."""
    logits: torch.Tensor
    probs: torch.Tensor
    experts: torch.Tensor
    weights: torch.Tensor

    @property
    def num_experts(self) -> int:
        return self.logits.shape[-1]

    @property
    def dropped(self) -> int:
        """How many (token, expert) assignments the capacity limit dropped."""
        return int((self.experts == self.num_experts).sum())


def route(logits: torch.Tensor, top_k: int, normalize: bool = True) -> Routing:
    """Top-k gating of (T, E) router logits (softmax in float32, as Mixtral does)."""
    if not torch.jit.is_tracing():   # traced for export, a shape is a tensor
        check_top_k(top_k, logits.shape[-1])
    probs = F.softmax(logits.float(), dim=-1)
    weights, experts = torch.topk(probs, top_k, dim=-1)
    if normalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return Routing(logits, probs, experts, weights.to(logits.dtype))


def expert_load(experts: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Assignments per expert, (E,) int64; dropped ones (index E) are not counted."""
    return torch.bincount(experts.flatten(), minlength=num_experts + 1)[:num_experts]


def load_balancing_loss(probs: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
    """Switch Transformer's auxiliary loss E * sum_i f_i * P_i for (T, E) router probabilities and
    the (T, k) chosen experts: 1.0 for a perfectly even router, up to E when one expert takes all.
    f (a count) carries no gradient; P does, and that is what moves the router."""
    T, E = probs.shape
    f = expert_load(experts, E).to(probs.dtype) / experts.numel()
    P = probs.mean(dim=0)
    return E * torch.sum(f * P)


def router_z_loss(logits: torch.Tensor) -> torch.Tensor:
    """ST-MoE's z-loss: mean over tokens of logsumexp(logits)^2."""
    return torch.logsumexp(logits.float(), dim=-1).square().mean()


def capacity(num_tokens: int, num_experts: int, top_k: int, capacity_factor: float) -> int:
    """Assignments one expert may take: ceil(capacity_factor * T * k / E)."""
    check_capacity_factor(capacity_factor)
    return math.ceil(capacity_factor * num_tokens * top_k / num_experts)


def apply_capacity(routing: Routing, capacity_factor: float | None) -> Routing:
    """Drop the assignments beyond each expert's capacity: first choices before second choices,
    earlier tokens before later ones. Dropped slots get expert E and weight 0."""
    check_capacity_factor(capacity_factor)
    if capacity_factor is None:
        return routing
    T, k = routing.experts.shape
    E = routing.num_experts
    cap = capacity(T, E, k, capacity_factor)
    # Priority order: slot-major (all first choices, then all second choices, ...), token order within.
    by_priority = routing.experts.t().reshape(-1)                        # (k*T,)
    onehot = F.one_hot(by_priority, E)                                    # (k*T, E)
    position = (onehot.cumsum(0) * onehot).sum(-1) - 1                    # place in its expert's queue
    keep = (position < cap).reshape(k, T).t()                             # back to (T, k)
    experts = torch.where(keep, routing.experts, torch.full_like(routing.experts, E))
    weights = torch.where(keep, routing.weights, torch.zeros_like(routing.weights))
    return Routing(routing.logits, routing.probs, experts, weights)
