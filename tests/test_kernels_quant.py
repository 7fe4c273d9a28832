"""The W4A16 / W8A16 kernels against their references, on `QuantLinear`'s own storage format: in
Triton's interpreter on a CPU (small shapes: numpy underneath), compiled on a GPU (`gpu` marker).

Tolerances are max |kernel - reference| over max |reference| (the output's scale):
- float32: both sides dequantize to the same float32 weights (bit for bit) and accumulate in
  float32; only the summation order differs, at most ~5e-7 relative at these K: 1e-5 is 20 times that;
- float16: each side rounds its result to fp16 once (half an ulp, ~2.5e-4 relative) and the CPU
  reference may round on the way; about 7e-4 has been seen, 5e-3 leaves room for other BLAS;
- bfloat16 (GPU only): 8 bits of mantissa, one rounding is ~2e-3: 2e-2.
The words GEMV's path for 16-bit x adds ~3e-5 of its own (`test_words_gemv_fast_path_error`).
Every kernel writes into an output poisoned with nan, so an element it never stores fails.
"""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

# llmopt.kernels first: without CUDA it sets TRITON_INTERPRET=1, and that must happen before triton is
# imported, or triton.language's own jit helpers (tl.sum, tl.zeros, ...) are compiled-mode functions
# that the interpreter cannot call. It imports without triton; importorskip then skips the file.
from llmopt.kernels import qlinear, w4a16, w8a16
from llmopt.kernels.qlinear import KernelQuantLinear, has_kernel
from llmopt.quant import QuantConfig, QuantLinear

pytest.importorskip("triton")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 2e-2}

# (N, K, group_size, symmetric, bias): tails in N and K, groups that straddle a K block (24) or
# a byte (3), per channel (None)
INT4_CASES = [
    (100, 192, 64, True, True),
    (100, 192, 64, False, False),
    (37, 96, 32, True, False),
    (37, 96, 32, False, True),
    (64, 256, 128, True, True),
    (48, 128, None, True, False),
    (48, 128, None, False, True),
    (20, 96, 24, False, True),
    (20, 48, 3, True, True),
]
INT8_CASES = [
    (100, 192, None, True, True),
    (37, 96, None, False, False),
    (48, 128, 32, True, False),
    (48, 128, 64, False, True),
    (20, 96, 24, False, True),
]
GEMV_M, GEMM_M = (1, 3, 8), (17, 40)
DTYPES = (torch.float32, torch.float16)


def make(N, K, group, symmetric, bias, bits=4, device=DEVICE, seed=0) -> QuantLinear:
    torch.manual_seed(seed)
    lin = nn.Linear(K, N, bias=bias)
    return QuantLinear.from_linear(lin, QuantConfig(bits=bits, group_size=group, symmetric=symmetric)).to(device)


def qargs(q):
    return q.qweight, q.scales, q.zeros, q.cfg.group_size


