"""llmopt.distill: the loss against hand-computed values and its limits, the student's
config and initialisation, and a short distillation run through the shared loop."""
import copy
import math

import pytest
import torch
import torch.nn.functional as F

from llmopt import distill as kd
from llmopt import models
from llmopt.distill import distill, distill_loss_fn, distillation_loss, init_from_teacher, soft_kl, student_config
from llmopt.train import TrainConfig, lm_loss, train


def by_hand(s_rows, t_rows, labels, T, alpha, kind):
    """The loss from the definition, in plain Python floats, one token at a time."""
    total_kl = total_ce = 0.0
    for s, t, y in zip(s_rows, t_rows, labels):
        def softmax(z):
            m = max(v / T for v in z)
            e = [math.exp(v / T - m) for v in z]
            return [v / sum(e) for v in e]
        p, q = softmax(t), softmax(s)
        if kind == "reverse":
            p, q = q, p
        total_kl += sum(pi * math.log(pi / qi) for pi, qi in zip(p, q))
        total_ce += -math.log(math.exp(s[y]) / sum(math.exp(v) for v in s))
    n = len(labels)
    return alpha * T**2 * total_kl / n + (1 - alpha) * total_ce / n


S_ROWS = [[1.0, -0.5, 2.0, 0.0], [0.3, 0.3, -1.0, 1.5], [-2.0, 0.5, 0.1, 0.2]]
T_ROWS = [[2.0, 0.0, 1.0, -1.0], [0.0, 1.0, -0.5, 2.5], [-1.0, -1.0, 0.5, 0.0]]
LABELS = [2, 3, 1]


@pytest.mark.parametrize("kind", ["forward", "reverse"])
@pytest.mark.parametrize("T", [0.5, 1.0, 2.0, 4.0])
@pytest.mark.parametrize("alpha", [0.0, 0.3, 0.5, 1.0])
def test_loss_equals_the_hand_computed_value(kind, T, alpha):
    s, t, y = torch.tensor(S_ROWS), torch.tensor(T_ROWS), torch.tensor(LABELS)
    got = distillation_loss(s, t, y, temperature=T, alpha=alpha, kind=kind)
    assert got.dtype == torch.float32 and got.dim() == 0
    assert got.item() == pytest.approx(by_hand(S_ROWS, T_ROWS, LABELS, T, alpha, kind), rel=1e-5)
    # (batch, seq, vocab) logits give the same per-token average as the flattened ones
    got3 = distillation_loss(s.reshape(1, 3, 4), t.reshape(1, 3, 4), y.reshape(1, 3), T, alpha, kind)
    assert got3.item() == pytest.approx(got.item(), rel=1e-6)


def test_forward_and_reverse_kl_differ():
    s, t = torch.tensor(S_ROWS), torch.tensor(T_ROWS)
    fwd, rev = soft_kl(s, t, 1.0, "forward"), soft_kl(s, t, 1.0, "reverse")
    assert fwd.shape == rev.shape == (3,)
    assert (fwd > 0).all() and (rev > 0).all() and not torch.allclose(fwd, rev)
    assert torch.allclose(soft_kl(t, s, 1.0, "forward"), rev)  # KL(q||p) is forward KL with roles swapped


def test_alpha_ends_are_cross_entropy_and_scaled_kl():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(2, 5, 30, generator=g) * 3, torch.randn(2, 5, 30, generator=g) * 3
    y = torch.randint(0, 30, (2, 5), generator=g)
    ce = F.cross_entropy(s.flatten(0, 1), y.flatten())
    assert torch.allclose(distillation_loss(s, t, y, temperature=3.0, alpha=0.0), ce)
    for T in (0.7, 1.0, 3.0):
        kl = F.kl_div(F.log_softmax(s / T, -1), F.softmax(t / T, -1), reduction="none").sum(-1).mean()
        assert torch.allclose(distillation_loss(s, t, y, temperature=T, alpha=1.0), T**2 * kl, rtol=1e-5)
        assert torch.allclose(distillation_loss(s, t, None, temperature=T, alpha=1.0), T**2 * kl, rtol=1e-5)


