"""`fuse(model)`: swap a Llama-family model's modules for ones that call the fused kernels.

What changes, per decoder layer (state-dict keys stay the same, the weights are shared):
- the two RMSNorms and the final norm -> `FusedRMSNorm` (one pass per row); the norm after
  attention also takes the residual add (`h = x + residual; y = norm(h)` in one kernel);
- the MLP -> `FusedMLP`: gate and up projections, then one SwiGLU kernel instead of SiLU, a
  product and two round trips of the (tokens, intermediate) activations through memory;
- attention -> `FusedAttention`: rotary embedding of q and k in one launch (the attention
  itself stays transformers' SDPA / eager path, which is already fused);
- every 4- or 8-bit `QuantLinear` -> `KernelQuantLinear`: the W4A16 / W8A16 kernels read the
  packed bytes directly instead of dequantizing the whole weight every call;
- every 4- or 8-bit `QuantExperts` of a Mixture-of-Experts layer -> `KernelQuantExperts`: the
  experts' codes stacked (new state-dict keys), run by lesson 07's grouped MoE kernels.

`merge=True` also stacks each layer's q, k and v projections into one `qkv_proj`, and gate and up
into one `gate_up_proj` (vLLM's QKVParallelLinear and MergedColumnParallelLinear): one matmul, or
one W4A16 GEMV, instead of three and two. At batch-1 decode every call is a launch and a pass over
a few MB, so fewer, larger calls waste less. The merged weights are the originals stacked (packed
INT4/INT8 codes and scales stack the same way), so the state-dict keys change to the merged names:
save the model before fusing with `merge=True`.

`gemv=True` (implies `merge`) goes one step further for `llmopt.serving`'s decode steps: each norm
runs inside the merged projection after it and the SwiGLU inside the down projection
(`kernels.gemv`: `norm_linear`, `swiglu_linear`), three kernels fewer per layer for up to 8 rows,
and the o projection is the plain Triton GEMV. On a GPU each call takes the fused GEMV or the
separate ops (cuBLAS), whichever was faster when timed once per shape.
It marks the layers (`layer.gemv`); the serving runner does the rest, and only with dense weights
(a quantized model keeps its W4A16 / W8A16 kernels and the separate norms). HF `generate` on the
model runs as with `merge=True`.

`backend` says where the ops run ("auto": the kernels on a GPU and the PyTorch references on
a CPU; "triton": the kernels everywhere, under the interpreter on a CPU - slow, for tests;
"torch": the references). `FusedAttention.forward` mirrors transformers' `LlamaAttention`
(tested against it on 5.x, DynamicCache, sdpa and eager attention).
"""
from __future__ import annotations

import torch
from torch import nn

from .common import check_backend
from .rmsnorm import rmsnorm
from .rope import rope
from .swiglu import swiglu


class FusedRMSNorm(nn.Module):
    """LlamaRMSNorm through the kernel; `forward(x, residual)` also does the residual add."""

    def __init__(self, weight: nn.Parameter, eps: float, backend: str = "auto"):
        super().__init__()
        self.weight, self.variance_epsilon, self.backend = weight, eps, backend

    def forward(self, x, residual=None):
        return rmsnorm(x, self.weight, self.variance_epsilon, residual, backend=self.backend)

    def extra_repr(self):
        return f"{tuple(self.weight.shape)}, eps={self.variance_epsilon}, backend={self.backend}"


class FusedMLP(nn.Module):
    """down(swiglu(gate(x), up(x))) with the SwiGLU in one kernel; after `merge()`, gate and up are one
    matmul whose two halves go to the kernel as they are (strided views, no copy)."""

    def __init__(self, mlp: nn.Module, backend: str = "auto"):
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj = mlp.gate_proj, mlp.up_proj, mlp.down_proj
        self.backend = backend

    def merge(self) -> bool:
        merged = merge_linears([self.gate_proj, self.up_proj])
        if merged is None:
            return False
        self.gate_up_proj, self.split = merged, self.gate_proj.out_features
        del self.gate_proj, self.up_proj
        return True

    def forward(self, x):
        if hasattr(self, "gate_up_proj"):
            gate, up = self.gate_up_proj(x).split(self.split, dim=-1)
        else:
            gate, up = self.gate_proj(x), self.up_proj(x)
        return self.down_proj(swiglu(gate, up, backend=self.backend))


