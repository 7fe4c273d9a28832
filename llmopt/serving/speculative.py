"""Speculative decoding by n-gram lookup (vLLM's `speculative_config={"method": "ngram", ...}`, the
"prompt lookup decoding" of Saxena, 2023) or by a draft model (`speculative_config={"model": ...}`).

A decode step reads every weight of the model to produce one token per sequence. If we could guess
the next k tokens, one forward over the last token and the k guesses would check all of them at
once: the logits at each position say what greedy decoding would pick there, so the guesses are
kept up to the first one the model disagrees with, and the model's own pick at that place comes
free (the "bonus" token). The output is exactly greedy decoding's; only the number of forwards
changes. Where do guesses come from? Text repeats itself, code especially: find the last place
where the sequence's final n tokens occurred before, and propose what followed them there. Or ask
a smaller model with the same vocabulary (`DraftModel`: a distilled student, the target with half
its layers dropped), run greedily k steps ahead; it guesses well where nothing repeats, at the price
of k of its own forwards per step.

On a GPU a forward over 1 + k tokens costs about what a forward over one token does (both read
the weights once), so every accepted guess is a token for free. On a CPU the extra tokens cost
some compute; lesson 10 measures both the acceptance and the speed.

Sampled requests (temperature > 0) keep their distribution too, by speculative sampling's rule
(Leviathan et al., 2023; Chen et al., 2023): a guess g is accepted with probability P(g), the
probability the request's own sampling (temperature, top-k, top-p, min-p) gives it at that position;
at the first rejection the token is drawn from P with g removed (the residual max(0, P - Q),
renormalised, where the draft's Q puts all its mass on g); if every guess is accepted the next token
is drawn from P at the position after them. Each emitted token is then distributed exactly as one
drawn from P would be (`speculative_accept` is the rule, `verify_sampled` runs it on logits;
tested by counting). The random numbers are used
differently, so a seeded request's text differs from its text without speculation, as in vLLM.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch

from .sampling import sampling_probs


@dataclass
class SpeculativeConfig:
    """vLLM's fields. `method` "ngram" (the default without a model) or "draft_model" (the default with
    one); `model`: the draft, a name or folder for `llmopt.load` or, in llmopt, a loaded model."""
    method: str | None = None
    num_speculative_tokens: int = 4
    prompt_lookup_max: int = 4
    prompt_lookup_min: int = 1
    model: object = None

    def __post_init__(self):
        if self.method is None:
            self.method = "ngram" if self.model is None else "draft_model"
        if self.method not in ("ngram", "draft_model"):
            raise ValueError(f"speculative_config method must be 'ngram' or 'draft_model', got {self.method!r}")
        if (self.model is None) != (self.method == "ngram"):
            raise ValueError(f"speculative_config: method {self.method!r} "
                             + ("takes no model" if self.method == "ngram" else "needs model=<the draft model>"))
        if not isinstance(self.num_speculative_tokens, int) or self.num_speculative_tokens < 1:
            raise ValueError(f"num_speculative_tokens must be an int >= 1, got {self.num_speculative_tokens!r}")
        if not 1 <= self.prompt_lookup_min <= self.prompt_lookup_max:
            raise ValueError(f"need 1 <= prompt_lookup_min <= prompt_lookup_max, got {self.prompt_lookup_min!r} "
                             f"and {self.prompt_lookup_max!r}")

    @classmethod
    def of(cls, config) -> SpeculativeConfig | None:
        if config is None or isinstance(config, cls):
            return config
        if not isinstance(config, dict):
            raise ValueError(f"speculative_config must be a dict or SpeculativeConfig, got {type(config).__name__}")
        unknown = sorted(set(config) - set(cls.__dataclass_fields__))
        if unknown:
            raise ValueError(f"speculative_config: unsupported keys {unknown}; llmopt takes "
                             f"{sorted(cls.__dataclass_fields__)}")
        return cls(**config)


def ngram_propose(tokens: list[int], k: int, max_n: int = 4, min_n: int = 1) -> list[int]:
    """Up to k tokens that followed the latest earlier occurrence of the sequence's last n tokens,
    trying the longest n first (a longer match is a better guess); [] when nothing matches."""
    size = len(tokens)
    for n in range(min(max_n, size - 1), min_n - 1, -1):
        tail = tokens[size - n:]
        for start in range(size - n - 1, -1, -1):   # latest first; the tail itself is not a match
            if tokens[start:start + n] == tail:
                return tokens[start + n:start + n + k]
    return []


class DraftModel:
    """Guesses from a smaller model with the target's vocabulary, run greedily: its guess is one token,
    a point mass, so `verify` and `verify_sampled` stay exact. Each sequence keeps the draft's KV cache
    of the tokens it has seen (a `transformers` DynamicCache); the next call cuts it back to what its
    tokens still share (a rejected guess, a preemption) and runs the draft on the rest only. The
    draft's cache lives outside the block manager's blocks."""

    def __init__(self, model, target):
        p = next(target.parameters())
        if isinstance(model, (str, bytes)) or hasattr(model, "__fspath__"):
            from .. import models

            model = models.load(str(model), device=p.device, dtype=p.dtype)[0]
        if not isinstance(model, torch.nn.Module):
            raise ValueError(f"speculative_config model must be a model or its name, got {type(model).__name__}")
        if model.config.vocab_size != target.config.vocab_size:
            raise ValueError(f"the draft model's vocabulary ({model.config.vocab_size} tokens) must be the "
                             f"target's ({target.config.vocab_size})")
        self.model = model.eval()
        self.caches: dict[int, tuple] = {}    # seq_id -> (the draft's cache, the tokens it holds)
        # the cache argument's name: `cache` in recent transformers, `past_key_values` before
        self.cache_arg = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"

    @torch.no_grad()
    def propose(self, seq_id: int, tokens: list[int], k: int) -> list[int]:
        """The draft's k greedy tokens after `tokens`."""
        from transformers import DynamicCache

        cache, seen = self.caches.get(seq_id, (None, []))
        keep, most = 0, min(len(seen), len(tokens) - 1)     # at least one token runs, for its logits
        while keep < most and seen[keep] == tokens[keep]:
            keep += 1
        if cache is None:
            cache = DynamicCache()
        elif keep < len(seen):
            cache.crop(keep - len(seen))     # a negative count removes that many tokens, in every version
        device = next(self.model.parameters()).device
        ids, guess = tokens[keep:], []
        for _ in range(k):
            logits = self.model(input_ids=torch.tensor([ids], device=device), use_cache=True,
                                **{self.cache_arg: cache}).logits
            ids = [int(logits[0, -1].argmax())]
            guess += ids
        self.caches[seq_id] = (cache, tokens + guess[:-1])  # the last guess has not run through the draft
        return guess

    def forget(self, keep: set[int]) -> None:
        """Drop the caches of sequences not in `keep` (finished, or not scheduled: rebuilt if they return)."""
        for seq_id in [s for s in self.caches if s not in keep]:
            del self.caches[seq_id]


