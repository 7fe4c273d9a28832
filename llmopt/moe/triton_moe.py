"""Dispatch path 3: the experts' grouped GEMMs as Triton kernels (kernel, reference, benchmark).

Path 2 (`sorted_dispatch`) already sorts the assignments by expert; a GPU still pays for the
gathered copy of x, one matmul launch per expert (or a grouped GEMM) and separate passes for
SiLU, the product with `up`, and the gate weight. Here:

- the host sorts the assignments by expert and pads each expert's segment to a multiple of
  BLOCK_M, so every BLOCK_M-row tile belongs to one expert (`block_expert[tile]`); padding rows
  point past the end and are masked (vLLM's `moe_align_block_size` does the same). The padded
  length is the most the padding can ever need, known from the shapes alone, and tiles past the
  last segment (expert -1) return at once: nothing is read back to the host, so a decode step with
  this layer can be recorded as a CUDA graph (lesson 10);
- `_gate_up_kernel`: one program per (row tile, column tile of the intermediate size) reads its rows of x straight
  from the token ids (no gathered copy), multiplies by that expert's gate and up columns and
  writes silu(gate) * up;
- `_down_kernel`: the same tiling over the down projection, times each row's gate weight;
- the host gathers each assignment's row back (`pos`) and sums the k slots of every token.

The experts' weights are float (E, N, K) tensors, or quantized ones (`PackedExperts`: INT4 codes two
to a byte, or INT8, with group scales, `QuantLinear`'s format stacked over the experts). Quantized
tiles are loaded as codes and dequantized in registers just before `tl.dot`, so the only traffic is
the packed bytes, and only the hit experts' bytes: at decode a token reads k of the E experts.

On a machine without CUDA the kernels run in Triton's interpreter (TRITON_INTERPRET=1, set by
`llmopt.kernels.common` before `triton` is imported): numpy under the hood, exact but slow, so only
for small tests. The reference is `dispatch.sorted_dispatch` (on the dequantized weights for
`PackedExperts`); the tests compare the two.
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from ..kernels.common import compiler_opaque, interpreted, next_power_of_2, pick_config, precision, tl, triton


class PackedExperts(NamedTuple):
    """E quantized (N, K) matrices stacked, each in `QuantLinear`'s format: qweight (E, N, K // 2)
    uint8 for 4 bits (code k = 2i in the low nibble of byte i; symmetric codes stored shifted by 8)
    or (E, N, K) int8 / uint8 for 8 bits; scales (E, N, n_groups); zeros (E, N, n_groups) uint8, or
    None when symmetric; group_size None for one group per row. w = (code - zero) * scale."""
    qweight: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor | None
    bits: int
    group_size: int | None

    @property
    def shape(self) -> tuple[int, int, int]:
        E, N, cols = self.qweight.shape
        return E, N, cols * 8 // self.bits

    def dequantize(self, dtype=torch.float32, only=None) -> torch.Tensor:
        """The (E, N, K) float weights (the reference's); with `only` (expert ids), the other experts
        are zeros and are not dequantized."""
        from ..kernels.w4a16 import dequantize_codes
        from ..quant import packing

        E, N, K = self.shape
        out = torch.zeros(E, N, K, dtype=dtype, device=self.qweight.device)
        for e in range(E) if only is None else only:
            codes = packing.unpack(self.qweight[e], 4) if self.bits == 4 else self.qweight[e]
            zeros = None if self.zeros is None else self.zeros[e]
            out[e] = dequantize_codes(codes, self.scales[e], zeros, self.group_size, 8.0 if self.bits == 4 else 0.0,
                                      dtype)
        return out


@triton.jit
def _expert_tile(w_ptr, s_ptr, z_ptr, e, n, k, mask, stride_we, stride_wn, stride_se, stride_sn, G,
                 BITS: tl.constexpr, HAS_ZEROS: tl.constexpr):
    """Expert e's weights W[n, k] (n, k: broadcastable index tensors). BITS 0: float weights, loaded
    as they are. BITS 4 / 8: codes loaded and dequantized here, in float32. (One return at the end:
    the compiler wants every return of a function to have the same type.)"""
    w_e = w_ptr + e * stride_we + n * stride_wn
    if BITS == 0:
        w = tl.load(w_e + k, mask=mask, other=0.0)
    else:
        if BITS == 4:   # the byte holding k, shifted so k's nibble is the low one (each byte is read for 2 k's)
            codes = (tl.load(w_e + k // 2, mask=mask, other=0) >> ((k % 2) * 4)) & 0xF
        else:
            codes = tl.load(w_e + k, mask=mask, other=0)
        g = e * stride_se + n * stride_sn + k // G          # the group of (n, k); zeros share the scales' layout
        s = tl.load(s_ptr + g, mask=mask, other=0.0).to(tl.float32)
        if HAS_ZEROS:
            z = tl.load(z_ptr + g, mask=mask, other=0).to(tl.float32)
        elif BITS == 4:
            z = 8.0     # symmetric INT4 codes are stored shifted by 8
        else:
            z = 0.0
        w = (codes.to(tl.float32) - z) * s
    return w


@triton.jit
def _w4_pairs_dot(a_even, a_odd, w_ptr, s_ptr, z_ptr, e, n, n_ok, j, j_ok, g, stride_we, stride_wn, stride_se,
                  stride_sn, HAS_ZEROS: tl.constexpr, PRECISION: tl.constexpr):
    """a @ W[n, k-tile]^T for INT4 experts when the K tile lies inside one quantization group g (the
    W4A16 GEMM's grouped path): each packed byte is loaded once (j = k // 2, the low nibble is k = 2j,
    the high one 2j + 1) and multiplies a's even and odd columns; code - zero is a small integer, exact
    in a's dtype, so the tensor cores take it as it is, and the group's one scale per column multiplies
    the float32 sums. Compiled for sm_90 (`scripts/sass_count.py moe`), the gate/up loop runs 19 machine
    instructions per packed byte this way, against 29-42 with `_expert_tile`'s dequantization per weight."""
    packed = tl.load(w_ptr + e * stride_we + n[None, :] * stride_wn + j[:, None], mask=j_ok[:, None] & n_ok[None, :],
                     other=0)                                  # (BLOCK_K // 2, BLOCK_N), K-major for tl.dot
    sg = e * stride_se + n * stride_sn + g
    s = tl.load(s_ptr + sg, mask=n_ok, other=0.0).to(tl.float32)   # 0 outside: those columns vanish
    if HAS_ZEROS:
        z = tl.load(z_ptr + sg, mask=n_ok, other=0).to(tl.float32)[None, :]
    else:
        z = 8.0
    # a code c as a float: the bits of 2^23 + c, minus 2^23 (one OR instead of a conversion)
    packed = packed.to(tl.int32)
    low = ((packed & 0xF) | 0x4B000000).to(tl.float32, bitcast=True) - (8388608.0 + z)
    high = ((packed >> 4) | 0x4B000000).to(tl.float32, bitcast=True) - (8388608.0 + z)
    part = tl.dot(a_even, low.to(a_even.dtype), input_precision=PRECISION)
    part += tl.dot(a_odd, high.to(a_odd.dtype), input_precision=PRECISION)
    return part * s[None, :]


@triton.jit
def _w8_group_dot(a, w_ptr, s_ptr, z_ptr, e, n, n_ok, k, k_ok, g, stride_we, stride_wn, stride_se, stride_sn,
                  HAS_ZEROS: tl.constexpr, PRECISION: tl.constexpr):
    """a @ W[n, k-tile]^T for INT8 experts when the K tile lies inside one group g: code - zero (at most
    255 in size: exact in bf16 and fp16) goes to the tensor cores as it is, and the group's one scale per
    column multiplies the float32 sums, instead of a scale gathered for every weight."""
    codes = tl.load(w_ptr + e * stride_we + n[None, :] * stride_wn + k[:, None], mask=k_ok[:, None] & n_ok[None, :],
                    other=0).to(tl.float32)                   # (BLOCK_K, BLOCK_N), K-major for tl.dot
    sg = e * stride_se + n * stride_sn + g
    s = tl.load(s_ptr + sg, mask=n_ok, other=0.0).to(tl.float32)
    if HAS_ZEROS:
        codes -= tl.load(z_ptr + sg, mask=n_ok, other=0).to(tl.float32)[None, :]
    return tl.dot(a, codes.to(a.dtype), input_precision=PRECISION) * s[None, :]


@triton.jit
def _expert_dot(a, w_ptr, s_ptr, z_ptr, e, n, n_ok, k0, K, G, stride_we, stride_wn, stride_se, stride_sn,
                BITS: tl.constexpr, HAS_ZEROS: tl.constexpr, PAIRS: tl.constexpr, BLOCK_K: tl.constexpr,
                PRECISION: tl.constexpr):
    """a @ W_e[n, k0:k0 + BLOCK_K]^T, float32: a is the (BLOCK_M, BLOCK_K) activation tile at k0, W_e
    expert e's (N, K) matrix. PAIRS (the K tile inside one quantization group): the grouped paths above,
    one scale per column after the dot. Otherwise each weight is dequantized in the tile (_expert_tile)."""
    ks = k0 + tl.arange(0, BLOCK_K)
    if PAIRS and BITS == 8:
        part = _w8_group_dot(a, w_ptr, s_ptr, z_ptr, e, n, n_ok, ks, ks < K, k0 // G, stride_we, stride_wn,
                             stride_se, stride_sn, HAS_ZEROS, PRECISION)
    elif PAIRS:   # INT4: the tile split into its even and odd columns, one per nibble of a packed byte
        j = k0 // 2 + tl.arange(0, BLOCK_K // 2)
        a_even, a_odd = tl.split(tl.reshape(a, (a.shape[0], BLOCK_K // 2, 2)))
        part = _w4_pairs_dot(a_even, a_odd, w_ptr, s_ptr, z_ptr, e, n, n_ok, j, j < K // 2, k0 // G, stride_we,
                             stride_wn, stride_se, stride_sn, HAS_ZEROS, PRECISION)
    else:   # the weight tile (BLOCK_K, BLOCK_N), K-major as tl.dot wants it
        w = _expert_tile(w_ptr, s_ptr, z_ptr, e, n[None, :], ks[:, None], (ks[:, None] < K) & n_ok[None, :],
                         stride_we, stride_wn, stride_se, stride_sn, G, BITS, HAS_ZEROS)
        part = tl.dot(a, w.to(a.dtype), input_precision=PRECISION)
    return part


@triton.jit
def _gate_up_kernel(x_ptr, w_ptr, s_ptr, z_ptr, h_ptr, token_ptr, block_expert_ptr,
                    H, INTER, G, stride_x, stride_we, stride_wn, stride_se, stride_sn, stride_h,
                    BITS: tl.constexpr, HAS_ZEROS: tl.constexpr, PAIRS: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr):
    pid_m, pid_n = tl.program_id(0), tl.program_id(1)
    e = tl.load(block_expert_ptr + pid_m)
    if e < 0:                                                 # a tile past the last segment: nothing to do
        return
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)           # positions in the padded sorted order
    token = tl.load(token_ptr + rows)                         # -1 on padding rows
    valid = token >= 0
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)            # columns of the intermediate size
    acc_gate = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)
    acc_up = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)
    for k0 in range(0, H, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        a = tl.load(x_ptr + token[:, None] * stride_x + ks[None, :], mask=valid[:, None] & (ks[None, :] < H),
                    other=0.0)                                # the tokens' rows of x, gathered
        # expert e's gate rows are 0..INTER-1 of its stacked matrix, its up rows INTER..2*INTER-1. Both
        # products first, then the sums: written `acc += dot(...)` twice, the up tile's loads came after
        # the gate's dot (the bf16 loop: 2 more barriers, 5% more instructions, `scripts/sass_count.py moe`)
        gate = _expert_dot(a, w_ptr, s_ptr, z_ptr, e, cols, cols < INTER, k0, H, G, stride_we, stride_wn,
                           stride_se, stride_sn, BITS, HAS_ZEROS, PAIRS, BLOCK_K, PRECISION)
        up = _expert_dot(a, w_ptr, s_ptr, z_ptr, e, INTER + cols, cols < INTER, k0, H, G, stride_we, stride_wn,
                         stride_se, stride_sn, BITS, HAS_ZEROS, PAIRS, BLOCK_K, PRECISION)
        acc_gate += gate
        acc_up += up
    h = acc_gate / (1.0 + tl.exp(-acc_gate)) * acc_up          # silu(gate) * up
    tl.store(h_ptr + rows[:, None] * stride_h + cols[None, :], h.to(h_ptr.dtype.element_ty),
             mask=valid[:, None] & (cols[None, :] < INTER))


@triton.jit
def _down_kernel(h_ptr, w_ptr, s_ptr, z_ptr, y_ptr, weight_ptr, token_ptr, block_expert_ptr,
                 H, INTER, G, stride_h, stride_we, stride_wn, stride_se, stride_sn, stride_y,
                 BITS: tl.constexpr, HAS_ZEROS: tl.constexpr, PAIRS: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr):
    pid_m, pid_n = tl.program_id(0), tl.program_id(1)
    e = tl.load(block_expert_ptr + pid_m)
    if e < 0:
        return
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    valid = tl.load(token_ptr + rows) >= 0
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)            # columns of H
    acc = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)
    for k0 in range(0, INTER, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        a = tl.load(h_ptr + rows[:, None] * stride_h + ks[None, :], mask=valid[:, None] & (ks[None, :] < INTER),
                    other=0.0)                                # h is already in the sorted order
        acc += _expert_dot(a, w_ptr, s_ptr, z_ptr, e, cols, cols < H, k0, INTER, G, stride_we, stride_wn,
                           stride_se, stride_sn, BITS, HAS_ZEROS, PAIRS, BLOCK_K, PRECISION)
    gate_weight = tl.load(weight_ptr + rows, mask=valid, other=0.0).to(tl.float32)
    y = acc * gate_weight[:, None]
    tl.store(y_ptr + rows[:, None] * stride_y + cols[None, :], y.to(y_ptr.dtype.element_ty),
             mask=valid[:, None] & (cols[None, :] < H))


def padded_length(num_assignments: int, num_experts: int, block_m: int) -> int:
    """The most rows the padded layout can need: every expert's segment rounded up to block_m adds at
    most block_m - 1 rows. From the shapes alone, so no count is read back from the GPU."""
    return triton.cdiv(num_assignments + num_experts * (block_m - 1), block_m) * block_m


def align_blocks(experts: torch.Tensor, weights: torch.Tensor, num_experts: int, block_m: int):
    """Sort the assignments by expert and pad every expert's segment to a multiple of block_m.

    Returns (token, weight, block_expert, pos), all of sizes known from the shapes (P =
    `padded_length(T * k, E, block_m)`): token (P,) the row of x for each padded position (-1 on
    padding), weight (P,) its gate weight, block_expert (P // block_m,) the expert of each tile (-1
    for the tiles after the last segment), pos (T, k) where each assignment landed (P for one dropped
    by a capacity limit, index E). Only tensor ops, no reads back to the host."""
    T, k = experts.shape
    E, n, dev = num_experts, experts.numel(), experts.device
    P = padded_length(n, E, block_m)
    flat = experts.flatten().long()
    order = torch.argsort(flat, stable=True)                  # by expert, token order within; dropped last
    sorted_e = flat[order]
    counts = torch.zeros(E + 1, dtype=torch.int64, device=dev).scatter_add_(0, flat, torch.ones_like(flat))
    padded = (counts[:E] + block_m - 1) // block_m * block_m
    seg_end = torch.cumsum(padded, 0)
    seg_start = torch.cat([seg_end - padded, seg_end.new_full((1,), P)])   # "expert E" (dropped) -> P
    rank = torch.arange(n, device=dev) - (torch.cumsum(counts, 0) - counts)[sorted_e]   # place in its segment
    pos_sorted = torch.where(sorted_e < E, seg_start[sorted_e] + rank, P)
    token = torch.full((P + 1,), -1, dtype=torch.int64, device=dev)
    weight = torch.zeros(P + 1, dtype=weights.dtype, device=dev)
    token[pos_sorted] = torch.where(sorted_e < E, order // k, -1)   # every dropped one writes to the spare slot P
    weight[pos_sorted] = weights.flatten()[order]
    tile_start = torch.arange(0, P, block_m, device=dev)
    block_expert = torch.searchsorted(seg_end, tile_start, right=True)   # the segment each tile starts in
    block_expert = torch.where(block_expert < E, block_expert, -1)
    pos = torch.empty(n, dtype=torch.int64, device=dev)
    pos[order] = pos_sorted
    return token[:P], weight[:P], block_expert, pos.view(T, k)


# Block sizes for a GPU, the fastest picked per shape by `pick_config`. BLOCK_M >= 16 (tl.dot's
# smallest tile): at decode most of a 16-row tile is padding, but the weights are read once per
# tile, and reading them is the cost.
# The interpreter pays per operation more than per element: on CPU, few programs with big tiles.
INTERPRETER_CONFIG = dict(BLOCK_M=16, BLOCK_N=256, BLOCK_K=256)
CONFIGS = [
    dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=32, num_warps=4),
    dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=64, num_warps=4),
    dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=128, num_warps=4),
    dict(BLOCK_M=16, BLOCK_N=128, BLOCK_K=64, num_warps=4),
    dict(BLOCK_M=32, BLOCK_N=64, BLOCK_K=64, num_warps=4),
    dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=64, num_warps=4),
    dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=64, num_warps=8),
]


