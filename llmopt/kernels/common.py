"""What every kernel file shares: where Triton runs, which path a wrapper takes, block configs.

- On a machine without CUDA, Triton kernels run in its interpreter (TRITON_INTERPRET=1, set
  here before `triton` is imported): numpy under the hood, exact but slow, so tests use small
  sizes. The interpreter has no bf16 arithmetic: the tests use float32 and float16.
- Each public op (`rmsnorm`, `swiglu`, ...) takes `backend`: "triton" runs the kernel (a CUDA
  tensor, or any CPU tensor under the interpreter), "torch" runs the PyTorch reference, and
  "auto" (the default) takes the kernel on a GPU and the reference elsewhere, so a fused model
  on a laptop stays as fast as PyTorch can make it.
- Kernel files take `triton` and `tl` from here (`from .common import tl, triton`), so the package
  imports without Triton installed (macOS): the kernels are then never launched.
- `pick_config` is a tiny autotuner: on a GPU it times each candidate block config once per
  shape and remembers the fastest; on CPU it takes the first (the interpreter's speed says
  nothing about a GPU's).
"""
from __future__ import annotations

import os
import sys
import warnings
from functools import cache

import torch

# The interpreter is chosen when `triton` is first imported (triton.language binds tl.sum, tl.zeros,
# ... then): a triton imported earlier without the flag cannot run kernels on CPU tensors.
# (llmopt/__init__.py sets the flag first thing: it noted whether triton was there already.)
from .. import _TRITON_IMPORTED_FIRST

_IMPORTED_TOO_EARLY = _TRITON_IMPORTED_FIRST or ("triton" in sys.modules and "TRITON_INTERPRET" not in os.environ)
# (Said when a kernel is asked for on a CPU tensor, not at import: transformers or bitsandbytes may import
# triton first in a process that only ever runs the references.)
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

try:
    import triton
    import triton.language as tl
    HAS_TRITON = True
