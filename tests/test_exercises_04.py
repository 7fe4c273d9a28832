import torch

from llmopt import exercises


def wanda(W, x_norm, sparsity, use_norm=True, per_row=True):
    scores = W.abs() * (x_norm[None, :] if use_norm else 1)
    k = round(sparsity * W.shape[1]) if per_row else round(sparsity * W.numel())
    flat = scores if per_row else scores.flatten()
    idx = torch.argsort(flat, dim=-1, stable=True)[..., :k]
    mask = torch.ones_like(flat, dtype=torch.bool).scatter_(-1, idx, False)
    return mask.reshape(W.shape)


def nm(scores, n, m, highest=True):
    groups = scores.reshape(scores.shape[0], -1, m)
    idx = torch.topk(groups, n, dim=-1, largest=highest).indices
    return torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, idx, True).reshape(scores.shape)


def test_check_wanda_mask(capsys):
    assert exercises.check_wanda_mask(wanda)
    assert not exercises.check_wanda_mask(lambda W, x, s: wanda(W, x, s, use_norm=False))  # magnitude
    assert "magnitude pruning" in capsys.readouterr().out
    assert not exercises.check_wanda_mask(lambda W, x, s: wanda(W, x, s, per_row=False))  # one threshold
    assert "every row keeps the same number" in capsys.readouterr().out
    assert not exercises.check_wanda_mask(lambda W, x, s: wanda(W, x, s).float())
    assert not exercises.check_wanda_mask(lambda W, x, s: ~wanda(W, x, s))  # kept the wrong half
    capsys.readouterr()


def floor_wanda(W, x_norm, sparsity):
    """int() instead of round(), and an argsort with no tie rule: right whenever sparsity *
    in_features is whole, so only a case where it is not (12 inputs at 0.3) tells it apart."""
    scores = W.abs() * x_norm[None, :]
    drop = torch.argsort(scores, dim=1)[:, : int(sparsity * W.shape[1])]
    return torch.ones_like(W, dtype=torch.bool).scatter_(1, drop, False)


def topk_wanda(W, x_norm, sparsity):
    """Keeps the highest scores with topk: the right count, but ties broken otherwise than by position."""
    keep = torch.topk(W.abs() * x_norm[None, :], W.shape[1] - round(sparsity * W.shape[1]), dim=1).indices
    return torch.zeros_like(W, dtype=torch.bool).scatter_(1, keep, True)


def test_check_wanda_mask_rounding_and_ties(capsys):
    assert exercises.check_wanda_mask(wanda)  # the reference: round() and a stable sort
    capsys.readouterr()
    assert not exercises.check_wanda_mask(floor_wanda)
    assert "round(12 * 0.3) = 4" in capsys.readouterr().out
    assert not exercises.check_wanda_mask(topk_wanda)
    assert "break ties" in capsys.readouterr().out


def test_check_nm_mask(capsys):
    assert exercises.check_nm_mask(nm)
    assert not exercises.check_nm_mask(lambda s, n, m: nm(s, n, m, highest=False))
    assert "HIGHEST" in capsys.readouterr().out
    assert not exercises.check_nm_mask(lambda s, n, m: nm(s, m - n, m))  # kept M-N instead of N
    assert not exercises.check_nm_mask(lambda s, n, m: nm(s.T.contiguous(), n, m).T)  # groups down columns
    capsys.readouterr()

    def stub(*a):
        raise NotImplementedError
    assert not exercises.check_nm_mask(stub) and not exercises.check_wanda_mask(stub)
    assert "not attempted yet" in capsys.readouterr().out
