"""`llmopt export onnx`: a Llama-family model as ONNX, in the folder layout Transformers.js loads.

    out/config.json, generation_config.json, tokenizer.json, tokenizer_config.json
    out/onnx/model.onnx              Transformers.js dtype "fp32"
    out/onnx/model_quantized.onnx    dtype "q8": int8 weights, activations quantized on the fly
    out/onnx/model_q4.onnx           dtype "q4": 4-bit weights in blocks of 32 (MatMulNBits)

The graph is one decoder step with the KV cache as inputs and outputs, as Transformers.js' text
generation expects of a Llama model:
    inputs   input_ids, attention_mask, position_ids        (batch, seq) int64
             past_key_values.{i}.key / .value                (batch, kv_heads, past, head_dim) float32
    outputs  logits                                          (batch, seq, vocab)
             present.{i}.key / .value                        (batch, kv_heads, past + seq, head_dim)
The first call passes a past of length 0 and the whole prompt; each later call one new token and the
presents of the call before.

We do not trace transformers' own forward (its cache objects and mask helpers change between
versions): `OnnxDecoder` re-states the Llama forward with plain tensors, reusing the model's own
modules for the projections, norms and MLP, so the weights are the model's. It is checked against
the model's logits in tests/test_export_onnx.py, and `onnx_generate` runs the exported file in
onnxruntime with its KV cache.
"""
from __future__ import annotations

import copy
from pathlib import Path

import torch
from torch import nn

from ..kernels.rope import rope_reference

FILES = {"fp32": "model.onnx", "q8": "model_quantized.onnx", "q4": "model_q4.onnx"}


