"""BlockManager: hand cases for paging, prefix caching, eviction and copy-on-write, then a random
walk (hypothesis) that simulates the KV cache slot by slot and checks every sequence reads its own tokens."""
from __future__ import annotations

from dataclasses import dataclass, field

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from llmopt.serving.block_manager import BlockManager, NoFreeBlocks


@dataclass(eq=False)   # identity: a fork has the same fields as its parent
class Seq:
    token_ids: list[int]
    block_table: list[int] = field(default_factory=list)
    num_cached_tokens: int = 0
    num_computed_tokens: int | None = None     # None: every token counts as computed


def check_refs(bm: BlockManager, live: list[Seq]) -> None:
    bm.check(live)
    for s in live:
        assert len(set(s.block_table)) == len(s.block_table), "a table holds a block twice"


def append(bm: BlockManager, seq: Seq, token: int) -> list[tuple[int, int]]:
    seq.token_ids.append(token)
    return bm.may_append(seq)


def test_bad_arguments():
    with pytest.raises(ValueError, match="num_blocks"):
        BlockManager(0, 4)
    with pytest.raises(ValueError, match="block_size"):
        BlockManager(4, 0)
    bm = BlockManager(4, 4)
    seq = Seq([1, 2, 3])
    bm.allocate(seq)
    with pytest.raises(ValueError, match="block_table"):
        bm.allocate(seq)
    with pytest.raises(ValueError, match="token_ids"):
        bm.allocate(Seq([]))
    with pytest.raises(ValueError, match="block_table"):
        bm.may_append(Seq([1, 2]))                     # never allocated
    with pytest.raises(ValueError, match="child.block_table"):
        bm.fork(seq, Seq([1], block_table=[3]))


def test_allocate_append_free():
    bm = BlockManager(8, 4)
    seq = Seq(list(range(10)))
    assert bm.can_allocate(seq)
    bm.allocate(seq)
    assert len(seq.block_table) == 3 and seq.num_cached_tokens == 0
    assert bm.num_free_blocks() == 5 and bm.usage() == pytest.approx(3 / 8)
    check_refs(bm, [seq])
    assert append(bm, seq, 10) == [] and append(bm, seq, 11) == []     # positions 10, 11: third block
    assert len(seq.block_table) == 3
    assert append(bm, seq, 12) == []                                    # position 12 starts block 4
    assert len(seq.block_table) == 4 and bm.num_free_blocks() == 4
    assert bm.blocks[seq.block_table[-1]].token_ids == [12]
    check_refs(bm, [seq])
    bm.free(seq)
    assert seq.block_table == [] and seq.num_cached_tokens == 0
    assert bm.num_free_blocks() == 8 and bm.usage() == 0
    check_refs(bm, [])


def test_prefix_sharing():
    bm = BlockManager(8, 4)
    a, b = Seq(list(range(8)) + [100, 101]), Seq(list(range(8)) + [200])
    bm.allocate(a)
    bm.allocate(b)
    assert b.num_cached_tokens == 8 and b.block_table[:2] == a.block_table[:2]
    assert [bm.blocks[i].ref_count for i in a.block_table] == [2, 2, 1]
    assert b.block_table[2] != a.block_table[2]
    assert bm.num_free_blocks() == 4
    check_refs(bm, [a, b])


def test_fully_cached_prompt_still_computes_its_last_block():
    bm = BlockManager(8, 4)
    a, b = Seq(list(range(8))), Seq(list(range(8)))
    bm.allocate(a)
    bm.allocate(b)
    assert b.num_cached_tokens == 4                          # len - block_size: the last token must run
    assert b.block_table[0] == a.block_table[0] and b.block_table[1] != a.block_table[1]
    check_refs(bm, [a, b])
    c = Seq(list(range(9)))                                  # one token more: both full blocks are hits
    bm.allocate(c)
    assert c.num_cached_tokens == 8 and c.block_table[:2] == a.block_table
    check_refs(bm, [a, b, c])


def test_revival_of_a_freed_cached_block():
    bm = BlockManager(4, 4)
    a = Seq(list(range(9)))
    bm.allocate(a)
    first_two = a.block_table[:2]
    bm.free(a)
    assert bm.num_free_blocks() == 4 and bm.blocks[first_two[0]].hash != -1   # freed but still cached
    b = Seq(list(range(8)) + [50, 51])
    assert bm.can_allocate(b)
    bm.allocate(b)
    assert b.num_cached_tokens == 8 and b.block_table[:2] == first_two
    assert [bm.blocks[i].ref_count for i in first_two] == [1, 1] and bm.num_free_blocks() == 1
    check_refs(bm, [b])


