"""fuse(model): the fused modules keep the model's logits and generations, in float and W4/W8,
with the kernels under the interpreter on CPU; the kernel benchmark's CPU path and CLI."""
import copy
import json

import pytest
import torch

pytest.importorskip("triton")
from llmopt import kernels  # noqa: E402  (sets TRITON_INTERPRET=1 on a machine without CUDA)
from llmopt.kernels import bench as kbench  # noqa: E402
from llmopt.quant import QuantConfig, QuantLinear, quantize  # noqa: E402

IDS = torch.tensor([[5, 17, 300, 42, 7, 9, 1000, 3, 77]])


def logits(m, ids=IDS):
    with torch.no_grad():
        return m(ids).logits


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_fused_tiny_model_keeps_logits_and_generation(tiny, backend):
    model, _ = tiny
    fused = kernels.fuse(copy.deepcopy(model), backend=backend)
    assert isinstance(fused.model.layers[0], kernels.FusedDecoderLayer)
    assert isinstance(fused.model.norm, kernels.FusedRMSNorm)
    ids = torch.cat([IDS, IDS.flip(1)])   # batch 2
    torch.testing.assert_close(logits(fused, ids), logits(model, ids), rtol=1e-5, atol=1e-5)
    want = model.generate(IDS, max_new_tokens=6, do_sample=False, pad_token_id=0)
    got = fused.generate(IDS, max_new_tokens=6, do_sample=False, pad_token_id=0)  # KV cache: decode steps of 1 token
    assert torch.equal(got, want)


