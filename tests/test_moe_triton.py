"""The Triton MoE kernels against the sorted dispatch reference: in Triton's interpreter on CPU
(small shapes: it is numpy underneath), compiled on a GPU."""
import pytest
import torch

pytest.importorskip("triton")

from llmopt import moe  # noqa: E402
from llmopt.moe import triton_moe  # noqa: E402  (sets TRITON_INTERPRET=1 on a machine without CUDA)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def problem(T, H, inter, E, k, only=None, cap=None, seed=0):
    return moe.random_problem(T, H, inter, E, k, device=DEVICE, seed=seed, only=only, capacity_factor=cap)


@pytest.mark.parametrize("case", [
    dict(T=20, H=32, inter=48, E=4, k=2),                   # I not a multiple of the column tile
    dict(T=9, H=40, inter=32, E=6, k=1, only=[0, 3, 4]),    # top-1, experts without tokens, H not a tile multiple
    dict(T=7, H=32, inter=16, E=3, k=3),                    # top-k = E
    dict(T=24, H=32, inter=32, E=4, k=2, cap=0.5),          # dropped assignments
])
def test_triton_matches_sorted(case):
    args = problem(**case)
    want = moe.sorted_dispatch(*args)
    got = triton_moe.triton_dispatch(*args)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_align_blocks_pads_each_segment():
    experts = torch.tensor([[2, 0], [2, 1], [0, 2], [2, 0]])
    weights = torch.arange(8, dtype=torch.float32).reshape(4, 2)
    token, weight, block_expert, pos = triton_moe.align_blocks(experts, weights, 4, block_m=4)
    # expert 0: tokens 0, 2, 3 (+1 pad); expert 1: token 1 (+3); expert 2: tokens 0, 1, 2, 3; expert 3: none;
    # then room for the worst case (8 assignments + 4 experts x 3 pads = 20 rows), tiles of expert -1
    assert triton_moe.padded_length(8, 4, 4) == 20
    assert block_expert.tolist() == [0, 1, 2, -1, -1]
    assert token.tolist() == [0, 2, 3, -1, 1, -1, -1, -1, 0, 1, 2, 3] + [-1] * 8
    assert weight.tolist() == [1, 4, 7, 0, 3, 0, 0, 0, 0, 2, 5, 6] + [0] * 8
    assert pos.tolist() == [[8, 0], [9, 4], [1, 10], [11, 2]]      # where each assignment's row went
    dropped = triton_moe.align_blocks(torch.tensor([[1, 4], [4, 0]]), torch.ones(2, 2), 4, block_m=4)
    assert dropped[3].tolist() == [[4, 16], [16, 0]]                 # expert E: the spare row past the end
    assert dropped[0].tolist()[:5] == [1, -1, -1, -1, 0]