def test_fresh_blocks_go_out_before_cached_ones_and_eviction_forgets_the_hash():
    bm = BlockManager(4, 4)
    a = Seq(list(range(5)))                                  # one full block (cached once freed), one partial
    bm.allocate(a)
    cached_a = a.block_table[0]
    bm.free(a)
    b = Seq([90, 91, 92, 93, 94])
    bm.allocate(b)
    assert cached_a not in b.block_table                     # unhashed blocks are handed out first
    cached_b = b.block_table[0]
    bm.free(b)
    # Other content needing 3 blocks: the 2 unhashed ones, then the least recently freed cached one.
    filler = Seq([70] * 8 + [71])
    bm.allocate(filler)
    assert cached_a in filler.block_table and cached_b not in filler.block_table
    assert bm.blocks[cached_a].token_ids != list(range(4))
    check_refs(bm, [filler])
    bm.free(filler)
    again_b, again_a = Seq([90, 91, 92, 93, 95]), Seq(list(range(5)))
    bm.allocate(again_b)
    bm.allocate(again_a)
    assert again_b.num_cached_tokens == 4 and again_b.block_table[0] == cached_b
    assert again_a.num_cached_tokens == 0                    # a's hash went with the eviction: a miss
    check_refs(bm, [again_a, again_b])


def test_eviction_takes_a_prefix_tail_before_its_head():
    bm = BlockManager(3, 4)
    a = Seq(list(range(9)))                                  # two full blocks and a partial one
    bm.allocate(a)
    head, tail = a.block_table[:2]
    bm.free(a)
    filler = Seq([70] * 5)                                   # the partial block, then one cached block
    bm.allocate(filler)
    assert tail in filler.block_table and head not in filler.block_table
    bm.free(filler)
    b = Seq(list(range(4)) + [9])
    bm.allocate(b)
    assert b.num_cached_tokens == 4 and b.block_table[0] == head
    check_refs(bm, [b])


def test_reviving_a_free_cached_block_uses_up_a_free_block():
    bm = BlockManager(2, 4)
    a = Seq(list(range(5)))
    bm.allocate(a)
    bm.free(a)
    c = Seq([60])
    bm.allocate(c)                                           # takes the unhashed block; the cached one is left
    assert bm.num_free_blocks() == 1
    b = Seq(list(range(4)) + [8])                            # a hit on the free cached block, plus one new block
    assert not bm.can_allocate(b)
    with pytest.raises(NoFreeBlocks):
        bm.allocate(b)
    check_refs(bm, [c])
    assert bm.can_allocate(Seq(list(range(4))))             # no hit (its last token must run): one new block


def test_free_uncaches_blocks_that_were_never_computed():
    bm = BlockManager(4, 4)
    a = Seq(list(range(9)), num_computed_tokens=0)
    bm.allocate(a)
    a.num_computed_tokens = 4                                # preempted after one chunk of its prefill
    bm.free(a)
    b = Seq(list(range(9)))
    bm.allocate(b)
    assert b.num_cached_tokens == 4                          # block 0 was computed, block 1 was not
    check_refs(bm, [b])


def test_prefix_caching_off():
    bm = BlockManager(8, 4, enable_prefix_caching=False)
    a, b = Seq(list(range(9))), Seq(list(range(9)))
    bm.allocate(a)
    bm.allocate(b)
    assert b.num_cached_tokens == 0 and not set(a.block_table) & set(b.block_table)
    assert all(blk.hash == -1 for blk in bm.blocks)
    for t in range(9, 13):
        append(bm, a, t)
    assert all(blk.hash == -1 for blk in bm.blocks)
    check_refs(bm, [a, b])


def test_decode_registers_full_blocks():
    bm = BlockManager(8, 4)
    a = Seq([1, 2, 3, 4, 5, 6])
    bm.allocate(a)
    append(bm, a, 7)
    assert bm.blocks[a.block_table[1]].hash == -1
    append(bm, a, 8)                                         # position 7 fills the second block
    assert bm.blocks[a.block_table[1]].hash != -1
    b = Seq([1, 2, 3, 4, 5, 6, 7, 8, 9])
    bm.allocate(b)
    assert b.num_cached_tokens == 8 and b.block_table[:2] == a.block_table
    check_refs(bm, [a, b])


def forked(num_blocks: int, n_tokens: int):
    """A block manager with a parent of `n_tokens` tokens and a child forked from it."""
    bm = BlockManager(num_blocks, 4)
    parent = Seq(list(range(n_tokens)))
    bm.allocate(parent)
    child = Seq(list(parent.token_ids))
    bm.fork(parent, child)
    return bm, parent, child


