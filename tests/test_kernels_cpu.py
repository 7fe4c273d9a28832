"""PyTorch's weight-only INT8 / INT4 CPU kernels (`kernels.cpu`) against the references, on
`QuantLinear`'s own formats, and `KernelQuantLinear` / `fuse` choosing them on a CPU.

Tolerances are max |kernel - reference| over max |reference| (the output's scale):
- float32: the kernel dequantizes in float32 as the reference does (W4 as (code - 8) * scale +
  offset, a rounding or two apart from (code - zero) * scale) and sums in its own order: ~1e-6
  has been seen, 1e-5 is the bar;
- bfloat16 / float16: the kernel's scales and offsets are rounded to x's dtype (bfloat16 keeps 8
  bits of the fp16 scale's 11) before the sums: ~6e-3 has been seen in bfloat16, 2e-2 is the bar
  (5e-3 for float16).
"""
import copy

import pytest
import torch
from torch import nn

from llmopt import bench, kernels
from llmopt.kernels import cpu
from llmopt.kernels.qlinear import KernelQuantLinear
from llmopt.kernels.w4a16 import w4a16_reference
from llmopt.kernels.w8a16 import w8a16_reference
from llmopt.quant import QuantConfig, QuantLinear, quantize

pytestmark = pytest.mark.skipif(not cpu.has_cpu_kernels(), reason="this PyTorch lacks the weight-only CPU kernels")

TOL = {torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 2e-2}
IDS = torch.tensor([[5, 17, 300, 42, 7, 9, 1000, 3, 77]])


def make(N, K, group, symmetric, bias, bits, seed=0) -> QuantLinear:
    torch.manual_seed(seed)
    return QuantLinear.from_linear(nn.Linear(K, N, bias=bias), QuantConfig(bits=bits, group_size=group,
                                                                           symmetric=symmetric))


def rand(*shape, dtype=torch.float32, seed=1):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def assert_close(got, want, bias=None):
    """The scale is the larger of the output's and the product's before the bias: the kernels add the
    bias after rounding the product to x's dtype, so a bias that cancels the product leaves that rounding."""
    assert got.shape == want.shape and got.dtype == want.dtype
    err = (got.float() - want.float()).abs().max()
    scale = want.float().abs().max()
    if bias is not None:
        scale = max(scale, (want.float() - bias.float()).abs().max())
    assert err <= TOL[want.dtype] * scale, f"max error {err:.3g} vs scale {scale:.3g}"