class FusedAttention(nn.Module):
    """transformers' Llama attention with the rotary embedding of q and k in one kernel."""

    def __init__(self, attn: nn.Module, backend: str = "auto"):
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj
        for name in ("config", "layer_idx", "head_dim", "num_key_value_groups", "scaling", "attention_dropout",
                     "is_causal", "sliding_window"):
            if hasattr(attn, name):
                setattr(self, name, getattr(attn, name))
        self.backend = backend

    def merge(self) -> bool:
        merged = merge_linears([self.q_proj, self.k_proj, self.v_proj])
        if merged is None:
            return False
        self.qkv_proj, self.qkv_sizes = merged, [m.out_features for m in (self.q_proj, self.k_proj, self.v_proj)]
        del self.q_proj, self.k_proj, self.v_proj
        return True

    def qkv(self, h):
        """The q, k and v projections of h (one matmul after `merge()`; its parts are views)."""
        if hasattr(self, "qkv_proj"):
            return self.qkv_proj(h).split(self.qkv_sizes, dim=-1)
        return self.q_proj(h), self.k_proj(h), self.v_proj(h)

    def forward(self, hidden_states, position_embeddings=None, attention_mask=None, **kwargs):
        shape = (*hidden_states.shape[:-1], -1, self.head_dim)
        q, k, v = (t.reshape(shape).transpose(1, 2) for t in self.qkv(hidden_states))
        cos, sin = position_embeddings
        q, k = rope(q, k, cos, sin, backend=self.backend)
        cache = kwargs.pop("cache", None)  # called past_key_values before transformers 5.2x
        if cache is None:
            cache = kwargs.pop("past_key_values", None)
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx,
                                {"sin": sin, "cos": cos, "cache_position": kwargs.get("cache_position")})
        out, weights = _attention_function(self.config)(
            self, q, k, v, attention_mask, dropout=0.0 if not self.training else self.attention_dropout,
            scaling=self.scaling, **kwargs)
        return self.o_proj(out.reshape(*hidden_states.shape[:-1], -1).contiguous()), weights


def _attention_function(config):
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
    from transformers.models.llama.modeling_llama import eager_attention_forward

    impl = getattr(config, "_attn_implementation", None) or "eager"
    return eager_attention_forward if impl == "eager" else ALL_ATTENTION_FUNCTIONS[impl]


class FusedDecoderLayer(nn.Module):
    """norm -> attention -> (add + norm, one kernel) -> fused MLP -> add."""

    def __init__(self, layer: nn.Module, backend: str = "auto"):
        super().__init__()
        self.self_attn = FusedAttention(layer.self_attn, backend)
        # a Mixture-of-Experts layer (lesson 07) keeps its own MLP; attention and the norms are fused
        self.mlp = FusedMLP(layer.mlp, backend) if _dense_mlp(layer.mlp) else layer.mlp
        self.input_layernorm = _fused_norm(layer.input_layernorm, backend)
        self.post_attention_layernorm = _fused_norm(layer.post_attention_layernorm, backend)
        if hasattr(layer, "attention_type"):  # models with sliding-window layers pick masks by it
            self.attention_type = layer.attention_type
        self.gemv = False   # fuse(gemv=True): llmopt.serving runs norm + matmul as one kernel at decode

    def forward(self, hidden_states, *args, **kwargs):
        h = self.input_layernorm(hidden_states)
        h = self.self_attn(hidden_states=h, **kwargs)[0]
        h, residual = self.post_attention_layernorm(h, hidden_states)   # residual + attention, then norm
        return residual + self.mlp(h)


@torch.no_grad()
def merge_linears(linears: list[nn.Module]) -> nn.Module | None:
    """One linear layer computing `linears`' outputs side by side: their weights (or packed codes,
    scales and zeros) stacked along the output dimension, biases too. None where they cannot be
    stacked: different types, input sizes, quantization settings, or bias on some and not others."""
    from .qlinear import KernelQuantLinear

    first = linears[0]
    if type(first) not in (nn.Linear, KernelQuantLinear):   # e.g. low-rank factors (lesson 06): kept apart
        return None
    if any(type(m) is not type(first) or m.in_features != first.in_features for m in linears):
        return None
    if len({m.bias is None for m in linears}) > 1:
        return None
    bias = None if first.bias is None else torch.cat([m.bias for m in linears])
    out_features = sum(m.out_features for m in linears)
    if type(first) is nn.Linear:
        merged = nn.Linear(first.in_features, out_features, bias=bias is not None, device="meta")
        merged.weight = nn.Parameter(torch.cat([m.weight for m in linears]), requires_grad=first.weight.requires_grad)
    elif type(first) is KernelQuantLinear:
        if any(m.cfg != first.cfg for m in linears) or len({m.zeros is None for m in linears}) > 1:
            return None
        merged = KernelQuantLinear(first.in_features, out_features, first.cfg, bias=False, device="meta",
                                   backend=first.backend)
        merged.qweight = torch.cat([m.packed_codes() for m in linears])
        merged.scales = torch.cat([m.scales for m in linears])
        merged.zeros = None if first.zeros is None else torch.cat([m.zeros for m in linears])
        merged.prepare_cpu(None if first.cpu_scales_zeros is None else first.cpu_scales_zeros.dtype)
    else:
        return None
    if bias is not None:
        merged.bias = nn.Parameter(bias, requires_grad=first.bias.requires_grad)
    return merged


