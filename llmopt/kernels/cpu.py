"""Weight-only INT8 and INT4 on a CPU: the matmul kernels PyTorch itself ships for them.

Off a GPU, `w4a16_linear` / `w8a16_linear` run their reference: dequantize the whole weight to
memory, then an ordinary matmul, which is *slower* than the float layer it replaces. PyTorch has
CPU kernels that read the codes directly (the ones gpt-fast and torchao use on a CPU):

- `aten._weight_int8pack_mm(x, codes, scales)`: int8 codes (N, K) with one scale per output channel,
  read as they are (`QuantLinear`'s symmetric per-channel INT8 format needs no copy), K a multiple of 16;
- `aten._weight_int4pack_mm_for_cpu(x, packed, group_size, scales_and_zeros)`: 4-bit codes in a nibble
  order of its own (made once by `aten._convert_weight_to_int4pack_for_cpu`), group sizes 32-256,
  N a multiple of 16, and tinygemm's dequantization w = (code - 8) * scale + offset, one (scale,
  offset) pair per group and channel. Our w = (code - zero) * scale is the same with
  offset = (8 - zero) * scale (0 for symmetric codes, whose zero is 8).

`pack_int4_for_cpu` builds that copy and `unpack_int4_from_cpu` reads the codes back out of it, so a
fused W4 layer (`KernelQuantLinear`) keeps its codes once, in the kernel's order, and rebuilds the saved
layout only to save or pickle and to move to a GPU (a prompt too long for the kernel dequantizes the copy).
These kernels are fast in bfloat16, where at batch 1 they beat the bfloat16 layer itself (weight-only
quantization making decode faster, not only smaller); in float32 and float16 they beat the reference
at one or two rows but not the float layer. Measure on your CPU: `llmopt bench weight-only`.
"""
from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F

from ..quant import packing

INT4_GROUP_SIZES = (32, 64, 128, 256)

# The most rows x may have for the kernels to beat the reference, by the CPU's kind of kernels
# (`cpu_kind`), bits and x's dtype (None: no limit). The kernels run row by row, so their time grows
# with the rows; what the reference costs depends on the CPU. Measured with `llmopt bench weight-only`
# on layers of 768 x 256 to 11008 x 4096 (PyTorch 2.13, a 2-core Intel Xeon with AVX-512 and AMX,
# the other kinds forced on it with ATEN_CPU_CAPABILITY and ONEDNN_MAX_CPU_ISA: simulated, not real
# CPUs of that kind), keeping the most rows at which the kernel beat the reference on every layer:
# - "AVX512": the CPU multiplies bfloat16 in hardware (AMX), so dequantize + matmul costs about the
#   same from 1 row to a few hundred (the dequantization dominates it). In bfloat16 the INT4 kernel
#   was ahead up to 256 rows (at 512 it lost on three of five layers), the INT8 one up to 64 (at 128
#   it lost on the two smallest); in float32 the reference is faster from 4 rows.
# - "AVX2": a bfloat16 matmul without the hardware for it is slow, so in bfloat16 both kernels were
#   at least 2.6x faster than the reference at every size measured, 1 to 1,024 rows; float32 as AVX512.
# - "DEFAULT", PyTorch's kernels without vector instructions: in bfloat16 the INT4 kernel was ahead at
#   2 rows (at 4 it lost on the smallest layer), the INT8 one at 4 (at 8 likewise); float32 as the
#   others. The CPUs not measured get this table too: ARM's PyTorch has NEON code for these kernels and
#   may well do better there (measure yours).
# float16 (2026-12-08, the same way): the INT4 kernel beat the reference on every layer at 1 row only,
# on all three kinds (at 2 it lost on one or two layers, by 6-27% on AVX512 over two runs, 15-49% on
# AVX2, 35% on default, while winning by up to 2.6x on the largest); the INT8 one up to 1 row on AVX512,
# 2 on AVX2, 4 on default.
# Longer prompts keep the reference.
MAX_ROWS = {
    "AVX512": {4: {torch.float32: 2, torch.float16: 1, torch.bfloat16: 256},
               8: {torch.float32: 2, torch.float16: 1, torch.bfloat16: 64}},
    "AVX2": {4: {torch.float32: 2, torch.float16: 1, torch.bfloat16: None},
             8: {torch.float32: 2, torch.float16: 2, torch.bfloat16: None}},
    "DEFAULT": {4: {torch.float32: 2, torch.float16: 1, torch.bfloat16: 2},
                8: {torch.float32: 2, torch.float16: 4, torch.bfloat16: 4}},
}


