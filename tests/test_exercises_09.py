"""Lessons 09-10's checks: each passes on a learner's answer written here from the definitions, fails
with a useful message on a plausible mistake, and says "not attempted yet" for the stub."""
import pytest
import torch

from llmopt.exercises import lesson09 as exercises


class Allocator:
    def __init__(self, num_blocks, count_holders=True):
        self.free_ids, self.refs, self.count_holders = list(range(num_blocks)), {}, count_holders

    def allocate(self):
        b = self.free_ids.pop()          # raises IndexError on an empty pool
        self.refs[b] = 1
        return b

    def share(self, b):
        self.refs[b] += 1

    def free(self, b):
        self.refs[b] = self.refs[b] - 1 if self.count_holders else 0
        if self.refs[b] == 0 and b not in self.free_ids:
            self.free_ids.append(b)

    def num_free(self):
        return len(self.free_ids)


class Stub:
    def __init__(self, n):
        raise NotImplementedError("Exercise 9.1")


def attention(q, k_cache, v_cache, table, n, ignore_table=False):
    ids = list(range(len(table))) if ignore_table else table
    k = torch.cat([k_cache[b] for b in ids])[:n]          # (n, Hk, D)
    v = torch.cat([v_cache[b] for b in ids])[:n]
    group = q.shape[0] // k.shape[1]
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    w = torch.softmax(torch.einsum("hd,nhd->hn", q, k) / q.shape[1] ** 0.5, -1)
    return torch.einsum("hn,nhd->hd", w, v)


def schedule(running, waiting, max_seqs, budget, chunk=True):
    out, n_running = [], len(running)
    for sid, left in running:
        if budget == 0:
            break
        n = min(left, budget)
        out.append((sid, n))
        budget -= n
    for sid, n in waiting:
        if budget == 0 or n_running >= max_seqs or (not chunk and n > budget):
            break
        n = min(n, budget)
        out.append((sid, n))
        budget -= n
        n_running += 1
    return out


def stub(*args):
    raise NotImplementedError("Exercise 9.x")


def test_block_allocator(capsys):
    assert exercises.check_block_allocator(Allocator)
    assert not exercises.check_block_allocator(lambda n: Allocator(n, count_holders=False))
    assert "count the holders" in capsys.readouterr().out
    assert not exercises.check_block_allocator(Stub)
    assert "not attempted yet" in capsys.readouterr().out


def test_paged_attention(capsys):
    assert exercises.check_paged_attention(attention)
    assert not exercises.check_paged_attention(lambda *a: attention(*a, ignore_table=True))
    assert "block table's ids" in capsys.readouterr().out
    assert not exercises.check_paged_attention(lambda q, k, v, t, n: attention(q, k, v, t, n + 1))
    assert "one position too many" in capsys.readouterr().out


def merge(parts, rescale=True):
    M = torch.stack([m for m, _, _ in parts]).max(0).values
    w = [torch.exp(m - M) if rescale else torch.ones_like(m) for m, _, _ in parts]
    return sum(a * wi[:, None] for (_, _, a), wi in zip(parts, w)) / sum(ll * wi for (_, ll, _), wi in
                                                                          zip(parts, w))[:, None]


def test_merge_partials(capsys):
    assert exercises.check_merge_partials(merge)
    assert not exercises.check_merge_partials(lambda parts: merge(parts, rescale=False))
    assert "rescale l and acc" in capsys.readouterr().out
    assert not exercises.check_merge_partials(lambda parts: merge(parts) * float("nan"))
    assert "empty piece" in capsys.readouterr().out


def test_scheduler_step(capsys):
    assert exercises.check_scheduler_step(schedule)
    assert not exercises.check_scheduler_step(lambda *a: schedule(*a, chunk=False))
    assert "expected" in capsys.readouterr().out


@pytest.mark.parametrize("check", [exercises.check_paged_attention, exercises.check_merge_partials,
                                   exercises.check_scheduler_step])
def test_stubs_say_not_attempted(check, capsys):
    assert not check(stub)
    assert "not attempted yet" in capsys.readouterr().out


def accept(probs, proposal, coins, remove=True, renormalise=True, keep_while=lambda c, p: c < p):
    m = 0
    while m < len(proposal) and keep_while(coins[m], float(probs[m, proposal[m]])):
        m += 1
    dist = probs[m].clone()
    if m < len(proposal) and remove:
        dist[proposal[m]] = 0
    return m, dist / dist.sum() if renormalise else dist


def test_speculative_accept(capsys):
    assert exercises.check_speculative_accept(accept)
    for wrong, says in ((dict(remove=False), "must not come back"), (dict(renormalise=False), "renormalise"),
                        (dict(keep_while=lambda c, p: c > p), "kept")):
        assert not exercises.check_speculative_accept(lambda *a, w=wrong: accept(*a, **w))
        assert says in capsys.readouterr().out
    assert not exercises.check_speculative_accept(stub)
    assert "not attempted yet" in capsys.readouterr().out
