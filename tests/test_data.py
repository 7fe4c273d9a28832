import collections

import pytest
import torch

from llmopt import data


def test_split_is_deterministic_and_roughly_90_5_5():
    docs = list(data.iter_documents())
    assert len(docs) > 500, "the stdlib corpus should have hundreds of files"
    counts = collections.Counter(data.split_of(d.path) for d in docs)
    assert counts["train"] / len(docs) > 0.8
    assert 0.02 < counts["validation"] / len(docs) < 0.09
    assert 0.02 < counts["test"] / len(docs) < 0.09
    assert [data.split_of(d.path) for d in docs[:50]] == [data.split_of(d.path) for d in docs[:50]]
    paths = {s: {d.path for d in data.documents(s)} for s in data.SPLITS}
    assert not paths["train"] & paths["test"] and not paths["train"] & paths["validation"]
    assert any(p.startswith("pydoc_data/topics/") for s in paths.values() for p in s)


def test_documents_skip_site_packages_and_undecodable(small_root):
    paths = [d.path for d in data.iter_documents(small_root)]
    assert "site-packages/skip.py" not in paths and "latin.py" not in paths
    assert sum(p.startswith("pkg/") for p in paths) == 60
    with pytest.raises(ValueError, match="split"):
        data.documents("dev", small_root)


def test_tokenizer_round_trip_and_stream(small_root, tmp_path, monkeypatch):
    monkeypatch.setenv("LLMOPT_CACHE", str(tmp_path / "cache"))
    tok = data.train_tokenizer(vocab_size=300, root=small_root)
    text = "def f1(x):\n    # café ünïcode\n\treturn x  \n"
    ids = tok(text).input_ids
    assert ids[0] == tok.eos_token_id  # every document starts with EOS
    assert tok.decode(ids, skip_special_tokens=True) == text
    docs = [d for d in data.documents("train", small_root)]
    stream = data.token_stream("train", tok, root=small_root)
    assert stream.dtype == torch.int32
    assert int((stream == tok.eos_token_id).sum()) == len(docs)
    again = data.token_stream("train", tok, root=small_root)  # from the cache
    assert torch.equal(stream, again)
    tok.pad_token = tok.eos_token
    tok(["a", "a much longer line"], padding=True)  # leaves padding on in the fast backend
    fresh = data.token_stream("train", tok, root=small_root, cache=False)
    assert torch.equal(stream, fresh)  # neither padded nor a different cache key
    with pytest.raises(ValueError, match="vocab_size"):
        data.train_tokenizer(vocab_size=10, root=small_root)


def test_random_batches_are_shifted_windows():
    stream = torch.arange(1000, dtype=torch.int32)
    x, y = next(data.random_batches(stream, 4, 16, torch.Generator().manual_seed(0)))
    assert x.shape == y.shape == (4, 16)
    assert torch.equal(y[:, :-1], x[:, 1:]) and torch.equal(y[:, 0], x[:, 0] + 1)
    with pytest.raises(ValueError, match="too short"):
        next(data.random_batches(stream[:10], 1, 16, torch.Generator()))
    for batch_size, seq_len, match in ((0, 16, "batch_size"), (4, 0, "seq_len"), (4, -3, "seq_len")):
        with pytest.raises(ValueError, match=match):
            next(data.random_batches(stream, batch_size, seq_len, torch.Generator()))


def test_calibration_batches_come_from_train(bundled):
    _, tok = bundled
    calib = data.calibration_batches(tok, n_samples=4, seq_len=32)
    assert calib.shape == (4, 32)
    train = data.token_stream("train", tok)
    # each window is a contiguous slice of the train stream
    n = train.numel() - 32
    for row in calib:
        hit = torch.ones(n, dtype=torch.bool)
        for k in range(4):  # candidate starts: where the first 4 tokens match
            hit &= train[k : k + n] == row[k]
        starts = hit.nonzero().flatten().tolist()
        assert any(torch.equal(train[s : s + 32].long(), row) for s in starts)
    with pytest.raises(ValueError, match="n_samples"):
        data.calibration_batches(tok, n_samples=0)
    for bad in (0, -5):
        with pytest.raises(ValueError, match="seq_len must be >= 1"):
            data.calibration_batches(tok, n_samples=2, seq_len=bad)
