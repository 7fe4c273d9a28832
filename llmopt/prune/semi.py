"""2:4 semi-structured sparsity on a GPU: zeros that the hardware skips.

Unstructured zeros in a dense tensor cost as much as any other number: the matmul still
multiplies them. NVIDIA's sparse tensor cores (compute capability 8.0 and up) instead take a
weight where every group of 4 consecutive inputs holds at most 2 nonzeros, stored as the 2
values plus 2-bit indices, and do half the multiplies. PyTorch exposes them through
`torch.sparse.to_sparse_semi_structured`: a weight converted with it runs through the same
`F.linear`, so an `nn.Linear` needs nothing else.

    prune(model, "sparsegpt", nm=(2, 4), calibration=calib)
    to_semi_structured(model.half().cuda())       # every decoder linear, on the GPU
    linear_speedup(4096, 11008, tokens=2048)      # dense vs 2:4 time of one linear layer

Everything here needs CUDA; on a CPU the functions raise a clear `ValueError` (after checking
the pattern and the shapes, which need no GPU). Which GPU matters as much as whether: the
speedup was built for Ampere (sm_8x), and PyTorch's kernels for Hopper lag behind (see
`_sparse_class`).
"""
from __future__ import annotations

import torch
from torch import nn

from .. import bench
from .masks import nm_mask
from .model import targets


def is_2to4(w: torch.Tensor) -> bool:
    """True when every group of 4 consecutive inputs of every row holds at most 2 nonzeros."""
    if w.dim() != 2 or w.shape[1] % 4:
        return False
    return bool(((w != 0).reshape(w.shape[0], -1, 4).sum(-1) <= 2).all())


BACKENDS = ("auto", "cusparselt", "cutlass")


def _sparse_class(backend: str):
    """PyTorch's two 2:4 implementations: NVIDIA's cuSPARSELt library and CUTLASS templates compiled
    into PyTorch. "auto" is PyTorch's own choice (cuSPARSELt unless `_FORCE_CUTLASS` is set). They
    differ by GPU generation: PyTorch builds its CUTLASS 2:4 kernels for compute capability 8.x
    only (pytorch/pytorch#132928), and on Hopper cuSPARSELt's gain over cuBLAS's dense kernels,
    which use Hopper's new matmul instructions, is small or negative (pytorch/pytorch#153825)."""
    import torch.sparse as ts

    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        backend = "cutlass" if ts.SparseSemiStructuredTensor._FORCE_CUTLASS else "cusparselt"
    return ts.SparseSemiStructuredTensorCUTLASS if backend == "cutlass" else ts.SparseSemiStructuredTensorCUSPARSELT


def _check_shape(name: str, w: torch.Tensor, cls) -> None:
    """The kernels' tile sizes: rows and columns multiples of a per-dtype minimum (for 16-bit
    floats 16 x 16 with cuSPARSELt, 32 x 64 with CUTLASS). PyTorch would raise a RuntimeError;
    this one names the layer."""
    rule = cls._DTYPE_SHAPE_CONSTRAINTS.get(w.dtype)
    if rule is None:
        raise ValueError(f"2:4 sparse kernels take float16 or bfloat16 weights, got {w.dtype} in {name}")
    rows, cols = w.shape
    if rows % rule.sparse_min_rows or cols % rule.sparse_min_cols:
        raise ValueError(f"{name}'s weight is {rows} x {cols}; the 2:4 kernels need rows a multiple of "
                         f"{rule.sparse_min_rows} and columns a multiple of {rule.sparse_min_cols}")


def _check_gpu(device: torch.device, dtype: torch.dtype) -> None:
    if device.type != "cuda":
        raise ValueError(f"2:4 sparse kernels need a CUDA GPU; the weights are on {device.type}")
    if torch.cuda.get_device_capability(device)[0] < 8:
        raise ValueError(f"2:4 sparse tensor cores need compute capability 8.0+, "
                         f"{torch.cuda.get_device_name(device)} has {torch.cuda.get_device_capability(device)}")
    if dtype not in (torch.float16, torch.bfloat16):
        raise ValueError(f"2:4 sparse kernels take float16 or bfloat16 weights, got {dtype}")


def _compress(w: torch.Tensor, cls, backend: str):
    """The weight in the library's compressed form; a library that cannot run on this GPU raises
    a RuntimeError that says which backend failed and on what."""
    try:
        return cls.from_dense(w)
    except RuntimeError as e:
        major, minor = torch.cuda.get_device_capability(w.device)
        gpu = f"{torch.cuda.get_device_name(w.device)} (sm_{major}{minor})"
        raise RuntimeError(f"2:4 backend {backend!r} failed on {gpu}: {e}") from e


@torch.no_grad()
def to_semi_structured(model: nn.Module, backend: str = "auto") -> nn.Module:
    """Store every decoder linear's 2:4-pruned weight in the compressed semi-structured
    format (in place; returns the model). Every layer is checked first (2:4 pattern, float16 or
    bfloat16, the kernels' shape multiples), then the device; nothing changes if one fails.
    `backend`: "auto" (PyTorch's choice), "cusparselt" or "cutlass"."""
    cls, layers = _sparse_class(backend), targets(model)
    for name, lin in layers.items():
        if not is_2to4(lin.weight):
            raise ValueError(f"{name} is not 2:4 sparse: prune it with nm=(2, 4) first")
        _check_shape(name, lin.weight, cls)
    for lin in layers.values():
        _check_gpu(lin.weight.device, lin.weight.dtype)
    for lin in layers.values():
        lin.weight = nn.Parameter(_compress(lin.weight.detach(), cls, backend), requires_grad=False)
    return model


@torch.no_grad()
def linear_speedup(out_features: int, in_features: int, tokens: int, dtype=torch.float16, device="cuda",
                   repeats: int = 20, backend: str = "auto") -> dict:
    """Time one linear layer, dense against 2:4 sparse (the same pruned weight), on `tokens`
    input rows; {"dense_ms", "sparse_ms", "speedup", "max_abs_diff", "backend"}. Small layers and
    few tokens gain little or nothing: the kernel's fixed costs and the metadata reads stay."""
    cls = _sparse_class(backend)
    device = torch.device(device)
    _check_gpu(device, dtype)
    g = torch.Generator(device=device).manual_seed(0)
    w = torch.randn(out_features, in_features, generator=g, device=device, dtype=dtype)
    w = w * nm_mask(w.abs().float(), 2, 4).to(dtype)
    _check_shape(f"a {out_features} x {in_features} linear", w, cls)
    x = torch.randn(tokens, in_features, generator=g, device=device, dtype=dtype)
    sparse_w = _compress(w, cls, backend)
    dense = bench.time_fn(lambda: nn.functional.linear(x, w), device=device, warmup=5, repeats=repeats)
    sparse = bench.time_fn(lambda: nn.functional.linear(x, sparse_w), device=device, warmup=5, repeats=repeats)
    diff = (nn.functional.linear(x, w) - nn.functional.linear(x, sparse_w)).abs().max().item()
    return {"dense_ms": dense.median * 1e3, "sparse_ms": sparse.median * 1e3,
            "speedup": dense.median / sparse.median, "max_abs_diff": diff,
            "backend": "cutlass" if "CUTLASS" in cls.__name__ else "cusparselt"}
