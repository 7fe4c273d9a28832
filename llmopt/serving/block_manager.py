"""`BlockManager`: the paged KV cache's bookkeeping (vLLM's PagedAttention idea, nano-vllm's name).

Why pages: a padded cache reserves `max_len` slots per sequence up front, so most of it sits empty
(a 100-token answer in a 4096-slot row wastes 97%) and fewer sequences fit in a batch. Here the
cache is a pool of blocks of `block_size` token slots; a sequence's *block table* lists its blocks
in order, and it takes a new block only when it needs one, so it wastes at most `block_size - 1`
slots. Blocks need not be contiguous: the attention kernel follows the table.

Prefix caching: a full block is named by a chained hash of (the previous block's hash, its tokens),
which identifies the whole prefix up to it. A new prompt whose first blocks hash to cached ones
shares them (ref_count += 1) and skips computing them. A freed block keeps its hash and contents
until it is handed out for something else, so a later prompt with the same prefix can revive it.

Copy-on-write: `fork` lets a child share all its parent's blocks (parallel sampling, beam search).
Before a sequence writes into a block that others also hold, it gets a private copy; the caller
copies the K/V (the (src, dst) pairs `may_append` returns).
"""
from __future__ import annotations

import hashlib
from array import array
from collections import Counter, deque
from dataclasses import dataclass, field


class NoFreeBlocks(RuntimeError):
    """`allocate`/`may_append` found too few free blocks; check `can_allocate`/`can_append` first."""


@dataclass
class Block:
    block_id: int
    ref_count: int = 0                  # how many block tables hold it
    hash: int = -1                      # -1 unless full and registered for prefix caching
    token_ids: list[int] = field(default_factory=list)   # the tokens whose K/V it holds