def test_identical_logits_give_zero_kl():
    g = torch.Generator().manual_seed(1)
    z = torch.randn(4, 6, 50, generator=g) * 4
    y = torch.randint(0, 50, (4, 6), generator=g)
    for kind in ("forward", "reverse"):
        assert soft_kl(z, z.clone(), 2.0, kind).abs().max() < 1e-6
        assert distillation_loss(z, z.clone(), y, 2.0, 1.0, kind).abs() < 1e-6
        # a constant shift of the logits changes no probability either
        assert distillation_loss(z, z + 7.5, y, 2.0, 1.0, kind).abs() < 1e-5
        assert torch.allclose(distillation_loss(z, z, y, 2.0, 0.5, kind), 0.5 * F.cross_entropy(z.flatten(0, 1),
                                                                                                y.flatten()))


def test_large_temperature_tends_to_matching_centered_logits():
    """Hinton et al. (2015), section 2.1: for T >> |logits|, T^2 KL -> mean_i (d_i - mean(d))^2 / 2
    per token, d = teacher - student logits; the gap shrinks like 1/T (both KL directions)."""
    g = torch.Generator().manual_seed(2)
    s, t = torch.randn(6, 40, generator=g, dtype=torch.float64) * 2, torch.randn(6, 40, generator=g,
                                                                                dtype=torch.float64) * 2
    d = t - s
    limit = 0.5 * ((d - d.mean(-1, keepdim=True)) ** 2).mean(-1)
    for kind in ("forward", "reverse"):
        gaps = [((T**2 * soft_kl(s, t, T, kind) - limit).abs() / limit).max().item() for T in (10.0, 1e2, 1e3, 1e4)]
        assert gaps[-1] < 1e-3 and gaps[-2] < 1e-2
        assert all(a > 5 * b for a, b in zip(gaps, gaps[1:]))  # about 10x closer per 10x T
        want = limit.mean()
        got = distillation_loss(s, t, None, temperature=1e4, alpha=1.0, kind=kind)
        assert got.dtype == torch.float64 and got.item() == pytest.approx(want.item(), rel=1e-3)
    assert (soft_kl(s, t, 1.0) - limit).abs().max() > 0.1  # at T=1 it is something else


def test_soft_targets_flatten_with_temperature():
    z = torch.tensor([[3.0, 1.0, 0.0, -2.0]])
    p1, p4 = kd.soft_targets(z, 1.0), kd.soft_targets(z, 4.0)
    assert torch.allclose(p1, torch.softmax(z, -1)) and torch.allclose(p4.sum(-1), torch.ones(1))
    assert p4.max() < p1.max() and p4.min() > p1.min()  # flatter
    assert kd.soft_targets(z.bfloat16(), 1.0).dtype == torch.float32


def test_low_precision_logits_are_upcast():
    g = torch.Generator().manual_seed(3)
    s, t = torch.randn(8, 100, generator=g), torch.randn(8, 100, generator=g)
    y = torch.randint(0, 100, (8,), generator=g)
    got = distillation_loss(s.bfloat16(), t.bfloat16(), y, 2.0, 0.5)
    assert got.dtype == torch.float32
    want = distillation_loss(s.bfloat16().float(), t.bfloat16().float(), y, 2.0, 0.5)
    assert torch.equal(got, want)


def test_ignored_labels_count_in_neither_term():
    g = torch.Generator().manual_seed(4)
    s, t = torch.randn(2, 6, 20, generator=g), torch.randn(2, 6, 20, generator=g)
    y = torch.randint(0, 20, (2, 6), generator=g)
    y_pad = y.clone()
    y_pad[:, 4:] = -100
    got = distillation_loss(s, t, y_pad, 2.0, 0.5)
    want = distillation_loss(s[:, :4], t[:, :4], y[:, :4], 2.0, 0.5)
    assert torch.allclose(got, want)


def test_gradients_reach_only_the_student():
    teacher = torch.nn.Linear(8, 16)
    student = torch.nn.Linear(8, 16)
    x = torch.randn(5, 8)
    y = torch.randint(0, 16, (5,))
    with torch.no_grad():
        t = teacher(x)
    loss = distillation_loss(student(x), t, y, 2.0, 0.5)
    loss.backward()
    assert student.weight.grad is not None and student.weight.grad.abs().sum() > 0
    assert teacher.weight.grad is None and not t.requires_grad


