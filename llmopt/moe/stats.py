"""What an MoE model holds and what one token costs it: parameters (total and active), FLOPs
per token, and how evenly its routers spread the load."""
from __future__ import annotations

import torch
from torch import nn

from ..quant.calibrate import decoder_layers
from .layer import MoEFeedForward, is_hf_moe_block, moe_layers
from .routing import expert_load


def _blocks(model: nn.Module) -> list[nn.Module]:
    """Every MoE block, ours or a stock Mixtral / Qwen3-MoE one (a `gate` router with `top_k`, and
    `experts` with stacked `gate_up_proj` / `down_proj`)."""
    return [m for m in model.modules() if isinstance(m, MoEFeedForward) or is_hf_moe_block(m)]


def _expert_params(block: nn.Module) -> int:
    """Weights in one expert: 3 * H * I, whether the experts are float (stacked tensors) or quantized
    (`llmopt.quant.QuantExperts`, one module per matrix)."""
    ex = block.experts
    if isinstance(ex.gate_up_proj, torch.Tensor):
        return ex.gate_up_proj[0].numel() + ex.down_proj[0].numel()
    return 3 * ex.hidden_size * ex.intermediate_size


def _expert_bytes(block: nn.Module) -> int:
    """Bytes of one expert's weights a forward reads (codes and scales, when quantized: `QuantExperts`, or
    `kernels.KernelQuantExperts` with every expert's codes in one tensor, of which the CPU kernels read
    their own copy: the other is `unread_bytes`)."""
    ex = block.experts
    if isinstance(ex.gate_up_proj, torch.Tensor):
        return _expert_params(block) * ex.gate_up_proj.element_size()
    held = sum(b.numel() * b.element_size() for b in ex.buffers())
    unread = ex.unread_bytes() if hasattr(ex, "unread_bytes") else 0
    return (held - unread) // _num_experts(block)   # every expert alike


def _num_experts(block: nn.Module) -> int:
    return len(block.experts.gate_up_proj)


def param_counts(model: nn.Module) -> dict[str, int]:
    """Total parameters and those one token uses ("active"): every MoE block counts its router and
    top_k of its E experts. Embedding rows are counted in both (a lookup touches one row, but the
    table's size is what a dense model's count includes too). For float models: a quantized one holds
    its weights as codes (`llmopt.bench.model_size_bytes` and `weight_bytes` measure those)."""
    if any(getattr(m, "quantized", False) for m in model.modules()):
        raise ValueError("param_counts counts a float model's parameters; this one is quantized (its codes are "
                         "buffers): use llmopt.bench.model_size_bytes / weight_bytes")
    total = sum(p.numel() for p in model.parameters())
    active = total
    for b in _blocks(model):
        active -= (_num_experts(b) - b.gate.top_k) * _expert_params(b)
    return {"total": total, "active": active}


def inactive_expert_bytes(model: nn.Module) -> int:
    """Bytes of the experts one token does not use: (E - top_k) experts of every MoE block
    (0 for a dense model)."""
    return sum((_num_experts(b) - b.gate.top_k) * _expert_bytes(b) for b in _blocks(model))


def flops_per_token(model: nn.Module, context: float = 0.0) -> float:
    """Matrix-product FLOPs (2 per multiply-add) one token costs: every linear it passes through
    (top_k experts per MoE block, the router, `lm_head`) plus attention scores over `context`
    positions. Norms, activations and the dispatch's data movement are left out."""
    flops = 0.0
    for layer in decoder_layers(model):
        attn = layer.self_attn
        for proj in (attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj):
            flops += 2 * proj.weight.numel()
        flops += 2 * 2 * context * attn.q_proj.out_features
        mlp = layer.mlp
        if _blocks(mlp):
            flops += 2 * (mlp.gate.weight.numel() + mlp.gate.top_k * _expert_params(mlp))
        else:
            flops += 2 * sum(p.numel() for p in mlp.parameters())
    return flops + 2 * model.get_output_embeddings().weight.numel()


@torch.no_grad()
def expert_loads(model: nn.Module, token_ids: torch.Tensor, batch_size: int = 8) -> torch.Tensor:
    """(layers, E) assignment counts of every MoE layer over `token_ids` (n, seq_len), with the
    model's current routing (capacity limits included: dropped assignments are not counted)."""
    layers = moe_layers(model)
    if not layers:
        raise ValueError("the model has no MoEFeedForward layers (call use_llmopt_moe first)")
    device = next(model.parameters()).device
    counts = torch.zeros(len(layers), layers[0].num_experts, dtype=torch.long)
    for i in range(0, token_ids.shape[0], batch_size):
        model(input_ids=token_ids[i:i + batch_size].to(device), use_cache=False)
        for j, m in enumerate(layers):
            counts[j] += expert_load(m.last_routing.experts, m.num_experts).cpu()
    return counts


def load_imbalance(counts: torch.Tensor) -> float:
    """Busiest expert's load over the mean load, averaged over layers (1.0 = perfectly even): the
    factor by which the slowest expert holds up the layer when experts run in parallel."""
    counts = counts.float()
    return (counts.max(-1).values / counts.mean(-1)).mean().item()
