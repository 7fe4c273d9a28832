"""Lessons 09-10: block allocation with reference counts, attention through a block table, merging the
pieces of a split attention, one continuous-batching scheduler step, and speculative sampling's rule."""
from __future__ import annotations

import torch

from ._common import _call, _result


def check_block_allocator(cls) -> bool:
    """Exercise 9.1: cls(num_blocks) with allocate() -> block id, share(block_id) (one more table holds
    it), free(block_id) (one fewer: back to the free pool at zero) and num_free() -> int."""
    name = "Exercise 9.1 (block allocation with reference counts)"
    ok, a = _call(name, cls, 4)
    if not ok:
        return _result(name, False, a)
    try:
        got = [a.allocate() for _ in range(3)]
        if len(set(got)) != 3 or not all(0 <= b < 4 for b in got):
            return _result(name, False, f"three allocations gave {got}: expected three different ids in [0, 4)")
        if a.num_free() != 1:
            return _result(name, False, f"4 blocks, 3 allocated: num_free() should be 1, got {a.num_free()}")
        a.share(got[0])                      # a prefix shared by a second sequence
        a.free(got[0])                       # the first sequence finishes
        if a.num_free() != 1:
            return _result(name, False, "a shared block went back to the pool when one of its two holders freed "
                                        "it: count the holders, free at zero")
        a.free(got[0])
        if a.num_free() != 2:
            return _result(name, False, "a block freed by its last holder must return to the pool")
        again = {a.allocate(), a.allocate()}
        if got[0] not in again or got[1] in again or got[2] in again:
            return _result(name, False, f"after freeing block {got[0]}, two allocations gave {sorted(again)}: "
                                        "a block still in use was handed out, or a free one was lost")
        if a.num_free() != 0:
            return _result(name, False, f"all 4 blocks in use: num_free() should be 0, got {a.num_free()}")
        try:
            a.allocate()
        except Exception:  # any error is right: the pool is empty
            pass
        else:
            return _result(name, False, "allocate() on an empty pool must raise, not hand out a used block")
    except NotImplementedError:
        return _result(name, False, "not attempted yet (the rest of the notebook uses llmopt's version)")
    except Exception as e:
        return _result(name, False, f"raised {type(e).__name__}: {e}")
    return _result(name, True, "blocks are shared by counting their holders and reused the moment the last one "
                               "lets go: what lets prefix caching and forks share memory safely")


def check_paged_attention(fn) -> bool:
    """Exercise 9.2: fn(q (Hq, D), k_cache, v_cache (num_blocks, block_size, Hk, D), block_table (list of
    ids), context_len) -> (Hq, D): softmax(q k^T / sqrt(D)) v over the sequence's first context_len
    positions, read through the block table; query head h uses kv head h // (Hq // Hk)."""
    from ..serving.attention import paged_decode_reference

    name = "Exercise 9.2 (attention through a block table)"
    g = torch.Generator().manual_seed(0)
    for Hq, Hk, D, bs, n, table in ((2, 2, 8, 4, 7, [5, 1]), (4, 2, 16, 4, 10, [3, 0, 6]),
                                    (4, 1, 8, 8, 8, [2]), (8, 2, 16, 2, 5, [7, 2, 4, 1])):
        kc = torch.randn(8, bs, Hk, D, generator=g)
        vc = torch.randn(8, bs, Hk, D, generator=g)
        q = torch.randn(Hq, D, generator=g)
        want = paged_decode_reference(q[None], kc, vc, torch.tensor([table]), torch.tensor([n]))[0]
        what = f"Hq={Hq}, Hk={Hk}, block_size={bs}, {n} tokens in blocks {table}"
        ok, got = _call(name, fn, q.clone(), kc.clone(), vc.clone(), list(table), n)
        if not ok:
            return _result(name, False, got)
        if not isinstance(got, torch.Tensor) or got.shape != want.shape:
            return _result(name, False, f"expected a ({Hq}, {D}) tensor for {what}")
        if torch.allclose(got.float(), want, atol=1e-5):
            continue
        contiguous = list(range(len(table)))
        if torch.allclose(got.float(), paged_decode_reference(q[None], kc, vc, torch.tensor([contiguous]),
                                                              torch.tensor([n]))[0], atol=1e-5):
            return _result(name, False, f"you read blocks 0, 1, ... instead of the block table's ids ({what})")
        longer = min(n + 1, len(table) * bs)
        if longer != n and torch.allclose(got.float(), paged_decode_reference(
                q[None], kc, vc, torch.tensor([table]), torch.tensor([longer]))[0], atol=1e-5):
            return _result(name, False, f"one position too many: attend to exactly context_len keys ({what})")
        return _result(name, False, f"max |error| {(got.float() - want).abs().max().item():.3g} for {what} "
                                    "(GQA: query head h reads kv head h // (Hq // Hk))")
    return _result(name, True, "keys and values scattered over blocks read in the table's order: attention "
                               "needs no contiguous KV buffer")