def test_gradients_only_reach_the_student_through_the_train_loss(tiny):
    teacher = tiny[0]
    student = init_from_teacher(teacher, student_config(teacher.config, num_hidden_layers=1))
    fn = distill_loss_fn(teacher, temperature=2.0, alpha=0.5)
    x = torch.randint(0, teacher.config.vocab_size, (2, 12))
    loss = fn(student, x[:, :-1], x[:, 1:])
    loss.backward()
    assert all(p.grad is None for p in teacher.parameters())
    assert sum(p.grad.abs().sum() for p in student.parameters() if p.grad is not None) > 0
    assert not teacher.training


def test_matches_the_qat_distillation_loss(tiny):
    """Lesson 03's QAT loss is this loss (forward KL) in another wrapper: same numbers."""
    from llmopt.quant.qat import distillation_loss as qat_loss

    teacher = tiny[0]
    student = init_from_teacher(teacher, student_config(teacher.config, num_hidden_layers=1))
    x = torch.randint(0, teacher.config.vocab_size, (2, 10))
    for T, a in ((1.0, 1.0), (2.0, 0.5)):
        with torch.no_grad():
            ours = distill_loss_fn(teacher, T, a)(student, x[:, :-1], x[:, 1:])
            theirs = qat_loss(teacher, T, a)(student, x[:, :-1], x[:, 1:])
        assert torch.allclose(ours, theirs, rtol=1e-5)


@pytest.mark.parametrize("kwargs, match", [
    (dict(temperature=0.0), "temperature"), (dict(temperature=-1.0), "temperature"),
    (dict(temperature="2"), "temperature"), (dict(alpha=1.5), "alpha"), (dict(alpha=-0.1), "alpha"),
    (dict(kind="symmetric"), "kind"), (dict(kind="Forward"), "'forward', 'reverse'"),
])
def test_bad_arguments_are_value_errors(kwargs, match):
    s, t, y = torch.tensor(S_ROWS), torch.tensor(T_ROWS), torch.tensor(LABELS)
    with pytest.raises(ValueError, match=match):
        distillation_loss(s, t, y, **kwargs)
    with pytest.raises(ValueError, match=match):
        distill_loss_fn(torch.nn.Linear(2, 2), **kwargs)


def test_bad_shapes_are_value_errors():
    s, t, y = torch.tensor(S_ROWS), torch.tensor(T_ROWS), torch.tensor(LABELS)
    with pytest.raises(ValueError, match="same shape"):
        distillation_loss(s, t[:, :3], y)
    with pytest.raises(ValueError, match="labels must have shape"):
        distillation_loss(s, t, y[:2])
    with pytest.raises(ValueError, match="labels are needed"):
        distillation_loss(s, t, None, alpha=0.5)
    with pytest.raises(ValueError, match="every label"):
        distillation_loss(s, t, torch.full((3,), -100))


# --------------------------------------------------------------------------- students

def test_student_config_is_a_valid_smaller_model(bundled):
    from transformers import LlamaForCausalLM

    teacher = bundled[0]
    for kw in (dict(num_hidden_layers=3), dict(num_hidden_layers=4, hidden_size=192, num_attention_heads=6,
                                                intermediate_size=576),
               dict(hidden_size=128), dict(num_key_value_heads=1, intermediate_size=512)):
        cfg = student_config(teacher.config, **kw)
        for k, v in kw.items():
            assert getattr(cfg, k) == v
        assert cfg.head_dim * cfg.num_attention_heads == cfg.hidden_size
        assert cfg.vocab_size == teacher.config.vocab_size and cfg.rope_parameters == teacher.config.rope_parameters
        torch.manual_seed(0)
        m = LlamaForCausalLM(cfg).eval()
        assert models.param_count(m) < models.param_count(teacher)
        with torch.no_grad():
            logits = m(input_ids=torch.randint(0, cfg.vocab_size, (2, 9))).logits
        assert logits.shape == (2, 9, cfg.vocab_size) and torch.isfinite(logits).all()
    assert teacher.config.num_hidden_layers == 6  # the teacher's config was not touched


@pytest.mark.parametrize("kwargs, match", [
    (dict(num_hidden_layers=0), r"num_hidden_layers must be an int in \[1, 2\]"),
    (dict(num_hidden_layers=3), "num_hidden_layers"),  # deeper than the teacher
    (dict(hidden_size=34), "not divisible by num_attention_heads 4"),
    (dict(hidden_size=60), "must be even"),  # 15 per head
    (dict(num_key_value_heads=3), r"num_key_value_heads must be an int in \[1, 2\]"),
    (dict(num_attention_heads=3), "not divisible by num_attention_heads 3"),
    (dict(num_attention_heads=3, hidden_size=48), "num_key_value_heads must be one of"),  # 3 heads, 2 groups
    (dict(intermediate_size=2.5), "intermediate_size"),
    (dict(num_hidden_layers=True), "num_hidden_layers"),
])
def test_student_config_rejects_invalid_shapes(tiny, kwargs, match):
    with pytest.raises(ValueError, match=match):
        student_config(tiny[0].config, **kwargs)  # the teacher: 2 layers, hidden 64, 4 heads, 2 kv heads


