"""`SamplingParams` (vLLM's names, defaults and checks) and the sampler that applies them.

One batch of next-token logits, one row per running sequence, each row with its own parameters:
repetition, presence and frequency penalties, a logit bias, allowed and banned tokens, greedy
(temperature 0), temperature, top-k, top-p (nucleus), min-p, a per-request seed, and the
log-probabilities of the chosen token and of the `logprobs` most likely ones.
"""
from __future__ import annotations

import copy
import math
import numbers
from dataclasses import dataclass, field

import torch


class Logprob(float):
    """vLLM's `Logprob` (`.logprob`, `.rank`: 1 for the most likely token, `.decoded_token`), kept a
    float, so code written for vLLM (`lp[t].logprob`) and plain arithmetic (`lp[t] + 1`) both work."""
    __slots__ = ("rank", "decoded_token")

    def __new__(cls, value: float, rank: int | None = None, decoded_token: str | None = None):
        obj = super().__new__(cls, value)
        obj.rank, obj.decoded_token = rank, decoded_token
        return obj

    @property
    def logprob(self) -> float:
        return float(self)

    def __reduce__(self):   # through the engine process's pipe
        return Logprob, (float(self), self.rank, self.decoded_token)

    def __repr__(self) -> str:
        return f"Logprob(logprob={float(self)!r}, rank={self.rank!r}, decoded_token={self.decoded_token!r})"


# the fields' checks (also for BeamSearchParams and prompts): each a ValueError that names the field

def as_int(name: str, value) -> int:
    """`value` as an int, else a ValueError naming the field (2.5, "2", True and nan are not ints)."""
    if (isinstance(value, numbers.Integral) and not isinstance(value, bool)) or (
            isinstance(value, float) and value.is_integer()):
        return int(value)
    raise ValueError(f"{name} must be an int, got {value!r}")