def _partials(q, k, v, pieces):
    """Flash-Decoding's partials of one query's attention (q (H, D), k and v (n, H, D)) over `pieces`
    (lists of key positions): per piece (m, l, acc) with m the largest score, l = sum exp(s - m) and
    acc = sum exp(s - m) v; an empty piece is (-inf, 0, 0)."""
    H, D = q.shape
    scores = torch.einsum("hd,nhd->hn", q, k) / D ** 0.5
    out = []
    for keys in pieces:
        if not keys:
            out.append((torch.full((H,), float("-inf")), torch.zeros(H), torch.zeros(H, D)))
            continue
        s = scores[:, keys]
        m = s.max(-1).values
        p = torch.exp(s - m[:, None])
        out.append((m, p.sum(-1), torch.einsum("hn,nhd->hd", p, v[keys])))
    return out


def check_merge_partials(fn) -> bool:
    """Exercise 9.3: fn(parts) -> (H, D), parts a list of (m (H,), l (H,), acc (H, D)) per piece of one
    query's context (Flash-Decoding): m the piece's largest score per head, l = sum exp(score - m),
    acc = sum exp(score - m) * v. The merged output is softmax attention over all the pieces' keys."""
    name = "Exercise 9.3 (merging split attention)"
    g = torch.Generator().manual_seed(3)
    for H, D, n, cuts in ((2, 8, 12, [0, 5, 12]), (4, 16, 30, [0, 1, 17, 30]), (2, 8, 9, [0, 9, 9])):
        q, k, v = torch.randn(H, D, generator=g) * 3, torch.randn(n, H, D, generator=g), torch.randn(n, H, D,
                                                                                                  generator=g)
        k[-1] *= 4          # a late key with a large score: its piece's max is far above the others'
        pieces = [list(range(a, b)) for a, b in zip(cuts, cuts[1:])]
        parts = _partials(q, k, v, pieces)
        want = torch.einsum("hn,nhd->hd", (torch.einsum("hd,nhd->hn", q, k) / D ** 0.5).softmax(-1), v)
        what = f"{len(pieces)} pieces of sizes {[len(p) for p in pieces]}"
        ok, got = _call(name, fn, [tuple(t.clone() for t in p) for p in parts])
        if not ok:
            return _result(name, False, got)
        if not isinstance(got, torch.Tensor) or got.shape != (H, D):
            return _result(name, False, f"expected an ({H}, {D}) tensor for {what}")
        if torch.allclose(got, want, atol=1e-5):
            continue
        if not torch.isfinite(got).all():
            return _result(name, False, f"NaN or inf for {what}: an empty piece has m = -inf and l = 0; weigh "
                                        "each piece by exp(m - M) with M the largest m, which is finite")
        plain = sum(a for _, _, a in parts) / sum(ll for _, ll, _ in parts)[:, None]
        if torch.allclose(got, plain, atol=1e-5):
            return _result(name, False, f"each piece's sums are relative to its own max: rescale l and acc by "
                                        f"exp(m - M) before adding them ({what})")
        return _result(name, False, f"max |error| {(got - want).abs().max().item():.3g} for {what}")
    return _result(name, True, "partial softmaxes merge exactly: pieces of one context can run on different "
                               "programs, which is how Flash-Decoding fills a GPU at batch 1")


