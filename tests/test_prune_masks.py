import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from llmopt.prune import (
    global_magnitude_masks,
    magnitude_mask,
    nm_mask,
    row_mask,
    sparsity,
    wanda_mask,
    wanda_scores,
)


@settings(max_examples=40, deadline=None)
@given(rows=st.integers(1, 9), cols=st.integers(1, 40), s=st.floats(0, 0.99), seed=st.integers(0, 99))
def test_magnitude_mask_has_exact_sparsity_and_prunes_the_smallest(rows, cols, s, seed):
    w = torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed))
    mask = magnitude_mask(w, s)
    k = round(s * w.numel())
    assert mask.shape == w.shape and mask.dtype == torch.bool and int((~mask).sum()) == k
    if 0 < k < w.numel():
        assert w.abs()[~mask].max() <= w.abs()[mask].min()


@settings(max_examples=40, deadline=None)
@given(rows=st.integers(1, 9), cols=st.integers(1, 40), s=st.floats(0, 0.99), seed=st.integers(0, 99))
def test_row_masks_prune_the_same_number_in_every_row(rows, cols, s, seed):
    scores = torch.rand(rows, cols, generator=torch.Generator().manual_seed(seed))
    mask = row_mask(scores, s)
    assert ((~mask).sum(1) == round(s * cols)).all()
    for r in range(rows):
        if 0 < round(s * cols) < cols:
            assert scores[r][~mask[r]].max() <= scores[r][mask[r]].min()


def test_wanda_by_hand():
    w = torch.tensor([[1.0, -2.0, 3.0, -4.0], [4.0, 3.0, -2.0, 1.0]])
    x_norm = torch.tensor([10.0, 1.0, 1.0, 0.1])
    assert torch.equal(wanda_scores(w, x_norm), torch.tensor([[10.0, 2.0, 3.0, 0.4], [40.0, 3.0, 2.0, 0.1]]))
    # half of each row: the small weight on the loud input survives, the large one on the quiet input does not
    want = torch.tensor([[True, False, True, False], [True, True, False, False]])
    assert torch.equal(wanda_mask(w, x_norm, 0.5), want)
    assert torch.equal(wanda_mask(w, torch.ones(4), 0.5), row_mask(w.abs(), 0.5))  # flat inputs: magnitude per row


@pytest.mark.parametrize("n, m", [(2, 4), (4, 8), (1, 4), (4, 4)])
def test_nm_mask_keeps_n_of_every_m(n, m):
    scores = torch.rand(6, 32, generator=torch.Generator().manual_seed(0))
    mask = nm_mask(scores, n, m)
    groups, s = mask.reshape(6, -1, m), scores.reshape(6, -1, m)
    assert (groups.sum(-1) == n).all()
    kept = torch.where(groups, s, torch.inf).amin(-1)
    dropped = torch.where(groups, -torch.inf, s).amax(-1)
    assert (kept >= dropped).all()  # the n best of each group
    assert sparsity(mask) == pytest.approx(1 - n / m)


def test_global_masks_share_one_threshold():
    g = torch.Generator().manual_seed(0)
    ws = {"small": 0.1 * torch.randn(8, 16, generator=g), "large": torch.randn(8, 16, generator=g)}
    masks = global_magnitude_masks(ws, 0.5)
    assert sum(int((~m).sum()) for m in masks.values()) == 128
    assert sparsity(masks["small"]) > 0.75 > 0.25 > sparsity(masks["large"])  # the quiet layer loses most
    pruned = torch.cat([w[~masks[k]] for k, w in ws.items()]).abs()
    kept = torch.cat([w[masks[k]] for k, w in ws.items()]).abs()
    assert pruned.max() <= kept.min()


def test_bad_input():
    w = torch.randn(4, 8)
    for bad in (1.0, -0.1, 1.5, True, "0.5", None):
        with pytest.raises(ValueError, match="sparsity"):
            magnitude_mask(w, bad)
    with pytest.raises(ValueError, match="0 < N <= M"):
        nm_mask(w, 4, 2)
    with pytest.raises(ValueError, match="0 < N <= M"):
        nm_mask(w, 0, 4)
    with pytest.raises(ValueError, match="multiple of M"):
        nm_mask(torch.randn(4, 6), 2, 4)
    with pytest.raises(ValueError, match="x_norm"):
        wanda_mask(w, torch.ones(4), 0.5)
    with pytest.raises(ValueError, match="2-D"):
        magnitude_mask(torch.randn(8), 0.5)
    with pytest.raises(ValueError, match="at least one"):
        global_magnitude_masks({}, 0.5)