class OnnxDecoder(nn.Module):
    """A Llama-family causal LM's forward with an explicit KV cache: (input_ids, attention_mask,
    position_ids, k_0, v_0, k_1, v_1, ...) -> (logits, k_0', v_0', ...)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        from ..serving.runner import check_model

        check_model(model)
        self.model = model
        cfg = model.config
        self.num_layers = cfg.num_hidden_layers
        self.num_heads = cfg.num_attention_heads
        self.num_kv_heads = getattr(cfg, "num_key_value_heads", None) or self.num_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.num_heads

    def forward(self, input_ids, attention_mask, position_ids, *past):
        base = self.model.model
        B, T = input_ids.shape
        P = past[0].shape[2]
        x = base.embed_tokens(input_ids)
        cos, sin = base.rotary_emb(x, position_ids)
        # query i sits at position P + i and sees key j when j <= P + i and the mask keeps key j
        keys = torch.arange(P + T, device=input_ids.device)
        causal = keys[None, :] <= (torch.arange(T, device=input_ids.device) + P)[:, None]          # (T, P+T)
        visible = causal[None, None] & attention_mask[:, None, None, :].bool()                      # (B,1,T,P+T)
        bias = torch.zeros(visible.shape, dtype=torch.float32).masked_fill(~visible, torch.finfo(torch.float32).min)
        group = self.num_heads // self.num_kv_heads
        presents = []
        for i, layer in enumerate(base.layers):
            attn = layer.self_attn
            h = layer.input_layernorm(x)
            if hasattr(attn, "qkv_proj"):   # kernels.fuse(merge=True): one matmul, split into q, k and v
                q, k, v = attn.qkv_proj(h).split(attn.qkv_sizes, dim=-1)
            else:
                q, k, v = attn.q_proj(h), attn.k_proj(h), attn.v_proj(h)
            q = q.reshape(B, T, -1, self.head_dim)
            k = k.reshape(B, T, -1, self.head_dim)
            v = v.reshape(B, T, -1, self.head_dim).transpose(1, 2)
            if hasattr(attn, "q_norm"):   # Qwen3
                q, k = attn.q_norm(q), attn.k_norm(k)
            q, k = rope_reference(q.transpose(1, 2), k.transpose(1, 2), cos, sin)
            k = torch.cat([past[2 * i], k.to(past[2 * i].dtype)], dim=2)
            v = torch.cat([past[2 * i + 1], v.to(past[2 * i + 1].dtype)], dim=2)
            presents += [k, v]
            kk = k.repeat_interleave(group, dim=1) if group > 1 else k
            vv = v.repeat_interleave(group, dim=1) if group > 1 else v
            scores = (q.float() @ kk.float().transpose(-1, -2)) * self.head_dim ** -0.5 + bias
            out = (scores.softmax(-1) @ vv.float()).to(x.dtype)                                      # (B,H,T,D)
            x = x + attn.o_proj(out.transpose(1, 2).reshape(B, T, -1))
            x = x + layer.mlp(layer.post_attention_layernorm(x))
        logits = self.model.lm_head(base.norm(x))
        return (logits, *presents)

    def empty_past(self, batch: int = 1, dtype=torch.float32) -> list[torch.Tensor]:
        shape = (batch, self.num_kv_heads, 0, self.head_dim)
        return [torch.zeros(shape, dtype=dtype) for _ in range(2 * self.num_layers)]


def io_names(num_layers: int) -> tuple[list[str], list[str]]:
    past = [f"past_key_values.{i}.{kv}" for i in range(num_layers) for kv in ("key", "value")]
    present = [f"present.{i}.{kv}" for i in range(num_layers) for kv in ("key", "value")]
    return ["input_ids", "attention_mask", "position_ids", *past], ["logits", *present]


def export_onnx(model=None, out_dir="onnx_export", tokenizer=None, quantize=("q8", "q4"), opset: int = 17) -> dict:
    """Write `model` (a loaded model, or a name/folder for `llmopt.load`; default the bundled one)
    and its tokenizer to `out_dir` in Transformers.js' layout; `quantize`: any of "q8", "q4".
    A model quantized by `llmopt.quant` (W4/W8 `QuantLinear`, NF4, ...) is written with its weights
    dequantized: the fp32 file computes what the quantized model computes, and "q8"/"q4" are made
    from it by onnxruntime's own quantizers. Returns {dtype: path of its .onnx file}."""
    from .. import models

    if not isinstance(model, nn.Module):
        model, tok = models.load(model, device="cpu", dtype=torch.float32)
        tokenizer = tokenizer or tok
    if tokenizer is None:
        raise ValueError("pass tokenizer= with a model object")
    bad = set(quantize) - {"q8", "q4"}
    if bad:
        raise ValueError(f"quantize takes 'q8' and 'q4', got {sorted(bad)}")
    rot = getattr(getattr(model, "model", None), "rotary_emb", None)
    rope_type = getattr(rot, "rope_type", "default")
    if "dynamic" in rope_type or rope_type == "longrope":
        import warnings

        limit = getattr(rot, "original_max_seq_len", model.config.max_position_embeddings)
        warnings.warn(f"rope_type {rope_type!r} recomputes its frequencies for contexts past {limit} tokens; the "
                      "exported graph keeps those of shorter contexts, so its logits differ from the model's past "
                      "that length", stacklevel=2)
    model = copy.deepcopy(model).float().cpu().eval()   # exported in float32 from the CPU; the caller's stays
    dequantize_linears(model)
    every_expert(model)
    out = Path(out_dir)
    (out / "onnx").mkdir(parents=True, exist_ok=True)
    dec = OnnxDecoder(model)
    inputs, outputs = io_names(dec.num_layers)
    ids = torch.tensor([[1, 2, 3]])
    past = [t.new_zeros(1, dec.num_kv_heads, 2, dec.head_dim) for t in dec.empty_past()]   # traced with a past
    args = (ids, torch.ones(1, 5, dtype=torch.long), torch.tensor([[2, 3, 4]]), *past)
    axes = {"input_ids": {0: "batch", 1: "seq"}, "attention_mask": {0: "batch", 1: "total"},
            "position_ids": {0: "batch", 1: "seq"}, "logits": {0: "batch", 1: "seq"}}
    axes.update({n: {0: "batch", 2: "past"} for n in inputs[3:]})
    axes.update({n: {0: "batch", 2: "total"} for n in outputs[1:]})
    path = out / "onnx" / FILES["fp32"]
    with torch.no_grad():
        torch.onnx.export(dec, args, str(path), input_names=inputs, output_names=outputs, dynamic_axes=axes,
                          opset_version=opset, do_constant_folding=True, dynamo=False)
    model.config.save_pretrained(out)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(out)
    tokenizer.save_pretrained(out)
    _mark_bos(tokenizer, out / "tokenizer_config.json")
    files = {"fp32": path}
    if "q8" in quantize:
        from onnxruntime.quantization import QuantType, quantize_dynamic

        files["q8"] = out / "onnx" / FILES["q8"]
        quantize_dynamic(str(path), str(files["q8"]), weight_type=QuantType.QInt8)
    if "q4" in quantize:
        files["q4"] = out / "onnx" / FILES["q4"]
        _quantize_q4(path, files["q4"])
    return files


