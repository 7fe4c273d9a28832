"""Lesson 05's checks: each passes on a correct learner implementation (written here from
the formulas, not by calling llmopt), fails with a useful message on a plausible mistake,
and says "not attempted yet" for the notebook's stub."""
import pytest
import torch
import torch.nn.functional as F

from llmopt.distill import distillation_loss, soft_targets
from llmopt.exercises.lesson05 import check_distillation_loss, check_soft_targets


def stub(*args):
    raise NotImplementedError("Exercise 5.x: see the text above")


def by_exp(z, T):
    """Another correct softmax: by hand, subtracting the max first."""
    z = z / T
    e = torch.exp(z - z.amax(-1, keepdim=True))
    return e / e.sum(-1, keepdim=True)


def test_check_soft_targets(capsys):
    assert check_soft_targets(lambda z, T: torch.softmax(z / T, dim=-1))
    assert check_soft_targets(by_exp)
    assert check_soft_targets(soft_targets)
    out = capsys.readouterr().out
    assert out.count("PASS") == 3 and "FAIL" not in out

    cases = [
        (lambda z, T: torch.softmax(z, -1), "temperature is missing"),
        (lambda z, T: torch.softmax(z * T, -1), "not multiply"),
        (lambda z, T: torch.softmax(z / T, 0), "sum to 1"),
        (lambda z, T: torch.log_softmax(z / T, -1), "sum to 1"),
        (lambda z, T: torch.exp(z / T) / torch.exp(z / T).sum(-1, keepdim=True), "NaN or inf"),  # overflows
        (lambda z, T: (z / T).tolist(), "expected a tensor"),
        (lambda z, T: torch.softmax(z / T, -1)[..., :3], "expected"),
        (lambda z, T: torch.softmax(z / (T + 1), -1), "values differ"),
    ]
    for fn, message in cases:
        assert not check_soft_targets(fn)
        assert message in capsys.readouterr().out

    assert not check_soft_targets(stub)
    assert "not attempted yet" in capsys.readouterr().out


def kd(s, t, y, T, alpha, kind="forward", t_squared=True, batchmean=True, ce_at_T=False, detach=False):
    """A learner's loss written from the formula with F.kl_div (mistakes switchable)."""
    if detach:
        s = s.detach()
    log_q, log_p = F.log_softmax(s / T, -1), F.log_softmax(t / T, -1)
    if kind == "reverse":
        log_q, log_p = log_p, log_q
    kl = F.kl_div(log_q, log_p, log_target=True, reduction="sum") / (s.shape[0] if batchmean else s.numel())
    ce = F.cross_entropy(s / T if ce_at_T else s, y)
    return alpha * (T**2 if t_squared else 1) * kl + (1 - alpha) * ce


def by_hand(s, t, y, T, alpha):
    """Another correct answer: probabilities and logs spelled out."""
    p = torch.softmax(t / T, -1)
    kl = (p * (torch.log_softmax(t / T, -1) - torch.log_softmax(s / T, -1))).sum(-1).mean()
    nll = -torch.log_softmax(s, -1).gather(-1, y[:, None]).mean()
    return alpha * T * T * kl + (1 - alpha) * nll


def test_check_distillation_loss(capsys):
    assert check_distillation_loss(kd)
    assert check_distillation_loss(by_hand)
    assert check_distillation_loss(lambda s, t, y, T, a: distillation_loss(s, t, y, temperature=T, alpha=a))
    out = capsys.readouterr().out
    assert out.count("PASS") == 3 and "FAIL" not in out

    cases = [
        (lambda s, t, y, T, a: kd(s, t, y, T, a, t_squared=False), "T^2"),
        (lambda s, t, y, T, a: kd(s, t, y, T, a, kind="reverse"), "reverse KL"),
        (lambda s, t, y, T, a: kd(s, t, y, T, a, batchmean=False), "averaged over vocabulary entries"),
        (lambda s, t, y, T, a: kd(s, t, y, T, a, ce_at_T=True), "plain logits"),
        (lambda s, t, y, T, a: kd(s, t, y, T, 1 - a), "alpha weighs the soft"),
        (lambda s, t, y, T, a: kd(s, t, y, T, a, detach=True), "no gradient flows"),
        (lambda s, t, y, T, a: kd(s, t, y, T, a) * 1.1, "expected"),
        (lambda s, t, y, T, a: kd(s, t, y, T, a).reshape(1, 1).expand(2, 1), "expected a scalar"),
        # the right value, a wrong gradient: the student's logits scaled by 0 in a way that keeps the value
        (lambda s, t, y, T, a: kd(s.detach() + 0 * s, t, y, T, a), "gradient to the student"),
    ]
    for fn, message in cases:
        assert not check_distillation_loss(fn)
        assert message in capsys.readouterr().out

    assert not check_distillation_loss(stub)
    assert "not attempted yet" in capsys.readouterr().out


def test_strict_mode_raises(monkeypatch, capsys):
    monkeypatch.setenv("LLMOPT_STRICT", "1")
    with pytest.raises(AssertionError, match="Exercise 5.1"):
        check_soft_targets(lambda z, T: torch.softmax(z, -1))
    with pytest.raises(AssertionError, match="Exercise 5.2"):
        check_distillation_loss(stub)
    capsys.readouterr()
