"""`ModelRunner`: one forward pass of a Llama-family model over a batch of sequences and a paged
KV cache (nano-vllm's name).

The batch is flat: the tokens of every scheduled sequence (a prefill chunk of many tokens, or one
decode token) are concatenated into one row, with their positions and the cache slot each token's
keys and values go to. Per layer:

    norm -> q, k, v projections -> rotary embedding and the k, v cache writes (one kernel on a GPU)
    -> attention through each sequence's block table (a prefill chunk: causal over its prefix and
       itself; all decode tokens together: `paged_decode`) -> o projection -> residual
    -> norm -> MLP -> residual

At decode the rotary embedding and the cache writes run inside the attention kernel
(`paged_decode_rope`), and with lesson 08's `fuse(gemv=True)` each norm inside the matmul after it.

The projections, norms and MLP are the model's own modules, called as they are: a quantized model
(`QuantLinear`, `KernelQuantLinear`) or a fused one (`kernels.fuse`) runs here unchanged. Only the
attention is ours, since it must read the paged cache. Works for Llama, Mistral, Qwen2 (q/k/v
biases live in the projections) and Qwen3 (per-head q/k norms), and the bundled model.

Decode steps (every sequence runs one token) take a shorter path, `_forward_decode`, whose inputs are
five tensors and which never waits on the host. On a GPU it is captured once per batch size into a
CUDA graph (vLLM's and nano-vllm's trick): a decode step of a 1B model is hundreds of small kernels,
and launching them one by one from Python takes longer than running them. A replay launches the
whole recorded sequence at once; the inputs are copied into the tensors the graph was recorded with,
and a batch is padded up to the next captured size, its padding rows writing into a scratch block
that no sequence owns. `enforce_eager=True` (vLLM's name) turns the graphs off.

`compilation_config=1` or higher (vLLM's name and levels; here every level above 0 does the same)
hands the decode step to `torch.compile` as well: the elementwise work between the matmuls (norms,
rotary, SiLU, residual adds) fused into generated kernels, one compiled graph per captured batch size.
Without CUDA graphs (on a CPU) a decode batch is padded the same way, up to a captured size, and
only the block tables' width is left to vary (one graph serves a sequence as it grows). Compiling
takes seconds to a minute per batch size, the first time that size runs.
"""
from __future__ import annotations

import warnings
from functools import partial

import torch
from torch import nn

from ..kernels.common import use_triton
from ..kernels.fuse import FusedRMSNorm
from ..kernels.gemv import gemv, norm_linear, swiglu_linear
from .attention import paged_decode, paged_decode_rope, paged_prefill_reference, rope_write_kv
from .multistep import greedy_advance
from .sequence import Sequence

# vLLM's kv_cache_dtype names: "auto" keeps the model's dtype
KV_CACHE_DTYPES = {"fp8": torch.float8_e4m3fn, "fp8_e4m3": torch.float8_e4m3fn}


def cache_dtype(kv_cache_dtype: str, model_dtype: torch.dtype) -> torch.dtype:
    """The KV cache's dtype for vLLM's `kv_cache_dtype` ("auto": the model's)."""
    if kv_cache_dtype == "auto":
        return model_dtype
    if kv_cache_dtype not in KV_CACHE_DTYPES:
        raise ValueError(f"kv_cache_dtype must be 'auto' or one of {sorted(KV_CACHE_DTYPES)}, got {kv_cache_dtype!r}")
    return KV_CACHE_DTYPES[kv_cache_dtype]


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
        separate = all(hasattr(attn, n) for n in ("q_proj", "k_proj", "v_proj"))
        if attn is None or not (separate or hasattr(attn, "qkv_proj")) or not hasattr(attn, "o_proj"):
            raise ValueError(f"layer {i}: expected self_attn with q_proj, k_proj, v_proj (or a merged qkv_proj) "
                             f"and o_proj")
        if getattr(layer, "mlp", None) is None:
            raise ValueError(f"layer {i}: expected an mlp")
    if getattr(model.config, "sliding_window", None) and getattr(model.config, "use_sliding_window", True):
        if model.config.sliding_window < getattr(model.config, "max_position_embeddings", 0):
            raise ValueError("sliding-window attention is not supported by llmopt.serving")