def test_fused_bundled_model_keeps_logits(bundled):
    model, _ = bundled
    fused = kernels.fuse(copy.deepcopy(model), backend="auto")  # CPU: the references
    torch.testing.assert_close(logits(fused), logits(model), rtol=1e-5, atol=1e-5)
    kernels.set_backend(fused, "triton")                         # the kernels, interpreted
    assert all(m.backend == "triton" for m in fused.modules() if hasattr(m, "backend"))
    torch.testing.assert_close(logits(fused, IDS[:, :4]), logits(model, IDS[:, :4]), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("cfg", [QuantConfig(bits=4, group_size=32),
                                 QuantConfig(bits=4, group_size=64, symmetric=False), QuantConfig(bits=8)],
                         ids=["w4-sym-g32", "w4-zp-g64", "w8-channel"])
def test_fused_quantized_model_uses_the_kernels(tiny, cfg):
    model, _ = tiny
    q = quantize(copy.deepcopy(model), cfg)
    fused = kernels.fuse(copy.deepcopy(q), backend="triton")
    kinds = {type(m).__name__ for m in fused.modules()}
    assert "KernelQuantLinear" in kinds and "QuantLinear" not in kinds
    assert set(fused.state_dict()) == set(q.state_dict())
    torch.testing.assert_close(logits(fused), logits(q), rtol=1e-4, atol=1e-4)
    assert sum(isinstance(m, QuantLinear) for m in kernels.fuse(copy.deepcopy(q), quantized=False).modules()) > 0


@pytest.mark.parametrize("cfg", [None, QuantConfig(bits=4, group_size=32, symmetric=False), QuantConfig(bits=8)],
                         ids=["dense", "w4-zp-g32", "w8-channel"])
def test_merged_projections_keep_logits_and_generation(tiny, cfg):
    model, _ = tiny
    base = model if cfg is None else quantize(copy.deepcopy(model), cfg)
    merged = kernels.fuse(copy.deepcopy(base), backend="torch" if cfg is None else "triton", merge=True)
    attn, mlp = merged.model.layers[0].self_attn, merged.model.layers[0].mlp
    assert hasattr(attn, "qkv_proj") and not hasattr(attn, "q_proj")
    assert hasattr(mlp, "gate_up_proj") and not hasattr(mlp, "up_proj")
    keys = set(merged.state_dict())
    assert any(".qkv_proj." in k for k in keys) and not any(".q_proj." in k for k in keys)
    torch.testing.assert_close(logits(merged), logits(base), rtol=1e-4, atol=1e-4)
    if cfg is None:
        want = base.generate(IDS, max_new_tokens=6, do_sample=False, pad_token_id=0)
        assert torch.equal(merged.generate(IDS, max_new_tokens=6, do_sample=False, pad_token_id=0), want)


def test_fuse_gemv_merges_and_marks_the_layers(tiny):
    """`gemv=True` merges as `merge=True` does and marks the layers for llmopt.serving's decode GEMVs;
    HF generate (which does not use the mark) runs as with `merge=True`."""
    model, _ = tiny
    g = kernels.fuse(copy.deepcopy(model), backend="torch", gemv=True)
    m = kernels.fuse(copy.deepcopy(model), backend="torch", merge=True)
    assert all(layer.gemv for layer in g.model.layers) and not any(layer.gemv for layer in m.model.layers)
    assert hasattr(g.model.layers[0].self_attn, "qkv_proj") and hasattr(g.model.layers[0].mlp, "gate_up_proj")
    torch.testing.assert_close(logits(g), logits(m), rtol=0, atol=0)


def test_merge_linears_stacks_outputs_or_refuses():
    from llmopt.kernels.fuse import merge_linears
    from llmopt.kernels.qlinear import KernelQuantLinear

    torch.manual_seed(0)
    a, b = torch.nn.Linear(12, 5), torch.nn.Linear(12, 3)
    x = torch.randn(4, 12)
    m = merge_linears([a, b])
    torch.testing.assert_close(m(x), torch.cat([a(x), b(x)], -1))
    qa, qb = (KernelQuantLinear.from_quant_linear(QuantLinear.from_linear(t, QuantConfig(bits=4, group_size=4)))
              for t in (a, b))
    qm = merge_linears([qa, qb])
    assert isinstance(qm, KernelQuantLinear) and qm.qweight.shape == (8, 6) and qm.scales.shape == (8, 3)
    torch.testing.assert_close(qm(x), torch.cat([qa(x), qb(x)], -1))
    qc = KernelQuantLinear.from_quant_linear(QuantLinear.from_linear(b, QuantConfig(bits=4, group_size=6)))
    assert merge_linears([qa, qc]) is None                                     # other group size
    assert merge_linears([a, qb]) is None                                      # dense with quantized
    assert merge_linears([a, torch.nn.Linear(12, 3, bias=False)]) is None     # bias on one only
    assert merge_linears([a, torch.nn.Linear(10, 3)]) is None                 # other input size


def test_fused_model_saves_and_reloads_as_a_plain_llama(tiny, tmp_path):
    from transformers import AutoModelForCausalLM

    model, _ = tiny
    fused = kernels.fuse(copy.deepcopy(model))
    assert set(fused.state_dict()) == set(model.state_dict())
    fused.save_pretrained(tmp_path)
    again = AutoModelForCausalLM.from_pretrained(tmp_path)
    torch.testing.assert_close(logits(again), logits(model))


@pytest.mark.parametrize("kind", ["upcycled", "mixtral"])
def test_fused_moe_model_keeps_its_experts_and_the_engines_tokens(tiny, kind):
    """A Mixture-of-Experts model (lesson 07): attention and norms fused, the MoE block kept as it is;
    the logits stay, and served by the engine (any fusion mode) it gives the unfused model's tokens."""
    import transformers

    from llmopt import moe
    from llmopt.serving import LLMEngine, SamplingParams

    model, tok = tiny
    if kind == "upcycled":
        big = moe.upcycle(copy.deepcopy(model), num_experts=4, top_k=2)
    else:
        cfg = transformers.MixtralConfig(vocab_size=model.config.vocab_size, hidden_size=64, intermediate_size=96,
                                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                         num_local_experts=4, num_experts_per_tok=2)
        torch.manual_seed(0)
        big = transformers.MixtralForCausalLM(cfg)
    with torch.no_grad():
        for name, p in big.named_parameters():
            if "experts" in name or name.endswith("mlp.gate.weight"):
                p.add_(torch.randn_like(p) * 0.3)
    big.eval()
    block = type(big.model.layers[0].mlp)
    prompt, n = [5, 9, 100, 7, 31], 8
    want = big.generate(torch.tensor([prompt]), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                        pad_token_id=0)[0, len(prompt):].tolist()
    for mode in ({}, {"merge": True}, {"gemv": True}):
        fused = kernels.fuse(copy.deepcopy(big), **mode)
        assert type(fused.model.layers[0].mlp) is block
        assert isinstance(fused.model.layers[0].self_attn, kernels.FusedAttention)
        torch.testing.assert_close(logits(fused), logits(big), rtol=1e-4, atol=1e-4)
        engine = LLMEngine(fused, tok, block_size=4, num_kv_blocks=32, max_model_len=64)
        i = engine.add_request(prompt, SamplingParams(temperature=0, max_tokens=n, ignore_eos=True))
        assert engine.run()[i].outputs[0].token_ids == want, mode


def test_fuse_rejects_what_it_cannot_fuse(tiny):
    model, _ = tiny
    fused = kernels.fuse(copy.deepcopy(model))
    with pytest.raises(ValueError, match="already fused"):
        kernels.fuse(fused)
    with pytest.raises(ValueError, match="backend"):
        kernels.fuse(copy.deepcopy(model), backend="cuda")
    with pytest.raises(ValueError, match="Llama-family"):
        kernels.fuse(torch.nn.Linear(4, 4))
    gelu = copy.deepcopy(model)
    gelu.config.hidden_act = "gelu"
    with pytest.raises(ValueError, match="activation"):
        kernels.fuse(gelu)


def test_backend_triton_on_cpu_needs_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="TRITON_INTERPRET"):
        kernels.use_triton(torch.ones(2), "triton")
    assert kernels.use_triton(torch.ones(2), "auto") is False