def block_hash(prev: int, token_ids) -> int:
    """Chained hash of a full block. sha256 rather than Python's `hash`: the same on every run and
    machine, and no prompt can be crafted to collide with (and so read) another request's prefix."""
    h = hashlib.sha256(prev.to_bytes(8, "little", signed=True))
    h.update(array("q", token_ids).tobytes())
    return int.from_bytes(h.digest()[:8], "little") >> 1      # 63 bits: never -1


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {num_blocks!r}")
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size!r}")
        self.num_blocks, self.block_size = num_blocks, block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        # Never-hashed blocks sit at the front, cached ones at the back in the order they were freed,
        # so popleft hands out empty blocks first and then evicts the least recently used cached one.
        self.free_block_ids: deque[int] = deque(range(num_blocks))
        self.hash_to_block_id: dict[int, int] = {}

    def num_free_blocks(self) -> int:
        return len(self.free_block_ids)

    def usage(self) -> float:
        return 1 - len(self.free_block_ids) / self.num_blocks

    def _num_blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def _take_free(self) -> Block:
        block = self.blocks[self.free_block_ids.popleft()]
        assert block.ref_count == 0
        if block.hash != -1:                                  # evict: it is about to hold other tokens
            assert self.hash_to_block_id[block.hash] == block.block_id
            del self.hash_to_block_id[block.hash]
        block.ref_count, block.hash, block.token_ids = 1, -1, []
        return block

    def _register(self, block: Block, h: int) -> None:
        if h not in self.hash_to_block_id:   # first one wins: an equal block already cached stays the cached one
            block.hash, self.hash_to_block_id[h] = h, block.block_id

    def _hashes(self, token_ids: list[int]) -> list[int]:
        """The chained hash of each full block of `token_ids`."""
        bs, hashes, h = self.block_size, [], -1
        for i in range(len(token_ids) // bs):
            h = block_hash(h, token_ids[i * bs:(i + 1) * bs])
            hashes.append(h)
        return hashes

    def _prefix_hits(self, token_ids: list[int], cache: bool = True) -> tuple[list[int], list[int]]:
        """(ids of the cached blocks that start the prompt, hashes of all its full blocks). The block
        holding the last token is never a hit: that token must run through the model for its logits.
        `cache=False`: no hits (a prompt that must be computed whole), its blocks still registered."""
        if not self.enable_prefix_caching:
            return [], []
        bs, hits, hashes = self.block_size, [], self._hashes(token_ids)
        if not cache:
            return [], hashes
        for i, h in enumerate(hashes[:(len(token_ids) - 1) // bs]):
            bid = self.hash_to_block_id.get(h)
            if bid is None or self.blocks[bid].token_ids != list(token_ids[i * bs:(i + 1) * bs]):
                break                     # hits are a prefix: past a miss the K/V must be recomputed anyway
            hits.append(bid)
        return hits, hashes

    def _blocks_needed(self, token_ids: list[int], hits: list[int]) -> int:
        revived = sum(self.blocks[b].ref_count == 0 for b in hits)   # a free cached hit leaves the free list
        return self._num_blocks_for(len(token_ids)) - len(hits) + revived

    def can_allocate(self, seq, cache: bool = True) -> bool:
        hits, _ = self._prefix_hits(seq.token_ids, cache)
        return self._blocks_needed(seq.token_ids, hits) <= len(self.free_block_ids)

    def allocate(self, seq, cache: bool = True) -> None:
        if seq.block_table:
            raise ValueError(f"seq.block_table must be empty to allocate, got {seq.block_table}")
        if not seq.token_ids:
            raise ValueError("seq.token_ids must not be empty")
        hits, hashes = self._prefix_hits(seq.token_ids, cache)
        if self._blocks_needed(seq.token_ids, hits) > len(self.free_block_ids):
            raise NoFreeBlocks(f"{len(seq.token_ids)} tokens need more than the {len(self.free_block_ids)} free blocks")
        bs, table = self.block_size, []
        for bid in hits:
            if self.blocks[bid].ref_count == 0:
                self.free_block_ids.remove(bid)
            self.blocks[bid].ref_count += 1
            table.append(bid)
        for i in range(len(hits), self._num_blocks_for(len(seq.token_ids))):
            block = self._take_free()
            block.token_ids = list(seq.token_ids[i * bs:(i + 1) * bs])
            if i < len(hashes):
                self._register(block, hashes[i])
            table.append(block.block_id)
        seq.block_table = table
        seq.num_cached_tokens = len(hits) * bs

    def _append_needs_block(self, seq) -> bool:
        pos, table = len(seq.token_ids) - 1, seq.block_table
        i = pos // self.block_size
        if pos < 0 or len(table) < i or (len(table) == i and pos % self.block_size):
            raise ValueError(f"seq.block_table ({len(table)} blocks) cannot take position {pos}: allocate the "
                             "sequence first and call may_append once per new token")
        return len(table) == i or self.blocks[table[i]].ref_count > 1     # a new block, or copy-on-write

    def can_append(self, seq) -> bool:
        return not self._append_needs_block(seq) or len(self.free_block_ids) > 0

    def may_append(self, seq) -> list[tuple[int, int]]:
        if not self.can_append(seq):
            raise NoFreeBlocks(f"no free block for position {len(seq.token_ids) - 1}")
        bs, table, copies = self.block_size, seq.block_table, []
        pos = len(seq.token_ids) - 1
        i, slot = divmod(pos, bs)
        if len(table) == i:
            table.append(self._take_free().block_id)
        elif self.blocks[table[i]].ref_count > 1:
            old, new = self.blocks[table[i]], self._take_free()
            old.ref_count -= 1
            table[i] = new.block_id
            copies.append((old.block_id, new.block_id))
        block = self.blocks[table[i]]
        assert block.ref_count == 1 and (block.hash == -1 or slot == bs - 1)
        block.token_ids = list(seq.token_ids[i * bs:pos + 1])
        if slot == bs - 1 and self.enable_prefix_caching:
            prev = self.blocks[table[i - 1]].hash if i > 0 else -1
            if prev == -1 and i > 0:                  # previous block not registered: rebuild the chain
                prev = self._hashes(seq.token_ids[:i * bs])[-1]
            self._register(block, block_hash(prev, block.token_ids))
        return copies

    def blocks_to_reserve(self, seq, num_tokens: int) -> int:
        """New blocks `seq` needs for the slots of its next `num_tokens` tokens (positions len - 1 ..
        len + num_tokens - 2: the last token, not yet run, and the ones it and they will produce)."""
        last = len(seq.token_ids) - 2 + num_tokens
        return max(0, last // self.block_size + 1 - len(seq.block_table))

    def reserve(self, seq, num_tokens: int) -> None:
        """Multi-step decoding: give `seq` its blocks for the next `num_tokens` tokens now, since the
        device writes their K/V before the host sees them. `may_append`, still called once per new
        token, then finds each token's block already there and only records its tokens and hash."""
        need = self.blocks_to_reserve(seq, num_tokens)
        if need > len(self.free_block_ids):
            raise NoFreeBlocks(f"{num_tokens} tokens ahead need {need} blocks, {len(self.free_block_ids)} are free")
        for _ in range(need):
            seq.block_table.append(self._take_free().block_id)

    def free(self, seq) -> None:
        # A block whose K/V was never written (a prefill cut short by preemption, a token sampled but
        # not yet run) must not stay cached: `num_computed_tokens`, where the sequence has it, says.
        computed = getattr(seq, "num_computed_tokens", None)
        computed = len(seq.token_ids) if computed is None else computed
        # Last block first: a prefix's tail is evicted before its head, which every longer hit needs.
        for i in reversed(range(len(seq.block_table))):
            block = self.blocks[seq.block_table[i]]
            assert block.ref_count > 0
            block.ref_count -= 1
            if block.ref_count == 0:
                if block.hash != -1 and (i + 1) * self.block_size > computed:
                    del self.hash_to_block_id[block.hash]
                    block.hash = -1
                if block.hash == -1:
                    self.free_block_ids.appendleft(block.block_id)
                else:
                    self.free_block_ids.append(block.block_id)
        seq.block_table = []
        seq.num_cached_tokens = 0

    def fork(self, parent, child) -> None:
        if child.block_table:
            raise ValueError(f"child.block_table must be empty to fork, got {child.block_table}")
        for bid in parent.block_table:
            assert self.blocks[bid].ref_count > 0
            self.blocks[bid].ref_count += 1
        child.block_table = list(parent.block_table)

    def check(self, seqs=None) -> None:
        """Assert the invariants: no block in the free list twice, a block is free exactly when its
        count is 0, every hashed block is full and indexed under its hash. Given `seqs`, every live
        sequence, also that each block's count is the number of their tables that hold it."""
        free = set(self.free_block_ids)
        assert len(free) == len(self.free_block_ids), "a block is in the free list twice"
        for b in self.blocks:
            assert b.ref_count >= 0
            assert (b.ref_count == 0) == (b.block_id in free), f"block {b.block_id}: ref_count {b.ref_count}"
            if b.hash != -1:
                assert self.hash_to_block_id.get(b.hash) == b.block_id, f"block {b.block_id}'s hash is not indexed"
                assert len(b.token_ids) == self.block_size, f"hashed block {b.block_id} is not full"
        for h, bid in self.hash_to_block_id.items():
            assert self.blocks[bid].hash == h, f"hash table entry for block {bid} is stale"
        assert self.enable_prefix_caching or not self.hash_to_block_id
        if seqs is not None:
            held = Counter(bid for seq in seqs for bid in seq.block_table)
            for b in self.blocks:
                assert b.ref_count == held[b.block_id], (
                    f"block {b.block_id}: ref_count {b.ref_count}, held by {held[b.block_id]} tables")
