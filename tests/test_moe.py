"""llmopt.moe: routing, balancing losses, capacity, dispatch paths, the layer inside transformers models."""
import copy
import math

import pytest
import torch
import torch.nn.functional as F

from llmopt import moe
from llmopt.moe.dispatch import grouped_mm, hit_experts

PATHS = ["dense", "loop", "sorted"]


def problem(T=37, H=16, inter=24, E=6, k=2, seed=0, only=None, cap=None):
    """Random dispatch inputs; `only` restricts routing to those experts (others get no tokens),
    `cap` applies a capacity factor (some assignments dropped)."""
    return moe.random_problem(T, H, inter, E, k, seed=seed, only=only, capacity_factor=cap)


def reference(x, experts, weights, gate_up, down):
    """Token by token, slot by slot: the definition."""
    out = torch.zeros_like(x)
    E = gate_up.shape[0]
    for t in range(x.shape[0]):
        for s in range(experts.shape[1]):
            e = int(experts[t, s])
            if e < E:
                out[t] += weights[t, s] * moe.expert_ffn(x[t:t + 1], gate_up[e], down[e])[0]
    return out


# ---------------------------------------------------------------- routing and losses

def test_route_topk_renormalised():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0], [0.0, 0.0, 3.0, 0.0]])
    r = moe.route(logits, 2)
    assert r.experts[0].tolist() == [0, 1] and r.experts[1, 0] == 2
    torch.testing.assert_close(r.weights.sum(-1), torch.ones(2))
    p = F.softmax(logits, -1)
    torch.testing.assert_close(r.weights[0], p[0, :2] / p[0, :2].sum())
    raw = moe.route(logits, 2, normalize=False)
    torch.testing.assert_close(raw.weights[0], p[0, :2])


@pytest.mark.parametrize("k", [0, 5, 2.0])
def test_bad_top_k(k):
    with pytest.raises(ValueError, match="top_k"):
        moe.route(torch.zeros(3, 4), k)
    with pytest.raises(ValueError, match="top_k"):
        moe.MoEFeedForward(8, 8, 4, k)


def test_load_balancing_loss_by_hand():
    probs = torch.tensor([[0.9, 0.1], [0.8, 0.2], [0.3, 0.7], [0.6, 0.4]])
    experts = torch.tensor([[0], [0], [1], [0]])
    # f = (3/4, 1/4), P = (0.65, 0.35): 2 * (0.75 * 0.65 + 0.25 * 0.35) = 1.15
    assert moe.load_balancing_loss(probs, experts).item() == pytest.approx(1.15)
    even = torch.full((8, 4), 0.25)
    assert moe.load_balancing_loss(even, torch.arange(8).reshape(4, 2) % 4).item() == pytest.approx(1.0)
    # everything on expert 0 with probability 1: E * 1 * 1 = E
    collapsed = F.one_hot(torch.zeros(5, dtype=torch.long), 4).float()
    assert moe.load_balancing_loss(collapsed, torch.zeros(5, 1, dtype=torch.long)).item() == pytest.approx(4.0)


def test_load_balancing_loss_vs_transformers():
    """Hugging Face counts f per token, not per assignment: its value is k times ours."""
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    logits = torch.randn(50, 8, generator=torch.Generator().manual_seed(1))
    r = moe.route(logits, 2)
    ours = moe.load_balancing_loss(r.probs, r.experts)
    theirs = load_balancing_loss_func((logits,), 8, 2)
    assert theirs.item() == pytest.approx(2 * ours.item(), rel=1e-5)


def test_load_balancing_loss_gradient_flows_to_router():
    w = torch.randn(4, 8, requires_grad=True)
    x = torch.randn(16, 8)
    r = moe.route(x @ w.t(), 2)
    moe.load_balancing_loss(r.probs, r.experts).backward()
    assert w.grad is not None and w.grad.abs().sum() > 0


def test_router_z_loss_by_hand():
    assert moe.router_z_loss(torch.zeros(3, 4)).item() == pytest.approx(math.log(4) ** 2)
    logits = torch.tensor([[0.0, math.log(3.0)]])  # logsumexp = log 4
    assert moe.router_z_loss(logits).item() == pytest.approx(math.log(4) ** 2)