def test_align_blocks_reads_nothing_back_to_the_host():
    """On the meta device a tensor has a shape but no data: `int(t)`, `.tolist()`, boolean masks and
    `nonzero` all fail there. So the layout is computed without reading the routing back, and its
    sizes depend on the shapes only: what a CUDA graph needs to record the MoE layer."""
    experts = torch.randint(0, 9, (6, 2), device="meta")
    sizes = [t.shape for t in triton_moe.align_blocks(experts, torch.rand(6, 2, device="meta"), 8, block_m=16)]
    P = triton_moe.padded_length(12, 8, 16)
    assert sizes == [(P,), (P,), (P // 16,), (6, 2)]
    with pytest.raises((RuntimeError, NotImplementedError)):   # what the old host-sized layout did
        int(experts.sum())


def _packed(E, H, inter, bits, group_size, symmetric, seed=0):
    """Random experts quantized like `quantize()` quantizes them: (PackedExperts gate_up, down), and the
    float weights they dequantize to."""
    from llmopt.kernels.qlinear import StackedQuantLinear
    from llmopt.quant import QuantConfig, QuantExperts

    torch.manual_seed(seed)
    float_experts = moe.Experts(E, H, inter)
    q = QuantExperts.from_experts(float_experts, QuantConfig(bits=bits, group_size=group_size, symmetric=symmetric))
    gate_up, down = (StackedQuantLinear.stack(list(m)).packed() for m in (q.gate_up_proj, q.down_proj))
    want_gu, want_dn = q.stacked(torch.float32)
    torch.testing.assert_close(gate_up.dequantize(), want_gu, rtol=0, atol=0)
    torch.testing.assert_close(down.dequantize(), want_dn, rtol=0, atol=0)
    return (_to(gate_up), _to(down)), (want_gu.to(DEVICE), want_dn.to(DEVICE))


def _to(p):
    return p._replace(qweight=p.qweight.to(DEVICE), scales=p.scales.to(DEVICE),
                      zeros=None if p.zeros is None else p.zeros.to(DEVICE))


@pytest.mark.parametrize("fmt", [
    dict(bits=4, group_size=16, symmetric=True),
    dict(bits=4, group_size=16, symmetric=False),
    dict(bits=4, group_size=None, symmetric=True),        # one scale per row
    dict(bits=8, group_size=None, symmetric=True),        # int8 codes
    dict(bits=8, group_size=16, symmetric=False),         # uint8 codes with zeros
])
def test_quantized_experts_match_the_dequantized_reference(fmt):
    """The kernels reading INT4 / INT8 codes: sorted dispatch over the dequantized weights is the spec.
    H = 48 and I = 80 are not multiples of the column tiles (masking); expert 5 gets no tokens and some
    assignments are dropped."""
    (gate_up, down), (gu, dn) = _packed(6, 48, 80, **fmt)
    x, ex, w, _, _ = problem(T=11, H=48, inter=80, E=6, k=2, seed=1)
    ex[ex == 5] = 6
    ex[0, 1] = 6
    want = moe.sorted_dispatch(x, ex, w, gu, dn)
    got = triton_moe.triton_dispatch(x, ex, w, gate_up, down)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    half = triton_moe.triton_dispatch(x.half(), ex, w.half(), gate_up, down)   # fp16 activations, fp32 sums
    torch.testing.assert_close(half.float(), want, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("config", triton_moe.CONFIGS, ids=lambda c: "-".join(str(v) for v in c.values()))
@pytest.mark.parametrize("bits, group_size, symmetric", [(4, 16, True), (4, 64, True), (4, 64, False), (8, 64, True),
                                                         (8, None, False)])
def test_every_config_is_right(config, bits, group_size, symmetric):
    """On a GPU `pick_config` may choose any of CONFIGS: each gives the reference's answer. A K tile
    inside one group (groups of 64 with BLOCK_K 32 or 64; per channel where BLOCK_K divides K) takes the
    grouped path (`_w4_pairs_dot`, `_w8_group_dot`), the rest dequantize every weight."""
    (gate_up, down), (gu, dn) = _packed(4, 128, 64, bits=bits, group_size=group_size, symmetric=symmetric, seed=2)
    x, ex, w, _, _ = problem(T=21, H=128, inter=64, E=4, k=2, seed=3)
    want = moe.sorted_dispatch(x, ex, w, gu, dn)
    torch.testing.assert_close(triton_moe.triton_dispatch(x, ex, w, gate_up, down, **config), want,
                               rtol=1e-4, atol=1e-4)


def test_packed_experts_are_checked():
    (gate_up, down), _ = _packed(4, 32, 48, bits=4, group_size=16, symmetric=True)
    x, ex, w, _, _ = problem(T=3, H=32, inter=48, E=4, k=2)
    with pytest.raises(ValueError, match="4- or 8-bit"):
        triton_moe.triton_dispatch(x, ex, w, gate_up._replace(bits=2), down)
    with pytest.raises(ValueError, match=r"gate_up \(E, 2I, H\)"):
        triton_moe.triton_dispatch(x, ex, w, down, gate_up)
    with pytest.raises(ValueError, match="fuses SiLU"):
        triton_moe.triton_dispatch(x, ex, w, gate_up, down, torch.nn.functional.gelu)


def test_triton_is_a_dispatch_path():
    layer = moe.MoEFeedForward(32, 32, 4, 2).to(DEVICE)
    x = torch.randn(10, 32, device=DEVICE)
    with torch.no_grad():
        want = layer(x)
        layer.experts.dispatch = "triton"
        got = layer(x)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.gpu
def test_triton_gpu_speed_and_bf16():
    """On a GPU: bf16 agreement and the kernel timed against the loop path at a fine-grained shape."""
    times = moe.dispatch_times(4096, 1024, 256, 64, 8, paths=("sorted", "loop", "triton"), device="cuda",
                               dtype=torch.bfloat16)
    print({k: f"{v * 1e3:.2f} ms" for k, v in times.items()})
    assert times["triton"] < times["loop"]


def test_expert_decode_benchmark_runs_every_way_against_its_reference():
    """`moe.expert_decode_times` (lesson 08's GPU timing of the W4 experts) at toy sizes, the kernels in the
    interpreter: every way answers (each is checked against its reference inside), and the 4-bit ways read
    an eighth of float32's bytes plus the group scales."""
    r = moe.expert_decode_times(2, 32, 48, 4, 2, group_size=16, device=DEVICE, dtype=torch.float32, rotate=2,
                                warmup=0, repeats=1, backend="triton")
    assert set(r["times"]) >= {"float sorted", "W4 QuantExperts", "W4 GEMV loop", "W4 grouped kernels"}
    assert all(t > 0 for t in r["times"].values()) and 2 <= r["hit"] <= 4
    assert 5 < r["bytes"]["float sorted"] / r["bytes"]["W4 grouped kernels"] < 8   # 4 of 32 bits, plus the scales


def test_the_engine_records_cuda_graphs_only_for_moe_layers_that_read_nothing_back():
    """`serving.runner.graph_blocker`: an MoE layer whose dispatch reads the routing back on the host keeps
    the engine eager on a GPU; "dense" and "triton" dispatch (and `KernelQuantExperts`) read nothing back."""
    import transformers

    from llmopt.serving.runner import graph_blocker

    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=32, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2)
    model = moe.upcycle(transformers.LlamaForCausalLM(cfg), num_experts=4, top_k=2)
    assert "layer 0's MLP" in graph_blocker(model)           # stock Mixtral experts: a loop over the hit ones
    moe.use_llmopt_moe(model, "sorted")
    assert "reads the routing back" in graph_blocker(model)
    for dispatch in ("dense", "triton"):
        moe.set_dispatch(model, dispatch)
        assert graph_blocker(model) is None, dispatch
    moe.use_llmopt_moe(model, "triton", capacity_factor=1.0)   # capacity limits: not claimed
    assert graph_blocker(model) is not None


def test_unwritten_rows_would_show(monkeypatch):
    """Every float buffer the dispatch allocates starts as NaN here: a row a kernel should have written
    and did not would reach the output."""
    real = torch.empty

    def poisoned(*args, **kw):
        t = real(*args, **kw)
        return t.fill_(float("nan")) if t.is_floating_point() else t

    (gate_up, down), (gu, dn) = _packed(4, 32, 48, bits=4, group_size=16, symmetric=False, seed=4)
    x, ex, w, _, _ = problem(T=13, H=32, inter=48, E=4, k=2, seed=5)
    ex[3, 0] = 4                                               # one dropped assignment: the spare row
    want = moe.sorted_dispatch(x, ex, w, gu, dn)
    monkeypatch.setattr(torch, "empty", poisoned)
    for config in (triton_moe.INTERPRETER_CONFIG, triton_moe.CONFIGS[0], dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=16)):
        torch.testing.assert_close(triton_moe.triton_dispatch(x, ex, w, gate_up, down, **config), want,
                                   rtol=1e-4, atol=1e-4)
