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

Everything here needs CUDA; on a CPU the functions raise a clear `ValueError`.
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


def _check_gpu(device: torch.device, dtype: torch.dtype) -> None:
    if device.type != "cuda":
        raise ValueError(f"2:4 sparse kernels need a CUDA GPU; the weights are on {device.type}")
    if torch.cuda.get_device_capability(device)[0] < 8:
        raise ValueError(f"2:4 sparse tensor cores need compute capability 8.0+, "
                         f"{torch.cuda.get_device_name(device)} has {torch.cuda.get_device_capability(device)}")
    if dtype not in (torch.float16, torch.bfloat16):
        raise ValueError(f"2:4 sparse kernels take float16 or bfloat16 weights, got {dtype}")


@torch.no_grad()
def to_semi_structured(model: nn.Module) -> nn.Module:
    """Store every decoder linear's 2:4-pruned weight in the compressed semi-structured
    format (in place; returns the model). Raises if a weight is not 2:4 or not on a GPU."""
    from torch.sparse import to_sparse_semi_structured

    for name, lin in targets(model).items():
        _check_gpu(lin.weight.device, lin.weight.dtype)
        if not is_2to4(lin.weight):
            raise ValueError(f"{name} is not 2:4 sparse: prune it with nm=(2, 4) first")
        lin.weight = nn.Parameter(to_sparse_semi_structured(lin.weight.detach()), requires_grad=False)
    return model


@torch.no_grad()
def linear_speedup(out_features: int, in_features: int, tokens: int, dtype=torch.float16, device="cuda",
                   repeats: int = 20) -> dict:
    """Time one linear layer, dense against 2:4 sparse (the same pruned weight), on `tokens`
    input rows; {"dense_ms", "sparse_ms", "speedup", "max_abs_diff"}. Small layers and few
    tokens gain little or nothing: the kernel's fixed costs and the metadata reads stay."""
    from torch.sparse import to_sparse_semi_structured

    device = torch.device(device)
    _check_gpu(device, dtype)
    g = torch.Generator(device=device).manual_seed(0)
    w = torch.randn(out_features, in_features, generator=g, device=device, dtype=dtype)
    w = w * nm_mask(w.abs().float(), 2, 4).to(dtype)
    x = torch.randn(tokens, in_features, generator=g, device=device, dtype=dtype)
    sparse_w = to_sparse_semi_structured(w)
    dense = bench.time_fn(lambda: nn.functional.linear(x, w), device=device, warmup=5, repeats=repeats)
    sparse = bench.time_fn(lambda: nn.functional.linear(x, sparse_w), device=device, warmup=5, repeats=repeats)
    diff = (nn.functional.linear(x, w) - nn.functional.linear(x, sparse_w)).abs().max().item()
    return {"dense_ms": dense.median * 1e3, "sparse_ms": sparse.median * 1e3,
            "speedup": dense.median / sparse.median, "max_abs_diff": diff}