def test_capacity_drops_exactly_the_counted_assignments():
    r = moe.route(torch.log(torch.tensor([[0.9, 0.1], [0.8, 0.2], [0.7, 0.3], [0.1, 0.9]])), 1)
    assert moe.capacity(4, 2, 1, 1.0) == 2
    c = moe.apply_capacity(r, 1.0)  # expert 0 wanted by tokens 0, 1, 2: token 2 is over capacity
    assert c.experts.flatten().tolist() == [0, 0, 2, 1]
    assert c.weights.flatten().tolist() == [1.0, 1.0, 0.0, 1.0]
    assert c.dropped == 1


def test_capacity_serves_first_choices_first():
    logits = torch.log(torch.tensor([[0.6, 0.4], [0.6, 0.4], [0.4, 0.6], [0.4, 0.6]]))
    r = moe.route(logits, 2)
    assert moe.capacity(4, 2, 2, 0.5) == 2
    c = moe.apply_capacity(r, 0.5)  # each expert's 2 places go to first choices; every second choice is dropped
    assert c.experts.tolist() == [[0, 2], [0, 2], [1, 2], [1, 2]]
    assert c.dropped == 4
    assert moe.expert_load(c.experts, 2).tolist() == [2, 2]


def test_capacity_counted_on_random_routing():
    T, E, k = 200, 8, 2
    r = moe.route(torch.randn(T, E, generator=torch.Generator().manual_seed(3)) * 3, k)
    want = moe.expert_load(r.experts, E)
    cap = moe.capacity(T, E, k, 1.0)
    c = moe.apply_capacity(r, 1.0)
    assert moe.expert_load(c.experts, E).tolist() == want.clamp(max=cap).tolist()
    assert c.dropped == int((want - cap).clamp(min=0).sum())
    assert moe.apply_capacity(r, None) is r


@pytest.mark.parametrize("cf", [0, -1.0, "1"])
def test_bad_capacity_factor(cf):
    with pytest.raises(ValueError, match="capacity_factor"):
        moe.capacity(10, 2, 1, cf)
    with pytest.raises(ValueError, match="capacity_factor"):
        moe.MoEFeedForward(8, 8, 4, 2, capacity_factor=cf)


# ---------------------------------------------------------------- dispatch paths

@pytest.mark.parametrize("case", [
    dict(),                              # 6 experts, top-2
    dict(k=1),                           # top-1 (Switch)
    dict(E=4, k=4),                      # top-k = E: every expert on every token
    dict(E=8, k=2, only=[1, 5, 6]),      # experts that receive no tokens
    dict(E=6, k=2, cap=0.6),             # capacity drops some assignments
    dict(T=1, E=4, k=2),                 # a single token (decode)
])
@pytest.mark.parametrize("path", PATHS)
def test_dispatch_paths_agree(case, path):
    args = problem(**case)
    torch.testing.assert_close(moe.get_dispatch(path)(*args), reference(*args), rtol=1e-5, atol=1e-5)


def test_hit_experts_lists_the_experts_with_tokens_and_skips_dropped_slots():
    assert hit_experts(torch.tensor([[5, 1], [1, 3]]), 6) == [1, 3, 5]
    assert hit_experts(torch.tensor([[2, 6], [6, 0]]), 6) == [0, 2]   # 6 = E: a dropped slot
    _, experts, *_ = problem(E=8, k=2, only=[1, 5, 6])
    assert hit_experts(experts, 8) == [1, 5, 6]


def test_grouped_mm_matches_segment_loop(monkeypatch):
    a = torch.randn(20, 8)
    w = torch.randn(4, 6, 8)
    counts = torch.tensor([5, 0, 12, 3])
    fast = grouped_mm(a, w, counts)
    monkeypatch.setattr("llmopt.moe.dispatch._has_grouped_mm", lambda device: False)
    slow = grouped_mm(a, w, counts)
    want = torch.cat([a[:5] @ w[0].t(), a[5:17] @ w[2].t(), a[17:] @ w[3].t()])
    torch.testing.assert_close(fast, want)
    torch.testing.assert_close(slow, want)