def _weights(w, block_k: int):
    """(tensor, scales, zeros), constexprs, (G, strides) for the kernels: a float (E, N, K) tensor, or
    `PackedExperts` (unused pointers get any tensor). PAIRS: every K tile inside one group (for INT4,
    `_w4_pairs_dot`; for INT8, `_w8_group_dot`)."""
    if isinstance(w, PackedExperts):
        q, s = w.qweight.contiguous(), w.scales.contiguous()
        z = None if w.zeros is None else w.zeros.contiguous()
        G = w.shape[2] if w.group_size is None else w.group_size
        kind = dict(BITS=w.bits, HAS_ZEROS=z is not None, PAIRS=G % block_k == 0)
        return (q, s, s if z is None else z), kind, (G, q.stride(0), q.stride(1), s.stride(0), s.stride(1))
    w = w.contiguous()
    return (w, w, w), dict(BITS=0, HAS_ZEROS=False, PAIRS=False), (1, w.stride(0), w.stride(1), 0, 0)


def is_silu(act) -> bool:
    """The kernels fuse SiLU: F.silu, nn.SiLU or transformers' SiLUActivation (None means SiLU too)."""
    return act is None or getattr(act, "__name__", "") == "silu" or type(act).__name__ in ("SiLU", "SiLUActivation")