def test_triton_imported_first_is_said_when_a_kernel_is_asked_for_not_at_import():
    """transformers or bitsandbytes may import triton before llmopt.kernels (no interpreter then): a process
    that only runs the references hears nothing; asking for the Triton backend on a CPU tensor says why
    it cannot run and what to do."""
    import os
    import subprocess
    import sys

    code = ("import warnings; warnings.simplefilter('error'); import triton, torch; import llmopt.kernels as k\n"
            "assert k.use_triton(torch.ones(2), 'auto') is False\n"
            "try:\n    k.use_triton(torch.ones(2), 'triton')\nexcept ValueError as e:\n    print(e)")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "imported before llmopt.kernels" in r.stdout and "restart" in r.stdout


def test_kernels_run_on_cpu_after_a_model_is_loaded_in_a_fresh_process():
    """A learner's fresh Jupyter kernel: `import llmopt`, load a model (transformers imports torch._dynamo,
    which imports triton), then ask for a Triton kernel on a CPU tensor. llmopt sets TRITON_INTERPRET on
    import, before triton can be imported, so the interpreter runs it (lesson 07's dispatch cell failed
    so before)."""
    import os
    import subprocess
    import sys

    code = ("import sys, torch, llmopt\nmodel, tok = llmopt.load('tinypy')\nassert 'triton' in sys.modules\n"
            "from llmopt import moe\nx, ex, w, gu, dn = moe.random_problem(8, 32, 32, 4, 2)\n"
            "err = (moe.get_dispatch('triton')(x, ex, w, gu, dn) - moe.sorted_dispatch(x, ex, w, gu, dn)).abs().max()\n"
            "print('err', float(err))")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    assert float(r.stdout.split("err")[-1]) < 1e-4


def test_bench_checks_every_kernel_on_cpu():
    rows = kbench.check("cpu")
    names = {r["kernel"] for r in rows}
    assert {"rmsnorm", "rmsnorm+residual", "swiglu", "softmax", "rope q+k", "w4a16 gemv", "w4a16 gemm",
            "w8a16 gemv", "gemv", "gemv+norm", "gemv+swiglu"} <= names
    for r in rows:
        assert r["max_abs_err"] < 1e-4, r


def test_bench_bytes_and_flops_are_the_minimum_traffic():
    by_name = {(c.kernel, c.size): c for c in kbench.cases("cpu", torch.float32, scale="small")}
    c = by_name[("rmsnorm", "37x300")]
    assert c.nbytes == (2 * 37 * 300 + 300) * 4          # read x and the weight, write y
    c = by_name[("w4a16 gemv", "M=1 192->100")]
    packed = 100 * 192 // 2 + 100 * (192 // 64) * 2        # nibbles + fp16 group scales
    assert c.nbytes == packed + (192 + 100) * 4 and c.flops == 2 * 100 * 192
    c = by_name[("gemv+norm", "M=1 130->45")]
    assert c.nbytes == (45 * 130 + 4 * 130 + 45) * 4      # W, x, residual, norm weight; write h and y


def test_rotation_hands_out_distinct_copies_in_turn():
    a, b = torch.arange(6.0), torch.ones(3)
    rot = kbench.Rotation((a, None, b), copies=3)
    seen = [rot() for _ in range(4)]
    assert [s[0].data_ptr() for s in seen[:3]] == [s[0].data_ptr() for s in rot.sets]
    assert len({s[0].data_ptr() for s in seen[:3]}) == 3 and seen[3] is seen[0]
    assert all(s[1] is None and torch.equal(s[0], a) and torch.equal(s[2], b) for s in seen)
    assert kbench.copies_past_l2(1 << 20, "cpu") == 1