def rand(*shape, dtype=torch.float32, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(DEVICE, dtype)


def poisoned(M, N, dtype):
    return torch.full((M, N), float("nan"), device=DEVICE, dtype=dtype)


def assert_close(got, want):
    assert got.shape == want.shape and got.dtype == want.dtype
    assert torch.isfinite(got).all(), "the kernel left elements unwritten (nan) or overflowed"
    err = (got.float() - want.float()).abs().max()
    assert err <= TOL[want.dtype] * want.float().abs().max(), f"max error {err:.3g} vs scale {want.abs().max():.3g}"


# --------------------------------------------------------------------------- references == QuantLinear

@pytest.mark.parametrize("case", INT4_CASES)
def test_int4_reference_is_quant_linear(case):
    q = make(*case)
    assert torch.equal(w4a16.dequantize_int4(*qargs(q)), q.dequantized_weight())
    for dtype in DTYPES:
        x = rand(5, case[1], dtype=dtype)
        assert torch.equal(w4a16.w4a16_reference(x, *qargs(q), q.bias), q(x))


@pytest.mark.parametrize("case", INT8_CASES)
def test_int8_reference_is_quant_linear(case):
    q = make(*case, bits=8)
    assert q.qweight.dtype == (torch.int8 if case[3] else torch.uint8)
    assert torch.equal(w8a16.dequantize_int8(*qargs(q)), q.dequantized_weight())
    for dtype in DTYPES:
        x = rand(5, case[1], dtype=dtype)
        assert torch.equal(w8a16.w8a16_reference(x, *qargs(q), q.bias), q(x))


# --------------------------------------------------------------------------- kernels == references

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("M", GEMV_M + GEMM_M)
@pytest.mark.parametrize("case", INT4_CASES)
def test_w4a16_kernel(case, M, dtype):
    q = make(*case)
    x = rand(M, case[1], dtype=dtype)
    out = poisoned(M, case[0], dtype)
    kernel = w4a16.w4a16_gemv if M <= w4a16.GEMV_MAX_M else w4a16.w4a16_gemm
    got = kernel(x, *qargs(q), q.bias, out=out)
    assert got.data_ptr() == out.data_ptr()
    assert_close(got, w4a16.w4a16_reference(x, *qargs(q), q.bias))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("M", GEMV_M)
@pytest.mark.parametrize("case", INT8_CASES)
def test_w8a16_gemv(case, M, dtype):
    q = make(*case, bits=8)
    x = rand(M, case[1], dtype=dtype)
    got = w8a16.w8a16_gemv(x, *qargs(q), q.bias, out=poisoned(M, case[0], dtype))
    assert_close(got, w8a16.w8a16_reference(x, *qargs(q), q.bias))


@pytest.mark.parametrize("group", [32, 128])
@pytest.mark.parametrize("path", ["w4 gemv", "w4 gemm", "w8 gemv"])
def test_every_candidate_config(path, group):
    # on a GPU `pick_config` may choose any candidate: each must compute the same thing. Groups of 32
    # are smaller than every GEMV tile (per-weight scales); of 128, one scale per tile for BLOCK_K <= 128
    N, K, symmetric, bias = 37, 256, False, True
    bits = 8 if path.startswith("w8") else 4
    q = make(N, K, group, symmetric, bias, bits=bits)
    mod, fn, configs = {"w4 gemv": (w4a16, w4a16.w4a16_gemv, w4a16.GEMV_CONFIGS),
                        "w4 gemm": (w4a16, w4a16.w4a16_gemm, w4a16.GEMM_CONFIGS),
                        "w8 gemv": (w8a16, w8a16.w8a16_gemv, w8a16.GEMV_CONFIGS)}[path]
    # one row: the grouped GEMV's LATE_SUM path; 3 rows in a GEMM tile of 16 or more: a decode batch
    for M in [3, 20] if path.endswith("gemm") else [1, 5]:
        x = rand(M, K)
        want = (w4a16.w4a16_reference if bits == 4 else w8a16.w8a16_reference)(x, *qargs(q), q.bias)
        for config in configs:
            assert_close(fn(x, *qargs(q), q.bias, out=poisoned(M, N, x.dtype), **config), want)


@pytest.mark.parametrize("grouped", [{}, dict(GROUPED=True, PREFETCH=True), dict(WORDS=True)])
@pytest.mark.parametrize("K, split, splits", [(1024, 4, 4), (384, 4, 3), (640, 2, 2)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_split_k_gemv_adds_its_partial_sums(monkeypatch, K, split, splits, dtype, grouped):
    """K cut in `splits` ranges of whole 128-wide tiles (the last one partly past K: masked), each
    range's float32 partial sums in its own slice, added up with the bias afterwards."""
    q = make(45, K, 128, False, True)
    x = rand(3, K, dtype=dtype)
    seen = []
    real = torch.empty

    def spy(*shape, **kw):   # the partial-sums buffer is the one float32 tensor of three dims
        t = real(*shape, **kw)
        if t.dim() == 3 and kw.get("dtype") == torch.float32:
            seen.append(tuple(t.shape))
        return t
    monkeypatch.setattr(w4a16.torch, "empty", spy)
    qweight, scales, zeros, group = qargs(q)
    # scales and zeros at the start of longer buffers whose tails are NaN / 255: a read past the last
    # group (a tile beyond K) would show in the output
    tail = torch.full((scales.numel() + 64,), float("nan"), dtype=scales.dtype, device=scales.device)
    tail[:scales.numel()] = scales.flatten()
    ztail = torch.full((zeros.numel() + 64,), 255, dtype=zeros.dtype, device=zeros.device)
    ztail[:zeros.numel()] = zeros.flatten()
    args = (qweight, tail[:scales.numel()].view(scales.shape), ztail[:zeros.numel()].view(zeros.shape), group)
    got = w4a16.w4a16_gemv(x, *args, q.bias, out=poisoned(3, 45, dtype), BLOCK_N=16, BLOCK_K=128, SPLIT_K=split,
                           **grouped)
    assert seen == [(splits, 3, 45)]
    assert_close(got, w4a16.w4a16_reference(x, *qargs(q), q.bias))


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("shape", [(1, 3), (2, 10), (0,)])  # leading dims: GEMV, GEMM (or W8's reference), empty
def test_linear_flattens_leading_dims(bits, shape):
    q = make(100, 192, 64, False, True, bits=bits)
    x = rand(*shape, 192)
    fn = w4a16.w4a16_linear if bits == 4 else w8a16.w8a16_linear
    got = fn(x, *qargs(q), q.bias, backend="triton")
    assert got.shape == (*shape, 100)
    if x.numel():
        assert_close(got, q(x))


# --------------------------------------------------------------------------- which path runs

def _forbid(monkeypatch, module, name):
    def boom(*args, **kwargs):
        raise AssertionError(f"{name} should not run on this path")
    monkeypatch.setattr(module, name, boom)


@pytest.mark.parametrize("M", [1, 8, 9, 17])
def test_triton_backend_runs_the_kernels(monkeypatch, M):
    q4, q8 = make(37, 96, 32, True, True), make(37, 96, 32, True, True, bits=8)
    x = rand(M, 96)
    want4, want8 = q4(x), q8(x)
    _forbid(monkeypatch, w4a16, "w4a16_reference")
    launched = []
    for name in ("_gemv", "_gemm"):
        real = getattr(w4a16, name)
        spy = lambda *a, _real=real, _name=name, **k: launched.append(_name) or _real(*a, **k)  # noqa: E731
        monkeypatch.setattr(w4a16, name, spy)
    assert_close(w4a16.w4a16_linear(x, *qargs(q4), q4.bias, backend="triton"), want4)
    assert set(launched) == {"_gemv" if M <= 8 else "_gemm"}
    if M <= w8a16.GEMV_MAX_M:  # W8 prefill is the reference by design
        _forbid(monkeypatch, w8a16, "w8a16_reference")
        assert_close(w8a16.w8a16_linear(x, *qargs(q8), q8.bias, backend="triton"), want8)


def test_small_batches_choose_between_the_gemv_and_a_gemm_tile(monkeypatch):
    """2-8 rows: pick_config is offered both kinds (here it takes the first GEMM one, as a GPU might);
    1 row: only GEMVs."""
    from llmopt.kernels import common

    offered = {}

    def pick(key, candidates, launch, cold=False):
        offered[key[2]] = [c.get("KERNEL", "gemv") for c in candidates]
        return next((c for c in candidates if c.get("KERNEL") == "gemm"), candidates[0])
    monkeypatch.setattr(w4a16, "pick_config", pick)
    monkeypatch.setattr(common, "pick_config", pick)
    q = make(37, 256, 128, False, True)
    for M in (1, 6):
        x = rand(M, 256)
        assert_close(w4a16.w4a16_linear(x, *qargs(q), q.bias, backend="triton"), q(x))
    assert set(offered[1]) == {"gemv"} and set(offered[6]) == {"gemv", "gemm"}


@pytest.mark.parametrize("backend", ["torch", "auto"])
@pytest.mark.parametrize("M", [1, 17])
def test_torch_backend_is_the_reference(monkeypatch, backend, M):
    if backend == "auto" and torch.cuda.is_available():
        pytest.skip("'auto' runs the kernels on a GPU")
    q4, q8 = make(37, 96, 32, False, True), make(37, 96, 32, False, True, bits=8)
    x = rand(2, M, 96)
    _forbid(monkeypatch, w4a16, "_launch")
    _forbid(monkeypatch, w8a16, "_gemv")
    assert torch.equal(w4a16.w4a16_linear(x, *qargs(q4), q4.bias, backend=backend), q4(x))
    assert torch.equal(w8a16.w8a16_linear(x, *qargs(q8), q8.bias, backend=backend), q8(x))


# --------------------------------------------------------------------------- bad input

def test_bad_backend():
    q4, q8 = make(37, 96, 32, True, False), make(37, 96, None, True, False, bits=8)
    x = rand(1, 96)
    with pytest.raises(ValueError, match="backend"):
        w4a16.w4a16_linear(x, *qargs(q4), backend="cuda")
    with pytest.raises(ValueError, match="backend"):
        w8a16.w8a16_linear(x, *qargs(q8), backend="fast")
    with pytest.raises(ValueError, match="backend"):
        KernelQuantLinear.from_quant_linear(q4, backend="gpu")


def test_grouped_gemv_tiles_whole_group_runs_or_falls_back():
    # (runs per tile, bytes per run); None: the group size does not split into power-of-two runs
    assert w4a16._grouped_runs(128, 4096, 512) == (4, 64)
    assert w4a16._grouped_runs(128, 4096, 64) == (1, 32)      # tiles smaller than a group
    assert w4a16._grouped_runs(None, 4096, 256) == (1, 128)   # per channel: one group of K
    assert w4a16._grouped_runs(None, 11008, 512) is None      # 5504 bytes do not split into 256s
    assert w4a16._grouped_runs(24, 96, 256) is None and w4a16._grouped_runs(3, 48, 256) is None
    # the fallback (the plain GEMV) still computes the right thing
    for case in [(20, 96, 24, False, True), (20, 48, 3, True, True)]:
        q = make(*case)
        x = rand(1, case[1])
        got = w4a16.w4a16_gemv(x, *qargs(q), q.bias, out=poisoned(1, case[0], x.dtype), BLOCK_N=16, BLOCK_K=256,
                               GROUPED=True, LATE_SUM=True)
        assert_close(got, w4a16.w4a16_reference(x, *qargs(q), q.bias))


def test_words_gemv_tiles_whole_group_runs_or_falls_back():
    # (runs per tile, 32-bit words per run); None: K or the group size do not split into such runs
    assert w4a16._word_runs(128, 4096, 512) == (4, 16)
    assert w4a16._word_runs(128, 4096, 64) == (1, 8)       # tiles smaller than a group
    assert w4a16._word_runs(None, 4096, 256) == (1, 32)    # per channel: one group of K
    assert w4a16._word_runs(None, 11008, 512) is None      # 1376 words do not split into 64s
    assert w4a16._word_runs(24, 96, 256) is None            # 3 words per group
    assert w4a16._word_runs(16, 96, 256) is None            # 2 words: less than one 16-byte load
    assert w4a16._word_runs(32, 100, 64) is None            # K not a whole number of words


WORDS_CASES = [(100, 192, 64, True, True), (37, 96, 32, False, False), (48, 128, None, False, True),
               (70, 512, 128, False, True), (20, 96, 24, False, True)]   # the last: the grouped GEMV's fallback


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("M", (1, 3))
@pytest.mark.parametrize("case", WORDS_CASES)
def test_words_gemv(case, M, dtype):
    q = make(*case)
    x = rand(M, case[1], dtype=dtype)
    want = w4a16.w4a16_reference(x, *qargs(q), q.bias)
    for config in (dict(BLOCK_N=16, BLOCK_K=256), dict(BLOCK_N=8, BLOCK_K=64, PREFETCH=True),
                   dict(BLOCK_N=32, BLOCK_K=128, SPLIT_K=2)):
        assert_close(w4a16.w4a16_gemv(x, *qargs(q), q.bias, out=poisoned(M, case[0], dtype), WORDS=True, **config),
                     want)


def test_words_gemv_fast_path_error(monkeypatch):
    """For 16-bit x the words GEMV skips the subtraction of 1 per code, and its sums keep 13-17 bits
    (see the kernel): here that path runs on float32 x, where the output's rounding does not hide
    it, against a float64 reference. ~3e-5 is seen; 2e-4 is well under fp16's (5e-4) and bf16's
    (4e-3) rounding of the output, and well over what the exact path shows (~2e-7)."""
    real = w4a16._launch
    seen = []

    def fast(*args, **meta):
        seen.append(meta.pop("EXACT"))
        return real(*args, EXACT=False, **meta)
    monkeypatch.setattr(w4a16, "_launch", fast)
    q = make(64, 1024, 128, False, True)
    x = rand(2, 1024)
    want = F.linear(x.double(), w4a16.dequantize_int4(*qargs(q)).double(), q.bias.double())
    got = w4a16.w4a16_gemv(x, *qargs(q), q.bias, out=poisoned(2, 64, x.dtype), BLOCK_N=16, BLOCK_K=256, WORDS=True)
    assert seen == [True]   # float32 x would have taken the exact path
    err = (got.double() - want).abs().max() / want.abs().max()
    assert 1e-6 < err < 2e-4, err   # above 1e-6: the fast path did run


def test_pick_config_skips_a_candidate_that_fails(monkeypatch):
    from llmopt import bench
    from llmopt.kernels import common

    monkeypatch.setattr(common.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(bench, "time_graph", lambda fn, **kw: (fn(), bench.Stats.of([1.0]))[1])
    calls = []

    def launch(BLOCK):
        calls.append(BLOCK)
        if BLOCK == 64:
            raise RuntimeError("out of resources")
    with pytest.warns(UserWarning, match="failed on this GPU"):
        assert common.pick_config(("test-skip",), [dict(BLOCK=64), dict(BLOCK=32)], launch) == dict(BLOCK=32)
    assert calls == [64, 32]
    with pytest.warns(UserWarning), pytest.raises(RuntimeError, match="every candidate"):
        common.pick_config(("test-all-fail",), [dict(BLOCK=64)] * 2, launch)


def test_pick_config_cold_times_each_call_after_a_scrub(monkeypatch):
    """`cold=True`: every candidate is timed right after a read that evicts the L2, so the candidates
    compare as they run on cold weights."""
    from llmopt import bench
    from llmopt.kernels import common

    monkeypatch.setattr(common.torch.cuda, "is_available", lambda: True)
    events = []
    monkeypatch.setattr(common, "_l2_scrub", lambda: lambda: events.append("scrub"))

    def time_graph(fn, **kw):
        events.clear()
        fn()
        cost = {"scrub": 5.0, 64: 3.0, 32: 2.0}
        return bench.Stats.of([sum(cost[e] for e in events)])
    monkeypatch.setattr(bench, "time_graph", time_graph)
    timed = []

    def launch(BLOCK):
        events.append(BLOCK)
        timed.append(list(events))
    assert common.pick_config(("test-cold",), [dict(BLOCK=64), dict(BLOCK=32)], launch, cold=True) == dict(BLOCK=32)
    assert timed == [["scrub", 64], ["scrub", 32]]      # each candidate right after the scrub
    common._best.pop(("test-cold",))


def test_bad_shapes():
    q = make(37, 96, 32, False, True)
    qw, s, z, g = qargs(q)
    x = rand(3, 96)
    bad = {
        "qweight": lambda: w4a16.w4a16_linear(rand(3, 64), qw, s, z, g),            # K mismatch
        "x": lambda: w4a16.w4a16_linear(rand(3, 97), qw, s, z, g),                  # odd in_features
        "group_size": lambda: w4a16.w4a16_linear(x, qw, s, z, 40),                  # does not divide 96
        "scales": lambda: w4a16.w4a16_linear(x, qw, s[:, :2], z, g),
        "zeros": lambda: w4a16.w4a16_linear(x, qw, s, z[:-1], g),
        "bias": lambda: w4a16.w4a16_linear(x, qw, s, z, g, bias=torch.zeros(36, device=DEVICE)),
        "out": lambda: w4a16.w4a16_gemv(x, qw, s, z, g, out=poisoned(3, 36, x.dtype)),
    }
    for name, call in bad.items():
        with pytest.raises(ValueError, match=rf"^{name}\b"):
            call()
    with pytest.raises(ValueError, match="qweight"):
        w4a16.w4a16_linear(x, qw.to(torch.int8), s, z, g)
    with pytest.raises(ValueError, match="M <= 8"):
        w4a16.w4a16_gemv(rand(9, 96), qw, s, z, g)
    with pytest.raises(ValueError, match="2-D"):
        w4a16.w4a16_gemm(rand(2, 9, 96), qw, s, z, g)
    q8 = make(37, 96, 32, True, False, bits=8)
    with pytest.raises(ValueError, match="scales"):
        w8a16.w8a16_linear(x, q8.qweight, q8.scales[:, :1], None, 32)
    with pytest.raises(ValueError, match="group_size"):
        w8a16.w8a16_gemv(x, *qargs(q8)[:3], 0)
    with pytest.raises(ValueError, match="qweight"):
        w8a16.w8a16_linear(rand(3, 48), *qargs(q8))


# --------------------------------------------------------------------------- the module

@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("bits, group, symmetric", [(4, 32, True), (4, None, False), (8, None, True), (8, 32, False)])
def test_kernel_quant_linear_matches_quant_linear(monkeypatch, bits, group, symmetric, backend):
    q = make(37, 96, group, symmetric, True, bits=bits)
    k = KernelQuantLinear.from_quant_linear(q, backend=backend)
    assert isinstance(k, QuantLinear) and k.backend == backend and has_kernel(k)
    assert list(k.state_dict()) == list(q.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(k.state_dict().values(), q.state_dict().values()))
    assert k.qweight.data_ptr() == q.qweight.data_ptr()  # the same codes, not re-quantized
    if backend == "triton":  # the kernels must run, not the references
        _forbid(monkeypatch, w4a16, "w4a16_reference")
        _forbid(monkeypatch, w8a16, "w8a16_reference")
    else:
        _forbid(monkeypatch, w4a16, "_launch")
        _forbid(monkeypatch, w8a16, "_gemv")
    for shape in [(1, 96), (2, 3, 96)] + ([(20, 96)] if bits == 4 else []):  # W8 prefill is the reference
        x = rand(*shape)
        if backend == "torch":
            assert torch.equal(k(x), q(x))
        else:
            assert_close(k(x), q(x))
    fresh = KernelQuantLinear(96, 37, q.cfg, bias=True, backend=backend)
    fresh.load_state_dict(q.state_dict())  # reloads from a QuantLinear checkpoint
    x = rand(3, 96)
    assert_close(fresh.to(DEVICE)(x), q(x))


def test_only_4_and_8_bits_have_kernels():
    q2 = make(16, 64, 32, True, False, bits=2)
    assert not has_kernel(q2) and not has_kernel(nn.Linear(4, 4))
    assert has_kernel(make(16, 64, 32, True, False, bits=4)) and has_kernel(make(16, 64, None, True, False, bits=8))
    with pytest.raises(ValueError, match="bits"):
        KernelQuantLinear.from_quant_linear(q2)
    with pytest.raises(ValueError, match="QuantLinear"):
        KernelQuantLinear.from_quant_linear(nn.Linear(4, 4))
    assert qlinear.KERNEL_BITS == (4, 8)


# --------------------------------------------------------------------------- compiled, on a GPU

@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("path", ["w4 gemv", "w4 gemm", "w8 gemv"])
def test_gpu_kernels(path, dtype):
    bits = 8 if path.startswith("w8") else 4
    N, K, M = 1000, 4096, (300 if path.endswith("gemm") else 5)
    q = make(N, K, 128, path == "w4 gemv", True, bits=bits, device="cuda")
    x = rand(M, K, dtype=dtype)
    fn = {"w4 gemv": w4a16.w4a16_gemv, "w4 gemm": w4a16.w4a16_gemm, "w8 gemv": w8a16.w8a16_gemv}[path]
    want = (w4a16.w4a16_reference if bits == 4 else w8a16.w8a16_reference)(x, *qargs(q), q.bias)
    assert_close(fn(x, *qargs(q), q.bias, out=poisoned(M, N, dtype)), want)
    linear = w4a16.w4a16_linear if bits == 4 else w8a16.w8a16_linear
    assert_close(linear(x, *qargs(q), q.bias, backend="auto"), want)  # autotuned config


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_every_gemv_config(dtype):
    """Compiled, every W4A16 GEMV candidate (the words GEMV's 16-bit path included, which the
    interpreter only runs in fp16) equals the reference at 1 and 3 rows, bf16 and fp16."""
    N, K = 1000, 4096
    for symmetric in (True, False):
        q = make(N, K, 128, symmetric, True, device="cuda")
        for M in (1, 3):
            x = rand(M, K, dtype=dtype)
            want = w4a16.w4a16_reference(x, *qargs(q), q.bias)
            for config in w4a16.GEMV_CONFIGS:
                assert_close(w4a16.w4a16_gemv(x, *qargs(q), q.bias, out=poisoned(M, N, dtype), **config), want)