def _check(x, gate_up, down, act):
    if not is_silu(act):
        raise ValueError(f"the Triton MoE kernel fuses SiLU; got activation {act!r}")
    if x.device.type == "cpu" and not interpreted():
        raise ValueError("Triton kernels need a CUDA tensor, or TRITON_INTERPRET=1 set before llmopt.moe.triton_moe "
                         "is imported to run them on CPU")
    for name, w in (("gate_up", gate_up), ("down", down)):
        if isinstance(w, PackedExperts) and w.bits not in (4, 8):
            raise ValueError(f"{name}: the kernels read 4- or 8-bit codes, got bits={w.bits!r}")
    E, two_i, H = gate_up.shape
    if tuple(down.shape) != (E, H, two_i // 2) or two_i % 2 or x.shape[-1] != H:
        raise ValueError(f"expected gate_up (E, 2I, H), down (E, H, I) and x (T, H); got {tuple(gate_up.shape)}, "
                         f"{tuple(down.shape)} and {tuple(x.shape)}")


@compiler_opaque
def triton_dispatch(x, experts, weights, gate_up, down, act=None, **config):
    """Same contract as the other dispatch paths (SiLU experts only: `act` must be SiLU or None).
    `gate_up` / `down`: float (E, 2I, H) / (E, H, I) tensors, or `PackedExperts` of those shapes.
    `config`: BLOCK_M, BLOCK_N, BLOCK_K, num_warps (default: the fastest of CONFIGS on a GPU, timed
    once per shape; INTERPRETER_CONFIG on CPU)."""
    _check(x, gate_up, down, act)
    if not config and interpreted() and x.device.type == "cpu":
        config = INTERPRETER_CONFIG
    if not config:
        # one tuning per power of two of the tokens (prompt lengths vary), per shape and format
        fmt = gate_up[3:] + (gate_up.zeros is None,) if isinstance(gate_up, PackedExperts) else None
        key = ("moe", next_power_of_2(x.shape[0]), experts.shape[1], gate_up.shape, x.dtype, fmt)
        config = pick_config(key, CONFIGS, lambda **c: _run(x, experts, weights, gate_up, down, **c))
    return _run(x, experts, weights, gate_up, down, **config)


def _run(x, experts, weights, gate_up, down, BLOCK_M, BLOCK_N, BLOCK_K, num_warps=4):
    E, two_i, H = gate_up.shape
    INTER, T = two_i // 2, x.shape[0]
    x = x.contiguous()
    token, weight, block_expert, pos = align_blocks(experts, weights, E, BLOCK_M)
    P = token.numel()
    h = torch.empty(P, INTER, device=x.device, dtype=x.dtype)
    y = torch.empty(P + 1, H, device=x.device, dtype=x.dtype)   # row P: zeros, for dropped assignments
    y[P].zero_()
    tiles = P // BLOCK_M
    meta = dict(BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K, PRECISION=precision(x.dtype), num_warps=num_warps)
    (w, s, z), kind, (G, swe, swn, sse, ssn) = _weights(gate_up, BLOCK_K)
    _gate_up_kernel[(tiles, triton.cdiv(INTER, BLOCK_N))](
        x, w, s, z, h, token, block_expert, H, INTER, G, x.stride(0), swe, swn, sse, ssn, h.stride(0), **kind, **meta)
    (w, s, z), kind, (G, swe, swn, sse, ssn) = _weights(down, BLOCK_K)
    _down_kernel[(tiles, triton.cdiv(H, BLOCK_N))](
        h, w, s, z, y, weight, token, block_expert, H, INTER, G, h.stride(0), swe, swn, sse, ssn, y.stride(0),
        **kind, **meta)
    return y[pos.flatten()].view(T, -1, H).sum(1)              # each token's k rows, summed
