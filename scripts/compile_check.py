"""Compile every Triton kernel of llmopt for an H100/H200 (sm_90), on a machine with no GPU.

The CPU tests run the kernels in Triton's interpreter, which accepts some programs the compiler
rejects (a type the GPU cannot hold, a layout it cannot convert, a constexpr used as a tensor).
A GPU is lent to this project now and then, for minutes; a kernel that fails to compile there
wastes them. `triton.compile` with a `GPUTarget` runs the whole pipeline, ptxas included, without
a GPU, so this script catches those errors here. Each kernel is compiled with the constexprs its
wrapper passes on a GPU, for the shapes of a 7B-class or TinyLlama-class layer.

    python scripts/compile_check.py            # prints one line per kernel; exit status 1 if any fails,
                                               # 2 if this Triton's offline-compile API is another one

Tested with Triton 3.9 (`ASTSource`'s arguments change between versions). `tests/test_kernels_compile.py`
runs it.
"""
import os
import sys
import time

os.environ["TRITON_INTERPRET"] = "0"   # compiled kernels, not the interpreter's
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")   # fused multiply-adds, as on a GPU launch
import triton  # noqa: E402

try:
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
except ImportError:   # another Triton: its offline-compile API lives elsewhere
    GPUTarget = ASTSource = None

API_MISMATCH = 2      # exit status when this Triton's offline-compile API is not the one used here

FLOATS = ("eps", "scale")   # the scalar arguments that are floats; every other scalar is an int32


def compile_sm90(kernel, pointers: dict, consts: dict, num_warps: int = 4, divisible=(), default_ptr="*bf16"):
    """`triton.compile` for sm_90. pointers: dtype of each `*_ptr` argument (default `default_ptr`);
    consts: the constexprs, and scalars specialised as constants (unit strides); divisible: integer
    arguments marked divisible by 16, as Triton's launcher marks them for such shapes on a GPU."""
    sig, attrs = {}, {}
    for i, name in enumerate(kernel.arg_names):
        if name in consts:
            sig[name] = "constexpr"
        elif name.endswith("_ptr"):
            sig[name] = pointers.get(name, default_ptr)
        else:
            sig[name] = "fp32" if name in FLOATS else "i32"
        if name in divisible:
            attrs[(i,)] = [["tt.divisibility", 16]]
    try:
        src = ASTSource(fn=kernel, signature=sig, attrs=attrs,
                        constexprs={(kernel.arg_names.index(k),): v for k, v in consts.items()})
    except TypeError as e:   # ASTSource's arguments change between Triton versions
        raise ApiMismatch(str(e)) from e
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps})


class ApiMismatch(RuntimeError):
    """This Triton's `ASTSource` takes other arguments than the ones written here (Triton 3.9's)."""