# (N, K, group_size, symmetric, bias): N a multiple of 16 but not of the kernel's 64-row blocks (48,
# 80), every group size the kernel takes, per channel (None: one group of K), zero points and not
INT4_CASES = [
    (48, 256, 32, True, True),
    (80, 256, 64, False, False),
    (64, 384, 128, False, True),
    (32, 512, 256, True, False),
    (48, 128, None, False, True),
    (16, 64, None, True, False),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("case", INT4_CASES)
def test_int4_kernel_equals_the_reference(case, dtype):
    N, K, group, symmetric, bias = case
    q = make(N, K, group, symmetric, bias, bits=4)
    assert cpu.cpu_format_problem(4, symmetric, group, N, K) is None
    packed, sz = cpu.pack_int4_for_cpu(q.qweight, q.scales, q.zeros, group)
    assert packed.shape == q.qweight.shape and packed.dtype == torch.uint8 and sz.shape == (K // (group or K), N, 2)
    assert not torch.equal(packed, q.qweight)   # a nibble order of its own, not a copy of ours
    for shape in [(1, K), (3, K), (2, 5, K), (33, K)]:
        x = rand(*shape, dtype=dtype)
        want = w4a16_reference(x, q.qweight, q.scales, q.zeros, group, q.bias)
        assert_close(cpu.int4_cpu_linear(x, packed, sz, group, q.bias), want, q.bias)


_ORDER_CHECK = """
import torch
from llmopt.kernels import cpu
for N, K in [(16, 64), (48, 256), (64, 64), (80, 128), (208, 96)]:   # partial blocks of 16, 32 and 48
    codes = torch.randint(0, 16, (N, K), generator=torch.Generator().manual_seed(N), dtype=torch.int32)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1)
    order, want = cpu.int4_cpu_order(packed, codes), codes.to(torch.uint8)
    assert order is not None and torch.equal(cpu.unpack_int4_from_cpu(packed, order), want)
    wrong = [o for o in cpu.INT4_CPU_ORDERS if not torch.equal(cpu.unpack_int4_from_cpu(packed, o), want)]
    assert N < 32 or wrong, (N, K)   # the orders differ: a right answer is not an accident
print(torch.backends.cpu.get_cpu_capability(), cpu.CPU_KIND, order)
"""


@pytest.mark.parametrize("capability, order", [("default", "(32, 'pairs')"), ("avx2", "(32, 'halves')"),
                                               ("avx512", "(64, 'halves')")])
def test_the_kernels_nibble_order_reads_back(capability, order):
    """`unpack_int4_from_cpu` inverts PyTorch's packing on every CPU layout, forced with
    ATEN_CPU_CAPABILITY (in a fresh process: PyTorch reads it once), and `cpu_kind` follows it."""
    import os
    import subprocess
    import sys

    if capability == "avx512" and not torch.backends.cpu.get_cpu_capability().startswith("AVX512"):
        pytest.skip("this CPU has no AVX-512")
    env = dict(os.environ, ATEN_CPU_CAPABILITY=capability)
    out = subprocess.run([sys.executable, "-c", _ORDER_CHECK], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split(None, 2) == [capability.upper(), capability.upper(), order + "\n"]


def test_a_w4_layer_keeps_its_codes_once():
    """On "auto", the kernel's copy is the only one; saving, loading and moving give the saved layout."""
    q = make(80, 256, 64, False, True, bits=4)
    k = KernelQuantLinear.from_quant_linear(copy.deepcopy(q))
    assert k.qweight is None and "its codes only" in repr(k)
    held = bench.model_size_bytes(k) - k.cpu_scales_zeros.numel() * 4
    assert held == bench.model_size_bytes(q)   # codes, scales, zeros and bias, once
    assert torch.equal(k.packed_codes(), q.qweight) and torch.equal(k.codes(), q.codes())
    saved = k.state_dict()
    assert list(saved) == list(q.state_dict()) and all(torch.equal(saved[n], t) for n, t in q.state_dict().items())
    fresh = QuantLinear(256, 80, q.cfg, bias=True)
    fresh.load_state_dict(saved)   # a plain QuantLinear reads what the fused one saved
    x = rand(3, 256)
    assert torch.equal(fresh(x), q(x))
    other = make(80, 256, 64, False, True, bits=4, seed=7)
    k.load_state_dict(other.state_dict())   # loading into the one-copy module repacks
    assert k.qweight is None and torch.allclose(k(x[:1]), other(x[:1]), atol=1e-5)
    half = copy.deepcopy(k).to(torch.bfloat16)   # a cast packs again, in the new dtype
    assert half.qweight is None and half.cpu_scales_zeros.dtype == torch.bfloat16
    assert_close(half(x[:1].bfloat16()), other.to(torch.bfloat16)(x[:1].bfloat16()), other.bias)
    moved = copy.deepcopy(k).to("meta")   # off the CPU (as to a GPU): the saved layout moves, no kernel
    assert moved.qweight is not None and moved.qweight.device.type == "meta" and not moved.cpu_kernel
    assert moved.cpu_codes is None and moved.cpu_scales_zeros is None


_LOAD_CHECK = """
import sys, torch
saved = torch.load(sys.argv[1], weights_only=False)
k, experts = saved["linear"], saved["experts"]
assert k.qweight is None and experts.gate_up_proj.qweight is None   # this CPU's copies, made on loading
for got, want in [(k(saved["x"]), saved["linear_out"]), (experts(*saved["moe_in"]), saved["experts_out"])]:
    err = (got - want).abs().max() / want.abs().max()
    assert err < 1e-5, err
print(torch.backends.cpu.get_cpu_capability(), k.cpu_order)
"""


@pytest.mark.parametrize("capability", ["default", "avx2"])
def test_a_pickled_w4_model_runs_on_another_cpu(tmp_path, capability):
    """`torch.save(model)` keeps the saved layout of the codes, not this CPU's nibble order: a fused W4
    layer and W4 experts pickled here give the same outputs in a process whose CPU layout differs."""
    import os
    import subprocess
    import sys

    from llmopt.kernels.qlinear import KernelQuantExperts
    from llmopt.moe.layer import Experts
    from llmopt.quant.experts import QuantExperts

    if torch.backends.cpu.get_cpu_capability() == capability.upper():
        pytest.skip(f"this process runs the {capability} layout already")
    q = make(80, 256, 64, False, True, bits=4)
    torch.manual_seed(0)
    qe = QuantExperts.from_experts(Experts(4, 64, 96), QuantConfig(bits=4, group_size=32, symmetric=False))
    x, moe_in = rand(1, 256), (rand(1, 64, seed=2), torch.tensor([[3, 1]]), torch.tensor([[0.7, 0.3]]))
    k, ke = KernelQuantLinear.from_quant_linear(copy.deepcopy(q)), KernelQuantExperts.from_quant_experts(qe)
    assert k.qweight is None and ke.gate_up_proj.qweight is None
    path = tmp_path / "fused.pt"
    torch.save({"linear": k, "experts": ke, "x": x, "linear_out": q(x), "moe_in": moe_in,
                "experts_out": qe(*moe_in)}, path)
    assert k.qweight is None and ke.gate_up_proj.qweight is None   # saving left the modules as they were
    env = dict(os.environ, ATEN_CPU_CAPABILITY=capability)
    out = subprocess.run([sys.executable, "-c", _LOAD_CHECK, str(path)], env=env, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith(capability.upper())
    loaded = torch.load(path, weights_only=False)   # and here, back to this CPU's order
    assert loaded["linear"].cpu_order == k.cpu_order and torch.equal(loaded["linear"](x), k(x))
    assert torch.equal(loaded["experts"](*moe_in), ke(*moe_in))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("N, K, bias", [(37, 96, True), (100, 192, False), (1, 48, True)])
def test_int8_kernel_equals_the_reference(N, K, bias, dtype):
    q = make(N, K, None, True, bias, bits=8)
    assert cpu.cpu_format_problem(8, True, None, N, K) is None
    for shape in [(1, K), (4, K), (2, 3, K), (40, K)]:
        x = rand(*shape, dtype=dtype)
        want = w8a16_reference(x, q.qweight, q.scales, None, None, q.bias)
        assert_close(cpu.int8_cpu_linear(x, q.qweight, q.scales, q.bias), want, q.bias)


@pytest.mark.parametrize("bits, symmetric, group, N, K, said", [
    (8, False, None, 32, 64, "symmetric"),
    (8, True, 32, 32, 64, "per output channel"),
    (8, True, None, 32, 40, "16 at a time"),    # in bfloat16 such a K crashed the process
    (4, True, 16, 32, 64, "group sizes"),
    (4, True, None, 32, 96, "group sizes"),     # per channel: the group is all of K = 96
    (4, False, 32, 24, 64, "multiple"),
    (2, True, 32, 32, 64, "no CPU kernel"),
])
def test_formats_the_kernels_cannot_read_are_said(bits, symmetric, group, N, K, said):
    assert said in cpu.cpu_format_problem(bits, symmetric, group, N, K)


def _use(monkeypatch):
    """Count the CPU kernels' calls; the reference path counts none."""
    calls = []
    for name in ("int4_cpu_linear", "int8_cpu_linear"):
        real = getattr(cpu, name)
        monkeypatch.setattr(kernels.qlinear, name, lambda *a, _real=real, **k: calls.append(1) or _real(*a, **k))
    return calls


@pytest.mark.parametrize("bits, group, symmetric", [(4, 32, True), (4, 64, False), (8, None, True)])
def test_kernel_quant_linear_runs_the_cpu_kernels_on_auto(monkeypatch, bits, group, symmetric):
    monkeypatch.setattr(cpu, "CPU_KIND", "AVX512")   # its row limits, whatever this CPU's
    q = make(48, 128, group, symmetric, True, bits=bits)
    k = KernelQuantLinear.from_quant_linear(q)
    assert k.cpu_kernel and "cpu kernel" in repr(k)
    assert list(k.state_dict()) == list(q.state_dict())   # the kernel's copy is not saved
    calls = _use(monkeypatch)
    most = cpu.max_rows(bits, torch.bfloat16)   # W4 256, W8 64
    for dtype, shape in ((torch.float32, (2, 1, 128)), (torch.bfloat16, (2, 3, 128)), (torch.bfloat16, (most, 128))):
        x = rand(*shape, dtype=dtype)
        assert_close(k.to(dtype)(x), q.to(dtype)(x), q.bias)
    assert len(calls) == 3
    k.backend = "torch"   # the reference, bit for bit
    x = rand(3, 128, dtype=torch.bfloat16)
    assert torch.equal(k(x), q(x)) and len(calls) == 3


@pytest.mark.parametrize("kind", ["AVX512", "DEFAULT"])
@pytest.mark.parametrize("bits, group", [(4, 32), (8, None)])
def test_many_rows_keep_the_reference(monkeypatch, bits, group, kind):
    """Long prompts, and float32 past two rows, where dequantize + matmul is the faster path (kernels.cpu.MAX_ROWS)."""
    monkeypatch.setattr(cpu, "CPU_KIND", kind)
    q = make(48, 128, group, bits == 8, True, bits=bits)
    k = KernelQuantLinear.from_quant_linear(q)
    assert k.cpu_kernel
    calls = _use(monkeypatch)
    for dtype, rows in ((torch.float32, 3), (torch.bfloat16, cpu.max_rows(bits, torch.bfloat16) + 1)):
        x = rand(rows, 128, dtype=dtype)
        k, q = k.to(dtype), q.to(dtype)
        assert torch.equal(k(x), q(x))
    assert not calls



def test_the_row_limits_follow_the_cpu(monkeypatch):
    """`kernel_rows` reads the table of this process's CPU kind: up to its limit the kernel, past it the
    reference; no limit (AVX2's bfloat16) takes the kernel for any prompt; float32 two rows, float16 one
    to four."""
    assert cpu.CPU_KIND in cpu.MAX_ROWS and cpu.cpu_kind() == cpu.CPU_KIND
    seen = set()
    for kind, table in cpu.MAX_ROWS.items():
        monkeypatch.setattr(cpu, "CPU_KIND", kind)
        for bits in (4, 8):
            assert table[bits][torch.float32] == 2 and 1 <= table[bits][torch.float16] <= 4
            for dtype in (torch.float32, torch.float16, torch.bfloat16):
                most = cpu.max_rows(bits, dtype)
                seen.add(most)
                if most is None:
                    assert cpu.kernel_rows(torch.empty(4096, 64, dtype=dtype), bits)
                    continue
                assert cpu.kernel_rows(torch.empty(most, 64, dtype=dtype), bits)
                assert cpu.kernel_rows(torch.empty(1, most, 64, dtype=dtype), bits)
                assert not cpu.kernel_rows(torch.empty(most + 1, 64, dtype=dtype), bits)
        assert cpu.max_rows(4, torch.int8) == 0 and not cpu.kernel_rows(torch.empty(1, 64, dtype=torch.int8), 4)
    assert {None, 1, 2, 4, 64, 256} <= seen   # the tables differ by CPU

def test_the_kernel_path_is_the_one_that_runs():
    """Spoil the kernel's copy of the scales: "auto" must give wrong outputs, "torch" right ones."""
    q = make(48, 128, 32, False, False, bits=4)
    k = KernelQuantLinear.from_quant_linear(q)
    k.cpu_scales_zeros.zero_()
    x = rand(2, 128)
    assert not torch.allclose(k(x), q(x), atol=1e-2)
    k.backend = "torch"   # reads the saved layout, rebuilt from the kernel's codes
    assert k.qweight is not None and torch.equal(k(x), q(x))
    k.backend = "auto"   # copied again from the saved scales
    assert k.qweight is None and torch.allclose(k(x), q(x), atol=1e-5)


def test_loading_a_state_dict_repacks_the_kernels_copy():
    k = KernelQuantLinear.from_quant_linear(make(48, 128, 32, False, False, bits=4, seed=0))
    other = make(48, 128, 32, False, False, bits=4, seed=5)
    k.load_state_dict(other.state_dict())
    x = rand(1, 128)
    assert torch.allclose(k(x), other(x), atol=1e-5)


def test_formats_without_a_cpu_kernel_keep_the_reference(monkeypatch):
    calls = _use(monkeypatch)
    for q in (make(24, 64, 32, True, False, bits=4), make(32, 64, 32, True, False, bits=8),
              make(32, 64, None, False, True, bits=8)):
        k = KernelQuantLinear.from_quant_linear(q)
        assert not k.cpu_kernel and k.cpu_codes is None
        x = rand(3, 64)
        assert torch.equal(k(x), q(x))
    assert not calls


@pytest.mark.parametrize("cfg", [QuantConfig(bits=4, group_size=64, symmetric=False), QuantConfig(bits=8)],
                         ids=["w4-zp-g64", "w8-channel"])
def test_fused_bundled_model_on_the_cpu_kernels(bundled, monkeypatch, cfg):
    model, _ = bundled
    q = quantize(copy.deepcopy(model), cfg)
    calls = _use(monkeypatch)
    for merge in (False, True):   # merged q/k/v and gate/up are packed anew
        fused = kernels.fuse(copy.deepcopy(q), merge=merge)
        linears = [m for m in fused.modules() if isinstance(m, KernelQuantLinear)]
        assert linears and all(m.cpu_kernel for m in linears)
        assert not any("cpu_" in key for key in fused.state_dict())   # saves as it did without the kernels
        with torch.no_grad():
            want, got = q(IDS).logits, fused(IDS).logits
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
        assert torch.equal(fused.generate(IDS, max_new_tokens=8, do_sample=False, pad_token_id=0),
                           q.generate(IDS, max_new_tokens=8, do_sample=False, pad_token_id=0))
    assert len(calls) > 0
    fused = kernels.fuse(copy.deepcopy(q))   # a step reads one copy of the codes, whichever path runs
    read, saved = bench.weight_bytes(fused), bench.weight_bytes(q)
    assert saved < read < 1.1 * saved   # W4: a float32 scale and offset per group; W8: float32 scales
    assert bench.weight_bytes(kernels.set_backend(fused, "torch")) == saved
    with torch.no_grad():   # in bfloat16: the kernels' fast dtype; the model still predicts as in float
        fused = kernels.fuse(copy.deepcopy(q)).to(torch.bfloat16)
        want, got = q(IDS).logits, fused(IDS).logits.float()
    assert (got.argmax(-1) == want.argmax(-1)).float().mean() >= 0.8
    assert (got - want).abs().max() <= 0.05 * want.abs().max()


def test_the_kernels_scales_are_kept_in_the_activations_dtype(bundled):
    """`fuse` keeps the CPU kernels' scales in the model's dtype (merged layers too), so no call casts
    them; loading new scales refreshes that copy (W8 reads it instead of `scales`)."""
    for bits, group in ((4, 32), (8, None)):
        q = make(48, 128, group, True, False, bits=bits)
        k = KernelQuantLinear.from_quant_linear(q, dtype=torch.bfloat16)
        assert k.cpu_scales_zeros.dtype == torch.bfloat16
        x = rand(1, 128, dtype=torch.bfloat16)
        assert_close(k(x), q.to(torch.bfloat16)(x))
        other = make(48, 128, group, True, False, bits=bits, seed=7)
        k.load_state_dict(other.state_dict())
        assert k.cpu_scales_zeros.dtype == torch.bfloat16
        assert_close(k(x), other.to(torch.bfloat16)(x))
    model, _ = bundled
    for dtype in (torch.float32, torch.bfloat16):
        for merge in (False, True):
            fused = kernels.fuse(quantize(copy.deepcopy(model).to(dtype), QuantConfig(bits=4, group_size=64)),
                                 merge=merge)
            linears = [m for m in fused.modules() if isinstance(m, KernelQuantLinear)]
            assert linears and {m.cpu_scales_zeros.dtype for m in linears} == {dtype}


def test_compiled_module_equals_eager():
    q = make(64, 256, 64, False, True, bits=4)
    k = KernelQuantLinear.from_quant_linear(q)
    x = rand(2, 256)
    torch.testing.assert_close(torch.compile(k, dynamic=False)(x), k(x), rtol=1e-6, atol=1e-6)


def test_benchmark_times_every_path(tmp_path, capsys, monkeypatch):
    import json

    from llmopt.cli import _bench, build_parser

    out = tmp_path / "w.json"
    rows = cpu.main(str(out), shapes=((64, 256),), rows=(1, 3), dtypes=(torch.float32, torch.bfloat16), copies=2)
    assert [(r["rows"], r["dtype"]) for r in rows] == [(1, "float32"), (3, "float32"), (1, "bfloat16"), (3, "bfloat16")]
    assert all(r[name] > 0 for r in rows for name in cpu.NAMES)
    assert "w4 cpu kernel" in capsys.readouterr().out and json.loads(out.read_text())["rows"] == rows
    assert all(r["copies"] == 2 for r in rows)
    assert build_parser().parse_args(["bench", "weight-only", "--copies", "8"]).copies == 8
    seen = {}   # `llmopt bench weight-only --rows 64 256 --dtype bfloat16` reaches the benchmark
    monkeypatch.setattr(cpu, "main", lambda json_path=None, **kw: seen.update(kw))
    _bench(build_parser().parse_args(["bench", "weight-only", "--rows", "64", "256", "--dtype", "bfloat16"]))
    assert seen == {"copies": 1, "rows": (64, 256), "dtypes": (torch.bfloat16,)}
    with pytest.raises(ValueError, match="copies"):
        cpu.benchmark(shapes=((64, 256),), copies=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compiled_engine_decodes_through_the_cpu_kernels(bundled, monkeypatch, dtype):
    """The serving engine's compiled decode step (compilation_config=3) over a fused W4 model: under
    torch.compile the INT4 kernel enters the graph as an opaque custom op (Inductor's own lowering of it
    failed in bfloat16 on this graph, torch 2.13). float32: the tokens equal HF generate's on the same
    model; bfloat16: they agree with the uncompiled engine's (rounding may move a late token)."""
    from llmopt.serving import LLMEngine, SamplingParams

    model, tok = bundled
    w4 = kernels.fuse(quantize(copy.deepcopy(model).to(dtype), QuantConfig(bits=4, group_size=64)), merge=True)
    prompts = [[5, 17, 300, 42], [7, 9, 1000, 3, 77, 12]]

    def run(**kw):
        engine = LLMEngine(w4, tok, block_size=16, num_kv_blocks=32, max_num_seqs=2, **kw)
        ids = [engine.add_request(p, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)) for p in prompts]
        final = engine.run()
        return [final[i].outputs[0].token_ids for i in ids]

    opaque = []
    real = cpu._int4_mm_opaque
    monkeypatch.setattr(cpu, "_int4_mm_opaque", lambda *a: opaque.append(1) or real(*a))
    compiled = run(compilation_config=3)
    assert opaque   # traced into the compiled graph
    if dtype == torch.float32:
        for p, got in zip(prompts, compiled):
            with torch.no_grad():
                want = w4.generate(torch.tensor([p]), max_new_tokens=8, do_sample=False, pad_token_id=0)
            assert got == want[0, len(p):].tolist()
    else:
        eager = run()
        same = sum(a == b for x, y in zip(compiled, eager) for a, b in zip(x, y))
        assert same >= 0.75 * sum(len(x) for x in eager), (compiled, eager)
