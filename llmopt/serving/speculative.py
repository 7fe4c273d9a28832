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
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


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