def test_sorted_dispatch_backward_matches_loop():
    args = [t.clone().requires_grad_(t.is_floating_point()) for t in problem(E=5, k=2, only=[0, 2, 3])]
    grads = {}
    for path in ("loop", "sorted"):
        for t in args:
            t.grad = None
        moe.get_dispatch(path)(*args).square().sum().backward()
        grads[path] = [t.grad.clone() for t in args if t.is_floating_point()]
    for a, b in zip(grads["loop"], grads["sorted"]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_unknown_dispatch():
    with pytest.raises(ValueError, match="dispatch"):
        moe.get_dispatch("fast")
    layer = moe.MoEFeedForward(8, 8, 4, 2)
    with pytest.raises(ValueError, match="dispatch"):
        layer.experts.dispatch = "fast"


def test_dispatch_times_runs_and_checks():
    t = moe.dispatch_times(64, 16, 8, 8, 2, repeats=1, warmup=0)
    assert set(t) == set(PATHS) and all(v > 0 for v in t.values())


# ---------------------------------------------------------------- the layer in transformers models

def tiny_mixtral(**kw):
    from transformers import MixtralConfig, MixtralForCausalLM

    cfg = MixtralConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, num_local_experts=6,
                        num_experts_per_tok=2, max_position_embeddings=64, **kw)
    torch.manual_seed(0)
    return MixtralForCausalLM(cfg).eval()


def test_layer_output_matches_its_routing():
    layer = moe.MoEFeedForward(16, 24, 6, 2)
    x = torch.randn(3, 5, 16)
    y = layer(x)
    r = layer.last_routing
    assert y.shape == x.shape and r.experts.shape == (15, 2)
    torch.testing.assert_close(y.reshape(15, 16), reference(x.reshape(15, 16), r.experts, r.weights,
                                                            layer.experts.gate_up_proj, layer.experts.down_proj))