def test_fork_and_copy_on_write():
    bm, parent, child = forked(8, 6)
    assert child.block_table == parent.block_table and child.block_table is not parent.block_table
    assert [bm.blocks[i].ref_count for i in parent.block_table] == [2, 2]
    check_refs(bm, [parent, child])
    shared = parent.block_table[1]
    pairs = append(bm, child, 100)                           # writes slot 2 of the shared partial block
    assert pairs == [(shared, child.block_table[1])] and child.block_table[1] != shared
    assert parent.block_table[1] == shared and bm.blocks[shared].ref_count == 1
    assert bm.blocks[shared].token_ids == [4, 5] and bm.blocks[child.block_table[1]].token_ids == [4, 5, 100]
    assert bm.blocks[parent.block_table[0]].ref_count == 2    # the untouched full block stays shared
    check_refs(bm, [parent, child])
    assert append(bm, parent, 200) == []                     # the parent now holds its block alone
    check_refs(bm, [parent, child])


def test_check_counts_the_holders_of_each_block():
    bm, parent, child = forked(8, 6)
    bm.check([parent, child])
    with pytest.raises(AssertionError, match="held by 1 tables"):
        bm.check([parent])                                   # the child's holds are not accounted for
    bm.blocks[parent.block_table[0]].ref_count += 1
    with pytest.raises(AssertionError, match="ref_count 3, held by 2"):
        bm.check([parent, child])


def test_full_pool():
    bm = BlockManager(2, 4)
    a = Seq(list(range(8)))
    bm.allocate(a)
    b = Seq([9])
    assert not bm.can_allocate(b)
    with pytest.raises(NoFreeBlocks):
        bm.allocate(b)
    assert b.block_table == [] and bm.num_free_blocks() == 0
    a.token_ids.append(8)
    assert not bm.can_append(a)
    with pytest.raises(NoFreeBlocks):
        bm.may_append(a)
    assert len(a.block_table) == 2
    check_refs(bm, [a])
    bm.free(a)
    assert bm.num_free_blocks() == 2
    check_refs(bm, [])


def test_copy_on_write_needs_a_free_block():
    bm, parent, child = forked(2, 7)
    child.token_ids.append(70)                               # slot 3 of the shared partial block
    assert not bm.can_append(child)
    with pytest.raises(NoFreeBlocks):
        bm.may_append(child)
    assert child.block_table == parent.block_table
    check_refs(bm, [parent, child])


