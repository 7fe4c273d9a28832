import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach for the hub
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
if not torch.cuda.is_available():
    # Triton's interpreter must be chosen before `triton` is first imported (triton.language binds
    # tl.sum, tl.zeros, ... to the interpreter's versions at import): set it before any test imports it
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Under pytest-xdist (`make test`: one worker per core) each worker takes its share of the cores.
# Left alone, every worker's torch (and every notebook kernel or CLI it starts) would spin up one
# thread per core, and two workers on two cores would fight over them.
_workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _workers > 1:
    _cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    _threads = max(1, _cores // _workers)
    torch.set_num_threads(_threads)
    os.environ["OMP_NUM_THREADS"] = str(_threads)  # the processes the tests start inherit it


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def bundled():
    """The bundled model and tokenizer (fp32 on CPU), loaded once."""
    import llmopt

    return llmopt.load("tinypy", device="cpu")


@pytest.fixture(scope="module")
def model_tok():
    """The bundled model in float32 on CPU, in eval mode, and its tokenizer: a fresh copy per test
    module (the serving tests)."""
    import llmopt

    model, tok = llmopt.load("tinypy", device="cpu", dtype=torch.float32)
    return model.eval(), tok


@pytest.fixture(scope="session")
def tiny():
    """A random 2-layer Llama with the bundled tokenizer: milliseconds to build."""
    import llmopt

    return llmopt.load("tiny-random", device="cpu")


@pytest.fixture
def small_root(tmp_path):
    """A fake 'standard library' of a few files, for fast corpus and tokenizer tests."""
    root = tmp_path / "lib"
    (root / "pkg").mkdir(parents=True)
    body = "def f{i}(x):\n    # café ünïcode\n    return x * {i} + len('abc')\n\n"
    for i in range(60):
        (root / "pkg" / f"mod{i}.py").write_text(body.format(i=i) * 20)
    (root / "site-packages").mkdir()
    (root / "site-packages" / "skip.py").write_text("print('not stdlib')\n")
    (root / "latin.py").write_bytes("# caf\xe9\n".encode("latin-1"))
    return root
