import copy
from dataclasses import asdict

import pytest
import torch

from llmopt import bench


def test_model_size_counts_parameters_and_buffers_once():
    lin = torch.nn.Linear(4, 3)
    assert bench.model_size_bytes(lin) == (12 + 3) * 4
    lin.register_buffer("scale", torch.ones(5, dtype=torch.float16))
    assert bench.model_size_bytes(lin) == (12 + 3) * 4 + 5 * 2
    tied = torch.nn.Sequential(torch.nn.Embedding(10, 4), torch.nn.Linear(4, 10, bias=False))
    tied[1].weight = tied[0].weight
    assert bench.model_size_bytes(tied) == 40 * 4
    packed = torch.nn.Module()
    packed.register_buffer("qweight", torch.zeros(8, 2, dtype=torch.uint8))  # e.g. 4-bit packed
    assert bench.model_size_bytes(packed) == 16


def test_model_size_halves_in_bf16(tiny):
    model = copy.deepcopy(tiny[0])  # a copy: casting the shared fixture would round its buffers for later tests
    full = bench.model_size_bytes(model)
    buffers = sum(b.numel() * b.element_size() for b in model.buffers())
    half = bench.model_size_bytes(model.to(torch.bfloat16))
    assert full == 4 * sum(p.numel() for p in model.parameters()) + buffers
    assert half < 0.51 * full


def test_weight_bytes_skip_the_embedding_table(tiny):
    model, _ = tiny
    emb = model.get_input_embeddings().weight
    assert bench.weight_bytes(model) == bench.model_size_bytes(model) - emb.numel() * emb.element_size()


def test_time_fn_statistics():
    calls = []
    s = bench.time_fn(lambda: calls.append(1), warmup=2, repeats=5)
    assert len(calls) == 7 and len(s.runs) == 5
    assert s.min <= s.median <= s.max
    with pytest.raises(ValueError, match="repeats"):
        bench.time_fn(lambda: None, repeats=0)


def test_time_fn_measures_sleep():
    import time

    s = bench.time_fn(lambda: time.sleep(0.02), warmup=0, repeats=3)
    assert 0.018 < s.median < 0.2


def test_track_memory_sees_an_allocation():
    with bench.track_memory("cpu") as m:
        x = torch.ones(64 * 2**20 // 4)  # 64 MB
        x += 1
    assert m.peak_bytes > 64e6 and "RSS" in m.kind


def test_generation_numbers_are_consistent(tiny):
    model, _ = tiny
    # 16 new tokens: the whole call must outlast the first token even on a busy machine
    r = bench.generation(model, batch_size=3, prompt_len=8, new_tokens=16, warmup=1, repeats=2)
    assert r.tokens_per_s == pytest.approx(3 * 16 / r.total_s)
    assert r.requests_per_s == pytest.approx(3 / r.total_s)
    assert 0 < r.ttft_s < r.total_s
    assert r.tpot_s == pytest.approx((r.total_s - r.ttft_s) / 15)
    assert r.peak_memory_bytes > 0
    assert r.joules_per_token is None  # no NVML on CPU
    d = asdict(r)  # how the tour writes it to JSON
    assert d["ttft"]["median"] == r.ttft_s and len(d["total"]["runs"]) == 2
    with pytest.raises(ValueError, match="new_tokens"):
        bench.generation(model, new_tokens=0)


def test_generation_produces_exactly_new_tokens(tiny):
    model, _ = tiny
    lengths = []

    def gen(ids, n):
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                             do_sample=False, pad_token_id=0)
        lengths.append(out.shape[1] - ids.shape[1])
        return out

    bench.generation(model, batch_size=2, prompt_len=4, new_tokens=6, warmup=0, repeats=1, generate_fn=gen)
    assert lengths == [1, 6]


def test_bandwidth_and_roofline(tiny):
    model, _ = tiny
    bw = bench.memory_bandwidth("cpu", nbytes=1 << 24, repeats=3)
    assert 1e8 < bw < 1e13
    roof = bench.decode_roofline(model, measured_s_per_token=1e-3, bandwidth=1e9)
    assert roof.floor_s_per_token == pytest.approx(bench.weight_bytes(model) / 1e9)
    assert roof.floor_tokens_per_s == pytest.approx(1 / roof.floor_s_per_token)
    assert roof.fraction_of_floor == pytest.approx(roof.floor_s_per_token / 1e-3)
    assert roof.measured_tokens_per_s == pytest.approx(1000)


def test_environment_names_the_machine():
    env = bench.environment()
    assert {"python", "torch", "cpu", "cuda"} <= set(env)


@pytest.mark.gpu
def test_cuda_timing_and_memory():
    x = torch.randn(4096, 4096, device="cuda")
    with bench.track_memory("cuda") as m:
        s = bench.time_fn(lambda: x @ x, device="cuda", repeats=3)
    assert s.median > 0 and m.peak_bytes >= x.numel() * 4 and m.kind == "cuda max allocated"


@pytest.mark.gpu
def test_cuda_generation_uses_bf16_and_cuda_memory():
    import llmopt

    model, _ = llmopt.load("tiny-random")
    assert model.device.type == "cuda" and model.dtype == torch.bfloat16
    r = bench.generation(model, batch_size=4, prompt_len=8, new_tokens=8, repeats=2)
    assert r.memory_kind == "cuda max allocated" and r.peak_memory_bytes > 0
    assert r.tokens_per_s == pytest.approx(32 / r.total_s)


