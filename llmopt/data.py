"""The offline corpus: the running Python's own standard library.

Every machine that runs this course has it, so nothing is downloaded and nothing is
copied into the repo. Files are split by a hash of their path (stable across machines
and runs), the tokenizer is a byte-level BPE trained on the train split, and token
streams are cached under ``~/.cache/llmopt`` (``LLMOPT_CACHE`` overrides).
"""
from __future__ import annotations

import copy
import hashlib
import os
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import torch

SPLITS = ("train", "validation", "test")
EOS = "<|endoftext|>"  # also used as BOS and PAD, as in GPT-2
# hash bucket in [0, 100): [0, 90) train, [90, 95) validation, [95, 100) test
_BOUNDS = {"train": (0, 90), "validation": (90, 95), "test": (95, 100)}


@dataclass(frozen=True)
class Document:
    path: str  # relative to the stdlib root, '/'-separated; the split key
    text: str


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def split_of(path: str) -> str:
    """Deterministic split of a document by the SHA-1 of its relative path."""
    bucket = int(hashlib.sha1(path.encode()).hexdigest(), 16) % 100
    return next(s for s, (lo, hi) in _BOUNDS.items() if lo <= bucket < hi)


def iter_documents(root: Path | None = None):
    """Yield every stdlib `.py` file and every pydoc topic, in a stable order."""
    root = Path(root) if root is not None else stdlib_root()
    for f in sorted(root.rglob("*.py")):
        rel = f.relative_to(root).as_posix()
        if "site-packages" in rel or "dist-packages" in rel:
            continue
        try:
            text = f.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue  # a few test files are deliberately not UTF-8
        if text.strip():
            yield Document(rel, text)
    try:
        from pydoc_data.topics import topics
    except ImportError:  # some distributions strip pydoc_data
        return
    for name in sorted(topics):
        yield Document(f"pydoc_data/topics/{name}", topics[name])


def documents(split: str, root: Path | None = None) -> list[Document]:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    return [d for d in iter_documents(root) if split_of(d.path) == split]


def corpus_id() -> str:
    """Names the corpus: the Python version whose stdlib it is (numbers depend on it)."""
    return f"python-{sys.version_info.major}.{sys.version_info.minor}.{sys.version_info.micro}-stdlib"


# --------------------------------------------------------------------------- tokenizer

def train_tokenizer(vocab_size: int = 4096, root: Path | None = None):
    """Train a byte-level BPE on the train split; returns a `PreTrainedTokenizerFast`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    if not 256 < vocab_size <= 65535:
        raise ValueError(f"vocab_size must be in (256, 65535], got {vocab_size}")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[EOS], min_frequency=2,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator((d.text for d in documents("train", root)), trainer=trainer)
    # Every training document starts with EOS, so prompts do too (the BOS role).
    eos_id = tok.token_to_id(EOS)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{EOS} $A", pair=f"{EOS} $A {EOS} $B", special_tokens=[(EOS, eos_id)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=EOS, eos_token=EOS, pad_token=EOS,
        model_max_length=1024, clean_up_tokenization_spaces=False)


def _cache_dir() -> Path:
    d = Path(os.environ.get("LLMOPT_CACHE", Path.home() / ".cache" / "llmopt"))
    d.mkdir(parents=True, exist_ok=True)
    return d


def token_stream(split: str, tokenizer, root: Path | None = None, cache: bool = True) -> torch.Tensor:
    """The split as one 1-D int tensor: EOS doc EOS doc ... (documents in path order).

    Cached per (corpus, split, tokenizer vocabulary) so later calls are instant.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    # A copy of the fast backend without padding or truncation: a padded call on the tokenizer
    # (tok(..., padding=True)) leaves padding switched on in its backend, which would pad every
    # document to the longest; and the cache key must not change with those settings.
    backend = copy.deepcopy(tokenizer.backend_tokenizer)
    backend.no_padding()
    backend.no_truncation()
    vocab_key = hashlib.sha1(backend.to_str().encode()).hexdigest()[:12]
    root_key = hashlib.sha1(str(Path(root) if root else stdlib_root()).encode()).hexdigest()[:8]
    path = _cache_dir() / f"{corpus_id()}-{root_key}-{split}-{vocab_key}.pt"
    if cache and path.exists():
        return torch.load(path)
    docs = documents(split, root)
    if not docs:
        raise ValueError(f"the {split} split of {root or stdlib_root()} is empty")
    # The fast backend directly: no max-length warnings, and its post-processor puts the
    # EOS in front of each document.
    encs = backend.encode_batch([d.text for d in docs])
    flat = torch.tensor([t for e in encs for t in e.ids], dtype=torch.int32)
    if cache:
        tmp = path.with_suffix(f".{os.getpid()}.tmp")  # one per process: parallel workers may both write
        torch.save(flat, tmp)
        tmp.replace(path)  # atomic: a parallel worker never reads half a file
    return flat


def check_token_ids(ids: torch.Tensor, name: str, model=None) -> torch.Tensor:
    """`ids` as a LongTensor, after checking that they are token ids: an integer dtype (a float
    tensor would be truncated silently) and, given the model, each in [0, its vocabulary size)
    (an id past the embedding table fails deep inside torch)."""
    if ids.dtype == torch.bool or ids.is_floating_point() or ids.is_complex():
        raise ValueError(f"{name} must hold integer token ids, got dtype {ids.dtype}")
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    vocab = getattr(emb, "num_embeddings", None) or getattr(getattr(model, "config", None), "vocab_size", None)
    if vocab is not None and ids.numel():
        lo, hi = ids.min().item(), ids.max().item()
        if lo < 0 or hi >= vocab:
            raise ValueError(f"{name} must hold token ids in [0, {vocab}) (the model's vocabulary), "
                             f"got ids from {lo} to {hi}")
    return ids.long()


def random_batches(stream: torch.Tensor, batch_size: int, seq_len: int, generator: torch.Generator):
    """Endless (input, target) batches of random windows from a token stream."""
    for name, v in (("batch_size", batch_size), ("seq_len", seq_len)):
        if v < 1:
            raise ValueError(f"{name} must be >= 1, got {v}")
    if stream.numel() <= seq_len + 1:
        raise ValueError(f"stream of {stream.numel()} tokens is too short for seq_len={seq_len}")
    while True:
        starts = torch.randint(0, stream.numel() - seq_len - 1, (batch_size,), generator=generator)
        window = torch.stack([stream[s : s + seq_len + 1] for s in starts.tolist()]).long()
        yield window[:, :-1], window[:, 1:]


def calibration_batches(tokenizer, n_samples: int = 128, seq_len: int = 256, seed: int = 0) -> torch.Tensor:
    """`n_samples` random windows from the *train* split, for PTQ calibration: (n, seq_len)."""
    for name, v in (("n_samples", n_samples), ("seq_len", seq_len)):
        if v < 1:
            raise ValueError(f"{name} must be >= 1, got {v}")
    g = torch.Generator().manual_seed(seed)
    x, _ = next(random_batches(token_stream("train", tokenizer), n_samples, seq_len, g))
    return x
