"""Multi-step decoding's device side: pick each row's greedy token and move the decode inputs on to it,
so the next decode step can run without the host (`ModelRunner.decode_steps`).

After a decode step's logits (B, V), for every row b:

    token = argmax(logits[b])                     # the first of equal maxima, as torch.argmax
    logprob = logits[b, token] - logsumexp(logits[b])
    tokens[step % S, b], logprobs[step % S, b] = token, logprob      # the run's record, S rows
    ids[b] = token; pos[b] += 1; lens[b] += 1
    slots[b] = tables[b, pos[b] // block_size] * block_size + pos[b] % block_size
    step += 1

In PyTorch that is about twenty small kernels per step (argmax, logsumexp, gathers, index copies,
adds); inside a CUDA graph each still costs a couple of microseconds. The Triton kernel does a row
per program in one pass over the logits (a running max, its index and a rescaled sum, as lesson 08's
online softmax), then `step += 1`: two launches.
"""
from __future__ import annotations

import torch

from ..kernels.common import compiler_opaque, next_power_of_2, pdl, pdl_launch, tl, triton, use_triton


def greedy_advance_reference(logits, ids, pos, slots, lens, tables, tokens, logprobs, step, block_size: int):
    """The spec, in PyTorch: updates ids, pos, slots, lens (B,), tokens/logprobs (S, B) and step (1,)
    in place. The last step's new position may lie past the sequence's blocks; its slot is never
    used (the host loads new inputs first), so the table lookup is clamped to stay inside."""
    tok = logits.argmax(-1)
    at = step % tokens.shape[0]
    tokens.index_copy_(0, at, tok[None])
    logprobs.index_copy_(0, at, (logits.gather(1, tok[:, None])[:, 0] - logits.logsumexp(-1))[None].float())
    ids.copy_(tok)
    pos.add_(1)
    lens.add_(1)
    block = (pos // block_size).clamp_(max=tables.shape[1] - 1)
    slots.copy_(tables.gather(1, block[:, None])[:, 0] * block_size + pos % block_size)
    step.add_(1)


@triton.jit
def _greedy_advance_kernel(logits_ptr, ids_ptr, pos_ptr, slots_ptr, lens_ptr, tables_ptr, tokens_ptr, logprobs_ptr,
                           step_ptr, V, B, S, WIDTH, stride_l, stride_t,
                           KV_BLOCK: tl.constexpr, BLOCK_V: tl.constexpr, PDL: tl.constexpr = False):
    if PDL:   # programmatic dependent launch (kernels/common.py)
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    b = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_V)
    best = tl.full((), float("-inf"), tl.float32)     # the largest logit so far
    best_i = tl.full((), 0, tl.int64)                 # its index (the first one, on ties)
    total = tl.full((), 0.0, tl.float32)              # sum of exp(logit - best) so far
    for start in range(0, V, BLOCK_V):
        x = tl.load(logits_ptr + b * stride_l + start + cols, mask=start + cols < V,
                    other=float("-inf")).to(tl.float32)
        m = tl.max(x, axis=0)
        i = tl.argmax(x, axis=0).to(tl.int64) + start
        new = tl.maximum(best, m)
        total = total * tl.exp(best - new) + tl.sum(tl.exp(x - new), axis=0)
        best_i = tl.where(m > best, i, best_i)        # strictly greater: an earlier equal maximum stays
        best = new
    step = tl.load(step_ptr)
    at = step % S
    tl.store(tokens_ptr + at * B + b, best_i)
    tl.store(logprobs_ptr + at * B + b, -tl.log(total))   # logit[token] - logsumexp = best - (best + log total)
    p = tl.load(pos_ptr + b) + 1
    tl.store(ids_ptr + b, best_i)
    tl.store(pos_ptr + b, p)
    tl.store(lens_ptr + b, tl.load(lens_ptr + b) + 1)
    block = tl.minimum(p // KV_BLOCK, WIDTH - 1)
    tl.store(slots_ptr + b, tl.load(tables_ptr + b * stride_t + block) * KV_BLOCK + p % KV_BLOCK)


def greedy_advance(logits, ids, pos, slots, lens, tables, tokens, logprobs, step, block_size: int,
                   backend: str = "auto"):
    """`greedy_advance_reference`'s contract; the kernel on a GPU ("auto"), or "triton" / "torch".
    ids, pos, slots, lens, tables, tokens and step are int64; logprobs float32; all contiguous."""
    if not use_triton(logits, backend):
        return greedy_advance_reference(logits, ids, pos, slots, lens, tables, tokens, logprobs, step, block_size)
    return _greedy_advance_triton(logits, ids, pos, slots, lens, tables, tokens, logprobs, step, block_size)


@compiler_opaque
def _greedy_advance_triton(logits, ids, pos, slots, lens, tables, tokens, logprobs, step, block_size: int):
    B, V = logits.shape
    for name, t in (("ids", ids), ("pos", pos), ("slots", slots), ("lens", lens), ("tokens", tokens),
                    ("step", step), ("tables", tables)):
        if t.dtype != torch.long or not t.is_contiguous():
            raise ValueError(f"{name} must be a contiguous int64 tensor, got {t.dtype}")
    if logits.stride(-1) != 1 or logprobs.dtype != torch.float32 or tokens.shape != logprobs.shape \
            or tokens.shape[1] != B:
        raise ValueError(f"logits (B, V) with a contiguous last dim, tokens and logprobs (S, {B}), logprobs float32")
    if B:
        _greedy_advance_kernel[(B,)](logits, ids, pos, slots, lens, tables, tokens, logprobs, step, V, B,
                                     tokens.shape[0], tables.shape[1], logits.stride(0), tables.stride(0),
                                     KV_BLOCK=block_size, BLOCK_V=min(4096, next_power_of_2(V)), PDL=pdl(logits),
                                     **pdl_launch(pdl(logits)))
    step.add_(1)


def steps_ahead(batch, done, k: int, scheduler, max_model_len: int) -> int:
    """How many decode steps a step's `batch` [(sequence, tokens to run)] may run before the host looks
    again (vLLM's multi-step scheduling, `num_scheduler_steps=k`): more than 1 only for a pure greedy
    decode batch that no waiting request could join now (it would wait that many steps for its
    prefill; one that finds the batch full may wait up to k - 1 steps past a seat freeing up), within
    every sequence's context, no longer than the longest still to generate (a shorter one runs on,
    and its extra tokens are dropped), and with the blocks for all of them free."""
    if k == 1 or not all(done) or any(n != 1 for _, n in batch):
        return 1
    if scheduler.waiting and len(scheduler.running) < scheduler.max_num_seqs:
        return 1
    longest = 0
    for seq, _ in batch:
        p = seq.params
        if not p.greedy or p.logprobs is not None or p.adjusted or seq.beam is not None:   # argmax alone
            return 1
        if seq.forks_pending:   # a one-token prompt's prefill: its n completions fork at this token
            return 1
        room = max_model_len - len(seq)
        k = min(k, room)
        longest = max(longest, room if p.max_tokens is None else p.max_tokens - seq.num_completion_tokens)
    k = min(k, longest)
    blocks = scheduler.blocks
    if sum(blocks.blocks_to_reserve(seq, k) for seq, _ in batch) > blocks.num_free_blocks():
        # then only as far as the blocks they hold reach
        k = min(k, *(len(seq.block_table) * blocks.block_size - len(seq) + 1 for seq, _ in batch))
    return max(k, 1)