def test_student_config_keeps_valid_head_dims(tiny):
    for h, heads in ((48, 4), (40, 4), (32, 2)):
        cfg = student_config(tiny[0].config, hidden_size=h, num_attention_heads=heads)
        assert cfg.head_dim == h // heads


def test_student_config_needs_a_llama_config(tiny):
    with pytest.raises(ValueError, match="LlamaConfig"):
        student_config({"hidden_size": 64})
    with pytest.raises(ValueError, match="student_cfg must be a LlamaConfig"):
        init_from_teacher(tiny[0], {"num_hidden_layers": 1})


def test_evenly_spaced_layers():
    assert kd.evenly_spaced(6, 3) == [0, 2, 5]
    assert kd.evenly_spaced(6, 6) == list(range(6))
    assert kd.evenly_spaced(6, 2) == [0, 5]
    assert kd.evenly_spaced(12, 4) == [0, 4, 7, 11]
    with pytest.raises(ValueError, match="n_student"):
        kd.evenly_spaced(6, 7)


def test_init_from_teacher_copies_the_chosen_layers(bundled):
    teacher = bundled[0]
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    cfg = student_config(teacher.config, num_hidden_layers=3)
    for layers in (None, [1, 3, 4], [5, 0, 2]):
        student = init_from_teacher(teacher, cfg, layers=layers)
        chosen = layers or [0, 2, 5]
        s, t = student.state_dict(), teacher.state_dict()
        for key in s:
            if key.startswith("model.layers."):
                i, rest = key.split(".", 3)[2:]
                src = f"model.layers.{chosen[int(i)]}.{rest}"
            else:
                src = key
            assert torch.equal(s[key], t[src]), key
            assert s[key].data_ptr() != t[src].data_ptr()  # copies, not views
        assert [m.self_attn.layer_idx for m in student.model.layers] == [0, 1, 2]  # the KV cache slots
    # training the student leaves the teacher as it was
    with torch.no_grad():
        for p in student.parameters():
            p.add_(1.0)
    assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())


def test_a_teacher_prefix_student_computes_the_teachers_first_layers(tiny):
    """With all layers copied in order the student IS the teacher: same logits."""
    teacher = tiny[0]
    student = init_from_teacher(teacher, student_config(teacher.config), layers=[0, 1])
    x = torch.randint(0, teacher.config.vocab_size, (2, 16))
    with torch.no_grad():
        assert torch.equal(student(input_ids=x).logits, teacher(input_ids=x).logits)
        out = student.generate(x[:, :5], max_new_tokens=4, do_sample=False, pad_token_id=0)
        want = teacher.generate(x[:, :5], max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert torch.equal(out, want)


def test_narrower_students_start_random(tiny):
    teacher = tiny[0]
    cfg = student_config(teacher.config, hidden_size=32, num_attention_heads=2, num_key_value_heads=1)
    a, b = init_from_teacher(teacher, cfg), init_from_teacher(teacher, cfg)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))  # seeded
    assert not torch.equal(init_from_teacher(teacher, cfg, seed=1).lm_head.weight, a.lm_head.weight)
    assert a.lm_head.weight.shape == (teacher.config.vocab_size, 32)
    with pytest.raises(ValueError, match="widths"):
        init_from_teacher(teacher, cfg, layers=[0])


@pytest.mark.parametrize("layers", [[0], [0, 0], [0, 2], [-1, 0], [0.0, 1]])
def test_init_from_teacher_rejects_bad_layers(tiny, layers):
    teacher = tiny[0]
    with pytest.raises(ValueError, match="layers must be 2 distinct"):
        init_from_teacher(teacher, student_config(teacher.config), layers=layers)


