"""`ModelRunner`: one forward pass of a Llama-family model over a batch of sequences and a paged
KV cache (nano-vllm's name).

The batch is flat: the tokens of every scheduled sequence (a prefill chunk of many tokens, or one
decode token) are concatenated into one row, with their positions and the cache slot each token's
keys and values go to. Per layer:

    norm -> q, k, v projections -> rotary embedding -> write k, v into the cache at their slots
    -> attention through each sequence's block table (a prefill chunk: causal over its prefix and
       itself; all decode tokens together: `paged_decode`) -> o projection -> residual
    -> norm -> MLP -> residual

The projections, norms and MLP are the model's own modules, called as they are: a quantized model
(`QuantLinear`, `KernelQuantLinear`) or a fused one (`kernels.fuse`) runs here unchanged. Only the
attention is ours, since it must read the paged cache. Works for Llama, Mistral, Qwen2 (q/k/v
biases live in the projections) and Qwen3 (per-head q/k norms), and the bundled model.
"""
from __future__ import annotations

import torch
from torch import nn

from ..kernels.rope import rope
from .attention import paged_decode, paged_prefill_reference, write_kv
from .sequence import Sequence


def kv_bytes_per_token(config, dtype: torch.dtype) -> int:
    """Bytes of keys and values one token occupies in the cache, over all layers."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    return 2 * config.num_hidden_layers * kv_heads * head_dim * torch.empty((), dtype=dtype).element_size()


def check_model(model: nn.Module) -> None:
    layers = getattr(getattr(model, "model", None), "layers", None)
    if layers is None or not hasattr(model, "lm_head"):
        raise ValueError(f"llmopt.serving runs Llama-family causal LMs (model.model.layers, lm_head); "
                         f"got {type(model).__name__}")
    for i, layer in enumerate(layers):
        attn = getattr(layer, "self_attn", None)
        if attn is None or not all(hasattr(attn, n) for n in ("q_proj", "k_proj", "v_proj", "o_proj")):
            raise ValueError(f"layer {i}: expected self_attn with q_proj, k_proj, v_proj, o_proj")
        if getattr(layer, "mlp", None) is None:
            raise ValueError(f"layer {i}: expected an mlp")
    if getattr(model.config, "sliding_window", None) and getattr(model.config, "use_sliding_window", True):
        if model.config.sliding_window < getattr(model.config, "max_position_embeddings", 0):
            raise ValueError("sliding-window attention is not supported by llmopt.serving")


class ModelRunner:
    def __init__(self, model: nn.Module, num_blocks: int, block_size: int, backend: str = "auto"):
        check_model(model)
        self.model, self.block_size, self.num_blocks, self.backend = model, block_size, num_blocks, backend
        cfg = model.config
        self.num_heads = cfg.num_attention_heads
        self.num_kv_heads = getattr(cfg, "num_key_value_heads", None) or self.num_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.num_heads
        self.scale = self.head_dim ** -0.5
        p = next(model.parameters())
        self.device = p.device
        self.dtype = p.dtype if p.is_floating_point() else torch.float32
        shape = (num_blocks, block_size, self.num_kv_heads, self.head_dim)
        n = cfg.num_hidden_layers
        self.k_cache = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in range(n)]
        self.v_cache = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in range(n)]

    @property
    def cache_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k_cache + self.v_cache)

    def copy_blocks(self, pairs: list[tuple[int, int]]) -> None:
        """Copy-on-write: duplicate whole blocks in every layer's cache."""
        if pairs:
            src = torch.tensor([s for s, _ in pairs], device=self.device)
            dst = torch.tensor([d for _, d in pairs], device=self.device)
            for k, v in zip(self.k_cache, self.v_cache):
                k[dst] = k[src]
                v[dst] = v[src]

    @torch.inference_mode()
    def forward(self, batch: list[tuple[Sequence, int]], need_logits: list[bool]) -> torch.Tensor:
        """Run the scheduled tokens; returns the logits (float32) at the last scheduled token of each
        sequence with `need_logits` True, in batch order."""
        bs = self.block_size
        tokens, positions, slots, segments = [], [], [], []
        for seq, n in batch:
            start = seq.num_computed_tokens
            table = seq.block_table
            segments.append((len(tokens), start, n))
            for pos in range(start, start + n):
                tokens.append(seq.token_ids[pos])
                positions.append(pos)
                slots.append(table[pos // bs] * bs + pos % bs)
        dev = self.device
        ids = torch.tensor(tokens, device=dev)[None]
        pos = torch.tensor(positions, device=dev)[None]
        slot_mapping = torch.tensor(slots, device=dev)
        decode = [i for i, (_, n) in enumerate(batch) if n == 1]
        if decode:
            width = max(len(batch[i][0].block_table) for i in decode)
            tables = torch.tensor([batch[i][0].block_table + [0] * (width - len(batch[i][0].block_table))
                                   for i in decode], device=dev)
            lens = torch.tensor([batch[i][0].num_computed_tokens + 1 for i in decode], device=dev)
            rows = torch.tensor([segments[i][0] for i in decode], device=dev)
        base = self.model.model
        x = base.embed_tokens(ids)
        cos, sin = base.rotary_emb(x, pos)
        T = ids.shape[1]
        for li, layer in enumerate(base.layers):
            attn = layer.self_attn
            h = layer.input_layernorm(x)
            q = attn.q_proj(h).view(1, T, -1, self.head_dim)
            k = attn.k_proj(h).view(1, T, -1, self.head_dim)
            v = attn.v_proj(h).view(T, -1, self.head_dim)
            if hasattr(attn, "q_norm"):   # Qwen3: RMSNorm per head before the rotation
                q, k = attn.q_norm(q), attn.k_norm(k)
            q, k = rope(q.transpose(1, 2), k.transpose(1, 2), cos, sin, backend=self.backend)
            q, k = q.transpose(1, 2)[0], k.transpose(1, 2)[0]          # (T, heads, D)
            kc, vc = self.k_cache[li], self.v_cache[li]
            write_kv(kc, vc, k, v.to(kc.dtype), slot_mapping)
            out = torch.empty_like(q)
            for i, (seq, n) in enumerate(batch):
                if n > 1:
                    off, start, _ = segments[i]
                    out[off:off + n] = paged_prefill_reference(q[off:off + n], kc, vc, seq.block_table, start,
                                                               self.scale)
            if decode:
                out[rows] = paged_decode(q[rows], kc, vc, tables, lens, self.scale, backend=self.backend)
            x = x + attn.o_proj(out.reshape(1, T, -1))
            x = x + layer.mlp(layer.post_attention_layernorm(x))
        last = [off + n - 1 for (off, _, n), need in zip(segments, need_logits) if need]
        if not last:
            return torch.empty(0, self.model.config.vocab_size)
        h = base.norm(x[0, last])
        return self.model.lm_head(h).float()