def as_number(name: str, value) -> float:
    """`value` as a float, else a ValueError naming the field (True, "0.5", inf and nan are not numbers)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    return float(value)


def as_list(name: str, values, item=None) -> list:
    """`values` (None, a list or a tuple) as a list, each item passed through `item` (which raises)."""
    if values is None:
        return []
    if not isinstance(values, (list, tuple)):
        raise ValueError(f"{name} must be a list, got {values!r}")
    return [item(name, v) for v in values] if item else list(values)


def as_text(name: str, value) -> str:
    """`value` if it is a non-empty string, else a ValueError naming the field."""
    if not isinstance(value, str) or not value:
        raise ValueError(f"{name} must hold non-empty strings, got {value!r}")
    return value


def top_logprobs(ids: list[int], values: list[float], token: int | None = None, token_logprob: float = 0.0,
                 token_rank: int | None = None) -> dict[int, Logprob]:
    """{token: Logprob} of the top-k (`ids`, `values`, best first: ranks 1..k) and the chosen `token`."""
    top = {t: Logprob(v, r) for r, (t, v) in enumerate(zip(ids, values), start=1)}
    if token is not None and token not in top:
        top[token] = Logprob(token_logprob, token_rank)
    return top


GREEDY_BELOW = 1e-5   # temperatures under this pick the most likely token


@dataclass
class SamplingParams:
    """How to pick each request's next tokens and when to stop (vLLM's fields and defaults)."""
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1                  # -1 or 0: no top-k (vLLM takes both)
    min_p: float = 0.0
    presence_penalty: float = 0.0    # subtracted from the logit of every token the completion has used
    frequency_penalty: float = 0.0   # subtracted once per use in the completion
    repetition_penalty: float = 1.0  # logits of tokens in the prompt or completion: / it if > 0, * it if < 0
    seed: int | None = None
    max_tokens: int | None = 16      # None: until the context is full
    min_tokens: int = 0
    stop: list[str] | str | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    logprobs: int | None = None      # also return the top-n log-probabilities at each step
    prompt_logprobs: int | None = None   # and of every prompt token (with the top-n there): for scoring
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    logit_bias: dict[int, float] | None = None      # added to those tokens' logits (OpenAI's logit_bias)
    allowed_token_ids: list[int] | None = None      # only these may be picked
    bad_words: list[str] | None = None              # words never to complete (their token ids: the engine's
    bad_words_token_ids: list[list[int]] | None = None   # tokenizer fills these in, `update_from_tokenizer`)
    detokenize: bool = True                         # False: token ids only, no text (no stop strings then)
    truncate_prompt_tokens: int | None = None       # keep only the prompt's last k tokens
    # the model's end-of-sequence ids, which the engine fills in (`update_from_eos`): min_tokens holds them back
    eos_token_ids: frozenset = field(default=frozenset(), repr=False, compare=False)

    def __post_init__(self):
        # types first (a float top_k or seed, or a nan temperature, would pass the range checks below and
        # fail inside a batch of other requests); 2.0 counts as the int 2, as JSON may send it
        for name in ("n", "top_k", "min_tokens"):
            setattr(self, name, as_int(name, getattr(self, name)))
        for name in ("seed", "max_tokens", "logprobs", "prompt_logprobs", "truncate_prompt_tokens"):
            if getattr(self, name) is not None:
                setattr(self, name, as_int(name, getattr(self, name)))
        for name in ("temperature", "top_p", "min_p", "presence_penalty", "frequency_penalty", "repetition_penalty"):
            setattr(self, name, as_number(name, getattr(self, name)))
        if self.seed is not None and not -2**63 <= self.seed < 2**63:
            raise ValueError(f"seed must be a signed 64-bit int, got {self.seed!r}")
        if self.n < 1:
            raise ValueError(f"n (completions per prompt) must be an int >= 1, got {self.n!r}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature!r}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if self.top_k < -1:
            raise ValueError(f"top_k must be -1 or 0 (disabled) or a positive int, got {self.top_k!r}")
        if not 0 <= self.min_p <= 1:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p!r}")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2 <= getattr(self, name) <= 2:
                raise ValueError(f"{name} must be in [-2, 2], got {getattr(self, name)!r}")
        if not self.repetition_penalty > 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty!r}")
        if self.max_tokens is not None and self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens!r}")
        if self.min_tokens < 0 or (self.max_tokens is not None and self.min_tokens > self.max_tokens):
            raise ValueError(f"min_tokens must be in [0, max_tokens], got {self.min_tokens!r}")
        if self.logprobs is not None and self.logprobs < 0:
            raise ValueError(f"logprobs must be None or >= 0, got {self.logprobs!r}")
        if self.prompt_logprobs is not None and self.prompt_logprobs < 0:
            raise ValueError(f"prompt_logprobs must be None or >= 0, got {self.prompt_logprobs!r}")
        if self.logit_bias is not None:
            try:
                self.logit_bias = {int(t): as_number("logit_bias", b) for t, b in dict(self.logit_bias).items()}
            except (TypeError, ValueError):
                raise ValueError(f"logit_bias must map token ids to finite numbers, got {self.logit_bias!r}") from None
        if self.allowed_token_ids is not None:
            self.allowed_token_ids = as_list("allowed_token_ids", self.allowed_token_ids, as_int)
            if not self.allowed_token_ids:
                raise ValueError("allowed_token_ids must be a non-empty list of token ids")
        if isinstance(self.bad_words, str):
            self.bad_words = [self.bad_words]
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = as_list("stop", self.stop, as_text)   # an empty one would end every completion at once
        self.stop_token_ids = as_list("stop_token_ids", self.stop_token_ids, as_int)
        if self.bad_words is not None:
            self.bad_words = as_list("bad_words", self.bad_words, as_text)
        if self.stop and not self.detokenize:
            raise ValueError("stop strings need the text: they cannot be used with detokenize=False")
        if self.truncate_prompt_tokens is not None and self.truncate_prompt_tokens < 1:
            raise ValueError(f"truncate_prompt_tokens must be None or >= 1, got {self.truncate_prompt_tokens!r}")

    def clone(self) -> SamplingParams:
        """A deep copy (vLLM's `SamplingParams.clone`)."""
        return copy.deepcopy(self)

    @property
    def greedy(self) -> bool:
        # a temperature under 1e-5 is greedy too (vLLM's rule): logits / 1e-300 would overflow to inf
        return self.temperature < GREEDY_BELOW or self.top_k == 1

    @property
    def penalized(self) -> bool:
        return self.presence_penalty != 0 or self.frequency_penalty != 0 or self.repetition_penalty != 1

    @property
    def all_stop_token_ids(self) -> set[int]:
        """The tokens that end a completion: `stop_token_ids` and, unless `ignore_eos`, the model's EOS."""
        return set(self.stop_token_ids) | (set() if self.ignore_eos else set(self.eos_token_ids))

    @property
    def adjusted(self) -> bool:
        """The logits are changed before a token is picked: penalties, a bias, allowed or banned tokens,
        or stop tokens held back until `min_tokens`."""
        return self.penalized or bool(self.logit_bias) or self.allowed_token_ids is not None or bool(
            self.bad_words_token_ids) or (self.min_tokens > 0 and bool(self.all_stop_token_ids))

    def update_from_eos(self, eos_token_ids) -> None:
        """The engine's model ends completions with these ids: `min_tokens` holds them back too (vLLM
        reads them from the model's generation config)."""
        self.eos_token_ids = frozenset(int(t) for t in eos_token_ids)

    def update_from_tokenizer(self, tokenizer) -> None:
        """`bad_words` as token ids (vLLM's name): each word as it starts a text and after a space."""
        if self.bad_words and self.bad_words_token_ids is None:
            seqs = []
            for word in self.bad_words:
                for text in (word.lstrip(), " " + word.lstrip()):
                    ids = tokenizer(text, add_special_tokens=False).input_ids
                    if ids and ids not in seqs:
                        seqs.append(ids)
            self.bad_words_token_ids = seqs


def apply_penalties(logits: torch.Tensor, p: SamplingParams, token_ids: list[int], num_prompt_tokens: int):
    """One row of logits with `p`'s penalties (vLLM's and HF's definitions): the repetition penalty
    (Keskar et al., 2019) on every token seen in the prompt or the completion, divides a positive
    logit and multiplies a negative one; the presence and frequency penalties (OpenAI's) subtract
    from the logits of tokens the completion has used, once and once per use."""
    logits = logits.clone()
    if p.repetition_penalty != 1:
        seen = torch.tensor(sorted(set(token_ids)), dtype=torch.long, device=logits.device)
        v = logits[seen]
        logits[seen] = torch.where(v > 0, v / p.repetition_penalty, v * p.repetition_penalty)
    out = token_ids[num_prompt_tokens:]
    if out and (p.presence_penalty or p.frequency_penalty):
        counts = torch.bincount(torch.tensor(out, device=logits.device), minlength=logits.numel()).float()
        logits -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).float()
    return logits