def graph_blocker(model: nn.Module) -> str | None:
    """Why the decode step cannot be recorded as a CUDA graph, or None. A graph replays fixed kernels
    on fixed shapes. A Mixture-of-Experts layer picks its experts from the data, and most dispatch
    paths read on the host how many tokens each expert got (to size a gather, to skip the idle ones):
    such a layer decodes eagerly. Experts that say they are `graph_safe` read nothing back (the grouped
    MoE kernels, `kernels.fuse` of a 4- or 8-bit MoE model, or lesson 07's `dispatch="triton"` /
    `"dense"`): a model of those records its graphs like a dense one."""
    for i, layer in enumerate(model.model.layers):
        mlp = layer.mlp
        dense = hasattr(mlp, "down_proj") and (hasattr(mlp, "gate_up_proj") or hasattr(mlp, "gate_proj"))
        experts = getattr(mlp, "experts", None)
        if dense or (getattr(experts, "graph_safe", False) and getattr(mlp, "capacity_factor", None) is None):
            continue
        return (f"layer {i}'s MLP ({type(mlp).__name__}) is not a dense gate/up/down MLP (experts are routed by the "
                f"data, and {type(experts).__name__} reads the routing back on the host; kernels.fuse of a 4- or "
                "8-bit MoE model runs its experts with kernels that do not)")
    return None


def compilation_level(config) -> int:
    """vLLM's `compilation_config` as a level: None or an int (its level), or a dict holding "level"
    (or "mode", vLLM's newer name). 0: the decode step runs as written; 1 and above: `torch.compile`d."""
    if isinstance(config, dict):
        unknown = set(config) - {"level", "mode"}
        if unknown or len(config) > 1:
            raise ValueError(f"compilation_config takes one of 'level' or 'mode' here, got keys {sorted(config)}")
        config = next(iter(config.values()), 0)
    if config is None:
        return 0
    if isinstance(config, bool) or not isinstance(config, int) or not 0 <= config <= 3:
        raise ValueError(f"compilation_config must be a level 0-3 (or {{'level': n}}), got {config!r}")
    return config


def graph_batch_sizes(max_num_seqs: int) -> list[int]:
    """The decode batch sizes captured as CUDA graphs: 1, 2, 4, 8, then every 16 (nano-vllm's choice),
    and max_num_seqs itself. A batch runs in the smallest graph that holds it."""
    sizes = {1, 2, 4, 8, *range(16, max_num_seqs + 1, 16), max_num_seqs}
    return sorted(s for s in sizes if s <= max_num_seqs)