def cpu_kind() -> str:
    """Which of `MAX_ROWS`'s tables this process uses: "AVX512", "AVX2" or "DEFAULT", after the
    vector instructions PyTorch's CPU kernels use (`torch.backends.cpu.get_cpu_capability()`, which
    ATEN_CPU_CAPABILITY can lower); any other CPU (ARM, POWER, s390x) gets "DEFAULT"'s."""
    capability = torch.backends.cpu.get_cpu_capability()
    if capability.startswith("AVX512"):
        return "AVX512"
    return "AVX2" if capability == "AVX2" else "DEFAULT"


CPU_KIND = cpu_kind()   # once: PyTorch picks its kernels once per process (and torch.compile reads a constant)


def max_rows(bits: int, dtype: torch.dtype) -> int | None:
    """The most rows for which the `bits`-bit kernel is the faster path on this CPU for x of `dtype`
    (`MAX_ROWS[CPU_KIND]`; None: no limit, 0: never)."""
    return MAX_ROWS[CPU_KIND][bits].get(dtype, 0)


def has_cpu_kernels() -> bool:
    """True when this PyTorch has both ops (2.6 and later do)."""
    return all(hasattr(torch.ops.aten, op) for op in
               ("_weight_int8pack_mm", "_weight_int4pack_mm_for_cpu", "_convert_weight_to_int4pack_for_cpu"))


def cpu_format_problem(bits: int, symmetric: bool, group_size: int | None, N: int, K: int) -> str | None:
    """Why PyTorch's CPU kernels cannot read this `QuantLinear` format, or None when they can."""
    if not has_cpu_kernels():
        return f"PyTorch {torch.__version__} lacks the weight-only CPU kernels (2.6 or later has them)"
    if bits == 8:
        if not symmetric or group_size is not None:
            return "the INT8 kernel takes symmetric codes with one scale per output channel"
        if K % 16:   # in bfloat16 other sizes read past the row (wrong sums, or a crash) in torch 2.13
            return f"the INT8 kernel reads in_features 16 at a time; {K} is not a multiple"
        return None
    if bits == 4:
        group = K if group_size is None else group_size
        if group not in INT4_GROUP_SIZES:
            return f"the INT4 kernel takes group sizes {INT4_GROUP_SIZES} (per channel: in_features), got {group}"
        if N % 16:
            return f"the INT4 kernel packs output channels 16 at a time; out_features {N} is not a multiple"
        return None
    return f"no CPU kernel for {bits}-bit codes (4 and 8 have one)"


def kernel_rows(x: torch.Tensor, bits: int) -> bool:
    """True when x (..., K) has few enough rows, for its dtype and this CPU, that the `bits`-bit CPU
    kernel is the faster path (`max_rows`)."""
    most = max_rows(bits, x.dtype)
    return most is None or x.numel() <= most * x.shape[-1]


@torch.no_grad()
def pack_int4_for_cpu(qweight, scales, zeros, group_size, codes=None) -> tuple[torch.Tensor, torch.Tensor]:
    """`QuantLinear`'s W4 buffers -> (codes in the kernel's nibble order (N, K / 2) uint8,
    scales_and_zeros (n_groups, N, 2) float32: each group's scale and tinygemm offset).
    `codes`: `qweight` already unpacked (N, K), where the caller has it (spares unpacking it again)."""
    if codes is None:
        codes = packing.unpack(qweight, 4)   # unsigned 0..15, (N, K)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32), 1)
    scale = scales.float()
    offset = torch.zeros_like(scale) if zeros is None else (8.0 - zeros.float()) * scale
    return packed, torch.stack([scale.T, offset.T], dim=-1).contiguous()