def every_expert(model: nn.Module) -> int:
    """Mixture-of-Experts layers (lesson 07) in place: dispatch "dense", every expert on every token
    weighted by the router's top-k weights (zero for the others). Export traces one run, and the other
    paths' shapes (how many tokens each expert gets) come from that run's data; the dense path's do not,
    so the graph computes the model's output for any input, at E/k times the expert FLOPs. Stock
    `transformers` MoE blocks are swapped for `MoEFeedForward` first. Returns how many layers."""
    from ..moe import layer

    for name, m in list(model.named_modules()):
        if layer.is_hf_moe_block(m):
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, layer.MoEFeedForward.from_hf(m, "dense"))
    found = layer.moe_layers(model)
    for m in found:
        m.experts.dispatch = "dense"      # the capacity factor, if any, stays as it was
    return len(found)


def dequantize_linears(model: nn.Module) -> int:
    """Swap, in place, every module that holds quantized weights (it has `dequantized_weight`) for an
    `nn.Linear` with those weights, dequantized to float32: ONNX export traces plain matmuls, not the
    bit unpacking. A Mixture-of-Experts layer's `QuantExperts` becomes float stacked experts first.
    Returns how many modules were swapped."""
    swapped = 0
    for name, module in list(model.named_modules()):
        if hasattr(module, "to_float"):
            parent_name, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent_name), attr, module.to_float(torch.float32))
            swapped += 1
    for name, module in list(model.named_modules()):
        if not hasattr(module, "dequantized_weight"):
            continue
        w = module.dequantized_weight(torch.float32)
        bias = getattr(module, "bias", None)
        linear = nn.Linear(w.shape[1], w.shape[0], bias=bias is not None)
        with torch.no_grad():
            linear.weight.copy_(w)
            if bias is not None:
                linear.bias.copy_(bias.float())
        parent_name, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent_name), attr, linear)
        swapped += 1
    return swapped


def _mark_bos(tokenizer, config_path: Path) -> None:
    """Say in tokenizer_config.json whether the tokenizer puts a BOS token first. Python's tokenizers
    read that from tokenizer.json's post-processor; Transformers.js' text-generation pipeline adds
    special tokens only when the config says `add_bos_token` (without it the model would see a prompt
    it was never trained on, and generate something else)."""
    import json

    bos = getattr(tokenizer, "bos_token_id", None)
    ids = tokenizer("a").input_ids
    cfg = json.loads(config_path.read_text())
    cfg["add_bos_token"] = bool(bos is not None and ids and ids[0] == bos)
    config_path.write_text(json.dumps(cfg, indent=2) + "\n")


def _quantize_q4(src: Path, dst: Path, block_size: int = 32) -> None:
    """4-bit weights for every MatMul with a constant weight (onnxruntime's MatMulNBits, symmetric,
    blocks of `block_size` along the input dim): what Transformers.js loads as dtype "q4"."""
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    q = MatMulNBitsQuantizer(onnx.load(str(src)), block_size=block_size, is_symmetric=True)
    q.process()
    q.model.save_model_to_file(str(dst))


def _empty_past(sess, batch: int = 1) -> dict:
    """A past of length 0 for every past_key_values input of an onnxruntime session."""
    import numpy as np

    return {i.name: np.zeros((batch, i.shape[1], 0, i.shape[3]), dtype=np.float32) for i in sess.get_inputs()
            if i.name.startswith("past_key_values.")}


def onnx_logits(path, ids):
    """Logits (batch, seq, vocab) of the exported file in onnxruntime for token ids (batch, seq), no past."""
    import numpy as np
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    ids = np.asarray(ids, dtype=np.int64)
    return sess.run(["logits"], {"input_ids": ids, "attention_mask": np.ones_like(ids),
                                 "position_ids": np.broadcast_to(np.arange(ids.shape[1]), ids.shape).copy(),
                                 **_empty_past(sess, ids.shape[0])})[0]


