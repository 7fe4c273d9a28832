"""Lesson 07's checks: each passes on a correct learner implementation (written here from the
definitions, not by calling llmopt), fails with a useful message on a plausible mistake, and
says "not attempted yet" for the notebook's stub."""
import pytest
import torch
import torch.nn.functional as F

from llmopt.exercises import lesson07 as exercises


def stub(*args):
    raise NotImplementedError("Exercise 7.x: see the text above")


def top_k_gating(logits, k, renorm=True, on_logits=False):
    probs = F.softmax(logits, -1)
    w, e = (logits if on_logits else probs).topk(k, -1)
    if renorm:
        w = w / w.sum(-1, keepdim=True)
    return w, e


def top_k_gating_softmax_of_topk(logits, k):
    """Another correct answer: softmax over the k largest logits is the renormalised top-k."""
    v, e = logits.topk(k, -1)
    return F.softmax(v, -1).flip(-1), e.flip(-1)  # any slot order is fine


def balancing_loss(probs, experts, per_token=False, times_e=True):
    T, E = probs.shape
    counts = torch.stack([(experts == i).sum() for i in range(E)]).float()
    f = counts / (T if per_token else experts.numel())
    loss = (f * probs.mean(0)).sum()
    return loss * E if times_e else loss


def ffn(x, gu, d):
    g, u = (x @ gu.t()).chunk(2, -1)
    return (F.silu(g) * u) @ d.t()


def sorted_dispatch(x, experts, weights, gate_up, down, weighted=True, overwrite=False):
    E, k = gate_up.shape[0], experts.shape[1]
    flat = experts.flatten()
    order = flat.argsort(stable=True)
    out = torch.zeros_like(x)
    start = 0
    for e in range(E):
        n = int((flat == e).sum())
        idx = order[start:start + n]
        start += n
        if n == 0:
            continue
        y = ffn(x[idx // k], gate_up[e], down[e])
        if weighted:
            y = y * weights.flatten()[idx, None]
        if overwrite:
            out[idx // k] = y
        else:
            out.index_add_(0, idx // k, y)
    return out


@pytest.mark.parametrize("fn", [top_k_gating, top_k_gating_softmax_of_topk])
def test_top_k_gating_passes(fn, capsys):
    assert exercises.check_top_k_gating(fn)
    assert "PASS" in capsys.readouterr().out


@pytest.mark.parametrize("fn, says", [
    (lambda lg, k: top_k_gating(lg, k, renorm=False), "renormalised"),
    (lambda lg, k: top_k_gating(lg, k, renorm=False, on_logits=True), "logits"),
    (lambda lg, k: (top_k_gating(lg, k)[0], torch.zeros(lg.shape[0], k, dtype=torch.long)), "wrong experts"),
    (lambda lg, k: top_k_gating(lg, k)[0], "pair"),
    (stub, "not attempted"),
])
def test_top_k_gating_fails(fn, says, capsys):
    assert not exercises.check_top_k_gating(fn)
    out = capsys.readouterr().out
    assert "FAIL" in out and says in out


def test_balancing_loss_passes(capsys):
    assert exercises.check_balancing_loss(balancing_loss)
    assert "PASS" in capsys.readouterr().out


@pytest.mark.parametrize("fn, says", [
    (lambda p, e: balancing_loss(p, e, per_token=True), "T*k assignments"),
    (lambda p, e: balancing_loss(p, e, times_e=False), "multiply by E"),
    (lambda p, e: "1.0x", "expected a number"),
    (lambda p, e: float(balancing_loss(p, e)), "return the 0-d tensor"),        # right value, no graph
    (lambda p, e: balancing_loss(p.detach(), e), "no gradient"),
    (lambda p, e: balancing_loss(p.detach(), e) + 0 * p.sum(), "wrong gradient"),
    (stub, "not attempted"),
])
def test_balancing_loss_fails(fn, says, capsys):
    assert not exercises.check_balancing_loss(fn)
    out = capsys.readouterr().out
    assert "FAIL" in out and says in out


def test_sorted_dispatch_passes(capsys):
    assert exercises.check_sorted_dispatch(sorted_dispatch)
    assert "PASS" in capsys.readouterr().out


@pytest.mark.parametrize("fn, says", [
    (lambda *a: sorted_dispatch(*a, weighted=False), "gate weight"),
    (lambda *a: sorted_dispatch(*a, overwrite=True), "index_add_"),
    (lambda x, *a: x, "difference"),
    (stub, "not attempted"),
])
def test_sorted_dispatch_fails(fn, says, capsys):
    assert not exercises.check_sorted_dispatch(fn)
    out = capsys.readouterr().out
    assert "FAIL" in out and says in out