def _fused_norm(norm: nn.Module, backend: str) -> FusedRMSNorm:
    eps = getattr(norm, "variance_epsilon", getattr(norm, "eps", None))
    if eps is None:
        raise ValueError(f"{type(norm).__name__} is not an RMSNorm with an epsilon")
    return FusedRMSNorm(norm.weight, eps, backend)


def _dense_mlp(mlp: nn.Module) -> bool:
    return all(hasattr(mlp, n) for n in ("gate_proj", "up_proj", "down_proj"))


def _moe_mlp(mlp: nn.Module) -> bool:
    from ..moe.layer import MoEFeedForward, is_hf_moe_block

    return isinstance(mlp, MoEFeedForward) or is_hf_moe_block(mlp)


def _check_layer(i: int, layer: nn.Module):
    attn = getattr(layer, "self_attn", None)
    if attn is None or not all(hasattr(attn, n) for n in ("q_proj", "k_proj", "v_proj", "o_proj")):
        raise ValueError(f"layer {i}: fuse() needs a Llama-family decoder layer (self_attn with q_proj, k_proj, "
                         "v_proj, o_proj)")
    mlp = getattr(layer, "mlp", None)
    if mlp is None or not (_dense_mlp(mlp) or _moe_mlp(mlp)):
        raise ValueError(f"layer {i}: fuse() needs a Llama-family decoder layer (mlp with gate_proj, up_proj, "
                         "down_proj, or a Mixtral-style Mixture-of-Experts block)")
    if hasattr(attn, "q_norm"):
        raise ValueError(f"layer {i}: attention with q/k norms (Qwen3, OLMo 2) is not supported by fuse()")
    act = getattr(getattr(attn, "config", None), "hidden_act", "silu")
    if act != "silu" and _dense_mlp(mlp):
        raise ValueError(f"layer {i}: the fused MLP computes SiLU(gate) * up; this model's activation is {act!r}")


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    base = getattr(model, "model", model)
    layers = getattr(base, "layers", None)
    if not isinstance(layers, nn.ModuleList) or not len(layers):
        raise ValueError(f"fuse() needs a Llama-family model (model.model.layers); got {type(model).__name__}")
    return layers


@torch.no_grad()
def fuse(model: nn.Module, backend: str = "auto", quantized: bool = True, merge: bool = False,
         gemv: bool = False) -> nn.Module:
    """Swap in the fused modules, in place; returns `model` (it still generates and saves). `merge`:
    also merge q/k/v and gate/up into one projection each, where their types and settings match.
    `gemv`: merge, and let `llmopt.serving` fold the norms and the SwiGLU into the decode matmuls."""
    from .qlinear import KernelQuantExperts, KernelQuantLinear, can_stack_experts, has_kernel

    check_backend(backend)
    layers = decoder_layers(model)
    if any(isinstance(layer, FusedDecoderLayer) for layer in layers):
        raise ValueError("this model is already fused")
    for i, layer in enumerate(layers):
        _check_layer(i, layer)
    for i in range(len(layers)):
        layers[i] = FusedDecoderLayer(layers[i], backend)
    base = getattr(model, "model", model)
    if isinstance(getattr(base, "norm", None), nn.Module) and hasattr(base.norm, "weight"):
        base.norm = _fused_norm(base.norm, backend)
    if quantized:
        # the activations' dtype: the CPU kernels keep their scales in it (`KernelQuantLinear.prepare_cpu`)
        dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), None)
        for name, module in list(model.named_modules()):
            if can_stack_experts(module):   # before the linears: its matrices go with it
                parent, _, child = name.rpartition(".")
                setattr(model.get_submodule(parent), child,
                        KernelQuantExperts.from_quant_experts(module, backend, dtype))
        for name, module in list(model.named_modules()):
            if has_kernel(module):
                parent, _, child = name.rpartition(".")
                setattr(model.get_submodule(parent), child,
                        KernelQuantLinear.from_quant_linear(module, backend, dtype))
    if merge or gemv:
        for layer in layers:
            layer.self_attn.merge()
            if isinstance(layer.mlp, FusedMLP):
                layer.mlp.merge()
            layer.gemv = gemv
    return model


def set_backend(model: nn.Module, backend: str) -> nn.Module:
    """Switch every fused module of `model` to `backend` ("auto", "triton" or "torch")."""
    check_backend(backend)
    for m in model.modules():
        if hasattr(m, "backend"):
            m.backend = backend
    return model
