"""Kernel-backed quantized modules: what `fuse` swaps in for lessons 02 and 07's quantized ones.

- `KernelQuantLinear`: a `QuantLinear` whose forward runs the W4A16 / W8A16 kernels. Same buffers,
  same state-dict keys, same outputs (within the dtype's rounding) as `QuantLinear`: only the forward
  changes, from "dequantize the whole weight, then matmul" to kernels that read the packed codes
  directly, so a quantized model becomes faster at decode and not only smaller (gpt-fast's
  `WeightOnlyInt4Linear` is the same module swap).
- `KernelQuantExperts`: a `QuantExperts` (4 or 8 bits) whose E experts' codes are stacked into one
  tensor per projection, so lesson 07's grouped MoE kernels (`moe.triton_moe`) run every hit expert
  in two launches, dequantizing in registers, instead of a loop over the hit experts with two GEMV
  calls each. It reads nothing back to the host, so a decode step of an MoE model can be recorded as
  a CUDA graph (the serving engine does, `graph_safe`). Its buffers are the experts' stacked, so its
  state-dict keys differ from QuantExperts' (save before fusing, as with `merge=True`).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..moe.dispatch import DispatchChoice, hit_experts, sorted_dispatch
from ..quant.linear import QuantConfig, QuantLinear
from .common import HAS_TRITON, check_backend, use_triton
from .cpu import cpu_format_problem, int4_cpu_linear, int8_cpu_linear, kernel_rows, pack_int4_for_cpu
from .w4a16 import w4a16_linear
from .w8a16 import w8a16_linear

KERNEL_BITS = (4, 8)


def has_kernel(module: nn.Module) -> bool:
    """True for a `QuantLinear` whose format a kernel here reads (4 or 8 bits)."""
    return isinstance(module, QuantLinear) and module.cfg.bits in KERNEL_BITS


class KernelQuantLinear(QuantLinear):
    """y = x @ dequant(W).T + b computed by `w4a16_linear` / `w8a16_linear` with `backend`
    ("auto": the Triton kernels on a GPU; on a CPU PyTorch's weight-only kernels where they read the
    format and x has few rows (decode, `kernels.cpu`), else the reference; "triton"; "torch": the reference)."""

    def __init__(self, in_features: int, out_features: int, cfg: QuantConfig, bias: bool = False, device=None,
                 backend: str = "auto"):
        if cfg.bits not in KERNEL_BITS:
            raise ValueError(f"KernelQuantLinear has kernels for bits in {KERNEL_BITS}, got bits={cfg.bits!r}")
        super().__init__(in_features, out_features, cfg, bias=bias, device=device)
        self.backend = check_backend(backend)
        self.cpu_kernel = False
        self.register_buffer("cpu_codes", None, persistent=False)
        self.register_buffer("cpu_scales_zeros", None, persistent=False)
        self.register_load_state_dict_post_hook(_repack_after_load)

    @torch.no_grad()
    def prepare_cpu(self) -> str | None:
        """Let `forward` use PyTorch's CPU kernels: on a CPU, where they read this format, and W4's
        codes copied once into their nibble order (not saved with the model). Returns why not, or None.
        `fuse` calls it; call it again after changing qweight."""
        self.cpu_kernel, self.cpu_codes, self.cpu_scales_zeros = False, None, None
        if self.qweight.device.type != "cpu":
            return f"the codes are on {self.qweight.device}, not a CPU"
        why = cpu_format_problem(self.cfg.bits, self.zeros is None, self.cfg.group_size, self.out_features,
                                 self.in_features)
        if why is None:
            if self.cfg.bits == 4:
                self.cpu_codes, self.cpu_scales_zeros = pack_int4_for_cpu(self.qweight, self.scales, self.zeros,
                                                                          self.cfg.group_size)
            self.cpu_kernel = True
        return why

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
        m.prepare_cpu()
        return m

    def unread_bytes(self) -> int:
        """Bytes held but not read by a forward (`bench.weight_bytes`): W4's saved codes, scales and zeros
        where the CPU kernel reads its own copy, else that copy."""
        if self.cpu_codes is None:
            return 0
        if self.cpu_kernel and self.backend == "auto" and self.qweight.device.type == "cpu":
            held = (self.qweight, self.scales, self.zeros)
        else:
            held = (self.cpu_codes, self.cpu_scales_zeros)
        return sum(t.numel() * t.element_size() for t in held if t is not None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.cpu_kernel and self.backend == "auto" and x.device.type == "cpu" and kernel_rows(x):
            if self.cfg.bits == 8:
                return int8_cpu_linear(x, self.qweight, self.scales, self.bias)
            return int4_cpu_linear(x, self.cpu_codes, self.cpu_scales_zeros, self.cfg.group_size, self.bias)
        fn = w4a16_linear if self.cfg.bits == 4 else w8a16_linear
        return fn(x, self.qweight, self.scales, self.zeros, self.cfg.group_size, self.bias, backend=self.backend)

    def extra_repr(self) -> str:
        cpu = ", cpu kernel" if self.cpu_kernel else ""
        return f"{super().extra_repr()}, backend={self.backend!r}{cpu}"


def _repack_after_load(module: KernelQuantLinear, incompatible_keys) -> None:
    """New codes loaded into a layer that holds the CPU kernel's copy of them: copy them again."""
    if module.cpu_codes is not None:
        module.prepare_cpu()