class BlockWalk(RuleBasedStateMachine):
    """Random allocate / append / fork / free / preempt over a small pool, with the KV cache simulated:
    `cache[(block, slot)]` is the prefix (all tokens up to and including that position) whose K/V was
    last written there, since a position's K/V depends on every token before it. A sequence must
    always read its own prefixes through its block table, and only write into blocks it holds alone."""

    @initialize(num_blocks=st.sampled_from([6, 16]), block_size=st.sampled_from([1, 2, 4]), caching=st.booleans())
    def setup(self, num_blocks, block_size, caching):
        self.bs = block_size
        self.bm = BlockManager(num_blocks, block_size, caching)
        self.live: list[Seq] = []
        self.cache: dict[tuple[int, int], tuple[int, ...]] = {}

    def write(self, seq: Seq, pos: int) -> None:
        block = seq.block_table[pos // self.bs]
        assert self.bm.blocks[block].ref_count == 1, "write into a shared block"
        self.cache[(block, pos % self.bs)] = tuple(seq.token_ids[:pos + 1])

    @rule(tokens=st.lists(st.integers(0, 1), min_size=1, max_size=14))
    def allocate(self, tokens):
        seq = Seq(tokens)
        if not self.bm.can_allocate(seq):
            free = self.bm.num_free_blocks()
            with pytest.raises(NoFreeBlocks):
                self.bm.allocate(seq)
            assert self.bm.num_free_blocks() == free and seq.block_table == []
            return
        self.bm.allocate(seq)
        n = seq.num_cached_tokens
        assert n % self.bs == 0 and n <= (len(tokens) - 1) // self.bs * self.bs
        assert len(seq.block_table) == -(-len(tokens) // self.bs)
        for pos in range(n, len(tokens)):                    # the prefill computes the rest
            self.write(seq, pos)
        self.live.append(seq)

    @precondition(lambda self: self.live)
    @rule(data=st.data(), token=st.integers(0, 1))
    def append(self, data, token):
        seq = data.draw(st.sampled_from(self.live))
        seq.token_ids.append(token)
        if not self.bm.can_append(seq):
            with pytest.raises(NoFreeBlocks):
                self.bm.may_append(seq)
            seq.token_ids.pop()
            return
        pairs = self.bm.may_append(seq)
        assert len(pairs) <= 1
        for src, dst in pairs:                               # the runner copies the block's K/V
            for slot in range(self.bs):
                if (src, slot) in self.cache:
                    self.cache[(dst, slot)] = self.cache[(src, slot)]
        self.write(seq, len(seq.token_ids) - 1)

    @precondition(lambda self: self.live)
    @rule(data=st.data(), tokens=st.lists(st.integers(0, 1), min_size=2, max_size=9), stop=st.booleans())
    def multi_step(self, data, tokens, stop):
        """The engine's multi-step decoding: a new token (tokens[0]) as a decode step appends it, then
        its blocks for len(tokens) positions reserved, the device writing all of them, the host taking
        them one by one (may_append each) up to the end or up to a stop, after which the sequence ends."""
        seq = data.draw(st.sampled_from(self.live))
        seq.token_ids.append(tokens[0])
        if not self.bm.can_append(seq):
            seq.token_ids.pop()
            return
        for src, dst in self.bm.may_append(seq):
            for slot in range(self.bs):
                if (src, slot) in self.cache:
                    self.cache[(dst, slot)] = self.cache[(src, slot)]
        k, pos = len(tokens), len(seq.token_ids) - 1
        if self.bm.blocks_to_reserve(seq, k) > self.bm.num_free_blocks():
            with pytest.raises(NoFreeBlocks):
                self.bm.reserve(seq, k)
            self.write(seq, pos)                             # a single step instead
            return
        self.bm.reserve(seq, k)
        ran = seq.token_ids[:pos] + tokens                   # what the device ran, position by position
        for m in range(k):
            block = seq.block_table[(pos + m) // self.bs]
            assert self.bm.blocks[block].ref_count == 1, "a run writes into a shared block"
            self.cache[(block, (pos + m) % self.bs)] = tuple(ran[:pos + m + 1])
        keep = data.draw(st.integers(1, k)) if stop else k
        for m in range(1, keep):
            seq.token_ids.append(tokens[m])
            assert self.bm.may_append(seq) == []             # reserved and private: nothing to copy
        if stop:
            self.live.remove(seq)
            self.bm.free(seq)

    @precondition(lambda self: self.live)
    @rule(data=st.data())
    def fork(self, data):
        parent = data.draw(st.sampled_from(self.live))
        child = Seq(list(parent.token_ids))
        self.bm.fork(parent, child)
        self.live.append(child)

    @precondition(lambda self: self.live)
    @rule(data=st.data())
    def free(self, data):
        seq = data.draw(st.sampled_from(self.live))
        self.live.remove(seq)
        self.bm.free(seq)
        assert seq.block_table == []

    @precondition(lambda self: self.live)
    @rule(data=st.data())
    def preempt_and_recompute(self, data):
        seq = data.draw(st.sampled_from(self.live))
        self.live.remove(seq)
        self.bm.free(seq)
        self.allocate(seq.token_ids)

    @rule(tokens=st.lists(st.integers(0, 1), min_size=1, max_size=14))
    def abort_before_prefill(self, tokens):
        seq = Seq(tokens, num_computed_tokens=0)
        if self.bm.can_allocate(seq):
            self.bm.allocate(seq)
            seq.num_computed_tokens = seq.num_cached_tokens      # nothing beyond the hits was written
            self.bm.free(seq)

    @invariant()
    def consistent(self):
        check_refs(self.bm, self.live)
        assert self.bm.num_free_blocks() + sum(b.ref_count > 0 for b in self.bm.blocks) == self.bm.num_blocks
        for seq in self.live:
            for p in range(len(seq.token_ids)):
                kv = self.cache.get((seq.block_table[p // self.bs], p % self.bs))
                assert kv == tuple(seq.token_ids[:p + 1]), f"position {p} reads K/V that is not its own"

    def teardown(self):
        if not hasattr(self, "bm"):
            return
        for seq in self.live:
            self.bm.free(seq)
        self.bm.check()
        assert self.bm.num_free_blocks() == self.bm.num_blocks and all(b.ref_count == 0 for b in self.bm.blocks)


TestBlockWalk = BlockWalk.TestCase
TestBlockWalk.settings = settings(max_examples=100, stateful_step_count=40, deadline=None)