def cases():
    """(name, kernel, pointer dtypes, constexprs, num_warps): each kernel with what its wrapper passes."""
    import llmopt.kernels  # noqa: F401 - loads the kernel modules; `llmopt.kernels.rope` etc. are functions there
    from llmopt.moe import triton_moe
    from llmopt.serving import attention, kv_cache

    rms, swi, sm, rope, w4a16, w8a16 = (sys.modules[f"llmopt.kernels.{m}"]
                                        for m in ("rmsnorm", "swiglu", "softmax", "rope", "w4a16", "w8a16"))
    quant = {"qw_ptr": "*u8", "s_ptr": "*fp16", "z_ptr": "*u8"}
    gemv = dict(HAS_ZEROS=True, HAS_BIAS=False, stride_xk=1, stride_on=1)
    # the grouped GEMV's widest config with both options on (picked by kind: the list grows), tiled as _gemv tiles
    # a 7B layer's K=4096 in groups of 128
    grouped = max((c for c in w4a16.GEMV_CONFIGS if c.get("GROUPED") and c.get("LATE_SUM") and c.get("PREFETCH")),
                  key=lambda c: c["num_warps"])
    runs, sub = w4a16._grouped_runs(128, 4096, grouped["BLOCK_K"])
    vec = min(16, sub)
    paged = {"tables_ptr": "*i64", "lens_ptr": "*i64", "m_ptr": "*fp32", "l_ptr": "*fp32", "acc_ptr": "*fp32"}
    moe = {"token_ptr": "*i64", "block_expert_ptr": "*i64", "weight_ptr": "*fp32"}
    yield "rmsnorm + residual", rms._rmsnorm_kernel, {}, dict(HAS_RESIDUAL=True, BLOCK=4096), 8
    yield "swiglu", swi._swiglu_kernel, {}, dict(BLOCK=1024), 4
    yield "softmax", sm._softmax_kernel, {}, dict(BLOCK=4096), 8
    yield "rope", rope._rope_kernel, {}, dict(BLOCK_HQ=32, BLOCK_HK=4, BLOCK_D=32), 4
    yield "w4a16 gemv", w4a16._w4a16_gemv_kernel, quant, dict(
        gemv, ONE_GROUP=False, LATE_SUM=True, BLOCK_M=1, BLOCK_N=32, BLOCK_K=64), 4
    yield "w4a16 grouped gemv", w4a16._w4a16_gemv_grouped_kernel, quant, dict(
        gemv, LATE_SUM=True, PREFETCH=True, ALIGNED=True, BLOCK_M=1, BLOCK_N=grouped["BLOCK_N"], GROUPS=runs,
        LANES=sub // vec, VEC=vec, GROUP_BYTES=64), grouped["num_warps"]
    for rows in (1, 4):
        yield f"w4a16 words gemv, {rows} row(s)", w4a16._w4a16_gemv_words_kernel, {**quant, "qw_ptr": "*i32"}, dict(
            gemv, PREFETCH=rows == 1, ALIGNED=True, EXACT=False, BLOCK_M=rows, BLOCK_N=32, GROUPS=4, LANES=4, VEC=4,
            GROUP_WORDS=16), 4
    for grouped_gemm, block_m, block_k in ((False, 64, 64), (True, 64, 64), (True, 16, 256)):
        yield f"w4a16 gemm{' grouped' if grouped_gemm else ''} {block_m}x128x{block_k}", w4a16._w4a16_gemm_kernel, \
            quant, dict(HAS_ZEROS=True, HAS_BIAS=True, PRECISION="tf32", GROUPED=grouped_gemm, BLOCK_M=block_m,
                        BLOCK_N=128, BLOCK_K=block_k), 4
    yield "w8a16 gemv", w8a16._w8a16_gemv_kernel, {**quant, "qw_ptr": "*i8"}, dict(
        gemv, BLOCK_M=1, BLOCK_N=32, BLOCK_K=64), 4
    dense = sys.modules["llmopt.kernels.gemv"]
    for prologue, rows, (bn, bk, warps), prefetch, pdl in (
            (dense.PLAIN, 1, (8, 512, 4), True, False), (dense.NORM, 1, (8, 256, 4), False, False),
            (dense.SWIGLU, 1, (16, 256, 4), True, False), (dense.NORM, 4, (4, 128, 4), False, False),
            (dense.NORM, 1, (8, 512, 4), True, True)):
        yield f"dense gemv, prologue {prologue}, {rows} row(s){', PDL' if pdl else ''}", dense._gemv_kernel, {}, dict(
            PROLOGUE=prologue, HAS_RESIDUAL=prologue == dense.NORM, HAS_BIAS=rows > 1, BLOCK_M=rows, BLOCK_N=bn,
            BLOCK_K=bk, PREFETCH=prefetch, PDL=pdl), warps
    w4 = {"w_ptr": "*u8", "s_ptr": "*fp16", "z_ptr": "*u8"}
    moe_w = {"float": ({}, dict(BITS=0, HAS_ZEROS=False, PAIRS=False)),   # bf16 experts (scale/zero pointers unused)
             "W4": (w4, dict(BITS=4, HAS_ZEROS=False, PAIRS=False)),
             "W4 pairs": (w4, dict(BITS=4, HAS_ZEROS=False, PAIRS=True)),
             "W4 pairs zero-point": (w4, dict(BITS=4, HAS_ZEROS=True, PAIRS=True)),
             "W8 zero-point": ({"w_ptr": "*u8", "s_ptr": "*fp16", "z_ptr": "*u8"}, dict(BITS=8, HAS_ZEROS=True,
                                                                                      PAIRS=False)),
             "W8": ({"w_ptr": "*i8", "s_ptr": "*fp16"}, dict(BITS=8, HAS_ZEROS=False, PAIRS=False)),
             "W8 grouped": ({"w_ptr": "*i8", "s_ptr": "*fp16"}, dict(BITS=8, HAS_ZEROS=False, PAIRS=True)),
             "W8 grouped zero-point": ({"w_ptr": "*u8", "s_ptr": "*fp16", "z_ptr": "*u8"}, dict(BITS=8, HAS_ZEROS=True,
                                                                                            PAIRS=True))}
    for label, (ptrs, fmt) in moe_w.items():
        for c in (triton_moe.CONFIGS[0], triton_moe.CONFIGS[-1]):
            blocks = dict(BLOCK_M=c["BLOCK_M"], BLOCK_N=c["BLOCK_N"], BLOCK_K=c["BLOCK_K"], PRECISION="tf32", **fmt)
            size = f"{c['BLOCK_M']}x{c['BLOCK_N']}x{c['BLOCK_K']}"
            yield f"moe gate/up, {label} experts, {size}", triton_moe._gate_up_kernel, {**moe, **ptrs}, blocks, \
                c["num_warps"]
            yield f"moe down, {label} experts, {size}", triton_moe._down_kernel, {**moe, **ptrs}, blocks, c["num_warps"]
    for split, rope, pdl in ((False, False, False), (True, False, False), (True, True, False), (True, True, True)):
        yield f"paged decode{' split' if split else ''}{' + rope + cache write' if rope else ''}" \
              f"{', PDL' if pdl else ''}", attention._paged_decode_kernel, {**paged, "slots_ptr": "*i64"}, dict(
                BLOCK_SIZE=16, GROUP_P=8, D_P=64, SPLIT=split, ROPE=rope, PDL=pdl), 4
    fp8 = {"k_ptr": "*fp8e4nv", "v_ptr": "*fp8e4nv"}   # kv_cache_dtype="fp8": the new token rounded in the kernel
    yield "paged decode split + rope + cache write, FP8 cache", attention._paged_decode_kernel, {
        **paged, "slots_ptr": "*i64", **fp8}, dict(BLOCK_SIZE=16, GROUP_P=8, D_P=64, SPLIT=True, ROPE=True), 4
    for pdl in (False, True):
        yield f"paged decode merge{', PDL' if pdl else ''}", attention._paged_decode_reduce_kernel, paged, dict(
            BLOCK_SIZE=16, SPLITS_P=64, D_P=64, PDL=pdl), 4
    from llmopt.serving import multistep

    ints = {n: "*i64" for n in ("ids_ptr", "pos_ptr", "slots_ptr", "lens_ptr", "tables_ptr", "tokens_ptr", "step_ptr")}
    floats = {"logits_ptr": "*fp32", "logprobs_ptr": "*fp32"}
    for pdl in (False, True):
        yield f"greedy advance{', PDL' if pdl else ''}", multistep._greedy_advance_kernel, {**ints, **floats}, dict(
            KV_BLOCK=16, BLOCK_V=4096, PDL=pdl), 4
    for cache in ("*bf16", "*fp8e4nv"):
        yield f"rope + cache write{', FP8 cache' if 'fp8' in cache else ''}", kv_cache._rope_write_kernel, {
            "slots_ptr": "*i64", "kc_ptr": cache, "vc_ptr": cache}, dict(BLOCK_HQ=32, BLOCK_HK=4, BLOCK_D=32, D_P=64), 4


def main() -> int:
    if ASTSource is None:
        print(f"triton {triton.__version__}: no triton.compiler.ASTSource / GPUTarget here; nothing checked")
        return API_MISMATCH
    failed = 0
    for name, kernel, pointers, consts, warps in cases():
        t = time.perf_counter()
        try:
            compile_sm90(kernel, pointers, consts, warps)
            print(f"ok    {name} ({time.perf_counter() - t:.1f} s)", flush=True)
        except ApiMismatch as e:
            print(f"triton {triton.__version__}: ASTSource takes other arguments ({e}); nothing checked")
            return API_MISMATCH
        except Exception as e:  # noqa: BLE001 - report every kernel, then fail
            failed += 1
            print(f"FAIL  {name}: {type(e).__name__}: {str(e)[:2000]}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