# The kernel's nibble order (PyTorch 2.6-2.13, `_convert_weight_to_int4pack_for_cpu`): output channels in
# blocks of B, stored block after block; in a block, for each input column k, B / 2 bytes hold the B codes
# of that column. Byte j holds channels j (low nibble) and j + B/2 (high nibble), "halves", in a full
# block where the CPU has AVX-512 (B = 64) or AVX2 (B = 32), so that one shift unpacks a whole vector;
# channels 2j and 2j+1, "pairs", in a partial last block and on other CPUs. The order depends on the CPU
# PyTorch runs on, so `int4_cpu_order` finds it by trying each on codes whose copy it has just made.
INT4_CPU_ORDERS = ((64, "halves"), (32, "halves"), (32, "pairs"), (16, "pairs"))


def unpack_int4_from_cpu(packed: torch.Tensor, order: tuple[int, str]) -> torch.Tensor:
    """The unsigned codes (N, K) uint8 in a copy made by `pack_int4_for_cpu` (N, K / 2), read in
    `order`, one of `INT4_CPU_ORDERS`."""
    block, layout = order
    N, K = packed.shape[0], 2 * packed.shape[1]
    flat = packed.reshape(-1)
    full = N // block * block
    out = torch.empty(N, K, dtype=torch.uint8, device=packed.device)
    for start, stop, size in ((0, full, block), (full, N, N - full)):   # the full blocks, then the partial one
        if stop == start:
            continue
        b = flat[start * K // 2: stop * K // 2].reshape(-1, K, size // 2)   # (blocks, K, bytes)
        low, high = b & 15, b >> 4
        if layout == "halves" and size == block:
            codes = torch.cat([low, high], dim=2)                  # channels j, then j + B/2
        else:
            codes = torch.stack([low, high], dim=3).flatten(2)     # channels 2j, 2j + 1
        out[start:stop] = codes.transpose(1, 2).reshape(stop - start, K)
    return out


def int4_cpu_order(packed: torch.Tensor, codes: torch.Tensor) -> tuple[int, str] | None:
    """The order of `INT4_CPU_ORDERS` in which `packed` holds `codes` (N, K), or None if none does
    (another PyTorch's layout: keep the codes then)."""
    codes = codes.to(torch.uint8)
    for order in INT4_CPU_ORDERS:
        if torch.equal(unpack_int4_from_cpu(packed, order), codes):
            return order
    return None


def _rows(x, K):
    """x (..., K) as the 2-D (M, K) the kernels take, contiguous."""
    return x.reshape(-1, K).contiguous()


def int8_cpu_linear(x, qweight, scales, bias=None) -> torch.Tensor:
    """y = x @ (codes * scale).T + bias for symmetric per-channel INT8 codes (N, K), scales (N, 1)."""
    K, N = x.shape[-1], qweight.shape[0]
    y = torch.ops.aten._weight_int8pack_mm(_rows(x, K), qweight, scales.reshape(N).to(x.dtype))
    y = y.reshape(*x.shape[:-1], N)
    return y if bias is None else y + bias.to(x.dtype)


@torch.library.custom_op("llmopt::int4_cpu_mm", mutates_args=())
def _int4_mm_opaque(x: torch.Tensor, packed: torch.Tensor, group: int, scales_and_zeros: torch.Tensor) -> torch.Tensor:
    return torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, group, scales_and_zeros)


@_int4_mm_opaque.register_fake
def _(x, packed, group, scales_and_zeros):
    return x.new_empty(x.shape[0], packed.shape[0])


def int4_cpu_linear(x, packed, scales_and_zeros, group_size, bias=None) -> torch.Tensor:
    """y = x @ dequant(W).T + bias from `pack_int4_for_cpu`'s tensors (group_size None: per channel)."""
    K, N = x.shape[-1], packed.shape[0]
    group = K if group_size is None else group_size
    # Under torch.compile the op goes in as an opaque custom op: Inductor's own lowering of it failed
    # (PyTorch 2.13, bfloat16, its input fused from the embedding lookup and the first norm).
    mm = _int4_mm_opaque if torch.compiler.is_compiling() else torch.ops.aten._weight_int4pack_mm_for_cpu
    y = mm(_rows(x, K), packed, group, scales_and_zeros.to(x.dtype))
    y = y.reshape(*x.shape[:-1], N)
    return y if bias is None else y + bias.to(x.dtype)