def test_gemv_config_sweep_runs_every_candidate_correctly():
    # on a CPU it times the interpreter (meaningless), but every config's output is checked
    from llmopt.kernels import w4a16

    result = kbench.sweep_gemv("cpu", shapes=((20, 256),), ms=(1, 3), repeats=1)
    assert len(result["rows"]) == len(w4a16.GEMV_CONFIGS) + len(w4a16.SMALL_BATCH_CONFIGS)
    assert sum(r.get("KERNEL") == "gemm" for r in result["rows"]) == 4    # 3 rows: the 16-row GEMM tiles too
    assert all(r["max_abs_err"] < 1e-4 and r["us"] > 0 for r in result["rows"])
    text = kbench.format_sweep(result, top=40)
    assert "M=1 256->20" in text and "M=3 256->20" in text and "'KERNEL': 'gemm', 'BLOCK_M': 16" in text


def test_cli_bench_kernels_on_cpu(tmp_path, capsys):
    from llmopt.cli import main

    out = tmp_path / "k.json"
    assert main(["bench", "kernels", "--only", "swiglu", "--no-compile", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "kernel timings need" in text and "swiglu" in text
    result = json.loads(out.read_text())
    assert result["check"] and all(r["max_abs_err"] < 1e-4 for r in result["check"])
    assert [r["kernel"] for r in result["rows"]] == ["swiglu"] and result["rows"][0]["eager_us"] > 0


@pytest.mark.slow
def test_compiled_reference_on_cpu():
    result = kbench.time_cases("cpu", warmup=1, repeats=3, compile=True, only=("rmsnorm",))
    row = result["rows"][0]
    assert row["compiled_us"] > 0 and row["compiled_vs_eager"] > 0


@pytest.mark.gpu
@pytest.mark.xfail(reason="not measured with this harness since the grouped GEMV: HF-style decode without CUDA "
                   "graphs is launch-bound. With the engine and CUDA graphs on an H200 (2026-11-27) the W4 + fused "
                   "model ran 394.5 tok/s against 326.7 unfused bf16 (1.21x); see BENCHMARKS.md", strict=False)
def test_gpu_fused_w4_model_decodes_faster():
    result = kbench.end_to_end("tinyllama-1.1b-random", "cuda", new_tokens=32, repeats=2)
    rows = {r["variant"]: r for r in result["rows"]}
    assert rows["w4 fused (W4A16 kernels)"]["speedup"] > 1.0
    assert rows["fused"]["max_logit_diff"] < 0.5   # bf16


@pytest.mark.gpu
def test_gpu_fused_kernels_meet_the_bandwidth_bars():
    """The lesson's claims on a GPU: fused RMSNorm / SwiGLU at >= 75% of the copy bandwidth and >= 2x
    eager (GPU time, `bench.time_graph`). Measured on an H200, 2026-11-26: 79-98% and 7-13x."""
    result = kbench.time_cases("cuda", repeats=50, compile=False, only=("rmsnorm", "swiglu"))
    assert result["rows"]
    for r in result["rows"]:
        of_peak = r["bytes"] / (r["kernel_us"] * 1e-6) / (result["copy_bandwidth_GBps"] * 1e9)
        assert of_peak >= 0.75 and r["speedup_vs_eager"] >= 2.0, r


@pytest.mark.gpu
@pytest.mark.xfail(reason="not reached yet: on an H200 (2026-11-27) the batch-1 W4A16 GEMV took 21.6 us on both "
                   "7B-class layers, 1.13x and 1.23x the bf16 matmul, 26% of the copy bandwidth (instruction-bound); "
                   "see BENCHMARKS.md", strict=False)
def test_gpu_w4a16_gemv_meets_the_bandwidth_bar():
    """The W4A16 GEMV at batch 1: >= 2.5x the bf16 matmul and >= 60% of the bandwidth (packed bytes)."""
    result = kbench.time_cases("cuda", repeats=50, compile=False, only=("w4a16 gemv",))
    rows = [r for r in result["rows"] if r["size"].startswith("M=1 ")]
    assert rows
    for r in rows:
        of_peak = r["bytes"] / (r["kernel_us"] * 1e-6) / (result["copy_bandwidth_GBps"] * 1e9)
        assert r["speedup_vs_dense_linear"] >= 2.5 and of_peak >= 0.6, r


def test_bench_kernel_names_and_only(capsys):
    """`--only` with a name that starts no kernel's name is an error before any work (it gave an empty
    table); the check on a CPU keeps only the named kernels too."""
    from llmopt.cli import main

    assert {c.kernel for c in kbench.cases("cpu", torch.float32, scale="small")} == set(kbench.KERNELS)
    assert main(["bench", "kernels", "--only", "rmsnorm", "nosuchkernel"]) == 2
    err = capsys.readouterr().err
    assert "nosuchkernel" in err and "gemv+swiglu" in err and len(err.strip().splitlines()) == 1
    assert {r["kernel"] for r in kbench.check("cpu", only=("swiglu",))} == {"swiglu"}