def check_scheduler_step(fn) -> bool:
    """Exercise 10.1: fn(running, waiting, max_num_seqs, max_num_batched_tokens) -> [(seq_id, n_tokens)].
    running: [(seq_id, tokens still to compute)] (1 for a decoding sequence, more mid-prefill), waiting:
    [(seq_id, prompt_len)]. Running first, in order; then waiting ones join in order while the token
    budget lasts and fewer than max_num_seqs run; a prompt bigger than what is left is chunked."""
    from ..serving import BlockManager, SamplingParams, Scheduler, Sequence

    name = "Exercise 10.1 (one scheduler step)"
    cases = [([(0, 1), (1, 1)], [(2, 5), (3, 7)], 4, 100), ([(0, 1), (1, 30)], [(2, 9)], 8, 20),
             ([(0, 1)], [(1, 50), (2, 3)], 8, 16), ([(0, 1), (1, 1), (2, 1)], [(3, 4), (4, 4)], 4, 64),
             ([], [(0, 10), (1, 10), (2, 10)], 2, 64), ([(0, 12)], [(1, 3)], 4, 12)]
    for running, waiting, max_seqs, budget in cases:
        sched = Scheduler(BlockManager(256, 4), max_num_seqs=max_seqs, max_num_batched_tokens=budget)
        seqs = {}
        for sid, left in running:   # a running sequence with `left` tokens still to compute
            s = Sequence(list(range(1, 41)), SamplingParams())
            sched.blocks.allocate(s)
            s.num_computed_tokens = len(s) - left
            s.status = s.status.RUNNING
            sched.running.append(s)
            seqs[s.seq_id] = sid
        for sid, n in waiting:
            s = Sequence([100 + sid] * n, SamplingParams())
            sched.add(s)
            seqs[s.seq_id] = sid
        want = [(seqs[s.seq_id], n) for s, n in sched.schedule()]
        what = f"running {running}, waiting {waiting}, max_num_seqs={max_seqs}, max_num_batched_tokens={budget}"
        ok, got = _call(name, fn, list(running), list(waiting), max_seqs, budget)
        if not ok:
            return _result(name, False, got)
        try:
            got = [(int(a), int(b)) for a, b in got]
        except (TypeError, ValueError):
            return _result(name, False, "return a list of (seq_id, n_tokens) pairs")
        if got == want:
            continue
        if sum(n for _, n in got) > budget:
            return _result(name, False, f"the step runs {sum(n for _, n in got)} tokens, over the budget of {budget} "
                                        f"({what})")
        if len(got) > max_seqs:
            return _result(name, False, f"{len(got)} sequences in one step, over max_num_seqs={max_seqs} ({what})")
        return _result(name, False, f"got {got}, expected {want} for {what}")
    return _result(name, True, "running sequences keep decoding while new ones join as the budget allows: "
                               "continuous batching, with long prompts split into chunks")


def check_speculative_accept(fn) -> bool:
    """Exercise 10.2: fn(probs (1 + k, V), proposal [k token ids], coins [k uniforms]) -> (m, next
    distribution (V,)): keep guess i while coins[i] < probs[i, guess i]; then the distribution the next
    token is drawn from: probs[m] without the rejected guess, renormalised, or probs[k] if all were kept."""
    from ..serving.speculative import speculative_accept

    name = "Exercise 10.2 (speculative sampling's rule)"
    g = torch.Generator().manual_seed(0)
    cases = []
    for k, V in ((3, 6), (1, 4), (4, 9), (2, 5)):
        probs = torch.softmax(torch.randn(k + 1, V, generator=g) * 1.5, -1)
        proposal = torch.randint(0, V, (k,), generator=g).tolist()
        accept_all = [0.0] * k                                       # every coin below its probability
        reject_first = [0.999999] * k
        middle = [0.0] * (k - 1) + [0.999999]                        # the last guess rejected
        cases += [(probs, proposal, coins) for coins in (accept_all, reject_first, middle)]
        cases.append((probs, proposal, torch.rand(k, generator=g).tolist()))
    for probs, proposal, coins in cases:
        m_want, want = speculative_accept(probs, proposal, coins)
        what = f"{len(proposal)} guesses {proposal}, coins {[round(c, 3) for c in coins]}"
        ok, got = _call(name, fn, probs.clone(), list(proposal), list(coins))
        if not ok:
            return _result(name, False, got)
        try:
            m, dist = int(got[0]), torch.as_tensor(got[1], dtype=torch.float32)
        except (TypeError, ValueError, IndexError):
            return _result(name, False, "return (m, a distribution over the vocabulary)")
        if m != m_want:
            return _result(name, False, f"kept {m} guesses, expected {m_want}: keep guess i only while coins[i] < "
                                        f"probs[i, guess i] ({what})")
        if dist.shape != want.shape:
            return _result(name, False, f"the next distribution should have {want.numel()} entries, got "
                                        f"{tuple(dist.shape)}")
        if torch.allclose(dist, want, atol=1e-6):
            continue
        if m < len(proposal) and torch.allclose(dist, probs[m], atol=1e-6):
            return _result(name, False, f"after a rejection the rejected guess must not come back: draw from probs[m] "
                                        f"with it removed, renormalised ({what})")
        if torch.allclose(dist / dist.sum(), want, atol=1e-6):
            return _result(name, False, f"right shape of distribution, but it does not sum to 1: renormalise ({what})")
        return _result(name, False, f"the next distribution differs from the expected one by "
                                    f"{(dist - want).abs().max().item():.3g} ({what})")
    return _result(name, True, "a guess survives with exactly its probability, and a rejection draws from the rest: "
                               "every token is distributed as the model's own sampling, yet several can come "
                               "from one forward")
