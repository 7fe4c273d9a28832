"""Count the machine instructions of the decode GEMVs' inner loops, on a machine with no GPU.

Triton can compile for a GPU it does not have: `triton.compile` with a `GPUTarget` runs its whole
pipeline down to a cubin (its pip wheel carries ptxas), and the `cuobjdump` beside ptxas prints the
SASS. Dividing the loop's instructions by the packed bytes each thread handles per iteration gives
instructions per weight byte: the number that decides whether a decode GEMV can keep up with memory.

    python scripts/sass_count.py                       # the grouped GEMV, its default config
    python scripts/sass_count.py '{"BLOCK_N": 16, "GROUPS": 8, "LANES": 4, "VEC": 16, "num_warps": 8}'
    python scripts/sass_count.py words                 # the words GEMV (VEC counts 32-bit words)
    python scripts/sass_count.py words '{"BLOCK_N": 32, "num_warps": 4}'
    python scripts/sass_count.py gemm                  # the plain and the grouped GEMM, one 64x128x64 tile
    python scripts/sass_count.py moe                   # lesson 07's MoE kernel: bf16, W4 per weight, W4 pairs
    python scripts/sass_count.py dense '{"PROLOGUE": 1}'   # the bf16 GEMV with the RMSNorm prologue (gemv.py)
    python scripts/sass_count.py words --json          # one line of JSON (lesson 08 reads it)

Besides the count it prints the registers per thread (`cuobjdump -res-usage`), how many programs
fit on one SM with them (65536 registers, 64 warps, 32 programs at most), and the packed bytes
those programs load per iteration: a memory-bound kernel needs tens of KB in flight per SM.

Tested with Triton 3.9 (`ASTSource`'s arguments change between versions; exit status 2 where this
Triton has no such API or other arguments, as `compile_check.py`). Integer arguments are
marked divisible by 16, as Triton's launcher marks them on a GPU for these shapes (K = 4096, 11008).
"""
import json
import os
import re
import subprocess
import sys
from collections import Counter

from compile_check import compile_sm90 as compile_for  # it sets TRITON_INTERPRET=0, then imports triton
from compile_check import triton

from llmopt.kernels import gemv, w4a16  # noqa: E402

POINTERS = {"x_ptr": "*bf16", "qw_ptr": "*u8", "s_ptr": "*fp16", "z_ptr": "*u8", "b_ptr": "*bf16",
            "out_ptr": "*bf16"}
# kernel, bytes per element of the weight as it reads it, default config, constexprs the wrapper adds
KERNELS = {
    "grouped": (w4a16._w4a16_gemv_grouped_kernel, 1,
                dict(BLOCK_N=32, GROUPS=4, LANES=4, VEC=16, num_warps=8, LATE_SUM=True, PREFETCH=False),
                dict(GROUP_BYTES=64)),
    "words": (w4a16._w4a16_gemv_words_kernel, 4,
              dict(BLOCK_N=64, GROUPS=4, LANES=4, VEC=4, num_warps=8, PREFETCH=False),
              dict(GROUP_WORDS=16, EXACT=False)),
    # the bf16 GEMV of gemv.py: PROLOGUE 0 (none), 1 (residual add + RMSNorm), 2 (SwiGLU)
    "dense": (gemv._gemv_kernel, 2, dict(gemv.GEMV_CONFIGS[0], PROLOGUE=gemv.NORM),
              dict(HAS_RESIDUAL=True, PREFETCH=False, PDL=False)),
}


def tile_bytes(kind: str, config: dict) -> int:
    """Weight bytes one program loads per loop iteration."""
    if kind == "dense":
        return config["BLOCK_N"] * config["BLOCK_K"] * KERNELS[kind][1]
    return config["BLOCK_N"] * config["GROUPS"] * config["LANES"] * config["VEC"] * KERNELS[kind][1]


def compile_sm90(kernel, consts: dict, num_warps: int, pointers=POINTERS):
    consts = dict(consts, stride_xk=1, stride_on=1)   # unit strides are specialised as constants
    # pointers and sizes: multiples of 16 (not M, nor the words GEMV's masks)
    aligned = [n for n in kernel.arg_names if n not in consts and n not in ("M", "mask_lo", "mask_hi")]
    return compile_for(kernel, pointers, consts, num_warps, divisible=aligned)


def cuobjdump(cubin: bytes, flag: str, path="/tmp/llmopt_gemv.cubin") -> str:
    with open(path, "wb") as f:
        f.write(cubin)
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    return subprocess.run([tool, flag, path], capture_output=True, text=True, check=True).stdout


def sass(cubin: bytes) -> str:
    return cuobjdump(cubin, "-sass")


def registers(cubin: bytes) -> int:
    return int(re.search(r"REG:(\d+)", cuobjdump(cubin, "-res-usage")).group(1))


def loop_body(text: str) -> list[str]:
    """The instructions of the longest backward branch's range: the kernel's main loop."""
    lines = [(int(a, 16), ins) for a, ins in re.findall(r"/\*([0-9a-f]{4})\*/\s+([^;]*);", text)]
    best = []
    for addr, ins in lines:
        target = re.search(r"BRA\s+0x([0-9a-f]+)", ins)
        if target and int(target.group(1), 16) < addr:
            body = [i for a, i in lines if int(target.group(1), 16) <= a <= addr]
            best = max(best, body, key=len)
    return best


def count(body: list[str]) -> Counter:
    return Counter(re.match(r"(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)", i).group(1) for i in body)


