"""Sparse upcycling (Komatsuzaki et al., 2022): a dense model's FFNs become an MoE's experts.

Each decoder layer's FFN is copied into E experts and a new router is added; attention,
norms, embeddings and `lm_head` are kept. The result is a `transformers` Mixtral model (the
Llama architecture with sparse MoE blocks), so it generates, saves and reloads like any other.
Because the top-k weights are renormalised to sum to 1 and the experts start identical, the
upcycled model (which keeps a Mistral's sliding window) computes exactly what the dense one
did, whatever the router says; a short fine-tune then lets the experts drift apart (each sees
only the tokens routed to it) and the router learn whom to send where. Capacity (total
parameters) grows about E-fold in the FFNs, compute per token about k-fold.
"""
from __future__ import annotations

import torch
from torch import nn

from ..quant.calibrate import decoder_layers
from .layer import moe_layers, use_llmopt_moe
from .routing import check_top_k, load_balancing_loss, router_z_loss

_LLAMA_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                 "num_key_value_heads", "hidden_act", "max_position_embeddings", "rms_norm_eps")


def _check_dense_ffns(model: nn.Module) -> None:
    """ValueError unless every decoder layer's FFN is a float Llama MLP, whose matrices are copied."""
    for i, layer in enumerate(decoder_layers(model)):
        mlp = getattr(layer, "mlp", None)
        found = [getattr(mlp, n, None) for n in ("gate_proj", "up_proj", "down_proj")]
        if not all(isinstance(m, nn.Linear) for m in found):
            what = type(mlp).__name__ if None in found else ", ".join(type(m).__name__ for m in found)
            raise ValueError(f"upcycle needs a float Llama-family model (Llama, Mistral): each decoder layer's FFN "
                             f"as mlp.gate_proj/up_proj/down_proj nn.Linear; layer {i} of {type(model).__name__} "
                             f"has {what}. Upcycle the float model before quantizing or factorising it")


def mixtral_config(dense_config, num_experts: int, top_k: int, **overrides):
    """A MixtralConfig with the dense Llama config's shapes (and a Mistral's sliding window) plus
    E experts, top-k."""
    from transformers import MixtralConfig

    check_top_k(top_k, num_experts)
    c = dense_config
    missing = [k for k in _LLAMA_FIELDS if not hasattr(c, k)]
    if missing:
        raise ValueError(f"dense_config must be a Llama-family config (Llama, Mistral); {type(c).__name__} has no "
                         f"{', '.join(missing)}")
    if getattr(c, "attention_bias", False) or getattr(c, "mlp_bias", False):
        raise ValueError("upcycling needs a Llama config without attention or MLP biases (Mixtral has none)")
    kw = dict(vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
              num_hidden_layers=c.num_hidden_layers, num_attention_heads=c.num_attention_heads,
              num_key_value_heads=c.num_key_value_heads, head_dim=getattr(c, "head_dim", None),
              hidden_act=c.hidden_act, max_position_embeddings=c.max_position_embeddings,
              rms_norm_eps=c.rms_norm_eps, rope_parameters=getattr(c, "rope_parameters", None),
              tie_word_embeddings=c.tie_word_embeddings, bos_token_id=c.bos_token_id,
              eos_token_id=c.eos_token_id, pad_token_id=c.pad_token_id,
              # Mistral's window; Qwen2-style configs carry one that use_sliding_window=False turns off
              sliding_window=getattr(c, "sliding_window", None) if getattr(c, "use_sliding_window", True) else None,
              attention_dropout=getattr(c, "attention_dropout", 0.0),
              initializer_range=getattr(c, "initializer_range", 0.02),
              num_local_experts=num_experts, num_experts_per_tok=top_k)
    kw.update(overrides)
    return MixtralConfig(**kw)


@torch.no_grad()
def upcycle(model: nn.Module, num_experts: int = 8, top_k: int = 2, router_std: float = 0.02, seed: int = 0,
            dispatch: str = "sorted", capacity_factor: float | None = None) -> nn.Module:
    """The dense Llama-family `model` as a Mixtral with `num_experts` copies of each FFN and a new
    router (normal, std `router_std`, seeded), its MoE blocks swapped for `MoEFeedForward`
    (`dispatch`, `capacity_factor`); same device and dtype. The dense model is not changed."""
    from transformers import MixtralForCausalLM

    _check_dense_ffns(model)
    cfg = mixtral_config(model.config, num_experts, top_k)
    param = next(model.parameters())
    moe = MixtralForCausalLM(cfg).to(param.device, param.dtype)
    state = {k: v for k, v in model.state_dict().items() if ".mlp." not in k}
    missing, unexpected = moe.load_state_dict(state, strict=False)
    if unexpected or any(".mlp." not in k for k in missing):
        raise ValueError(f"{type(model).__name__} does not map onto Mixtral: unexpected {unexpected[:3]}, "
                         f"missing {[k for k in missing if '.mlp.' not in k][:3]}")
    g = torch.Generator().manual_seed(seed)
    for dense_layer, moe_layer in zip(decoder_layers(model), decoder_layers(moe)):
        mlp, block = dense_layer.mlp, moe_layer.mlp
        gate_up = torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight], dim=0)
        block.experts.gate_up_proj.copy_(gate_up.expand(num_experts, -1, -1))
        block.experts.down_proj.copy_(mlp.down_proj.weight.expand(num_experts, -1, -1))
        block.gate.weight.copy_(torch.randn(block.gate.weight.shape, generator=g) * router_std)
    moe.generation_config = model.generation_config
    return use_llmopt_moe(moe, dispatch, capacity_factor)


def aux_losses(model: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """(load-balancing loss, router z-loss), each averaged over the model's MoE layers, from
    their last forward pass."""
    layers = [m for m in moe_layers(model) if m.last_routing is not None]
    if not layers:
        raise ValueError("no MoEFeedForward layer has routed a batch yet")
    balance = sum(load_balancing_loss(m.last_routing.probs, m.last_routing.experts) for m in layers) / len(layers)
    z = sum(router_z_loss(m.last_routing.logits) for m in layers) / len(layers)
    return balance, z


def moe_lm_loss(balance_coef: float = 0.01, z_coef: float = 0.001):
    """A `loss_fn` for `llmopt.train.train`: next-token cross-entropy + balance_coef * the
    load-balancing loss + z_coef * the router z-loss (Mixtral and ST-MoE use 0.01-0.02 and 0.001)."""
    from ..train import lm_loss

    def loss_fn(model, x, y):
        ce = lm_loss(model, x, y)  # the forward pass leaves each MoE layer's routing behind
        balance, z = aux_losses(model)
        return ce + balance_coef * balance + z_coef * z
    return loss_fn
