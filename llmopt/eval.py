"""Quality measures: perplexity on the bundled test split or any token stream.

Perplexity uses strided windows (as in the Hugging Face perplexity guide): each window of
up to `seq_len` tokens scores the next `stride` tokens the previous windows did not, so
every token after the first is scored exactly once, with at least `seq_len - stride`
tokens of context. The default stride (seq_len - 1) gives back-to-back windows: fastest,
slightly pessimistic; a smaller stride gives each token more context and costs more.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm


def _windows(n_tokens: int, seq_len: int, stride: int):
    """(begin, end, n_scored) per window. Each window scores its last `n_scored` tokens,
    at most seq_len - 1 of them, so even the first scored token has one token of context."""
    step, out, start = min(stride, seq_len - 1), [], 1  # token 0 has no context: never scored
    while start < n_tokens:
        end = min(start + step, n_tokens)
        out.append((max(0, end - seq_len), end, end - start))
        start = end
    return out


@torch.no_grad()
def nll(model, stream: torch.Tensor, seq_len: int = 512, stride: int | None = None,
        batch_size: int = 8, progress: bool = True) -> tuple[float, int]:
    """Total negative log-likelihood (nats) of `stream` and the number of tokens scored."""
    from .data import check_token_ids

    stream = check_token_ids(torch.as_tensor(stream).flatten(), "stream", model)
    stride = seq_len if stride is None else stride
    if seq_len < 2 or not 0 < stride <= seq_len:
        raise ValueError(f"need seq_len >= 2 and 0 < stride <= seq_len, got {seq_len=}, {stride=}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if stream.numel() < 2:
        raise ValueError("the token stream needs at least 2 tokens")
    device = next(model.parameters()).device
    wins = _windows(stream.numel(), seq_len, stride)
    total, count = torch.zeros((), dtype=torch.float64, device=device), 0
    bar = tqdm(total=sum(w[2] for w in wins), desc="perplexity", unit="tok", disable=not progress, leave=False)
    i = 0
    while i < len(wins):
        # batch consecutive windows of the same length (all but possibly the last)
        length = wins[i][1] - wins[i][0]
        group = [wins[i]]
        while len(group) < batch_size and i + len(group) < len(wins) and \
                wins[i + len(group)][1] - wins[i + len(group)][0] == length:
            group.append(wins[i + len(group)])
        i += len(group)
        x = torch.stack([stream[b:e] for b, e, _ in group]).to(device)
        logits = model(input_ids=x).logits.float()
        for row, (_, _, k) in enumerate(group):
            # logits at position t predict token t+1: the last k tokens need logits [-k-1:-1]
            lp = F.cross_entropy(logits[row, -k - 1 : -1], x[row, -k:], reduction="sum")
            total += lp.double()  # summed on the device: one sync at the end, not one per window
            count += k
        bar.update(sum(k for *_, k in group))
    bar.close()
    return total.item(), count


def perplexity(model, stream=None, tokenizer=None, split: str = "test", seq_len: int = 512,
               stride: int | None = None, max_tokens: int | None = None, batch_size: int = 8,
               progress: bool = True) -> float:
    """Perplexity of `model` on a token stream, or on a split of the bundled corpus.

    stream: 1-D token ids; if None, `split` of the stdlib corpus, tokenized with `tokenizer`.
    max_tokens: evaluate only the first `max_tokens` tokens (smoke runs, quick looks).
    """
    if stream is None:
        if tokenizer is None:
            raise ValueError("perplexity needs a token `stream` or a `tokenizer` to build the split")
        from .data import token_stream

        stream = token_stream(split, tokenizer)
    stream = torch.as_tensor(stream).flatten()
    if max_tokens is not None:
        if max_tokens < 2:
            raise ValueError(f"max_tokens must be >= 2, got {max_tokens}")
        stream = stream[:max_tokens]
    seq_len = min(seq_len, getattr(model.config, "max_position_embeddings", seq_len))
    total, count = nll(model, stream, seq_len, stride, batch_size, progress)
    return math.exp(total / count)
