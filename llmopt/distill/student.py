"""The student: a smaller Llama of the teacher's family, and a head start from its weights.

A student shares the teacher's tokenizer (the soft targets are distributions over the same
vocabulary) and is smaller in depth (fewer layers), width (hidden size, heads) or MLP size.
Depth is the cheapest cut to make well: a student with the teacher's widths can start from a
subset of the teacher's own layers (DistilBERT took every other layer; Minitron prunes, then
distils), which is far better than random weights. A narrower student starts from random
weights here (`llmopt.prune.prune_ffn` and `prune_heads` make narrower students that keep
the teacher's weights, and plug into `distill` the same way).

    cfg = student_config(teacher.config, num_hidden_layers=3)
    student = init_from_teacher(teacher, cfg)            # layers [0, 2, 5] of a 6-layer teacher
"""
from __future__ import annotations

import copy

import torch

_SIZES = ("num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads")


def student_config(teacher_config, num_hidden_layers: int | None = None, hidden_size: int | None = None,
                   intermediate_size: int | None = None, num_attention_heads: int | None = None,
                   num_key_value_heads: int | None = None):
    """A copy of the teacher's Llama config with the given sizes (None keeps the teacher's).

    Each size must be a positive int no larger than the teacher's (a student is smaller).
    The attention keeps its shape rules: hidden_size divisible by the number of query heads,
    query heads divisible by key/value heads (grouped-query attention), an even head
    dimension (RoPE rotates pairs). Everything else (vocabulary, RoPE, norms) is the teacher's."""
    from transformers import LlamaConfig

    if not isinstance(teacher_config, LlamaConfig):
        raise ValueError(f"teacher_config must be a transformers LlamaConfig, got {type(teacher_config).__name__}")
    asked = dict(num_hidden_layers=num_hidden_layers, hidden_size=hidden_size, intermediate_size=intermediate_size,
                 num_attention_heads=num_attention_heads, num_key_value_heads=num_key_value_heads)
    sizes = {}
    for name in _SIZES:
        top, v = getattr(teacher_config, name), asked[name]
        if v is None:
            sizes[name] = top
        elif isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= top:
            raise ValueError(f"{name} must be an int in [1, {top}] (the teacher's is {top}), got {v!r}")
        else:
            sizes[name] = v
    h, heads, kv = sizes["hidden_size"], sizes["num_attention_heads"], sizes["num_key_value_heads"]
    if h % heads:
        ok = [n for n in range(1, teacher_config.num_attention_heads + 1) if h % n == 0 and (h // n) % 2 == 0]
        raise ValueError(f"hidden_size {h} is not divisible by num_attention_heads {heads}; "
                         f"num_attention_heads could be one of {ok}")
    if (h // heads) % 2:
        raise ValueError(f"the head dimension hidden_size / num_attention_heads = {h // heads} must be even "
                         "(RoPE rotates pairs of dimensions); change hidden_size or num_attention_heads")
    if heads % kv:
        ok = [n for n in range(1, heads + 1) if heads % n == 0]
        raise ValueError(f"num_attention_heads {heads} is not divisible by num_key_value_heads {kv}; "
                         f"num_key_value_heads must be one of {ok}")
    d = teacher_config.to_dict()
    d.update(sizes)
    widths_kept = h == teacher_config.hidden_size and heads == teacher_config.num_attention_heads
    d["head_dim"] = getattr(teacher_config, "head_dim", None) if widths_kept else h // heads
    d["head_dim"] = d["head_dim"] or h // heads
    for k in ("_name_or_path", "transformers_version", "llmopt_lowrank"):   # the last: a factorised teacher's layers
        d.pop(k, None)
    return LlamaConfig(**d)


def same_widths(teacher_config, student_cfg) -> bool:
    """True when every teacher matrix has the student's shape: its layers can be copied."""
    keys = ("vocab_size", "hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads",
            "head_dim", "tie_word_embeddings", "attention_bias", "mlp_bias")
    return all(getattr(teacher_config, k, None) == getattr(student_cfg, k, None) for k in keys)


def evenly_spaced(n_teacher: int, n_student: int) -> list[int]:
    """`n_student` layer indices spread over `n_teacher`, first and last kept: 6 -> 3 gives
    [0, 2, 5]. The first and last layers are the ones that work directly with the (copied)
    embeddings and output head; spreading the rest keeps a bit of every depth."""
    if not 1 <= n_student <= n_teacher:
        raise ValueError(f"n_student must be in [1, {n_teacher}], got {n_student}")
    if n_student == 1:
        return [n_teacher - 1]
    return [round(i * (n_teacher - 1) / (n_student - 1)) for i in range(n_student)]


def init_from_teacher(teacher, student_cfg, layers: list[int] | None = None, seed: int = 0):
    """A new `LlamaForCausalLM(student_cfg)` on the teacher's device and dtype.

    When the widths match (`same_widths`), the embeddings, the final norm, the lm_head and
    teacher layers `layers` (default `evenly_spaced`) are *copied* into it: student layer i
    gets teacher layer layers[i]. The copies own their memory, so training the student never
    touches the teacher. Otherwise the student starts from random weights (seeded; `layers`
    must then be None). The teacher's generation config comes along (pad and eos tokens).
    Copying needs the teacher's float nn.Linear weights: a quantized, factorised or fused teacher
    is refused (start the student from the float teacher; it can still distil from the other)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    if not isinstance(student_cfg, LlamaConfig):
        raise ValueError(f"student_cfg must be a LlamaConfig (see student_config), got {type(student_cfg).__name__}")
    quantized = next((n for n, m in teacher.named_modules() if getattr(m, "quantized", False)), None)
    if quantized is not None:
        raise ValueError(f"teacher is quantized ({quantized} is a {type(teacher.get_submodule(quantized)).__name__}): "
                         "init_from_teacher copies float weights; pass the float teacher (the quantized one can "
                         "still be the teacher that distill learns from)")
    tcfg = teacher.config
    n_t, n_s = tcfg.num_hidden_layers, student_cfg.num_hidden_layers
    p = next(teacher.parameters())
    with torch.random.fork_rng(devices=[]):  # the same student every time; the global RNG untouched
        torch.manual_seed(seed)
        student = LlamaForCausalLM(student_cfg).to(device=p.device, dtype=p.dtype)
    if getattr(teacher, "generation_config", None) is not None:
        student.generation_config = copy.deepcopy(teacher.generation_config)
    if not same_widths(tcfg, student_cfg):
        if layers is not None:
            raise ValueError("layers can be copied only when the student has the teacher's widths "
                             "(hidden, MLP, heads, vocabulary); got a narrower student: pass layers=None")
        return student.eval()
    if layers is None:
        layers = evenly_spaced(n_t, n_s)
    layers = list(layers)
    if len(layers) != n_s or len(set(layers)) != n_s or not all(isinstance(i, int) and 0 <= i < n_t for i in layers):
        raise ValueError(f"layers must be {n_s} distinct teacher layer indices in [0, {n_t}), got {layers!r}")
    src = teacher.state_dict()
    state = {}
    for key in student.state_dict():
        if key.startswith("model.layers."):
            i, rest = key[len("model.layers."):].split(".", 1)
            key_t = f"model.layers.{layers[int(i)]}.{rest}"
        else:
            key_t = key
        if key_t not in src:   # a low-rank or fused module where a Llama has a plain linear
            raise ValueError(f"teacher has no tensor {key_t}: init_from_teacher copies the float weights of a "
                             "plain Llama; pass the teacher before factorising or fusing it")
        state[key] = src[key_t].detach().clone()
    student.load_state_dict(state)
    if tcfg.tie_word_embeddings:
        student.tie_weights()
    return student.eval()