def adjust_logits(logits: torch.Tensor, p: SamplingParams, token_ids: list[int], num_prompt_tokens: int):
    """One row of logits as `p` wants it picked from: the penalties, then vLLM's `logit_bias`,
    `allowed_token_ids` (everything else -inf), `bad_words` (a word's last token is banned when the
    completion ends with the tokens before it; a one-token word is banned always), and `min_tokens`
    (EOS and the stop tokens banned until the completion has that many tokens, as vLLM)."""
    logits = apply_penalties(logits, p, token_ids, num_prompt_tokens) if p.penalized else logits.clone()
    if p.logit_bias:
        ids = torch.tensor(list(p.logit_bias), dtype=torch.long, device=logits.device)
        logits[ids] += torch.tensor(list(p.logit_bias.values()), dtype=logits.dtype, device=logits.device)
    if p.allowed_token_ids is not None:
        keep = torch.zeros_like(logits, dtype=torch.bool)
        keep[torch.tensor(p.allowed_token_ids, dtype=torch.long, device=logits.device)] = True
        logits = logits.masked_fill(~keep, float("-inf"))
    out = token_ids[num_prompt_tokens:]
    for word in p.bad_words_token_ids or []:
        if len(word) == 1 or (len(out) >= len(word) - 1 and out[len(out) - len(word) + 1:] == word[:-1]):
            logits[word[-1]] = float("-inf")
    stops = [t for t in p.all_stop_token_ids if t < logits.numel()]
    if len(out) < p.min_tokens and stops:
        logits[torch.tensor(stops, dtype=torch.long, device=logits.device)] = float("-inf")
    return logits


