"""Multi-step decoding's device side (`serving.multistep`): the Triton kernel against the PyTorch spec in
the interpreter, with tied maxima, vocabularies over one chunk and not a power of 2, the record's ring
wrapping around, and positions running off the end of a table."""
import pytest
import torch

from llmopt.kernels import common  # noqa: F401 - sets TRITON_INTERPRET=1 on a CPU before triton loads

pytest.importorskip("triton")

from llmopt.serving.multistep import greedy_advance, greedy_advance_reference  # noqa: E402


def state(B, V, S, step, seed):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, V, generator=g) * 3
    logits[0, [5, V - 1]] = logits[0].max() + 1          # a tie: the first index must win
    if B > 2:
        logits[2, :] = 0.5                                # every logit equal
    pos = torch.tensor([3, 7, 15, 0][:B]) % 16           # row 2 at the last slot of its last block
    tables = torch.randint(0, 50, (B, 4), generator=g)
    flat = torch.stack([torch.zeros(B, dtype=torch.long), pos, torch.zeros(B, dtype=torch.long), pos + 1])
    tokens = torch.full((S, B), -7, dtype=torch.long)
    logprobs = torch.full((S, B), float("nan"))
    return logits, flat, tables, tokens, logprobs, torch.tensor([step])


@pytest.mark.parametrize("B,V,S,step", [(1, 37, 8, 0), (3, 5000, 3, 4), (4, 300, 2, 1)])
def test_greedy_advance_kernel_matches_the_spec(B, V, S, step):
    want, got = state(B, V, S, step, seed=V), state(B, V, S, step, seed=V)
    bs = 4
    greedy_advance_reference(want[0], *want[1], want[2], want[3], want[4], want[5], bs)
    greedy_advance(got[0], *got[1], got[2], got[3], got[4], got[5], bs, backend="triton")
    assert torch.equal(got[1], want[1]) and torch.equal(got[3], want[3]) and torch.equal(got[5], want[5])
    at = step % S
    assert got[3][at, 0] == 5 and (B < 3 or got[3][at, 2] == 0)   # ties: the first maximum
    torch.testing.assert_close(got[4], want[4], equal_nan=True, atol=1e-5, rtol=1e-5)
    others = [r for r in range(S) if r != at]
    assert (got[3][others] == -7).all() and got[4][others].isnan().all()   # only the step's row is written


def test_greedy_advance_clamps_a_position_past_the_table():
    """A row whose new position lies past its table (the last step of a run) still gets an in-range
    lookup; the slot is never used."""
    logits, flat, tables, tokens, logprobs, step = state(1, 10, 2, 0, seed=1)
    flat[1, 0], flat[3, 0] = 15, 16                     # position 15 -> 16: block 4 of a 4-block table
    ref = [t.clone() for t in (logits, flat, tables, tokens, logprobs, step)]
    greedy_advance(logits, *flat, tables, tokens, logprobs, step, 4, backend="triton")
    greedy_advance_reference(ref[0], *ref[1], ref[2], ref[3], ref[4], ref[5], 4)
    assert torch.equal(flat, ref[1]) and flat[2, 0] == tables[0, 3] * 4


def test_greedy_advance_checks_its_arguments():
    logits, flat, tables, tokens, logprobs, step = state(2, 10, 2, 0, seed=2)
    with pytest.raises(ValueError, match="int64"):
        greedy_advance(logits, *flat, tables.int(), tokens, logprobs, step, 4, backend="triton")
