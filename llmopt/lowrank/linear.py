"""`LowRankLinear`: a drop-in for `nn.Linear` that computes x -> x V^T U^T with two thin layers.

Two plain `nn.Linear`s (in -> rank without bias, rank -> out with the original bias), so every
PyTorch backend runs them with its ordinary matmul, and the later lessons' tools (quantization
of each factor, say) see linears they already know.
"""
from __future__ import annotations

import torch
from torch import nn

from .factor import check_rank, factor


class LowRankLinear(nn.Module):
    """y = u(v(x)) with v: in_features -> rank (no bias) and u: rank -> out_features (+ bias).

    The dense weight it stands for is u.weight @ v.weight (`dense_weight()`)."""

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = True,
                 device=None, dtype=None):
        super().__init__()
        check_rank(rank, out_features, in_features)
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.v = nn.Linear(in_features, rank, bias=False, device=device, dtype=dtype)
        self.u = nn.Linear(rank, out_features, bias=bias, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.u(self.v(x))

    @classmethod
    def from_factors(cls, u: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None = None) -> LowRankLinear:
        """Wrap u (out x r) and v (r x in) as they are (u @ v approximates the dense weight)."""
        if u.dim() != 2 or v.dim() != 2 or u.shape[1] != v.shape[0]:
            raise ValueError(f"need u (out, r) and v (r, in) with the same r, "
                             f"got {tuple(u.shape)} and {tuple(v.shape)}")
        layer = cls(v.shape[1], u.shape[0], u.shape[1], bias is not None, device=u.device, dtype=u.dtype)
        with torch.no_grad():
            layer.u.weight.copy_(u)
            layer.v.weight.copy_(v)
            if bias is not None:
                layer.u.bias.copy_(bias)
        return layer

    @classmethod
    def from_linear(cls, linear: nn.Linear, rank: int | None = None, *, energy: float | None = None,
                    whiten: torch.Tensor | None = None) -> LowRankLinear:
        """The truncated SVD of `linear`'s weight (see `factor`): give `rank` or `energy`, and
        `whiten` (from `cholesky_whitening` or `asvd_scale`) for the activation-aware versions.
        The bias is kept as it is."""
        if not isinstance(linear, nn.Linear):
            raise ValueError(f"from_linear needs an nn.Linear, got {type(linear).__name__}")
        u, v = factor(linear.weight, rank, energy=energy, whiten=whiten)
        return cls.from_factors(u, v, None if linear.bias is None else linear.bias.detach())

    def dense_weight(self) -> torch.Tensor:
        """U V: the (out, in) weight this layer computes with."""
        return self.u.weight @ self.v.weight

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, "
                f"bias={self.u.bias is not None}")