def gemm():
    for name, grouped in (("plain GEMM", False), ("grouped GEMM", True)):
        consts = dict(HAS_ZEROS=False, HAS_BIAS=False, PRECISION="tf32", GROUPED=grouped, BLOCK_M=64, BLOCK_N=128,
                      BLOCK_K=64)
        body = loop_body(sass(compile_sm90(w4a16._w4a16_gemm_kernel, consts, 4).asm["cubin"]))
        ops = count(body)
        print(f"{name}, 64x128x64 tiles, 4 warps: loop of {len(body)} instructions per K step "
              f"({len(body) / 32:.1f} per packed byte per thread)")
        print("  " + ", ".join(f"{k} {v}" for k, v in ops.most_common(16)))


def moe():
    """Lesson 07's MoE gate/up kernel, one 16-row tile: its loop per packed byte of the experts' weights
    (two weight tiles of BLOCK_N x BLOCK_K per K step: gate and up)."""
    from llmopt.moe import triton_moe

    pointers = {"token_ptr": "*i64", "block_expert_ptr": "*i64", "weight_ptr": "*fp32", "w_ptr": "*u8",
                "s_ptr": "*fp16", "z_ptr": "*u8"}
    kinds = {"bf16": ({"w_ptr": "*bf16"}, dict(BITS=0, PAIRS=False), 2.0),
             "W4, dequantized per weight": ({}, dict(BITS=4, PAIRS=False), 0.5),
             "W4, pairs (a K tile inside one group)": ({}, dict(BITS=4, PAIRS=True), 0.5),
             "W8, dequantized per weight": ({"w_ptr": "*i8"}, dict(BITS=8, PAIRS=False), 1.0),
             "W8, grouped (a K tile inside one group)": ({"w_ptr": "*i8"}, dict(BITS=8, PAIRS=True), 1.0)}
    for name, (ptrs, fmt, elem) in kinds.items():
        for bn, bk in ((64, 64), (128, 64)):
            consts = dict(BLOCK_M=16, BLOCK_N=bn, BLOCK_K=bk, PRECISION="tf32", HAS_ZEROS=False, **fmt)
            aligned = [n for n in triton_moe._gate_up_kernel.arg_names if n not in consts and not n.endswith("_ptr")]
            cubin = compile_for(triton_moe._gate_up_kernel, {**pointers, **ptrs}, consts, 4, divisible=aligned)
            body = loop_body(sass(cubin.asm["cubin"]))
            per_thread = 2 * bn * bk * elem / (32 * 4)
            print(f"{name}, 16x{bn}x{bk} tiles, 4 warps: loop of {len(body)} instructions for {per_thread:.0f} weight "
                  f"bytes per thread = {len(body) / per_thread:.1f} per byte")
            print("  " + ", ".join(f"{k} {v}" for k, v in count(body).most_common(12)))


def main(kind: str, config: dict, as_json: bool = False) -> dict:
    kernel, elem_bytes, default, extra = KERNELS[kind]
    config = {**default, **config}
    warps = config.pop("num_warps")
    if kind == "dense":
        consts = {**dict(HAS_BIAS=False, BLOCK_M=1), **extra, **config}
        consts["HAS_RESIDUAL"] = consts["HAS_RESIDUAL"] and consts["PROLOGUE"] == gemv.NORM
        aligned = [n for n in kernel.arg_names if n not in consts and n not in ("M", "eps")]
        cubin = compile_for(kernel, {}, consts, warps, divisible=aligned).asm["cubin"]
    else:
        consts = {**dict(HAS_ZEROS=False, HAS_BIAS=False, BLOCK_M=1, ALIGNED=True), **extra, **config}   # BLOCK_M: rows
        pointers = dict(POINTERS, qw_ptr="*i32") if elem_bytes == 4 else POINTERS
        cubin = compile_sm90(kernel, consts, warps, pointers).asm["cubin"]
    body = loop_body(sass(cubin))
    ops = count(body)
    tile = tile_bytes(kind, config)   # weight bytes per program and iteration
    per_thread = tile / (32 * warps)
    regs = registers(cubin)
    programs = min(65536 // (regs * 32 * warps), 64 // warps, 32)
    result = dict(kind=kind, config=config, num_warps=warps, instructions=len(body), bytes_per_thread=per_thread,
                  per_byte=len(body) / per_thread, ops=dict(ops.most_common()), registers=regs,
                  programs_per_sm=programs)
    if as_json:
        print(json.dumps(result))
        return result
    print(f"{kind} GEMV {config}, {warps} warps: loop of {len(body)} instructions for {per_thread:.0f} weight "
          f"bytes per thread = {len(body) / per_thread:.1f} per byte")
    print("  " + ", ".join(f"{k} {v}" for k, v in ops.most_common(16)))
    print(f"  {regs} registers per thread: {programs} programs per SM, {programs * tile / 1024:.0f} KB of "
          f"weights loaded per iteration per SM")
    return result


if __name__ == "__main__":
    import compile_check

    if compile_check.ASTSource is None:   # another Triton: its offline-compile API lives elsewhere
        print(f"triton {triton.__version__}: no triton.compiler.ASTSource / GPUTarget here; nothing counted")
        sys.exit(compile_check.API_MISMATCH)
    args = sys.argv[1:]
    as_json = "--json" in args
    args = [a for a in args if a != "--json"]
    try:
        if args == ["gemm"]:
            gemm()
        elif args == ["moe"]:
            moe()
        else:
            kind = args.pop(0) if args and args[0] in KERNELS else "grouped"
            main(kind, json.loads(args[0]) if args else {}, as_json)
    except compile_check.ApiMismatch as e:
        print(f"triton {triton.__version__}: ASTSource takes other arguments ({e}); nothing counted")
        sys.exit(compile_check.API_MISMATCH)
