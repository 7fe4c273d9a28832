import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from llmopt import eval as evaluate


@settings(max_examples=200, deadline=None)
@given(n=st.integers(2, 300), seq_len=st.integers(2, 64), stride=st.integers(1, 64))
def test_windows_score_every_token_once(n, seq_len, stride):
    stride = min(stride, seq_len)
    scored = []
    for begin, end, k in evaluate._windows(n, seq_len, stride):
        assert 0 <= begin < end <= n and end - begin <= seq_len
        assert 1 <= k <= end - begin - 1  # every scored token has context in its window
        scored += range(end - k, end)
    assert scored == list(range(1, n))


class Uniform(torch.nn.Module):
    """Logits all equal: perplexity must be the vocabulary size."""

    def __init__(self, vocab):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.vocab = vocab
        self.config = type("C", (), {"max_position_embeddings": 1024})()

    def forward(self, input_ids):
        logits = torch.zeros(*input_ids.shape, self.vocab) + self.w
        return type("O", (), {"logits": logits})()


def test_uniform_model_has_vocab_perplexity():
    stream = torch.randint(0, 37, (500,))
    assert evaluate.perplexity(Uniform(37), stream, seq_len=64, progress=False) == pytest.approx(37, rel=1e-5)


def test_one_window_equals_direct_cross_entropy(tiny):
    model, _ = tiny
    stream = torch.randint(0, model.config.vocab_size, (100,))
    with torch.no_grad():
        logits = model(stream[None]).logits[0]
    want = math.exp(torch.nn.functional.cross_entropy(logits[:-1], stream[1:]).item())
    got = evaluate.perplexity(model, stream, seq_len=128, progress=False)
    assert got == pytest.approx(want, rel=1e-4)


def test_strides_and_batches_agree_when_context_does_not_matter():
    stream = torch.randint(0, 11, (301,))
    a = evaluate.perplexity(Uniform(11), stream, seq_len=32, stride=5, batch_size=3, progress=False)
    b = evaluate.perplexity(Uniform(11), stream, seq_len=50, batch_size=1, progress=False)
    assert a == pytest.approx(b) == pytest.approx(11)


def test_smaller_stride_gives_more_context(bundled):
    model, tok = bundled
    stream = tok("\n".join(f"x{i} = compute(x{i-1}, step={i})" for i in range(1, 120))).input_ids
    stream = torch.tensor(stream)
    coarse = evaluate.perplexity(model, stream, seq_len=64, progress=False)
    fine = evaluate.perplexity(model, stream, seq_len=64, stride=16, progress=False)
    assert fine < coarse


def test_stream_must_hold_the_models_token_ids(tiny):
    model, _ = tiny
    vocab = model.config.vocab_size
    with pytest.raises(ValueError, match="stream must hold integer token ids"):
        evaluate.perplexity(model, torch.rand(50), seq_len=16, progress=False)
    for bad in (vocab, -1):
        stream = torch.randint(0, vocab, (50,))
        stream[7] = bad
        with pytest.raises(ValueError, match=rf"stream must hold token ids in \[0, {vocab}\)"):
            evaluate.nll(model, stream, seq_len=16, progress=False)
    with pytest.raises(ValueError, match="stride"):   # 0 was read as "the default"
        evaluate.perplexity(Uniform(5), torch.arange(5), seq_len=4, stride=0, progress=False)
    with pytest.raises(ValueError, match="batch_size"):
        evaluate.perplexity(Uniform(5), torch.arange(5), seq_len=4, batch_size=0, progress=False)


def test_bad_arguments():
    with pytest.raises(ValueError, match="stride"):
        evaluate.nll(Uniform(5), torch.arange(5), seq_len=4, stride=8, progress=False)
    with pytest.raises(ValueError, match="tokenizer"):
        evaluate.perplexity(Uniform(5))
    with pytest.raises(ValueError, match="max_tokens"):
        evaluate.perplexity(Uniform(5), torch.arange(5), max_tokens=1)
