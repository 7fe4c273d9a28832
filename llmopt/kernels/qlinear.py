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

import copy
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from ..moe.dispatch import DispatchChoice, hit_experts, loop_dispatch, sorted_dispatch
from ..quant import packing
from ..quant.linear import QuantConfig, QuantLinear
from .common import HAS_TRITON, check_backend, use_triton
from .cpu import (
    cpu_format_problem,
    int4_cpu_linear,
    int4_cpu_order,
    int8_cpu_linear,
    kernel_rows,
    pack_int4_for_cpu,
    unpack_int4_from_cpu,
)
from .w4a16 import dequantize_codes, w4a16_linear
from .w8a16 import w8a16_linear

KERNEL_BITS = (4, 8)


def _cpu_kernels_on(module: nn.Module, device: torch.device) -> bool:
    """Whether `module` (`KernelQuantLinear`, `KernelQuantExperts`) runs PyTorch's CPU kernels for
    tensors on `device`: prepared for them (a format they read), backend "auto", and a CPU."""
    return module.cpu_kernel and module.backend == "auto" and device.type == "cpu"


def has_kernel(module: nn.Module) -> bool:
    """True for a `QuantLinear` whose format a kernel here reads (4 or 8 bits)."""
    return isinstance(module, QuantLinear) and module.cfg.bits in KERNEL_BITS