def test_init_from_teacher_needs_the_float_teacher(tiny):
    """Layers are copied from float nn.Linear weights: a quantized or factorised teacher is a clear
    ValueError (not a KeyError), and a factorised teacher's low-rank record stays out of the student."""
    from llmopt.lowrank import factorize
    from llmopt.quant import QuantConfig, quantize

    teacher = tiny[0]
    cfg = student_config(teacher.config, num_hidden_layers=1)
    for bits in (8, 4):
        q = quantize(copy.deepcopy(teacher), QuantConfig(bits=bits, group_size=32))
        with pytest.raises(ValueError, match=r"teacher is quantized \(model\.layers\.0\.self_attn\.q_proj is a "):
            init_from_teacher(q, cfg)
    f = factorize(copy.deepcopy(teacher), "svd", ratio=0.5)
    with pytest.raises(ValueError, match=r"teacher has no tensor model\.layers\.1\.self_attn\.q_proj\.weight"):
        init_from_teacher(f, cfg)
    f_cfg = student_config(f.config, num_hidden_layers=1)
    assert not hasattr(f_cfg, "llmopt_lowrank") and f_cfg.to_dict() == cfg.to_dict()


# --------------------------------------------------------------------------- the trainer

def _pattern_teacher():
    """A tiny teacher trained (briefly) on a repeating pattern, and that pattern."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    teacher = LlamaForCausalLM(models.tiny_config(vocab_size=64, num_hidden_layers=2))
    stream = torch.arange(64).repeat(50)
    train(teacher, stream, TrainConfig(steps=40, batch_size=4, seq_len=32, lr=3e-3, warmup=5, autocast="none"),
          progress=False)
    return teacher, stream


def test_distill_lowers_the_loss_and_leaves_the_teacher_alone():
    teacher, stream = _pattern_teacher()
    before = copy.deepcopy(teacher.state_dict())
    torch.manual_seed(1)
    from transformers import LlamaForCausalLM

    student = LlamaForCausalLM(student_config(teacher.config, hidden_size=32, num_attention_heads=2,
                                              num_key_value_heads=1, num_hidden_layers=1))
    cfg = TrainConfig(steps=40, batch_size=4, seq_len=32, lr=3e-3, warmup=5, eval_every=20, eval_tokens=256,
                      autocast="none")
    log = distill(teacher, student, stream, cfg, temperature=2.0, alpha=0.5, val_stream=stream, progress=False)
    assert log.tokens_seen == 40 * 4 * 32
    assert log.loss[-1] < 0.7 * log.loss[0]
    assert log.eval_loss[-1] < 0.7 * log.eval_loss[0]  # the student's own cross-entropy (4.1 -> 2.2 nats)
    assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())
    assert not teacher.training and not student.training


def test_distill_alpha_zero_is_the_hard_label_baseline():
    """alpha=0 is train() with lm_loss: same batches, same loss, same weights."""
    teacher, stream = _pattern_teacher()
    cfg = TrainConfig(steps=5, batch_size=2, seq_len=16, lr=1e-3, warmup=1, autocast="none", log_every=1)
    a = init_from_teacher(teacher, student_config(teacher.config, num_hidden_layers=1))
    b = copy.deepcopy(a)
    log_a = train(a, stream, cfg, loss_fn=lm_loss, progress=False)
    log_b = distill(teacher, b, stream, cfg, alpha=0.0, progress=False)
    assert log_a.loss == pytest.approx(log_b.loss, rel=1e-5)
    assert all(torch.allclose(p, q, atol=1e-6) for p, q in zip(a.parameters(), b.parameters()))


def test_distill_rejects_bad_pairs(tiny):
    teacher = tiny[0]
    cfg = TrainConfig(steps=1, batch_size=1, seq_len=8)
    stream = torch.arange(100)
    with pytest.raises(ValueError, match="different models"):
        distill(teacher, teacher, stream, cfg)
    with pytest.raises(ValueError, match="TrainConfig"):
        distill(teacher, copy.deepcopy(teacher), stream, {"steps": 1})
    other = init_from_teacher(teacher, student_config(teacher.config, num_hidden_layers=1))
    other.resize_token_embeddings(teacher.config.vocab_size - 8)
    with pytest.raises(ValueError, match="vocab"):
        distill(teacher, other, stream, cfg)
    shallow = copy.copy(teacher)  # shares every parameter tensor
    with pytest.raises(ValueError, match="shares parameter"):
        distill(teacher, shallow, stream, cfg)
    with pytest.raises(ValueError, match="alpha"):
        distill(teacher, copy.deepcopy(teacher), stream, cfg, alpha=2)