def filter_logits(logits: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    """Logits of one row with everything outside top-k / top-p / min-p set to -inf."""
    if p.top_k > 0 and p.top_k < logits.numel():
        kth = logits.topk(p.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if p.top_p < 1.0:
        probs = torch.softmax(logits, -1)
        sorted_probs, order = probs.sort(descending=True)
        # keep the smallest set whose mass reaches top_p: drop a token if the mass before it already does
        drop = (sorted_probs.cumsum(-1) - sorted_probs) >= p.top_p
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(0, order, drop), float("-inf"))
    if p.min_p > 0:
        probs = torch.softmax(logits, -1)
        logits = logits.masked_fill(probs < p.min_p * probs.max(), float("-inf"))
    return logits


def sampling_probs(logits: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    """The distribution a sampled request draws from, for rows of (already adjusted) logits (..., V):
    temperature, then top-k / top-p / min-p, then softmax."""
    rows = (logits.float() / p.temperature).reshape(-1, logits.shape[-1])
    # an extreme penalty may push a logit to inf: keep it the most likely, not nan after the softmax
    rows = rows.nan_to_num(nan=float("-inf"), posinf=torch.finfo(torch.float32).max, neginf=float("-inf"))
    return torch.softmax(torch.stack([filter_logits(r, p) for r in rows]), -1).reshape(logits.shape)


def sample(logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator | None],
           histories: list[tuple[list[int], int]] | None = None):
    """Next token of each row of `logits` (B, V) under its own parameters. `histories`: each row's
    (token ids so far, number of them in the prompt), needed for the penalties.

    Returns (tokens (B,) int64, -1 for a row with nothing left to pick from; logprob of each chosen
    token (B,); top logprobs per row: a list of {token: logprob} dicts or None). Log-probabilities
    are of the model's distribution (before penalties, temperature and filtering), as vLLM reports
    them by default."""
    logits = logits.float()
    penalized = logits
    if any(p.adjusted for p in params):
        if histories is None:
            raise ValueError("penalties and banned words need each row's token ids (histories)")
        penalized = torch.stack([adjust_logits(logits[i], p, *histories[i]) if p.adjusted else logits[i]
                                 for i, p in enumerate(params)])
    elif all(p.greedy and p.logprobs is None for p in params):
        # the common case in one pass and one transfer: on a GPU each .cpu() is a wait for the device
        tokens = logits.argmax(-1)
        chosen = logits.gather(1, tokens[:, None])[:, 0] - logits.logsumexp(-1)
        both = torch.stack([tokens.double(), chosen.double()]).cpu()   # token ids are exact in float64
        return both[0].long(), both[1].float(), [None] * len(params)
    logprobs = torch.log_softmax(logits, -1)
    tokens = torch.empty(len(params), dtype=torch.long)
    best = penalized.max(-1)   # -1 where every logit is -inf or a row has a nan: nothing to pick
    greedy = torch.where(best.values > float("-inf"), best.indices, -1).cpu()
    for i, p in enumerate(params):
        if p.greedy:
            tokens[i] = greedy[i]
            continue
        probs = sampling_probs(penalized[i], p).cpu()
        if not torch.isfinite(probs).all():   # every token masked (or the model's logits nan): the engine
            tokens[i] = -1                     # ends this request with an error, the others go on
            continue
        tokens[i] = torch.multinomial(probs, 1, generator=generators[i]).item()
    chosen = logprobs.gather(1, tokens.clamp(min=0).to(logits.device)[:, None]).squeeze(1).cpu()
    tops = []
    for i, p in enumerate(params):
        if p.logprobs is None:
            tops.append(None)
            continue
        v, idx = logprobs[i].topk(p.logprobs) if p.logprobs else (torch.zeros(0), torch.zeros(0))
        rank = int((logprobs[i] > chosen[i].to(logprobs.device)).sum()) + 1
        # the chosen token too (alone with logprobs=0, as vLLM)
        tops.append(top_logprobs(idx.long().tolist(), v.tolist(), int(tokens[i]), float(chosen[i]), rank))
    return tokens, chosen, tops


def prompt_logprobs(batch, done, every, logits: torch.Tensor, named=lambda top: top) -> torch.Tensor:
    """In an engine step (`SamplingParams(prompt_logprobs=k)`): record in each `every`-position
    sequence of `batch` [(sequence, tokens run)] the log-probabilities its logits rows give its prompt
    tokens (the logits at position j score token j + 1; a recompute after preemption records nothing
    twice; `named` adds the tokens' text), and return the rows to sample from, one per sequence whose
    prompt is `done`."""
    keep, row = [], 0
    for (seq, n), d, all_rows in zip(batch, done, every):
        if not all_rows:
            keep += [row] if d else []
            row += int(d)
            continue
        # the positions whose next token is a prompt token not yet scored (none twice after a recompute)
        start, k = seq.num_computed_tokens, seq.params.prompt_logprobs
        first = len(seq.prompt_logprobs) - 1          # the position that scores the next unscored token
        stop = min(start + n, seq.num_prompt_tokens - 1)
        if start <= first < stop:   # one log-softmax, gather and top-k for them all: one transfer, not one a token
            lps = torch.log_softmax(logits[row + first - start:row + stop - start], -1)
            targets = seq.token_ids[first + 1:stop + 1]
            chosen = lps.gather(1, torch.tensor(targets, device=lps.device)[:, None])
            ranks = ((lps > chosen).sum(1) + 1).tolist()
            tops = [t.tolist() for t in lps.topk(k, -1)] if k else [[[]] * len(targets)] * 2
            for tok, lp, rank, values, ids in zip(targets, chosen[:, 0].tolist(), ranks, *tops):
                seq.prompt_logprobs.append(named(top_logprobs(ids, values, tok, lp, rank)))
        keep += [row + n - 1] if d else []
        row += n
    return logits[keep]