class ModelRunner:
    def __init__(self, model: nn.Module, num_blocks: int, block_size: int, backend: str = "auto",
                 max_num_seqs: int = 64, max_model_len: int | None = None, enforce_eager: bool = False,
                 num_scheduler_steps: int = 1, kv_cache_dtype: str = "auto", compilation_config=None):
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
        self.cache_dtype = cache_dtype(kv_cache_dtype, self.dtype)
        if (self.cache_dtype.itemsize == 1 and self.device.type == "cuda" and use_triton(p, backend)
                and torch.cuda.get_device_capability(self.device) < (8, 9)):
            raise ValueError("an FP8 KV cache needs a GPU with FP8 conversions (sm_89+: Ada, Hopper) for the "
                             "Triton kernels; on older GPUs pass backend='torch'")
        # one block more than the block manager hands out: the scratch block (id num_blocks) that
        # padding rows of a decode batch write into
        shape = (num_blocks + 1, block_size, self.num_kv_heads, self.head_dim)
        n = cfg.num_hidden_layers
        self.k_cache = [torch.zeros(shape, dtype=self.cache_dtype, device=self.device) for _ in range(n)]
        self.v_cache = [torch.zeros(shape, dtype=self.cache_dtype, device=self.device) for _ in range(n)]
        self.max_model_len = max_model_len or getattr(cfg, "max_position_embeddings", 2048)
        # multi-step decoding: how many decode steps may run on the device before the host looks
        self.num_scheduler_steps = num_scheduler_steps
        self._rope_table = self._rotary_table()
        self.graphs: dict[int, tuple] = {}      # batch size -> (CUDA graph, logits, tokens, logprobs)
        self.batch_sizes = graph_batch_sizes(max_num_seqs)
        self.compiled = compilation_level(compilation_config) > 0
        if self.compiled:
            self._compiled_forward = torch.compile(self._forward_decode, dynamic=False)
            self._compiled_step = torch.compile(self._decode_step, dynamic=False)
            # dynamo keeps at most 8 compiled versions of a function, for every runner together; ours
            # are one per batch size, of each runner in the process (the setting's name before torch 2.6:
            # cache_size_limit)
            config = torch._dynamo.config
            name = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"
            setattr(config, name, max(getattr(config, name), 64))
        self.eager_reason = "enforce_eager" if enforce_eager else graph_blocker(model)
        if self.device.type == "cuda" and self.eager_reason is None:
            self.capture_cuda_graphs(max_num_seqs)
        elif self.device.type == "cuda" and not enforce_eager:
            warnings.warn(f"decoding without CUDA graphs: {self.eager_reason}", stacklevel=3)

    # rotary types whose frequencies do not depend on the context length: one table serves every step
    STATIC_ROPE = ("default", "linear", "llama3", "yarn")

    def _rotary_table(self):
        """(cos, sin) for every position, (max_model_len, head_dim), made once by the model's own rotary
        embedding: a step then takes its rows with two gathers instead of the module's ~8 elementwise
        kernels, with the same values (the module's math is per position). None for the rotary types
        whose frequencies change with the context length ("dynamic", "longrope", ...)."""
        rot = self.model.model.rotary_emb
        if getattr(rot, "rope_type", "default") not in self.STATIC_ROPE:
            return None
        with torch.inference_mode():
            x = torch.empty(1, dtype=self.dtype, device=self.device)
            cos, sin = rot(x, torch.arange(self.max_model_len, device=self.device)[None])
        return cos[0], sin[0]

    def _rotary(self, x, pos):
        """cos, sin (1, T, head_dim) for positions pos (1, T)."""
        if self._rope_table is None:
            return self.model.model.rotary_emb(x, pos)
        cos, sin = self._rope_table
        return cos[pos], sin[pos]

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

    # ------------------------------------------------------------------ one layer, in two halves

    @staticmethod
    def _norm(norm, x, residual):
        """(norm(x + residual), x + residual): one kernel when `norm` is lesson 08's `FusedRMSNorm`.
        The residual stream is carried from layer to layer so that every add can ride on a norm."""
        if residual is None:
            return norm(x), x
        if isinstance(norm, FusedRMSNorm):
            return norm(x, residual)
        h = x + residual
        return norm(h), h

    @staticmethod
    def _gemv(layer, norm, *linears) -> bool:
        """True where lesson 08's `fuse(gemv=True)` asked for a norm (or SwiGLU) inside the next matmul
        and the modules allow it: a fused norm, dense projections."""
        return (getattr(layer, "gemv", False) and isinstance(norm, FusedRMSNorm)
                and all(type(m) is nn.Linear for m in linears))

    @staticmethod
    def _norm_linear(norm, proj, x, residual):
        """(proj(norm(x + residual)), x + residual): one kernel at decode (`kernels.gemv.norm_linear`)."""
        if residual is None:
            return norm_linear(x, norm.weight, norm.variance_epsilon, proj.weight, proj.bias, backend=norm.backend), x
        return norm_linear(x, norm.weight, norm.variance_epsilon, proj.weight, proj.bias, residual,
                           backend=norm.backend)

    def _project(self, layer, x, residual):
        """(add) + norm -> q, k, v projections -> (q/k norms): q (T, Hq, D), k and v (T, Hk, D), unrotated
        (views of one merged projection's output where there is one), and the residual stream."""
        attn, T, D = layer.self_attn, x.shape[1], self.head_dim
        if self._gemv(layer, layer.input_layernorm, getattr(attn, "qkv_proj", None)):
            qkv, residual = self._norm_linear(layer.input_layernorm, attn.qkv_proj, x, residual)
            q, k, v = qkv.split(attn.qkv_sizes, dim=-1)
        else:
            h, residual = self._norm(layer.input_layernorm, x, residual)
            if hasattr(attn, "qkv_proj"):   # lesson 08's fuse(merge=True): one matmul, three views of its output
                q, k, v = attn.qkv(h)
            else:
                q, k, v = attn.q_proj(h), attn.k_proj(h), attn.v_proj(h)
        q, k, v = q.view(T, -1, D), k.view(T, -1, D), v.view(T, -1, D)
        if hasattr(attn, "q_norm"):   # Qwen3: RMSNorm per head before the rotation
            q, k = attn.q_norm(q), attn.k_norm(k)
        return q, k, v, residual

    def _qkv(self, layer, li, x, residual, cos, sin, slots):
        """`_project`, then rotary on q and k with k and v written into layer li's cache at `slots` in the
        same kernel: returns q (T, Hq, D) and the residual stream."""
        q, k, v, residual = self._project(layer, x, residual)
        q = rope_write_kv(q, k, v, cos[0], sin[0], self.k_cache[li], self.v_cache[li], slots, backend=self.backend)
        return q, residual

    def _rest(self, layer, out, residual):
        """o projection -> add + norm -> MLP; returns the MLP's output and the residual stream. With
        `fuse(gemv=True)`, at decode: the GEMV for o, then add + norm + gate/up in one kernel and
        SwiGLU + down in another (`kernels.gemv`)."""
        o_proj, out = layer.self_attn.o_proj, out.reshape(1, out.shape[0], -1)
        mlp, norm = layer.mlp, layer.post_attention_layernorm
        if self._gemv(layer, norm, o_proj):    # the plain GEMV, where it beats cuBLAS (timed once per shape)
            a = gemv(out, o_proj.weight, o_proj.bias, backend=norm.backend)
        else:
            a = o_proj(out)
        if self._gemv(layer, norm, getattr(mlp, "gate_up_proj", None), getattr(mlp, "down_proj", None)):
            gate_up, residual = self._norm_linear(norm, mlp.gate_up_proj, a, residual)
            gate, up = gate_up.split(mlp.split, dim=-1)
            return swiglu_linear(gate, up, mlp.down_proj.weight, mlp.down_proj.bias, backend=mlp.backend), residual
        h, residual = self._norm(norm, a, residual)
        return mlp(h), residual

    def _logits(self, x, residual):
        """The final norm and the LM head (one kernel with `fuse(gemv=True)` at decode), as float32."""
        base, head = self.model.model, self.model.lm_head
        if self._gemv(base.layers[0], base.norm, head):
            return self._norm_linear(base.norm, head, x, residual)[0].float()
        return head(self._norm(base.norm, x, residual)[0]).float()

    # ------------------------------------------------------------------ any batch

    @torch.inference_mode()
    def forward(self, batch: list[tuple[Sequence, int]], need_logits: list[bool],
                every_position: list[bool] | None = None) -> torch.Tensor:
        """Run the scheduled tokens; returns the logits (float32) at the last scheduled token of each
        sequence with `need_logits` True, in batch order; for one with `every_position` True, the logits
        at each of its scheduled tokens instead (the last of them the one `need_logits` asks for)."""
        every_position = every_position or [False] * len(batch)
        if all(n == 1 for _, n in batch) and all(need_logits):
            return self.decode([seq for seq, _ in batch])
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
        if decode:   # the decode tokens' context lengths and block tables, as a decode step has them
            flat, tables = self.decode_inputs([batch[i][0] for i in decode])
            lens, tables = flat.view(4, -1)[3].to(dev), tables.to(dev)
            rows = torch.tensor([segments[i][0] for i in decode], device=dev)
        base = self.model.model
        x = base.embed_tokens(ids)
        cos, sin = self._rotary(x, pos)
        residual = None
        for li, layer in enumerate(base.layers):
            q, residual = self._qkv(layer, li, x, residual, cos, sin, slot_mapping)
            kc, vc = self.k_cache[li], self.v_cache[li]
            out = torch.empty_like(q)
            for i, (seq, n) in enumerate(batch):
                if n > 1:
                    off, start, _ = segments[i]
                    out[off:off + n] = paged_prefill_reference(q[off:off + n], kc, vc, seq.block_table, start,
                                                               self.scale, check=False)
            if decode:
                out[rows] = paged_decode(q[rows], kc, vc, tables, lens, self.scale, backend=self.backend,
                                         check=False)
            x, residual = self._rest(layer, out, residual)
        last = [r for (off, _, n), need, every in zip(segments, need_logits, every_position)
                for r in (range(off, off + n) if every else [off + n - 1] if need else [])]
        if not last:
            return torch.empty(0, self.model.config.vocab_size)
        return self._logits(x[0, last], residual[0, last])

    # ------------------------------------------------------------------ decode steps

    def _forward_decode(self, ids, pos, slots, lens, tables) -> torch.Tensor:
        """One token for each of B sequences: ids, positions, cache slots, context lengths (B,) and
        block tables (B, width). No host syncs and no data-dependent shapes, so it can be captured."""
        base = self.model.model
        x = base.embed_tokens(ids[None])
        cos, sin = self._rotary(x, pos[None])
        residual = None
        for li, layer in enumerate(base.layers):
            q, k, v, residual = self._project(layer, x, residual)
            # rotary, the cache write and attention: one kernel (plus the pieces' merge) on a GPU
            out = paged_decode_rope(q, k, v, cos[0], sin[0], slots, self.k_cache[li], self.v_cache[li], tables, lens,
                                    self.scale, backend=self.backend, check=False)
            x, residual = self._rest(layer, out, residual)
        return self._logits(x[0], residual[0])

    def _decode_step(self, ids, pos, slots, lens, tables, tokens, logprobs, step) -> torch.Tensor:
        """`_forward_decode`, then multi-step decoding's part, also on the device: each row's greedy
        token and its log-probability go to row `step` of `tokens` / `logprobs` (S, B), and the
        inputs move on to that token (its id, position + 1, its slot from the block table, context + 1),
        so the next call runs it with no word from the host. Returns the logits."""
        logits = self._forward_decode(ids, pos, slots, lens, tables)
        greedy_advance(logits, ids, pos, slots, lens, tables, tokens, logprobs, step, self.block_size,
                       backend=self.backend)
        return logits

    def _run_forward(self, *args) -> torch.Tensor:
        """`_forward_decode`, compiled with `compilation_config` > 0."""
        return self._compiled_forward(*args) if self.compiled else self._forward_decode(*args)

    def _run_step(self, *args) -> torch.Tensor:
        """`_decode_step`, compiled with `compilation_config` > 0."""
        return self._compiled_step(*args) if self.compiled else self._decode_step(*args)

    def decode_inputs(self, seqs: list[Sequence], size: int | None = None, width: int | None = None):
        """The decode inputs of `seqs` on the host: one int64 tensor holding ids, positions, slots and
        context lengths (4 x size), and the block tables (size, width). Rows past len(seqs), up to
        `size`, are padding: token 0 at position 0 in the scratch block."""
        bs, scratch = self.block_size, self.num_blocks
        size = size or len(seqs)
        width = width or max(len(s.block_table) for s in seqs)
        pad = size - len(seqs)
        pos = [s.num_computed_tokens for s in seqs]   # the token to run is the sequence's last
        ids = [s.token_ids[p] for s, p in zip(seqs, pos)]
        slots = [s.block_table[p // bs] * bs + p % bs for s, p in zip(seqs, pos)]
        lens = [p + 1 for p in pos]
        flat = (ids + [0] * pad + pos + [0] * pad + slots + [scratch * bs] * pad + lens + [1] * pad)
        tables = [s.block_table + [scratch] * (width - len(s.block_table)) for s in seqs] + [[scratch] * width] * pad
        return torch.tensor(flat), torch.tensor(tables)

    @torch.inference_mode()
    def decode(self, seqs: list[Sequence]) -> torch.Tensor:
        """Logits (B, vocab) of a decode step: a CUDA graph replay when one is big enough, else eager."""
        B = len(seqs)
        size = next((s for s in self.graphs if s >= B), None)
        if size is None:
            flat, tables = self._eager_inputs(seqs)
            return self._run_forward(*flat.view(4, -1), tables)[:B]
        graph, logits, _, _ = self.graphs[size]
        self._load_graph_inputs(seqs, size)
        graph.replay()
        return logits[:B]

    def _eager_inputs(self, seqs: list[Sequence]):
        """The inputs of a decode step that runs without a CUDA graph, on the device: as they are, or for
        a compiled step padded up to the captured batch size that holds them, with the tables' width
        marked dynamic, so that one compiled graph serves every step of that size (a padding row:
        token 0 at position 0 in the scratch block, as in a CUDA graph)."""
        size = width = None
        if self.compiled:
            size = next((s for s in self.batch_sizes if s >= len(seqs)), len(seqs))
            width = max(2, *(len(s.block_table) for s in seqs))   # dynamo specializes a size of 1
        flat, tables = self.decode_inputs(seqs, size, width)
        flat, tables = flat.to(self.device), tables.to(self.device)
        if self.compiled:
            torch._dynamo.mark_dynamic(tables, 1)
        return flat, tables

    def _load_graph_inputs(self, seqs: list[Sequence], size: int) -> None:
        flat, tables = self.decode_inputs(seqs, size)
        self._graph_inputs[:4 * size].copy_(flat, non_blocking=True)
        self._graph_tables[:size, :tables.shape[1]].copy_(tables, non_blocking=True)

    @torch.inference_mode()
    def decode_steps(self, seqs: list[Sequence], num_steps: int) -> tuple[list[list[int]], list[list[float]]]:
        """Multi-step decoding (vLLM's `num_scheduler_steps`): `num_steps` greedy decode steps in a row
        with one host sync at the end. Each step's token is picked on the device and fed to the next
        step there, so on a GPU the host queues all the graph replays at once and the device runs them
        back to back; the host's own work per step (scheduling, sampling, bookkeeping) is paid once.
        The blocks for every position must be in the tables already (`BlockManager.reserve`).
        Returns tokens and their log-probabilities, [step][sequence]."""
        B = len(seqs)
        size = next((s for s in self.graphs if s >= B), None)
        if size is None:
            flat, tables = self._eager_inputs(seqs)
            shape = (max(num_steps, self.num_scheduler_steps), tables.shape[0])   # one shape for every run
            tokens = torch.empty(shape, dtype=torch.long, device=self.device)
            logprobs = torch.empty(shape, dtype=torch.float32, device=self.device)
            step = torch.zeros(1, dtype=torch.long, device=self.device)
            for _ in range(num_steps):
                self._run_step(*flat.view(4, -1), tables, tokens, logprobs, step)
        else:
            graph, _, tokens, logprobs = self.graphs[size]
            if num_steps > tokens.shape[0]:
                raise ValueError(f"num_steps ({num_steps}) exceeds num_scheduler_steps ({tokens.shape[0]})")
            self._load_graph_inputs(seqs, size)
            self._graph_step.zero_()
            for _ in range(num_steps):
                graph.replay()
        return tokens[:num_steps, :B].tolist(), logprobs[:num_steps, :B].tolist()

    @torch.inference_mode()
    def capture_cuda_graphs(self, max_num_seqs: int) -> None:
        """Record a decode step once per size of `graph_batch_sizes`, largest first, all sharing one
        memory pool; each is run once eagerly before (kernels compiled, block configs picked). The step
        is `_forward_decode`, or with multi-step decoding `_decode_step` (greedy pick and inputs moved
        on, inside the graph)."""
        sizes, width = graph_batch_sizes(max_num_seqs), -(-self.max_model_len // self.block_size)
        self._graph_inputs = torch.zeros(4 * sizes[-1], dtype=torch.long, device=self.device)
        self._graph_tables = torch.full((sizes[-1], width), self.num_blocks, dtype=torch.long, device=self.device)
        self._graph_step = torch.zeros(1, dtype=torch.long, device=self.device)
        pool = None
        for size in reversed(sizes):
            tokens = torch.zeros(self.num_scheduler_steps, size, dtype=torch.long, device=self.device)
            logprobs = torch.zeros(self.num_scheduler_steps, size, dtype=torch.float32, device=self.device)
            self._pad_graph_inputs(size)
            self._graph_body(size, tokens, logprobs)
            self._pad_graph_inputs(size)       # the run above may have moved them on a token
            torch.cuda.synchronize(self.device)
            graph, logits = self._record(partial(self._graph_body, size, tokens, logprobs), pool)
            pool = graph.pool() if pool is None else pool
            self.graphs[size] = (graph, logits, tokens, logprobs)
        self.graphs = dict(sorted(self.graphs.items()))
        torch.cuda.synchronize(self.device)

    @staticmethod
    def _record(fn, pool):
        """(a CUDA graph of what fn launches, fn's output): the graph's input and output tensors are the
        ones fn read and wrote; a replay reruns its kernels on whatever they hold then."""
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=pool):
            out = fn()
        return graph, out

    def _pad_graph_inputs(self, size: int) -> None:
        """Every row padding: token 0 at position 0 in the scratch block."""
        flat = self._graph_inputs[:4 * size].view(4, size)
        flat.zero_()
        flat[2].fill_(self.num_blocks * self.block_size)
        flat[3].fill_(1)
        self._graph_tables[:size].fill_(self.num_blocks)

    def _graph_body(self, size: int, tokens, logprobs) -> torch.Tensor:
        args = (*self._graph_inputs[:4 * size].view(4, size), self._graph_tables[:size])
        if self.num_scheduler_steps > 1:
            return self._run_step(*args, tokens, logprobs, self._graph_step)
        return self._run_forward(*args)

