"""Lesson 03's checks: each passes on a correct learner implementation (written here from
the formulas, not by calling llmopt), fails with a useful message on a plausible mistake,
and says "not attempted yet" for the notebook's stub."""
import pytest
import torch

from llmopt import exercises
from llmopt.quant.qat import fake_quant, ste_round


def stub(*args):
    raise NotImplementedError("Exercise 3.x: see the text above")


class RoundSTE(torch.autograd.Function):
    """Another correct answer: a custom autograd function instead of the detach trick."""

    @staticmethod
    def forward(ctx, x):
        return torch.round(x)

    @staticmethod
    def backward(ctx, grad):
        return grad


def detach_trick(x):
    return x + (torch.round(x) - x).detach()


def fq(w, scale, zero, bits, rnd=detach_trick, clamp=True, keep_scale=True):
    """A learner's fake quantization written from the formula."""
    qmin, qmax = (-(2 ** (bits - 1) - 1), 2 ** (bits - 1) - 1) if zero is None else (0, 2**bits - 1)
    s = scale if keep_scale else scale.detach()
    q = rnd(w / s) + (0 if zero is None else zero)
    if clamp:
        q = torch.clamp(q, qmin, qmax)
    return (q - (0 if zero is None else zero)) * s


def test_check_ste(capsys):
    assert exercises.check_ste(ste_round)
    assert exercises.check_ste(RoundSTE.apply)
    assert exercises.check_ste(detach_trick)
    out = capsys.readouterr().out
    assert out.count("PASS") == 3 and "FAIL" not in out

    assert not exercises.check_ste(torch.round)  # round's own gradient is zero
    assert "gradient is zero" in capsys.readouterr().out
    assert not exercises.check_ste(lambda x: torch.round(x).detach())
    assert "no gradient flows" in capsys.readouterr().out
    assert not exercises.check_ste(lambda x: x + (torch.floor(x) - x).detach())  # floor, not round
    assert "differs from torch.round" in capsys.readouterr().out
    assert not exercises.check_ste(lambda x: 2 * x + (torch.round(x) - 2 * x).detach())  # gradient 2
    assert "unchanged" in capsys.readouterr().out
    assert not exercises.check_ste(lambda x: x[:2] + (torch.round(x[:2]) - x[:2]).detach())
    assert "expected a tensor of shape" in capsys.readouterr().out

    assert not exercises.check_ste(stub)
    assert "not attempted yet" in capsys.readouterr().out


def test_check_fake_quant(capsys):
    assert exercises.check_fake_quant(fq)
    assert exercises.check_fake_quant(lambda w, s, z, b: fq(w, s, z, b, rnd=RoundSTE.apply))
    assert exercises.check_fake_quant(fake_quant)
    out = capsys.readouterr().out
    assert out.count("PASS") == 3 and "FAIL" not in out

    cases = [
        (lambda w, s, z, b: fq(w, s, z, b, rnd=torch.round), "no gradient"),  # forgot the STE
        (lambda w, s, z, b: fq(w, s, z, b, clamp=False), "values differ"),
        (lambda w, s, z, b: fq(w, s, z, b, keep_scale=False), "gradient to the scale"),
        # the STE around the whole quantizer: even the weights the clamp cut off get a gradient
        (lambda w, s, z, b: w + (fq(w, s, z, b) - w).detach(), "clamp cut off"),
        (lambda w, s, z, b: fq(w, s, None, b), "values differ"),  # ignores the zero point
    ]
    for fn, message in cases:
        assert not exercises.check_fake_quant(fn)
        assert message in capsys.readouterr().out

    assert not exercises.check_fake_quant(stub)
    assert "not attempted yet" in capsys.readouterr().out


def test_strict_mode_raises(monkeypatch, capsys):
    monkeypatch.setenv("LLMOPT_STRICT", "1")
    with pytest.raises(AssertionError, match="Exercise 3.1"):
        exercises.check_ste(torch.round)
    with pytest.raises(AssertionError, match="Exercise 3.2"):
        exercises.check_fake_quant(stub)
    capsys.readouterr()