class KernelQuantLinear(QuantLinear):
    """y = x @ dequant(W).T + b computed by `w4a16_linear` / `w8a16_linear` with `backend`
    ("auto": the Triton kernels on a GPU; on a CPU PyTorch's weight-only kernels where they read the
    format and x has few rows (decode, `kernels.cpu`), else the reference; "triton"; "torch": the reference).

    On a CPU with "auto", a W4 layer keeps its codes once, in the CPU kernel's nibble order
    (`cpu_codes`; `qweight` is None): `packed_codes()` rebuilds the saved layout where it is needed,
    for `state_dict`, for a move to a GPU (`.to`) and for pickling (`torch.save(model)`: the kernel's
    order depends on the CPU); a prompt too long for the kernel dequantizes the kernel's copy itself."""

    def __init__(self, in_features: int, out_features: int, cfg: QuantConfig, bias: bool = False, device=None,
                 backend: str = "auto"):
        if cfg.bits not in KERNEL_BITS:
            raise ValueError(f"KernelQuantLinear has kernels for bits in {KERNEL_BITS}, got bits={cfg.bits!r}")
        super().__init__(in_features, out_features, cfg, bias=bias, device=device)
        self.cpu_kernel = False
        self.cpu_order = None   # the nibble order of cpu_codes (`kernels.cpu.INT4_CPU_ORDERS`)
        self.register_buffer("cpu_codes", None, persistent=False)
        self.register_buffer("cpu_scales_zeros", None, persistent=False)
        self.backend = backend
        self.register_load_state_dict_post_hook(_repack_after_load)

    @property
    def backend(self) -> str:
        return self._backend

    @backend.setter
    def backend(self, value: str):
        self._backend = check_backend(value)
        if self.cpu_kernel:   # "auto" keeps only the CPU kernel's copy of W4 codes; the others read the saved one
            self.prepare_cpu()

    @torch.no_grad()
    def prepare_cpu(self, dtype: torch.dtype | None = None) -> str | None:
        """Let `forward` use PyTorch's CPU kernels: on a CPU, where they read this format. W4's codes are
        moved into their nibble order (with backend "auto" the saved layout is dropped once the new one is
        checked to give the same codes back), and the scales (W4: with tinygemm's offsets) kept in `dtype`,
        the activations' dtype the kernels want them in (default: float32, or the dtype they had), so
        no call casts them. `state_dict` saves the usual layout. Returns why not, or None.
        `fuse` calls it; `.to` calls it again (a module moved off the CPU stops using the kernels); call it
        again after changing the codes or scales."""
        if dtype is None:
            dtype = torch.float32 if self.cpu_scales_zeros is None else self.cpu_scales_zeros.dtype
        self.qweight = self.packed_codes()
        self.cpu_kernel, self.cpu_codes, self.cpu_scales_zeros, self.cpu_order = False, None, None, None
        if self.qweight.device.type != "cpu":
            return f"the codes are on {self.qweight.device}, not a CPU"
        why = cpu_format_problem(self.cfg.bits, self.zeros is None, self.cfg.group_size, self.out_features,
                                 self.in_features)
        if why is None:
            if self.cfg.bits == 4:
                codes = packing.unpack(self.qweight, 4)
                self.cpu_codes, sz = pack_int4_for_cpu(self.qweight, self.scales, self.zeros, self.cfg.group_size,
                                                       codes)
                if self.backend == "auto":
                    self.cpu_order = int4_cpu_order(self.cpu_codes, codes)
                if self.cpu_order is not None:
                    self.qweight = None   # one copy of the codes: the kernel's
            else:
                sz = self.scales.reshape(self.out_features)
            self.cpu_scales_zeros = sz.to(dtype)
            self.cpu_kernel = True
        return why

    def packed_codes(self) -> torch.Tensor:
        """The codes in `QuantLinear`'s packed layout, what `state_dict` saves: `qweight`, or rebuilt
        from the CPU kernel's copy when the module keeps only that."""
        if self.qweight is not None:
            return self.qweight
        return packing.pack(unpack_int4_from_cpu(self.cpu_codes, self.cpu_order), 4)

    def codes(self) -> torch.Tensor:
        if self.qweight is not None:
            return super().codes()
        c = unpack_int4_from_cpu(self.cpu_codes, self.cpu_order).to(torch.int16)
        return c - 8 if self.cfg.symmetric else c

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        if self.qweight is not None:
            return super()._save_to_state_dict(destination, prefix, keep_vars)
        self.qweight = self.packed_codes()   # saved as a QuantLinear's, whichever layout the module holds
        try:
            super()._save_to_state_dict(destination, prefix, keep_vars)
        finally:
            self.qweight = None

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        if self.qweight is None:   # a buffer to load the saved codes into (`_repack_after_load` moves them)
            self.qweight = self.packed_codes()
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def __getstate__(self):
        """Pickled (`torch.save(model)`, `copy.deepcopy`): the saved layout of the codes, not the kernel's
        copy, whose nibble order depends on the CPU; `__setstate__` makes the copy again where it is loaded."""
        state = super().__getstate__()
        if self.cpu_kernel:
            buffers = self._buffers.copy()
            buffers.update(qweight=self.packed_codes(), cpu_codes=None)
            state.update(_buffers=buffers, cpu_order=None)
        return state

    def __setstate__(self, state):
        super().__setstate__(state)
        _repack_after_load(self, None)   # this CPU's copy (none where the tensors were loaded onto a GPU)

    def _apply(self, fn, *args, **kwargs):
        if not self.cpu_kernel:
            return super()._apply(fn, *args, **kwargs)
        # Moved or cast: the saved layout moves, and the kernel's copies are made again (on a CPU).
        self.qweight, self.cpu_codes = self.packed_codes(), None
        out = super()._apply(fn, *args, **kwargs)
        self.prepare_cpu()
        return out

    def runs_cpu_kernel(self, x: torch.Tensor) -> bool:
        """True when `forward(x)` runs the CPU kernels: on "auto", on a CPU, a format they read, and
        few enough rows (`kernels.cpu.kernel_rows`)."""
        return _cpu_kernels_on(self, x.device) and kernel_rows(x, self.cfg.bits)

    @classmethod
    def from_quant_linear(cls, q: QuantLinear, backend: str = "auto", dtype: torch.dtype | None = None
                          ) -> KernelQuantLinear:
        """Wrap `q`'s codes, scales, zeros and bias as they are: the same tensors, no copy and no
        re-quantization (the swapped-out module usually goes away, so no memory is doubled; the CPU
        kernels' copies aside, `prepare_cpu`). `dtype`: the activations' dtype (`prepare_cpu`)."""
        if not isinstance(q, QuantLinear):
            raise ValueError(f"q must be a QuantLinear, got {type(q).__name__}")
        m = cls(q.in_features, q.out_features, q.cfg, bias=False, device="meta", backend=backend)
        m.qweight, m.scales, m.zeros = q.qweight, q.scales, q.zeros
        if q.bias is not None:  # a Parameter of its own over the same data: m.to(...) must not move q's
            m.bias = nn.Parameter(q.bias.data, requires_grad=q.bias.requires_grad)
        m.prepare_cpu(dtype)
        return m

    def unread_bytes(self) -> int:
        """Bytes held but not read by a decode step (`bench.weight_bytes`): where the CPU kernels run, the
        saved tensors they do not read (W4: codes, scales and zeros; W8: the scales), else their copies."""
        if self.cpu_scales_zeros is None:
            return 0
        if _cpu_kernels_on(self, self.scales.device):
            held = (self.qweight, self.scales, self.zeros) if self.cfg.bits == 4 else (self.scales,)
        else:
            held = (self.cpu_codes, self.cpu_scales_zeros)
        return sum(t.numel() * t.element_size() for t in held if t is not None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.runs_cpu_kernel(x):
            if self.cfg.bits == 8:
                return int8_cpu_linear(x, self.qweight, self.cpu_scales_zeros, self.bias)
            return int4_cpu_linear(x, self.cpu_codes, self.cpu_scales_zeros, self.cfg.group_size, self.bias)
        if self.qweight is None:   # a prompt too long for the kernel: the reference, reading the kernel's copy
            codes = unpack_int4_from_cpu(self.cpu_codes, self.cpu_order)
            w = dequantize_codes(codes, self.scales, self.zeros, self.cfg.group_size, 8.0, x.dtype)
            return F.linear(x, w, None if self.bias is None else self.bias.to(x.dtype))
        fn = w4a16_linear if self.cfg.bits == 4 else w8a16_linear
        return fn(x, self.qweight, self.scales, self.zeros, self.cfg.group_size, self.bias, backend=self.backend)

    def extra_repr(self) -> str:
        cpu = ""
        if self.cpu_kernel:
            cpu = ", cpu kernel" if self.qweight is not None else ", cpu kernel (its codes only)"
        return f"{super().extra_repr()}, backend={self.backend!r}{cpu}"


def _repack_after_load(module: nn.Module, incompatible_keys) -> None:
    """New codes or scales loaded (`load_state_dict`, unpickling) into a module that holds the CPU kernels'
    copies of them: copy them again."""
    if module.cpu_kernel:
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
    weights) -> (T, H). `backend` "auto": the kernels on a GPU (SiLU experts); on a CPU, for decode
    rows, each hit expert's matrices on PyTorch's weight-only kernels (`prepare_cpu`, as
    `KernelQuantLinear`, W4 codes kept only in their order); elsewhere the reference, which dequantizes
    the hit experts and runs the `dispatch` path ("sorted" for "triton")."""
    quantized = True

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int, cfg: QuantConfig,
                 backend: str = "auto", dispatch: str = "sorted", device=None):
        super().__init__()
        self.num_experts, self.hidden_size, self.intermediate_size, self.cfg = (num_experts, hidden_size,
                                                                                 intermediate_size, cfg)
        self.gate_up_proj = StackedQuantLinear(num_experts, hidden_size, 2 * intermediate_size, cfg, device)
        self.down_proj = StackedQuantLinear(num_experts, intermediate_size, hidden_size, cfg, device)
        self.act = F.silu
        self.dispatch = dispatch
        self.cpu_kernel = False
        self.cpu_orders = None   # W4 on "auto": each expert's nibble order, {"gate_up": [...], "down": [...]}
        for name in ("cpu_gate_up_codes", "cpu_gate_up_scales", "cpu_down_codes", "cpu_down_scales"):
            self.register_buffer(name, None, persistent=False)
        self.backend = backend
        self.register_load_state_dict_post_hook(_repack_after_load)

    backend = KernelQuantLinear.backend   # "auto" keeps only the CPU kernels' copy of W4 codes

    @torch.no_grad()
    def prepare_cpu(self, dtype: torch.dtype | None = None) -> str | None:
        """Let `forward` run the hit experts on PyTorch's CPU kernels (`KernelQuantLinear.prepare_cpu`:
        the same formats, W4's codes copied into the kernel's nibble order, the scales kept in `dtype`),
        every expert's copies stacked, not saved. Returns why not, or None."""
        if dtype is None:
            dtype = torch.float32 if self.cpu_gate_up_scales is None else self.cpu_gate_up_scales.dtype
        self._restore_codes()
        self.cpu_kernel, self.cpu_orders = False, None
        self.cpu_gate_up_codes = self.cpu_gate_up_scales = self.cpu_down_codes = self.cpu_down_scales = None
        copies, orders = {}, {}
        for name, stacked in (("gate_up", self.gate_up_proj), ("down", self.down_proj)):
            if stacked.qweight.device.type != "cpu":
                return f"the codes are on {stacked.qweight.device}, not a CPU"
            why = cpu_format_problem(self.cfg.bits, stacked.zeros is None, self.cfg.group_size,
                                     stacked.out_features, stacked.in_features)
            if why is not None:
                return why
            if self.cfg.bits == 4:
                codes = [packing.unpack(q, 4) for q in stacked.qweight]
                packs = [pack_int4_for_cpu(stacked.qweight[e], stacked.scales[e],
                                           None if stacked.zeros is None else stacked.zeros[e], self.cfg.group_size,
                                           codes[e])
                         for e in range(self.num_experts)]
                copies[name] = (torch.stack([p for p, _ in packs]), torch.stack([sz for _, sz in packs]).to(dtype))
                orders[name] = [int4_cpu_order(p, c) for (p, _), c in zip(packs, codes)]
            else:
                copies[name] = (None, stacked.scales.reshape(self.num_experts, stacked.out_features).to(dtype))
        (self.cpu_gate_up_codes, self.cpu_gate_up_scales), (self.cpu_down_codes, self.cpu_down_scales) = (
            copies["gate_up"], copies["down"])
        self.cpu_kernel = True
        if orders and self.backend == "auto" and None not in orders["gate_up"] + orders["down"]:
            self.cpu_orders = orders
            self._drop_codes()
        return None

    def _saved_codes(self, name: str) -> torch.Tensor:
        """The `name` ("gate_up", "down") matrices' stacked codes in the saved layout: the stacked
        qweight, or rebuilt from the CPU kernels' copies where only they are kept."""
        stacked = getattr(self, f"{name}_proj")
        if stacked.qweight is not None:
            return stacked.qweight
        copies = getattr(self, f"cpu_{name}_codes")
        return torch.stack([packing.pack(unpack_int4_from_cpu(c, order), 4)
                            for c, order in zip(copies, self.cpu_orders[name])])

    def _restore_codes(self) -> None:
        for name in ("gate_up", "down"):
            getattr(self, f"{name}_proj").qweight = self._saved_codes(name)

    def _drop_codes(self) -> None:
        if self.cpu_orders is not None:   # one copy of the codes: the kernels'
            self.gate_up_proj.qweight = self.down_proj.qweight = None

    def _packed(self, name: str):
        """The `name` matrices as `PackedExperts` in the saved layout."""
        return getattr(self, f"{name}_proj").packed()._replace(qweight=self._saved_codes(name))

    def _dequantize(self, name: str, dtype: torch.dtype, only=None) -> torch.Tensor:
        """The `name` matrices' (E, N, K) float weights, as `PackedExperts.dequantize` (with `only`, the
        other experts zeros), read from whichever copy of the codes the module keeps: where it keeps only
        the CPU kernels', straight from theirs (no saved layout rebuilt for a long prompt)."""
        if self.cpu_orders is None:
            return self._packed(name).dequantize(dtype, only)
        stacked, copies = getattr(self, f"{name}_proj"), getattr(self, f"cpu_{name}_codes")
        out = torch.zeros(self.num_experts, stacked.out_features, stacked.in_features, dtype=dtype)
        for e in range(self.num_experts) if only is None else only:
            codes = unpack_int4_from_cpu(copies[e], self.cpu_orders[name][e])
            zeros = None if stacked.zeros is None else stacked.zeros[e]
            out[e] = dequantize_codes(codes, stacked.scales[e], zeros, self.cfg.group_size, 8.0, dtype)
        return out

    def state_dict(self, *args, **kwargs):
        self._restore_codes()   # the stacked matrices save the usual layout
        try:
            return super().state_dict(*args, **kwargs)
        finally:
            self._drop_codes()

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        self._restore_codes()   # buffers to load the saved codes into (`_repack_after_load` moves them)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def __getstate__(self):
        """Pickled: the stacked matrices' saved layout, not the kernels' copies (`KernelQuantLinear.__getstate__`)."""
        state = super().__getstate__()
        if self.cpu_kernel:
            buffers = self._buffers.copy()
            buffers.update(cpu_gate_up_codes=None, cpu_down_codes=None)
            modules = self._modules.copy()
            for name in ("gate_up", "down"):   # shallow copies of the stacked modules, holding the saved codes
                stacked = modules[f"{name}_proj"] = copy.copy(modules[f"{name}_proj"])
                stacked._buffers = stacked._buffers.copy()
                stacked._buffers["qweight"] = self._saved_codes(name)
            state.update(_buffers=buffers, _modules=modules, cpu_orders=None)
        return state

    def __setstate__(self, state):
        super().__setstate__(state)
        _repack_after_load(self, None)

    def _apply(self, fn, *args, **kwargs):
        if not self.cpu_kernel:
            return super()._apply(fn, *args, **kwargs)
        self._restore_codes()   # moved or cast: the saved layout moves, the kernels' copies are made again
        self.cpu_orders = self.cpu_gate_up_codes = self.cpu_down_codes = None
        out = super()._apply(fn, *args, **kwargs)
        self.prepare_cpu()
        return out

    def _cpu_matrix(self, name: str, e: int):
        """Expert e's `name` matrix ("gate_up" or "down") as a function x -> x @ W^T on the CPU kernels."""
        scales = getattr(self, f"cpu_{name}_scales")[e]
        if self.cfg.bits == 8:
            return partial(int8_cpu_linear, qweight=getattr(self, f"{name}_proj").qweight[e], scales=scales)
        return partial(int4_cpu_linear, packed=getattr(self, f"cpu_{name}_codes")[e], scales_and_zeros=scales,
                       group_size=self.cfg.group_size)

    def unread_bytes(self) -> int:
        """Bytes held but not read (`bench.weight_bytes`, as `KernelQuantLinear.unread_bytes`), every expert's."""
        if self.cpu_gate_up_scales is None:
            return 0
        if _cpu_kernels_on(self, self.gate_up_proj.scales.device):
            held = ([self.gate_up_proj.scales, self.down_proj.scales] if self.cfg.bits == 8
                    else [*self.gate_up_proj.buffers(), *self.down_proj.buffers()])
        else:
            held = [self.cpu_gate_up_codes, self.cpu_gate_up_scales, self.cpu_down_codes, self.cpu_down_scales]
        return sum(t.numel() * t.element_size() for t in held if t is not None)

    @classmethod
    def from_quant_experts(cls, q: nn.Module, backend: str = "auto", dtype: torch.dtype | None = None
                           ) -> KernelQuantExperts:
        """The codes of `q` (see `can_stack_experts`) stacked, the same values (a copy: `q` can go).
        `dtype`: the activations' dtype (`prepare_cpu`)."""
        if not can_stack_experts(q):
            raise ValueError(f"{type(q).__name__}: KernelQuantExperts holds QuantExperts of plain 4- or 8-bit "
                             "QuantLinear matrices (rtn, gptq, awq)")
        with torch.device("meta"):
            m = cls(q.num_experts, q.hidden_size, q.intermediate_size, q.gate_up_proj[0].cfg, backend, q.dispatch)
        m.gate_up_proj = StackedQuantLinear.stack(list(q.gate_up_proj))
        m.down_proj = StackedQuantLinear.stack(list(q.down_proj))
        m.act = q.act
        m.prepare_cpu(dtype)
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
        if _cpu_kernels_on(self, x.device) and kernel_rows(x, self.cfg.bits):
            gate_up = {e: self._cpu_matrix("gate_up", e) for e in hit}
            down = {e: self._cpu_matrix("down", e) for e in hit}
            return loop_dispatch(x, experts, weights, gate_up, down, self.act, only=hit)
        gate_up, down = self._dequantize("gate_up", x.dtype, hit), self._dequantize("down", x.dtype, hit)
        fn = sorted_dispatch if self.dispatch == "triton" else self._fn
        return fn(x, experts, weights, gate_up, down, self.act)

    def to_float(self, dtype=torch.float32) -> nn.Module:
        """lesson 07's float `Experts` holding the dequantized weights (as `QuantExperts.to_float`)."""
        from ..moe.layer import Experts

        with torch.device("meta"):
            out = Experts(self.num_experts, self.hidden_size, self.intermediate_size, self.dispatch)
        out.gate_up_proj = nn.Parameter(self._dequantize("gate_up", dtype))
        out.down_proj = nn.Parameter(self._dequantize("down", dtype))
        out.act = self.act
        return out

    def extra_repr(self) -> str:
        cpu = (", cpu kernel (its codes only)" if self.cpu_orders else ", cpu kernel") if self.cpu_kernel else ""
        return f"dispatch={self.dispatch!r}, backend={self.backend!r}{cpu}"