def verify(logits: torch.Tensor, proposal: list[int]) -> tuple[int, list[float], torch.Tensor]:
    """Greedy verification. `logits` (1 + k, V): the model's logits at the last token and at each of
    the k proposed ones. Returns (m, the accepted tokens' log-probabilities, the logits row to pick the
    next token from): the first m proposals are what greedy decoding would have picked."""
    picks = logits.argmax(-1).tolist()
    m = 0
    while m < len(proposal) and picks[m] == proposal[m]:
        m += 1
    lps = torch.log_softmax(logits[:m].float(), -1).gather(1, torch.tensor(proposal[:m], device=logits.device)[:, None])
    return m, lps[:, 0].tolist(), logits[m]


def speculative_accept(probs: torch.Tensor, proposal: list[int], coins: list[float]) -> tuple[int, torch.Tensor]:
    """The rule itself. probs (1 + k, V): the target's distribution at the last token and at each of
    the k guesses; coins: k uniform numbers in [0, 1). Guess i is kept while coins[i] < probs[i, guess];
    returns (m, the distribution the next token is drawn from): after a rejection probs[m] with the
    rejected guess removed, renormalised; with every guess kept, probs[k]."""
    m = 0
    while m < len(proposal) and coins[m] < probs[m, proposal[m]]:
        m += 1
    residual = probs[m].clone()
    if m < len(proposal):
        residual[proposal[m]] = 0.0       # P - Q: the rejected guess cannot come back
    return m, residual / residual.sum()


