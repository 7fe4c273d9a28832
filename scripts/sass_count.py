"""Count the machine instructions of the grouped W4A16 GEMV's inner loop, on a machine with no GPU.

Triton can compile for a GPU it does not have: `triton.compile` with a `GPUTarget` runs its whole
pipeline down to a cubin (its pip wheel carries ptxas), and the `cuobjdump` beside ptxas prints the
SASS. Dividing the loop's instructions by the packed bytes each thread handles per iteration gives
instructions per weight byte: the number that decides whether a decode GEMV can keep up with memory.

    python scripts/sass_count.py                       # the default config
    python scripts/sass_count.py '{"BLOCK_N": 16, "GROUPS": 8, "LANES": 4, "VEC": 16, "num_warps": 8}'
    python scripts/sass_count.py gemm                  # the plain and the grouped GEMM, one 64x128x64 tile

Tested with Triton 3.9 (`ASTSource`'s arguments change between versions). Integer arguments are
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

from llmopt.kernels import w4a16  # noqa: E402

POINTERS = {"x_ptr": "*bf16", "qw_ptr": "*u8", "s_ptr": "*fp16", "z_ptr": "*u8", "b_ptr": "*bf16",
            "out_ptr": "*bf16"}
DEFAULT = dict(BLOCK_N=32, GROUPS=4, LANES=4, VEC=16, num_warps=8, LATE_SUM=True, PREFETCH=False)


def compile_sm90(kernel, consts: dict, num_warps: int):
    consts = dict(consts, stride_xk=1, stride_on=1)   # unit strides are specialised as constants
    aligned = [n for n in kernel.arg_names if n not in consts and n != "M"]   # pointers and sizes: multiples of 16
    return compile_for(kernel, POINTERS, consts, num_warps, divisible=aligned)


def sass(cubin: bytes, path="/tmp/llmopt_gemv.cubin") -> str:
    with open(path, "wb") as f:
        f.write(cubin)
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    return subprocess.run([tool, "-sass", path], capture_output=True, text=True, check=True).stdout


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


def main(config: dict):
    config = {**DEFAULT, **config}
    warps = config.pop("num_warps")
    consts = dict(HAS_ZEROS=False, HAS_BIAS=False, BLOCK_M=1, ALIGNED=True, GROUP_BYTES=64, **config)
    body = loop_body(sass(compile_sm90(w4a16._w4a16_gemv_grouped_kernel, consts, warps).asm["cubin"]))
    ops = count(body)
    per_thread = config["BLOCK_N"] * config["GROUPS"] * config["LANES"] * config["VEC"] / (32 * warps)
    print(f"{config}, {warps} warps: loop of {len(body)} instructions for {per_thread:.0f} packed bytes per "
          f"thread = {len(body) / per_thread:.1f} per byte")
    print("  " + ", ".join(f"{k} {v}" for k, v in ops.most_common(16)))


if __name__ == "__main__":
    if sys.argv[1:] == ["gemm"]:
        gemm()
    else:
        main(json.loads(sys.argv[1]) if len(sys.argv) > 1 else {})