def test_matmul_flops_by_hand_and_after_pruning(bundled):
    from llmopt.prune import prune_ffn

    model, _ = bundled  # 6 layers, hidden 256, 8 query heads of 32, 2 kv heads, MLP 768, vocab 4096
    f = bench.matmul_flops(model, tokens=10, context=100, logits=1)
    assert f["attention projections"] == 6 * 2 * 10 * (2 * 256 * 256 + 2 * 256 * 64)
    assert f["mlp"] == 6 * 2 * 10 * 3 * 256 * 768
    assert f["attention scores"] == 6 * 2 * 2 * 10 * 100 * 256
    assert f["lm_head"] == 2 * 256 * 4096
    assert f["total"] == sum(v for k, v in f.items() if k != "total")
    small = prune_ffn(copy.deepcopy(model), 0.25)
    g = bench.matmul_flops(small, tokens=10, context=100, logits=1)
    assert g["mlp"] == 0.75 * f["mlp"] and g["attention projections"] == f["attention projections"]


def _tiny_llama(seed=0):
    from transformers import LlamaForCausalLM

    from llmopt.models import tiny_config

    torch.manual_seed(seed)
    return LlamaForCausalLM(tiny_config(vocab_size=256)).eval()  # hidden 64, q 64, kv 32, MLP 128, 2 layers


def test_matmul_flops_counts_quantized_fused_and_merged_projections_as_float():
    from llmopt import kernels
    from llmopt.quant import QuantConfig, quantize

    dense = bench.matmul_flops(_tiny_llama(), tokens=10, context=10)
    assert dense["attention projections"] == 2 * 2 * 10 * (2 * 64 * 64 + 2 * 64 * 32)
    assert dense["mlp"] == 2 * 2 * 10 * 3 * 64 * 128
    w4 = quantize(_tiny_llama(), QuantConfig(bits=4, group_size=32))
    assert bench.matmul_flops(w4, 10, 10) == dense           # QuantLinear: the same product from codes
    nf4 = quantize(_tiny_llama(), QuantConfig(bits=4, method="nf4"))
    assert bench.matmul_flops(nf4, 10, 10) == dense
    assert bench.matmul_flops(kernels.fuse(w4), 10, 10) == dense             # KernelQuantLinear
    assert bench.matmul_flops(kernels.fuse(_tiny_llama(), merge=True), 10, 10) == dense   # qkv_proj, gate_up_proj
    w8 = kernels.fuse(quantize(_tiny_llama(), QuantConfig(bits=8)), merge=True)
    assert bench.matmul_flops(w8, 10, 10) == dense


def test_matmul_flops_counts_top_k_experts_and_the_router():
    from llmopt import kernels, moe
    from llmopt.quant import QuantConfig, quantize

    dense = bench.matmul_flops(_tiny_llama(), tokens=10, context=10)
    top_k, E = 2, 4
    up = bench.matmul_flops(moe.upcycle(_tiny_llama(), E, top_k), 10, 10)
    assert up["mlp"] == top_k * dense["mlp"] + 2 * 2 * 10 * 64 * E   # 2 layers: router (E x 64) + top_k experts
    assert up["attention projections"] == dense["attention projections"]
    q = quantize(moe.upcycle(_tiny_llama(), E, top_k), QuantConfig(bits=4, group_size=32))
    assert bench.matmul_flops(q, 10, 10) == up                        # QuantExperts
    assert bench.matmul_flops(kernels.fuse(q), 10, 10) == up          # KernelQuantExperts
    assert bench.matmul_flops(moe.use_llmopt_moe(moe.upcycle(_tiny_llama(), E, top_k)), 10, 10) == up


def test_bench_arguments_are_checked(tiny):
    model, _ = tiny
    with pytest.raises(ValueError, match="input_ids"):
        bench.generation(model, input_ids=torch.tensor([1, 2, 3]))
    with pytest.raises(ValueError, match="tokens must be >= 1"):
        bench.prefill(model, tokens=0)
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        bench.prefill(model, tokens=4, batch_size=0)
    for bad in (0.0, -1e-3, float("nan")):
        with pytest.raises(ValueError, match="measured_s_per_token"):
            bench.decode_roofline(model, bad, bandwidth=1e9)
    with pytest.raises(ValueError, match="bandwidth"):
        bench.decode_roofline(model, 1e-3, bandwidth=-1.0)
    with pytest.raises(ValueError, match="tokens >= 1"):
        bench.matmul_flops(model, tokens=0, context=1)
    with pytest.raises(ValueError, match="context >= 0"):
        bench.matmul_flops(model, tokens=1, context=-1)


def test_prefill_times_a_forward_pass(tiny):
    model, _ = tiny
    stats = bench.prefill(model, tokens=16, batch_size=2, warmup=1, repeats=3)
    assert len(stats.runs) == 3 and 0 < stats.min <= stats.median <= stats.max


def test_time_graph_off_a_gpu_is_time_fn():
    calls = []
    s = bench.time_graph(lambda: calls.append(1), device="cpu", warmup=2, repeats=3)
    assert len(calls) == 5 and s.median >= 0