class StackedQuantLinear(nn.Module):
    """E quantized (out, in) matrices of one config in one set of buffers, `QuantLinear`'s stacked:
    qweight (E, out, in * bits / 8), scales (E, out, n_groups), zeros (E, out, n_groups) or None."""

    def __init__(self, num: int, in_features: int, out_features: int, cfg: QuantConfig, device=None):
        super().__init__()
        self.num, self.in_features, self.out_features, self.cfg = num, in_features, out_features, cfg
        one = QuantLinear(in_features, out_features, cfg, device="meta")   # the per-matrix shapes and dtypes
        for name, b in one.named_buffers():
            self.register_buffer(name, torch.zeros(num, *b.shape, dtype=b.dtype, device=device))
        if one.zeros is None:
            self.zeros = None

    @classmethod
    @torch.no_grad()
    def stack(cls, linears) -> StackedQuantLinear:
        first = linears[0]
        m = cls(len(linears), first.in_features, first.out_features, first.cfg, device="meta")
        m.qweight = torch.stack([q.qweight for q in linears])
        m.scales = torch.stack([q.scales for q in linears])
        m.zeros = None if first.zeros is None else torch.stack([q.zeros for q in linears])
        return m

    def __len__(self) -> int:
        return self.num

    def packed(self):
        """The buffers as the MoE kernels' `PackedExperts` (no copy)."""
        from ..moe.triton_moe import PackedExperts

        return PackedExperts(self.qweight, self.scales, self.zeros, self.cfg.bits, self.cfg.group_size)

    def extra_repr(self) -> str:
        return f"{self.num} x {QuantLinear.extra_repr(self)}"


def can_stack_experts(module: nn.Module) -> bool:
    """True for a `QuantExperts` whose matrices are all plain 4- or 8-bit `QuantLinear`s without bias
    (round-to-nearest, GPTQ or AWQ codes): `KernelQuantExperts` can hold them."""
    from ..quant.experts import QuantExperts

    return (isinstance(module, QuantExperts)
            and all(type(m) is QuantLinear and m.bias is None and m.cfg.bits in KERNEL_BITS
                    for m in [*module.gate_up_proj, *module.down_proj]))


class KernelQuantExperts(DispatchChoice, nn.Module):
    """Quantized SwiGLU experts run by the grouped MoE kernels: called like `Experts`, (x, experts,
    weights) -> (T, H). `backend` "auto": the kernels on a GPU (SiLU experts), the reference elsewhere,
    which dequantizes the hit experts and runs the `dispatch` path ("sorted" for "triton")."""
    quantized = True

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int, cfg: QuantConfig,
                 backend: str = "auto", dispatch: str = "sorted", device=None):
        super().__init__()
        self.num_experts, self.hidden_size, self.intermediate_size, self.cfg = (num_experts, hidden_size,
                                                                                 intermediate_size, cfg)
        self.gate_up_proj = StackedQuantLinear(num_experts, hidden_size, 2 * intermediate_size, cfg, device)
        self.down_proj = StackedQuantLinear(num_experts, intermediate_size, hidden_size, cfg, device)
        self.act = F.silu
        self.backend = check_backend(backend)
        self.dispatch = dispatch

    @classmethod
    def from_quant_experts(cls, q: nn.Module, backend: str = "auto") -> KernelQuantExperts:
        """The codes of `q` (see `can_stack_experts`) stacked, the same values (a copy: `q` can go)."""
        if not can_stack_experts(q):
            raise ValueError(f"{type(q).__name__}: KernelQuantExperts holds QuantExperts of plain 4- or 8-bit "
                             "QuantLinear matrices (rtn, gptq, awq)")
        with torch.device("meta"):
            m = cls(q.num_experts, q.hidden_size, q.intermediate_size, q.gate_up_proj[0].cfg, backend, q.dispatch)
        m.gate_up_proj = StackedQuantLinear.stack(list(q.gate_up_proj))
        m.down_proj = StackedQuantLinear.stack(list(q.down_proj))
        m.act = q.act
        return m

    @property
    def graph_safe(self) -> bool:
        """Whether the forward on a GPU is the kernels' path, which reads nothing back to the host: a
        CUDA graph can record it."""
        from ..moe.triton_moe import is_silu

        return HAS_TRITON and self.backend != "torch" and is_silu(self.act)

    def forward(self, x: torch.Tensor, experts: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        from ..moe.triton_moe import is_silu, triton_dispatch

        if use_triton(x, self.backend) and is_silu(self.act):
            return triton_dispatch(x, experts, weights, self.gate_up_proj.packed(), self.down_proj.packed(), self.act)
        hit = hit_experts(experts, self.num_experts)
        gate_up = self.gate_up_proj.packed().dequantize(x.dtype, hit)
        down = self.down_proj.packed().dequantize(x.dtype, hit)
        fn = sorted_dispatch if self.dispatch == "triton" else self._fn
        return fn(x, experts, weights, gate_up, down, self.act)

    def to_float(self, dtype=torch.float32) -> nn.Module:
        """lesson 07's float `Experts` holding the dequantized weights (as `QuantExperts.to_float`)."""
        from ..moe.layer import Experts

        with torch.device("meta"):
            out = Experts(self.num_experts, self.hidden_size, self.intermediate_size, self.dispatch)
        out.gate_up_proj = nn.Parameter(self.gate_up_proj.packed().dequantize(dtype))
        out.down_proj = nn.Parameter(self.down_proj.packed().dequantize(dtype))
        out.act = self.act
        return out

    def extra_repr(self) -> str:
        return f"dispatch={self.dispatch!r}, backend={self.backend!r}"
