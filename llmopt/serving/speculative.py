"""Speculative decoding by n-gram lookup (vLLM's `speculative_config={"method": "ngram", ...}`, the
"prompt lookup decoding" of Saxena, 2023): no draft model at all.

A decode step reads every weight of the model to produce one token per sequence. If we could guess
the next k tokens, one forward over the last token and the k guesses would check all of them at
once: the logits at each position say what greedy decoding would pick there, so the guesses are
kept up to the first one the model disagrees with, and the model's own pick at that place comes
free (the "bonus" token). The output is exactly greedy decoding's; only the number of forwards
changes. Where do guesses come from? Text repeats itself, code especially: find the last place
where the sequence's final n tokens occurred before, and propose what followed them there.

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

from dataclasses import dataclass

import torch

from .sampling import sampling_probs


@dataclass
class SpeculativeConfig:
    """vLLM's fields for n-gram speculation."""
    method: str = "ngram"
    num_speculative_tokens: int = 4
    prompt_lookup_max: int = 4
    prompt_lookup_min: int = 1

    def __post_init__(self):
        if self.method != "ngram":
            raise ValueError(f"speculative_config method must be 'ngram' (no draft model here), got {self.method!r}")
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

def propose(batch, cfg: SpeculativeConfig, blocks, budget: int, max_model_len: int) -> dict[int, tuple[int, list[int]]]:
    """n-gram guesses for the decodes of a step's `batch` [(sequence, tokens to run)], within
    `budget` more tokens, each sequence's max_tokens and context, and the free blocks (reserved now
    for the guesses' K/V). Each guess is appended to its sequence for the forward; returns
    {seq_id: (length before, guess)}."""
    guesses = {}
    for seq, n in batch:
        p = seq.params
        if (n != 1 or budget < 1 or seq.beam is not None or p.logprobs is not None or p.adjusted
                or seq.forks_pending or seq.num_computed_tokens + 1 != len(seq)):
            continue
        room = min(cfg.num_speculative_tokens, budget, max_model_len - len(seq) - 1)
        if p.max_tokens is not None:
            room = min(room, p.max_tokens - seq.num_completion_tokens - 1)   # the bonus token fits too
        guess = ngram_propose(seq.token_ids, room, cfg.prompt_lookup_max, cfg.prompt_lookup_min) if room > 0 else []
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