def onnx_generate(path, prompt_ids: list[int], max_new_tokens: int, eos_token_id: int | None = None):
    """Greedy generation with the exported file in onnxruntime, KV cache carried between calls.
    Returns (new token ids, seconds of the decode steps after the first)."""
    import time

    import numpy as np
    import onnxruntime as ort

    if max_new_tokens < 1:
        return [], 0.0
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [i.name for i in sess.get_inputs()]
    feed = _empty_past(sess)
    past_names = list(feed)
    ids = list(prompt_ids)
    step_ids, pos0, out, t_first = ids, 0, [], None
    for _ in range(max_new_tokens):
        n = len(step_ids)
        feed.update(input_ids=np.array([step_ids], dtype=np.int64),
                    attention_mask=np.ones((1, pos0 + n), dtype=np.int64),
                    position_ids=np.arange(pos0, pos0 + n, dtype=np.int64)[None])
        results = sess.run(None, {k: feed[k] for k in names})
        token = int(results[0][0, -1].argmax())
        if t_first is None:
            t_first = time.perf_counter()
        out.append(token)
        if eos_token_id is not None and token == eos_token_id:
            break
        feed.update(zip(past_names, results[1:]))
        pos0, step_ids = pos0 + n, [token]
    return out, time.perf_counter() - t_first


def onnx_perplexity(path, tokens: torch.Tensor, window: int = 512) -> float:
    """Perplexity of the exported file on a 1-D token tensor, in windows of `window` (no past)."""
    import math

    import numpy as np
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    past = _empty_past(sess)
    tokens = tokens.long()
    nll, n = 0.0, 0
    for s in range(0, len(tokens) - window, window):
        x = tokens[s:s + window + 1].numpy()[None]
        logits = sess.run(["logits"], {"input_ids": x[:, :-1], "attention_mask": np.ones((1, window), np.int64),
                                       "position_ids": np.arange(window, dtype=np.int64)[None], **past})[0][0]
        nll += torch.nn.functional.cross_entropy(torch.from_numpy(logits), torch.from_numpy(x[0, 1:]),
                                                 reduction="sum").item()
        n += window
    return math.exp(nll / n)


def measure_export(files: dict, model=None, new_tokens: int = 64, eval_tokens: int = 4096) -> dict:
    """Size, perplexity on the test split, greedy decode speed in onnxruntime (CPU, batch 1) and
    agreement with the fp32 file's tokens, for each file of one export (`export_onnx`'s result; the
    tokenizer is the one saved beside them). `model`: a name for the report (default: the folder's)."""
    from transformers import AutoTokenizer

    from .. import data

    if isinstance(new_tokens, bool) or not isinstance(new_tokens, int) or new_tokens < 1:
        raise ValueError(f"new_tokens must be an int >= 1 (2 or more to time the decode), got {new_tokens!r}")
    folder = Path(next(iter(files.values()))).parent.parent
    tok = AutoTokenizer.from_pretrained(folder)
    stream = data.token_stream("test", tok)
    prompt = stream[:32].tolist()
    rows, ref = [], None
    for dtype, path in files.items():
        got, seconds = onnx_generate(path, prompt, new_tokens)
        ref = got if ref is None else ref
        rows.append({"dtype": dtype, "file": str(path), "MB": Path(path).stat().st_size / 1e6,
                     "perplexity": onnx_perplexity(path, stream[:eval_tokens]),
                     "tok_s": (len(got) - 1) / seconds if len(got) > 1 else None,
                     "same_tokens_as_fp32": sum(a == b for a, b in zip(got, ref)) / len(ref)})
    return {"model": model if isinstance(model, str) else folder.name, "new_tokens": new_tokens,
            "eval_tokens": eval_tokens, "rows": rows}


def format_export(result: dict) -> str:
    lines = [f"{result['model']}: onnxruntime on this CPU, batch 1, {result['new_tokens']} greedy tokens; "
             f"perplexity on {result['eval_tokens']} test tokens",
             "dtype | file | MB | perplexity | tok/s | greedy tokens equal to fp32's"]
    for r in result["rows"]:
        tok_s = "-" if r["tok_s"] is None else f"{r['tok_s']:.0f}"   # one token: no decode step to time
        lines.append(f"{r['dtype']} | {Path(r['file']).name} | {r['MB']:.1f} | {r['perplexity']:.3f} | "
                     f"{tok_s} | {r['same_tokens_as_fp32']:.0%}")
    return "\n".join(lines)
