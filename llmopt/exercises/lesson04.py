"""Lesson 04: pruning (the Wanda mask and an N:M mask)."""
from __future__ import annotations

import torch

from ._common import _call, _result


def _as_mask(name, got, shape):
    """(ok, bool mask or message) for whatever the learner's function returned."""
    if not isinstance(got, torch.Tensor):
        return False, f"returned {type(got).__name__}, expected a bool tensor shaped like the weight"
    if tuple(got.shape) != tuple(shape):
        return False, f"mask has shape {tuple(got.shape)}, expected {tuple(shape)}"
    if got.dtype != torch.bool:
        return False, f"mask has dtype {got.dtype}: return a bool tensor (True where the weight stays)"
    return True, got


def check_wanda_mask(fn) -> bool:
    """Exercise 4.1: fn(W, x_norm, sparsity) -> bool mask keeping, in every output row, the
    weights with the largest |W_ij| * ||X_j||; compared with llmopt.prune.wanda_mask."""
    from ..prune import magnitude_mask, wanda_mask

    name = "Exercise 4.1 (the Wanda mask)"
    g = torch.Generator().manual_seed(0)
    # (4, 12, 0.3): 3.6 weights per row, so round() and int() differ; the last case has tied scores
    for rows, cols, s, tied in [(6, 16, 0.5, False), (5, 12, 0.25, False), (3, 40, 0.7, False),
                                (4, 12, 0.3, False), (4, 16, 0.5, True)]:
        if tied:  # weights in {-2, -1, 1, 2} and norms in {1, 2}: many equal scores in every row
            w = torch.randint(1, 3, (rows, cols), generator=g).float()
            w *= torch.randint(0, 2, (rows, cols), generator=g).float() * 2 - 1
            x_norm = torch.randint(1, 3, (cols,), generator=g).float()
        else:
            w = torch.randn(rows, cols, generator=g)
            x_norm = torch.rand(cols, generator=g) * 4 + 0.1
        x_norm[cols // 3] = 40.0  # one loud input channel: its small weights must survive
        ok, got = _call(name, fn, w.clone(), x_norm.clone(), s)
        if ok:
            ok, got = _as_mask(name, got, w.shape)
        if not ok:
            return _result(name, False, got)
        want, what = wanda_mask(w, x_norm, s), f"a {rows}x{cols} weight at sparsity {s}"
        if torch.equal(got, want):
            continue
        kept = got.sum(1)
        if not (kept == kept[0]).all():
            return _result(name, False, f"rows keep {kept.tolist()} weights: compare within each output row, "
                           f"so every row keeps the same number ({what})")
        k = round(s * cols)
        if kept[0] != cols - k:
            return _result(name, False, f"rows keep {int(kept[0])} weights, expected {cols - k}: drop "
                           f"round(sparsity * in_features) = round({cols} * {s}) = {k} per row ({what})")
        if torch.equal(got, magnitude_mask(w, s)) or torch.equal(got, wanda_mask(w, torch.ones(cols), s)):
            return _result(name, False, f"this is magnitude pruning: multiply |W| by the input norm first ({what})")
        return _result(name, False, f"{int((got != want).sum())} entries differ from llmopt.prune.wanda_mask "
                       f"for {what}: score |W_ij| * x_norm[j], drop the lowest round(sparsity * in_features) per row"
                       + (", and break ties between equal scores by position (a stable sort: the earlier input "
                          "is dropped first)" if tied else ""))
    return _result(name, True, "matches llmopt.prune.wanda_mask (per-row comparison of |W| * ||X||)")


def check_nm_mask(fn) -> bool:
    """Exercise 4.2: fn(scores, n, m) -> bool mask keeping the n highest scores in every
    group of m consecutive inputs of each row; compared with llmopt.prune.nm_mask."""
    from ..prune import nm_mask

    name = "Exercise 4.2 (an N:M mask)"
    g = torch.Generator().manual_seed(1)
    for rows, cols, n, m in [(4, 16, 2, 4), (3, 24, 4, 8), (5, 12, 1, 4), (2, 8, 2, 4)]:
        scores = torch.rand(rows, cols, generator=g)
        ok, got = _call(name, fn, scores.clone(), n, m)
        if ok:
            ok, got = _as_mask(name, got, scores.shape)
        if not ok:
            return _result(name, False, got)
        what = f"{n}:{m} on a {rows}x{cols} score matrix"
        per_group = got.reshape(rows, -1, m).sum(-1)
        if not (per_group == n).all():
            return _result(name, False, f"groups of {m} keep {sorted(set(per_group.flatten().tolist()))} "
                           f"weights, expected exactly {n} in each ({what})")
        if not torch.equal(got, nm_mask(scores, n, m)):
            return _result(name, False, f"right counts, wrong weights: keep the {n} HIGHEST scores of each group "
                           f"of {m} consecutive inputs in a row ({what})")
    return _result(name, True, "every group keeps exactly its N best: matches llmopt.prune.nm_mask")