except ImportError:  # e.g. macOS: the kernels are defined but never launched; every op uses its reference
    from types import SimpleNamespace

    HAS_TRITON = False
    triton = SimpleNamespace(jit=lambda fn: fn, cdiv=lambda a, b: -(-a // b))
    tl = SimpleNamespace(constexpr=int)

BACKENDS = ("auto", "triton", "torch")


def interpreter_clash(triton_version: str, numpy_version: str) -> str | None:
    """Why the interpreter of this Triton cannot run with this numpy, or None. Triton < 3.7's interpreter
    turns one-element arrays into Python ints, which numpy >= 2.4 refuses: every kernel with a loop over
    a runtime bound then fails with "only 0-dimensional arrays can be converted to Python scalars"."""
    def major_minor(v):
        return tuple(int(p) for p in v.split("+")[0].split(".")[:2])
    if major_minor(triton_version) < (3, 7) and major_minor(numpy_version) >= (2, 4):
        return (f"Triton {triton_version}'s interpreter fails with numpy {numpy_version} (kernels on CPU tensors "
                f"raise 'only 0-dimensional arrays can be converted'): pip install 'numpy<2.4' or 'triton>=3.7'")
    return None


if HAS_TRITON and os.environ.get("TRITON_INTERPRET") == "1":
    import numpy as _np
    if (_clash := interpreter_clash(triton.__version__, _np.__version__)) is not None:
        warnings.warn(_clash, stacklevel=2)

# Programmatic dependent launch (Hopper and later, Triton >= 3.4): a kernel launched with it may start
# while the kernel before it drains; it calls `gdc_wait` before touching what that kernel wrote (its
# weights, which nothing writes, it may load before), and `gdc_launch_dependents` to let the next one
# start early in turn. In a decode step of a 1B model, a chain of ~130 small kernels, it hides part of
# each launch's fixed cost. Off unless asked for (LLMOPT_PDL=1, or `set_pdl(True)` before the kernels
# are launched or a CUDA graph records them): it has not been measured on a GPU yet.
_PDL = os.environ.get("LLMOPT_PDL", "0") == "1"
HAS_PDL = HAS_TRITON and hasattr(getattr(getattr(tl, "extra", None), "cuda", None), "gdc_wait")


def set_pdl(on: bool) -> None:
    """Launch the decode kernels that support it with programmatic dependent launch (see above)."""
    global _PDL
    _PDL = bool(on)


def pdl_enabled() -> bool:
    """Whether `set_pdl` (or LLMOPT_PDL=1) asked for programmatic dependent launch."""
    return _PDL


def pdl(x: torch.Tensor) -> bool:
    """True when a kernel working on `x` should be launched with programmatic dependent launch."""
    return _PDL and HAS_PDL and x.is_cuda and _major(x.device.index or 0) >= 9


@cache
def _major(index: int) -> int:
    return torch.cuda.get_device_capability(index)[0]


def compiler_opaque(fn):
    """`fn` run as it is inside `torch.compile`d code (a graph break around it), never traced: for the
    functions that launch Triton kernels. Tracing into them would trace `pick_config`'s timing runs
    and, on a CPU, the interpreter's numpy; the compiled step calls them between its own kernels
    instead (and a CUDA graph records them all the same). Costs well under a microsecond a call."""
    return torch.compiler.disable(fn)


def pdl_launch(on: bool) -> dict:
    """The launch option that goes with a kernel's PDL constexpr."""
    return {"launch_pdl": True} if on else {}


def interpreted() -> bool:
    """True when Triton kernels run in the interpreter (on CPU tensors)."""
    return os.environ.get("TRITON_INTERPRET") == "1" and not _IMPORTED_TOO_EARLY


def check_backend(backend: str) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    return backend


def use_triton(x: torch.Tensor, backend: str = "auto") -> bool:
    """True when the op should launch its Triton kernel for the tensor `x`."""
    check_backend(backend)
    if backend == "torch":
        return False
    runnable = HAS_TRITON and (x.is_cuda or (x.device.type == "cpu" and interpreted()))
    if backend == "triton":
        if not runnable:
            why = "Triton is not installed" if not HAS_TRITON else (
                "triton was imported before llmopt.kernels without TRITON_INTERPRET=1, so its interpreter is off "
                "in this process: restart and import llmopt.kernels first, or set TRITON_INTERPRET=1"
                if _IMPORTED_TOO_EARLY and x.device.type == "cpu" else
                f"a {x.device.type} tensor needs CUDA, or TRITON_INTERPRET=1 set before llmopt.kernels is imported")
            raise ValueError(f"backend='triton' cannot run here: {why}")
        return True
    return runnable and x.is_cuda  # auto: kernels on a GPU, the reference on a CPU


def precision(dtype: torch.dtype) -> str:
    """`tl.dot`'s input precision: float32 stays float32 ("tf32" would round the inputs to a
    10-bit mantissa, too coarse to compare with the reference); fp16/bf16 go to the tensor cores."""
    return "ieee" if dtype == torch.float32 else "tf32"


def next_power_of_2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


_best: dict = {}


def pick_config(key, candidates: list[dict], launch, cold: bool = False) -> dict:
    """The fastest of `candidates` (dicts of block sizes) for `key`, timed once on a GPU.

    `launch(**config)` runs the kernel once with that config. Results are cached per key (the
    shape and dtype), as `triton.autotune` does; on CPU the first candidate is returned untimed.
    Timed as GPU time in a CUDA graph (`bench.time_graph`): timed call by call, a small kernel's
    launch overhead would hide the differences between the candidates. `cold`: each call comes after
    a read of twice the L2's size (the same for every candidate, so it does not change their order),
    so a kernel that streams weights is timed reading them from memory, as it does in a model's
    decode step (every layer's weights once per token), not from the L2 its previous call filled: a
    tile that keeps few bytes in flight hides that latency poorly and should lose."""
    if key in _best:
        return _best[key]
    if not torch.cuda.is_available() or len(candidates) == 1:
        return candidates[0]
    from ..bench import time_graph

    scrub = _l2_scrub() if cold else None
    times = []
    for c in candidates:
        fn = (lambda c=c: (scrub(), launch(**c))) if cold else (lambda c=c: launch(**c))
        try:
            times.append(time_graph(fn, calls=10, warmup=2, repeats=5).median)
        except Exception as e:  # noqa: BLE001 - e.g. a tile too big for this GPU's registers or shared memory
            warnings.warn(f"{key}: config {c} failed on this GPU and is skipped: {type(e).__name__}: {e}",
                          stacklevel=2)
            times.append(float("inf"))
    if times and min(times) == float("inf"):
        raise RuntimeError(f"{key}: every candidate config failed on this GPU")
    _best[key] = candidates[min(range(len(candidates)), key=times.__getitem__)]
    return _best[key]


_scrub_buffers: dict = {}


def _l2_scrub():
    """A function that reads a buffer twice the current GPU's L2 (what was cached is evicted)."""
    dev = torch.cuda.current_device()
    if dev not in _scrub_buffers:
        l2 = getattr(torch.cuda.get_device_properties(dev), "L2_cache_size", 0) or 64 << 20
        _scrub_buffers[dev] = torch.ones(2 * l2 // 4, dtype=torch.float32, device=f"cuda:{dev}")
    buf = _scrub_buffers[dev]
    return lambda: torch.amax(buf)


def output_buffer(out, like: torch.Tensor, shape=None) -> torch.Tensor:
    """`out` checked to be a contiguous tensor of `like`'s dtype and `shape` (default: like's), or a new one."""
    shape = tuple(like.shape if shape is None else shape)
    if out is None:
        return torch.empty(shape, dtype=like.dtype, device=like.device)
    if tuple(out.shape) != shape or out.dtype != like.dtype or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous {like.dtype} tensor of shape {shape}, "
                         f"got {out.dtype} {tuple(out.shape)}")
    return out


def check_block(block: int) -> int:
    if block != next_power_of_2(block):
        raise ValueError(f"block must be a power of 2, got {block}")
    return block

