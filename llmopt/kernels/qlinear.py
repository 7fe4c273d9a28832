"""`KernelQuantLinear`: a `QuantLinear` whose forward runs the W4A16 / W8A16 kernels.

Same buffers, same state-dict keys, same outputs (within the dtype's rounding) as `QuantLinear`: only
the forward changes, from "dequantize the whole weight, then matmul" to kernels that read the packed
codes directly, so a quantized model becomes faster at decode and not only smaller (gpt-fast's
`WeightOnlyInt4Linear` is the same module swap).
"""
from __future__ import annotations

import torch
from torch import nn

from ..quant.linear import QuantConfig, QuantLinear
from .common import check_backend
from .w4a16 import w4a16_linear
from .w8a16 import w8a16_linear

KERNEL_BITS = (4, 8)


def has_kernel(module: nn.Module) -> bool:
    """True for a `QuantLinear` whose format a kernel here reads (4 or 8 bits)."""
    return isinstance(module, QuantLinear) and module.cfg.bits in KERNEL_BITS


class KernelQuantLinear(QuantLinear):
    """y = x @ dequant(W).T + b computed by `w4a16_linear` / `w8a16_linear` with `backend`
    ("auto": the kernels on a GPU, the reference on a CPU; "triton"; "torch")."""

    def __init__(self, in_features: int, out_features: int, cfg: QuantConfig, bias: bool = False, device=None,
                 backend: str = "auto"):
        if cfg.bits not in KERNEL_BITS:
            raise ValueError(f"KernelQuantLinear has kernels for bits in {KERNEL_BITS}, got bits={cfg.bits!r}")
        super().__init__(in_features, out_features, cfg, bias=bias, device=device)
        self.backend = check_backend(backend)

    @classmethod
    def from_quant_linear(cls, q: QuantLinear, backend: str = "auto") -> KernelQuantLinear:
        """Wrap `q`'s codes, scales, zeros and bias as they are: the same tensors, no copy and no
        re-quantization (the swapped-out module usually goes away, so no memory is doubled)."""
        if not isinstance(q, QuantLinear):
            raise ValueError(f"q must be a QuantLinear, got {type(q).__name__}")
        m = cls(q.in_features, q.out_features, q.cfg, bias=False, device="meta", backend=backend)
        m.qweight, m.scales, m.zeros = q.qweight, q.scales, q.zeros
        if q.bias is not None:  # a Parameter of its own over the same data: m.to(...) must not move q's
            m.bias = nn.Parameter(q.bias.data, requires_grad=q.bias.requires_grad)
        return m

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fn = w4a16_linear if self.cfg.bits == 4 else w8a16_linear
        return fn(x, self.qweight, self.scales, self.zeros, self.cfg.group_size, self.bias, backend=self.backend)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, backend={self.backend!r}"
