"""Lesson 06's checks: each passes on a correct learner implementation (written here from
the formulas, not by calling llmopt), fails with a useful message on a plausible mistake,
and says "not attempted yet" for the notebook's stub."""
import pytest
import torch

from llmopt.exercises import lesson06 as exercises


def stub(*args):
    raise NotImplementedError("Exercise 6.x: see the text above")


def rank_for_energy(S, energy, square=True, strict=False, off=0):
    e = S.pow(2) if square else S
    share = torch.cumsum(e, 0) / e.sum()
    reached = share > energy if strict else share >= energy - 1e-9
    return int(torch.nonzero(reached)[0]) + 1 + off


def rank_for_energy_loop(S, energy):
    """Another correct answer: a plain Python loop."""
    total, acc = float((S**2).sum()), 0.0
    for r, s in enumerate(S.tolist(), start=1):
        acc += s * s
        if acc >= energy * total * (1 - 1e-9):
            return r
    return len(S)


def truncated_svd(w, rank, split="left", scale=True, largest=True):
    U, S, Vh = torch.linalg.svd(w, full_matrices=False)
    keep = slice(0, rank) if largest else slice(S.numel() - rank, None)
    U, S, Vh = U[:, keep], S[keep], Vh[keep]
    if not scale:
        S = torch.ones_like(S)
    if split == "left":
        return U * S, Vh
    return U * S.sqrt(), S.sqrt()[:, None] * Vh


def whitened(w, H, rank, square_root="cholesky", undo=True):
    if square_root == "cholesky":
        L = torch.linalg.cholesky(H.double())
    elif square_root == "transposed":  # a mistake: L^T L is not H
        L = torch.linalg.cholesky(H.double()).T
    else:  # the symmetric square root works as well: any L with L L^T = H
        vals, vecs = torch.linalg.eigh(H.double())
        L = vecs @ torch.diag(vals.sqrt()) @ vecs.T
    u, v = truncated_svd(w.double() @ L, rank)
    if undo:
        v = v @ torch.linalg.inv(L)
    return u.float(), v.float()


def test_check_rank_for_energy(capsys):
    assert exercises.check_rank_for_energy(rank_for_energy)
    assert exercises.check_rank_for_energy(rank_for_energy_loop)
    out = capsys.readouterr().out
    assert out.count("PASS") == 2 and "FAIL" not in out

    cases = [(lambda S, e: rank_for_energy(S, e, square=False), "squared"),
             (lambda S, e: rank_for_energy(S, e, off=-1), "one too few"),
             (lambda S, e: rank_for_energy(S, e, strict=True), "one too many"),
             (lambda S, e: "3", "got rank 3"),
             (lambda S, e: None, "expected an integer rank")]
    for fn, message in cases:
        assert not exercises.check_rank_for_energy(fn)
        assert message in capsys.readouterr().out
    assert not exercises.check_rank_for_energy(stub)
    assert "not attempted yet" in capsys.readouterr().out


def test_check_lowrank_factor(capsys):
    assert exercises.check_lowrank_factor(truncated_svd)
    assert exercises.check_lowrank_factor(lambda w, r: truncated_svd(w, r, split="even"))
    out = capsys.readouterr().out
    assert out.count("PASS") == 2 and "FAIL" not in out

    cases = [(lambda w, r: truncated_svd(w, r, scale=False), "singular values are missing"),
             (lambda w, r: truncated_svd(w, r, largest=False), "smallest"),
             (lambda w, r: truncated_svd(w, r)[::-1], "u should be"),
             (lambda w, r: truncated_svd(w, r)[0], "pair of tensors"),
             (lambda w, r: (w[:, :r], torch.eye(r, w.shape[1])), "not the truncated SVD")]
    for fn, message in cases:
        assert not exercises.check_lowrank_factor(fn)
        assert message in capsys.readouterr().out
    assert not exercises.check_lowrank_factor(stub)
    assert "not attempted yet" in capsys.readouterr().out


def test_check_whitened_factor(capsys):
    assert exercises.check_whitened_factor(whitened)
    assert exercises.check_whitened_factor(lambda w, H, r: whitened(w, H, r, square_root="symmetric"))
    out = capsys.readouterr().out
    assert out.count("PASS") == 2 and "FAIL" not in out

    cases = [(lambda w, H, r: truncated_svd(w, r), "plain SVD"),
             (lambda w, H, r: whitened(w, H, r, undo=False), "undo the whitening"),
             (lambda w, H, r: whitened(w, H, r, square_root="transposed"), "output error")]
    for fn, message in cases:
        assert not exercises.check_whitened_factor(fn)
        assert message in capsys.readouterr().out
    assert not exercises.check_whitened_factor(stub)
    assert "not attempted yet" in capsys.readouterr().out


def test_strict_mode_raises(monkeypatch, capsys):
    monkeypatch.setenv("LLMOPT_STRICT", "1")
    with pytest.raises(AssertionError, match="Exercise 6.1"):
        exercises.check_rank_for_energy(stub)
    with pytest.raises(AssertionError, match="Exercise 6.2"):
        exercises.check_lowrank_factor(lambda w, r: truncated_svd(w, r, largest=False))
    with pytest.raises(AssertionError, match="Exercise 6.3"):
        exercises.check_whitened_factor(lambda w, H, r: truncated_svd(w, r))
    capsys.readouterr()