def _rotating(fn, arg_sets):
    """A call of `fn` on the next of `arg_sets` each time: weights that come from memory, not a cache."""
    sets = itertools.cycle(arg_sets)
    return lambda: fn(*next(sets))


def benchmark(shapes=((768, 256), (4096, 256), (2048, 2048), (5632, 2048), (11008, 4096)), rows=(1, 16),
              dtypes=(torch.float32, torch.bfloat16), group_size: int = 128, copies: int = 1) -> list[dict]:
    """Median time of the float layer, the reference (dequantize + matmul) and the CPU kernels, W8
    per channel and W4 groups of `group_size` (or per channel where K is smaller), random weights.
    `copies` > 1: each call reads the next of that many copies of the layer's weights, so a layer that
    fits in the caches is read from memory, as a whole model's decode step reads it."""
    from ..bench import time_fn
    from ..quant.linear import QuantConfig, QuantLinear
    from .w4a16 import w4a16_reference
    from .w8a16 import w8a16_reference

    if copies < 1:
        raise ValueError(f"copies must be >= 1, got {copies}")
    if not rows or min(rows) < 1:
        raise ValueError(f"rows must be numbers of rows >= 1, got {tuple(rows)}")
    torch.manual_seed(0)
    out = []
    for N, K in shapes:
        linear = torch.nn.Linear(K, N, bias=False)
        g = group_size if K > group_size else None
        w8 = QuantLinear.from_linear(linear, QuantConfig(bits=8))
        w4 = QuantLinear.from_linear(linear, QuantConfig(bits=4, group_size=g, symmetric=False))
        packed, sz = pack_int4_for_cpu(w4.qweight, w4.scales, w4.zeros, g)
        q8s, q4s, packs = ([t.clone() for _ in range(copies)] for t in (w8.qweight, w4.qweight, packed))
        for dtype in dtypes:
            ws = [linear.weight.detach().to(dtype, copy=True) for _ in range(copies)]
            for m in rows:
                x = torch.randn(m, K, dtype=dtype)
                runs = {
                    "float": _rotating(F.linear, [(x, w) for w in ws]),
                    "w8 reference": _rotating(w8a16_reference, [(x, q, w8.scales, None, None) for q in q8s]),
                    "w8 cpu kernel": _rotating(int8_cpu_linear, [(x, q, w8.scales) for q in q8s]),
                    "w4 reference": _rotating(w4a16_reference, [(x, q, w4.scales, w4.zeros, g) for q in q4s]),
                    "w4 cpu kernel": _rotating(int4_cpu_linear, [(x, p, sz, g) for p in packs]),
                }
                row = {"N": N, "K": K, "rows": m, "dtype": str(dtype).removeprefix("torch."), "copies": copies}
                row.update({name: 1e3 * time_fn(fn, warmup=max(3, copies), repeats=max(20, copies)).median
                            for name, fn in runs.items()})
                out.append(row)
    return out


NAMES = ("float", "w8 reference", "w8 cpu kernel", "w4 reference", "w4 cpu kernel")


def format_rows(rows: list[dict]) -> str:
    lines = [f"{'N x K':>12} {'rows':>4} {'dtype':>8} " + " ".join(f"{n:>14}" for n in NAMES) + "   (ms, median)"]
    for r in rows:
        lines.append(f"{r['N']:>5} x {r['K']:<4} {r['rows']:>4} {r['dtype']:>8} "
                     + " ".join(f"{r[n]:>14.3f}" for n in NAMES))
    return "\n".join(lines)


def main(json_path=None, **kwargs) -> list[dict]:
    """What `llmopt bench weight-only` runs: `benchmark(**kwargs)`, printed (and saved as JSON)."""
    import json

    from ..bench import environment

    rows = benchmark(**kwargs)
    print(format_rows(rows))
    if json_path:
        with open(json_path, "w") as f:
            json.dump({"env": environment(), "rows": rows}, f, indent=1)
        print(f"saved {json_path}")
    return rows