def verify_sampled(logits: torch.Tensor, proposal: list[int], params, generator: torch.Generator | None):
    """Speculative sampling's check. `logits` (1 + k, V) as in `verify`; `params`: the request's
    SamplingParams (temperature > 0, no penalties). Returns (m, the accepted tokens' log-probabilities,
    the next token and its log-probability): the first m guesses are kept, then one token drawn from
    the residual (after a rejection) or from the position after the guesses. Log-probabilities are
    the model's (before temperature and filtering), as `sample` reports them."""
    probs = sampling_probs(logits, params).cpu()
    m, residual = speculative_accept(probs, proposal, torch.rand(len(proposal), generator=generator).tolist())
    token = int(torch.multinomial(residual, 1, generator=generator))
    logprobs = torch.log_softmax(logits[:m + 1].float(), -1)
    chosen = logprobs.gather(1, torch.tensor(proposal[:m] + [token], device=logits.device)[:, None])[:, 0].tolist()
    return m, chosen[:m], token, chosen[m]


# ---------------------------------------------------------------- in the engine's step

def propose(batch, cfg: SpeculativeConfig, blocks, budget: int, max_model_len: int,
            draft: DraftModel | None = None) -> dict[int, tuple[int, list[int]]]:
    """Guesses (n-gram, or the `draft` model's) for the decodes of a step's `batch` [(sequence, tokens
    to run)], within `budget` more tokens, each sequence's max_tokens and context, and the free blocks
    (reserved now for the guesses' K/V). Each guess is appended to its sequence for the forward;
    returns {seq_id: (length before, guess)}."""
    guesses = {}
    if draft is not None:
        draft.forget({seq.seq_id for seq, _ in batch})
    for seq, n in batch:
        p = seq.params
        if (n != 1 or budget < 1 or seq.beam is not None or p.logprobs is not None or p.adjusted
                or seq.forks_pending or seq.num_computed_tokens + 1 != len(seq)):
            continue
        room = min(cfg.num_speculative_tokens, budget, max_model_len - len(seq) - 1)
        if p.max_tokens is not None:
            room = min(room, p.max_tokens - seq.num_completion_tokens - 1)   # the bonus token fits too
        if room < 1:
            continue
        if draft is not None:   # its guesses are always `room` long: no blocks for them, no need to run it
            if blocks.blocks_to_reserve(seq, 1 + room) > blocks.num_free_blocks():
                continue
            guess = draft.propose(seq.seq_id, seq.token_ids, room)
        else:
            guess = ngram_propose(seq.token_ids, room, cfg.prompt_lookup_max, cfg.prompt_lookup_min)
        if not guess or blocks.blocks_to_reserve(seq, 1 + len(guess)) > blocks.num_free_blocks():
            continue
        blocks.reserve(seq, 1 + len(guess))
        guesses[seq.seq_id] = (len(seq), guess)
        seq.token_ids += guess
        budget -= len(guess)
    return guesses


def verify_batch(batch, done, every, logits, guesses, generators):
    """Check each guess against the logits at its positions (`verify`, or `verify_sampled` with the
    sequence's generator for a sampled one). `done[i]`: the sequence's last token is in this step;
    `every[i]`: the forward kept its logits at every position. Returns the logits rows to go on with
    (for a guessing sequence, the one its next token comes from), the new `every`, and {seq_id:
    (sequence, length before, accepted tokens, their log-probabilities, (next token, its
    log-probability) already drawn for a sampled sequence, else None)}."""
    rows, row, every, accepted = [], 0, list(every), {}
    for i, ((seq, n), d) in enumerate(zip(batch, done)):
        if seq.seq_id in guesses:
            length, guess = guesses[seq.seq_id]
            if seq.params.greedy:
                (m, lps, _), drawn = verify(logits[row:row + n], guess), None
            else:
                m, lps, token, lp = verify_sampled(logits[row:row + n], guess, seq.params, generators.get(seq.seq_id))
                drawn = (token, lp)
            accepted[seq.seq_id] = (seq, length, guess[:m], lps, drawn)
            rows.append(row + m)
            every[i] = False
        elif every[i]:
            rows.extend(range(row, row + n))
        elif d:
            rows.append(row)
        row += n if (every[i] or seq.seq_id in guesses) else int(d)
    return logits[rows], every, accepted