@pytest.mark.parametrize("path", PATHS)
def test_swapped_into_mixtral_same_logits(path):
    model = tiny_mixtral()
    ids = torch.randint(0, 64, (2, 11), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = model(ids).logits
        moe.use_llmopt_moe(model, path)
        got = model(ids).logits
    assert len(moe.moe_layers(model)) == 2
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_swapped_into_qwen3_moe_same_logits():
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    cfg = Qwen3MoeConfig(vocab_size=64, hidden_size=32, intermediate_size=48, moe_intermediate_size=16,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                         num_experts=16, num_experts_per_tok=4, norm_topk_prob=False, max_position_embeddings=64)
    torch.manual_seed(0)
    model = Qwen3MoeForCausalLM(cfg).eval()
    with torch.no_grad():  # the zero-initialised router would tie every expert: give it something to say
        for name, p in model.named_parameters():
            if name.endswith("mlp.gate.weight"):
                p.normal_(std=0.5)
    ids = torch.randint(0, 64, (1, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = model(ids).logits
        moe.use_llmopt_moe(model, "sorted")
        got = model(ids).logits
    assert not moe.moe_layers(model)[0].gate.normalize
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_use_llmopt_moe_needs_moe_blocks(tiny):
    with pytest.raises(ValueError, match="MoE blocks"):
        moe.use_llmopt_moe(tiny[0])
    with pytest.raises(ValueError, match="MoEFeedForward"):
        moe.set_dispatch(tiny[0], "loop")


# ---------------------------------------------------------------- upcycling

@pytest.fixture(scope="module")
def upcycled(tiny):
    return moe.upcycle(tiny[0], num_experts=4, top_k=2).eval()


def test_upcycled_model_equals_dense_at_start(tiny, upcycled):
    ids = torch.randint(0, tiny[0].config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(upcycled(ids).logits, tiny[0](ids).logits, rtol=1e-4, atol=1e-4)
    assert type(upcycled).__name__ == "MixtralForCausalLM"
    assert tiny[0].config.model_type == "llama"  # the dense model is untouched


def test_upcycled_param_counts_and_flops(tiny, upcycled):
    dense = tiny[0]
    cfg = dense.config
    L, H, inter, E, k = cfg.num_hidden_layers, cfg.hidden_size, cfg.intermediate_size, 4, 2
    ffn = 3 * H * inter
    n_dense = sum(p.numel() for p in dense.parameters())
    counts = moe.param_counts(upcycled)
    assert counts["total"] == n_dense + L * ((E - 1) * ffn + E * H)
    assert counts["active"] == n_dense + L * ((k - 1) * ffn + E * H)
    assert moe.param_counts(dense) == {"total": n_dense, "active": n_dense}
    emb = dense.get_input_embeddings().weight.numel()
    assert moe.flops_per_token(dense) == 2 * (n_dense - emb - sum(
        p.numel() for n, p in dense.named_parameters() if "norm" in n))
    assert moe.flops_per_token(upcycled) - moe.flops_per_token(dense) == 2 * L * ((k - 1) * ffn + E * H)


def test_upcycled_saves_reloads_generates(upcycled, tmp_path):
    from transformers import AutoModelForCausalLM

    upcycled.save_pretrained(tmp_path)
    back = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(back).__name__ == "MixtralForCausalLM"
    ids = torch.randint(0, upcycled.config.vocab_size, (1, 12), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(back(ids).logits, upcycled(ids).logits, rtol=1e-5, atol=1e-5)
        out = upcycled.generate(ids, max_new_tokens=5, do_sample=False)
    assert out.shape == (1, 17)


def test_upcycled_mistral_keeps_its_sliding_window():
    """A Mistral source with a window shorter than the sequence: the upcycled model keeps the window,
    so it still computes what the dense model does at start."""
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(0)
    dense = MistralForCausalLM(MistralConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                             num_attention_heads=4, num_key_value_heads=2, sliding_window=4)).eval()
    up = moe.upcycle(dense, num_experts=4, top_k=2).eval()
    assert up.config.sliding_window == 4
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(up(ids).logits, dense(ids).logits, rtol=1e-5, atol=1e-5)


def test_upcycle_needs_a_float_llama_family_model(tiny):
    from transformers import GPT2Config, GPT2LMHeadModel

    from llmopt.lowrank import factorize
    from llmopt.quant import QuantConfig, quantize

    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=32))
    with pytest.raises(ValueError, match="upcycle needs a float Llama-family model.*GPT2LMHeadModel has GPT2MLP"):
        moe.upcycle(gpt2, 4, 2)
    with pytest.raises(ValueError, match="dense_config must be a Llama-family config.*intermediate_size"):
        moe.mixtral_config(gpt2.config, 4, 2)
    for changed, kind in ((quantize(copy.deepcopy(tiny[0]), QuantConfig(bits=8)), "QuantLinear"),
                          (factorize(copy.deepcopy(tiny[0]), "svd", ratio=0.5), "LowRankLinear")):
        with pytest.raises(ValueError, match=f"layer 0 of LlamaForCausalLM has {kind}"):
            moe.upcycle(changed, 4, 2)


def test_moe_lm_loss_trains_router_and_experts(tiny):
    model = moe.upcycle(tiny[0], num_experts=4, top_k=2, router_std=0.5).train()
    with pytest.raises(ValueError, match="routed"):
        moe.aux_losses(model)
    x = torch.randint(0, model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    loss = moe.moe_lm_loss(balance_coef=0.1, z_coef=0.01)(model, x[:, :-1], x[:, 1:])
    loss.backward()
    layer = moe.moe_layers(model)[0]
    assert layer.gate.weight.grad.abs().sum() > 0
    assert layer.experts.gate_up_proj.grad.abs().sum() > 0
    balance, z = moe.aux_losses(model)
    assert 1.0 <= balance.item() <= 4.0 and z.item() > 0
    # a trained model copies (its layers' last routing belongs to the step's graph: the copy drops it)
    twin = copy.deepcopy(model)
    assert moe.moe_layers(twin)[0].last_routing is None and layer.last_routing is not None
    torch.testing.assert_close(twin(x).logits, model(x).logits)


def test_counts_of_stock_and_swapped_blocks_agree():
    model = tiny_mixtral()
    stock = moe.param_counts(model), moe.flops_per_token(model)
    cfg = model.config
    per_expert = 3 * cfg.hidden_size * cfg.intermediate_size
    assert stock[0]["total"] - stock[0]["active"] == cfg.num_hidden_layers * (6 - 2) * per_expert
    moe.use_llmopt_moe(model)
    assert (moe.param_counts(model), moe.flops_per_token(model)) == stock


def test_decode_reads_only_the_active_experts(tiny, upcycled):
    from llmopt import bench

    dense = tiny[0]
    cfg = dense.config
    per_expert_bytes = 3 * cfg.hidden_size * cfg.intermediate_size * 4  # float32
    emb = dense.get_input_embeddings().weight
    held = bench.model_size_bytes(upcycled)
    assert bench.weight_bytes(upcycled) == held - emb.numel() * 4 - cfg.num_hidden_layers * (4 - 2) * per_expert_bytes
    assert moe.stats.inactive_expert_bytes(dense) == 0
