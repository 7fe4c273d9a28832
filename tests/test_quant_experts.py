"""QuantExperts: a Mixture-of-Experts layer's experts quantized like linears (llmopt/quant/experts.py)."""
import copy
import json
import warnings

import pytest
import torch

from llmopt import moe
from llmopt.quant import QuantConfig, QuantExperts, QuantLinear, load_quantized, quantize, save_quantized
from llmopt.quant.experts import ExpertHessians, expert_targets, is_stacked_experts
from llmopt.quant.primitives import quantize as quantize_tensor


@pytest.fixture(autouse=True)
def _no_grad():
    with torch.no_grad():
        yield


def _family(family: str):
    """A small MoE model with routers and experts that differ, so the routing decides the output."""
    import transformers as tf

    base = dict(vocab_size=97, hidden_size=64, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    if family == "upcycled":
        model = moe.upcycle(tf.LlamaForCausalLM(tf.LlamaConfig(**base)), num_experts=4, top_k=2)
    elif family == "mixtral":
        model = tf.MixtralForCausalLM(tf.MixtralConfig(**base, num_local_experts=4, num_experts_per_tok=2))
    else:
        model = tf.Qwen3MoeForCausalLM(tf.Qwen3MoeConfig(**base, num_experts=4, num_experts_per_tok=2,
                                                         moe_intermediate_size=32, head_dim=16))
    for name, p in model.named_parameters():
        if name.endswith("mlp.gate.weight") or "experts" in name:
            p.normal_(std=0.5 if name.endswith("gate.weight") else 0.1)
    return model.eval()


def _dequantized_copy(float_model, qmodel):
    """The float model holding the quantized model's weights, dequantized, and its float tensors (norms
    and routers, which AWQ and SmoothQuant rescale): what the quantized model must compute."""
    ref = copy.deepcopy(float_model)
    held = qmodel.state_dict()
    for name, t in ref.state_dict().items():
        if name in held and held[name].shape == t.shape and held[name].is_floating_point():
            t.copy_(held[name])
    for name, m in qmodel.named_modules():
        if isinstance(m, QuantExperts):
            target = ref.get_submodule(name)
            gate_up, down = m.stacked(torch.float32)
            target.gate_up_proj.copy_(gate_up)
            target.down_proj.copy_(down)
        elif hasattr(m, "dequantized_weight") and ".experts." not in name:
            ref.get_submodule(name).weight.copy_(m.dequantized_weight(torch.float32))
    return ref


IDS = torch.tensor([[5, 17, 60, 3, 25, 7, 90, 11, 42, 8], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]])


@pytest.mark.parametrize("family", ["upcycled", "mixtral", "qwen3_moe"])
@pytest.mark.parametrize("cfg", [QuantConfig(bits=4, group_size=16), QuantConfig(bits=8),
                                 QuantConfig(bits=4, group_size=64, method="nf4"),
                                 QuantConfig(bits=4, group_size=16, method="gptq"),
                                 QuantConfig(bits=4, group_size=16, method="awq")],
                         ids=["w4g16", "w8", "nf4", "gptq", "awq"])
def test_quantize_covers_the_experts_and_computes_with_their_codes(family, cfg):
    model = _family(family)
    q = copy.deepcopy(model)
    calibration = torch.randint(0, 97, (4, 24), generator=torch.Generator().manual_seed(1))
    with warnings.catch_warnings():
        warnings.simplefilter("error")          # no "stays in float" warning: the experts are covered
        quantize(q, cfg, calibration if cfg.method in ("gptq", "awq") else None)
    blocks = [m for m in q.modules() if isinstance(m, QuantExperts)]
    assert len(blocks) == 2 and not any(is_stacked_experts(m) for m in q.modules())
    assert all(type(b.gate_up_proj[0]).__name__ == ("NF4Linear" if cfg.method == "nf4" else "QuantLinear")
               for b in blocks)
    # the model computes exactly what the float model does with the dequantized weights...
    torch.testing.assert_close(q(IDS).logits, _dequantized_copy(model, q)(IDS).logits, rtol=1e-5, atol=1e-5)
    # ...which are close to the float weights (not equal: these are random 64-wide layers, where 4 bits
    # move the logits a good deal)
    a, b = q(IDS).logits.flatten(), model(IDS).logits.flatten()
    assert not torch.equal(a, b)
    assert torch.nn.functional.cosine_similarity(a, b, dim=0) > (0.999 if cfg.bits == 8 else 0.85)


def test_rtn_codes_are_each_experts_round_to_nearest():
    model = _family("mixtral")
    experts = model.model.layers[0].mlp.experts
    cfg = QuantConfig(bits=4, group_size=16)
    q = QuantExperts.from_experts(experts, cfg)
    for e in range(4):
        for name in ("gate_up_proj", "down_proj"):
            want = quantize_tensor(getattr(experts, name)[e], 4, 16)
            assert torch.equal(getattr(q, name)[e].codes(), want.q.to(torch.int16))
            torch.testing.assert_close(getattr(q, name)[e].scales.float(), want.scale.reshape(-1, 4).half().float())


@pytest.mark.parametrize("dispatch", ["dense", "loop", "sorted"])
def test_every_dispatch_path_gives_the_float_experts_answer(dispatch):
    """Dequantizing only the experts a batch uses changes nothing: the answer is the float experts'
    holding the dequantized weights, whichever path dispatches, with dropped slots (index E) too."""
    x, chosen, weights, gate_up, down = moe.random_problem(40, 32, 24, 6, 2, seed=3, only=[0, 2, 5],
                                                           capacity_factor=1.0)
    assert (chosen == 6).any()
    experts = moe.Experts(6, 32, 24, dispatch)
    experts.gate_up_proj.copy_(gate_up)
    experts.down_proj.copy_(down)
    q = QuantExperts.from_experts(experts, QuantConfig(bits=4, group_size=8))
    assert q.dispatch == dispatch
    want = q.to_float()(x, chosen, weights)
    torch.testing.assert_close(q(x, chosen, weights), want, rtol=1e-6, atol=1e-6)
    assert (want - experts(x, chosen, weights)).abs().max() > 0   # 4 bits: it did change the answer


def _structured_problem(tokens=512, hidden=32, inter=24, E=4):
    """Inputs with a few strong directions (as real activations have) routed to experts 0-2; expert 3 gets
    no tokens."""
    g = torch.Generator().manual_seed(0)
    basis = torch.randn(hidden, hidden, generator=g) * torch.logspace(0, -2, hidden)[:, None]
    x = torch.randn(tokens, hidden, generator=g) @ basis
    chosen = torch.randint(0, 3, (tokens, 2), generator=g)
    experts = moe.Experts(E, hidden, inter, "loop")
    return x, chosen, torch.full((tokens, 2), 0.5), experts


def test_gptq_experts_beat_round_to_nearest_on_the_tokens_they_get():
    x, chosen, weights, experts = _structured_problem()
    stats = ExpertHessians()
    handle = experts.register_forward_hook(stats)
    want = experts(x, chosen, weights)
    handle.remove()
    assert set(stats.H) == {(name, e) for name in ("gate_up_proj", "down_proj") for e in range(3)}
    cfg = QuantConfig(bits=3, group_size=None, method="gptq")
    rtn = QuantExperts.from_experts(experts, cfg)
    gptq = QuantExperts.from_experts(experts, cfg, stats.H)
    rtn_err = (rtn(x, chosen, weights) - want).pow(2).mean()
    gptq_err = (gptq(x, chosen, weights) - want).pow(2).mean()
    assert gptq_err < 0.7 * rtn_err
    # the expert no token reached had no Hessian: it is rounded to nearest
    assert torch.equal(gptq.down_proj[3].qweight, rtn.down_proj[3].qweight)
    assert not torch.equal(gptq.down_proj[0].qweight, rtn.down_proj[0].qweight)


@pytest.mark.parametrize("family", ["upcycled", "mixtral"])
def test_save_and_load_bring_the_quantized_experts_back(tmp_path, family):
    model = _family(family)
    quantize(model, QuantConfig(bits=4, group_size=32))
    save_quantized(model, None, tmp_path)
    meta = json.loads((tmp_path / "quant_config.json").read_text())
    kinds = [spec["class"] for spec in meta["modules"].values()]
    assert kinds.count("QuantExperts") == 2 and not any(".experts." in name for name in meta["modules"])
    back, _ = load_quantized(tmp_path)
    assert type(back.model.layers[0].mlp.experts) is QuantExperts
    torch.testing.assert_close(back(IDS).logits, model(IDS).logits, rtol=0, atol=0)
    # lesson 07's layer takes the loaded stock blocks over and keeps the quantized experts
    moe.use_llmopt_moe(back, "loop")
    assert isinstance(back.model.layers[0].mlp, moe.MoEFeedForward)
    torch.testing.assert_close(back(IDS).logits, model(IDS).logits, rtol=1e-6, atol=1e-6)


def test_decode_reads_only_the_experts_it_uses():
    from llmopt.bench import model_size_bytes, weight_bytes

    model = _family("upcycled")
    dense_bytes = weight_bytes(model)
    quantize(model, QuantConfig(bits=4, group_size=32))
    one = model.model.layers[0].mlp.experts
    per_expert = sum(b.numel() * b.element_size() for m in (one.gate_up_proj[0], one.down_proj[0])
                     for b in m.buffers())
    assert per_expert == 3 * 64 * 64 // 2 + 3 * 64 * 64 // 32 * 2     # int4 codes + one fp16 scale per 32
    assert model_size_bytes(model) - weight_bytes(model) == 2 * 2 * per_expert + 97 * 64 * 4   # + embeddings
    assert weight_bytes(model) < dense_bytes / 3
    with pytest.raises(ValueError, match="quantized"):
        moe.param_counts(model)


def test_shapes_are_checked_before_anything_changes():
    model = _family("qwen3_moe")            # experts 32 wide: group 64 cannot split down_proj's inputs
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=r"experts\.down_proj .*group_size 64 does not divide in_features 32.*"
                                         r"Nothing was changed"):
        quantize(model, QuantConfig(bits=4, group_size=64))
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert not any(getattr(m, "quantized", False) for m in model.modules())
    # skipping the experts is the way out: the rest is quantized, the experts stay float, no warning
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        quantize(model, QuantConfig(bits=4, group_size=16, skip=("lm_head", "experts")))
    assert len(expert_targets(model, QuantConfig())) == 2          # the experts: still float
    assert isinstance(model.model.layers[0].self_attn.q_proj, QuantLinear)


def _upcycled_with_outliers():
    """The upcycled family with a few loud channels in every norm's output (what large LLMs have and
    these small random models do not), planted without changing what the model computes."""
    from llmopt.quant.smoothquant import plant_outliers

    model = _family("upcycled")
    want = model(IDS).logits
    plant_outliers(model, n_channels=2, factor=50.0)
    torch.testing.assert_close(model(IDS).logits, want, rtol=1e-4, atol=1e-4)
    return model


def test_scales_fold_into_the_norm_the_router_and_every_expert_exactly():
    """AWQ's and SmoothQuant's fold for an MoE block: norm / s, and the router's and every expert's gate/up
    columns * s. The float model computes the same logits, and the router picks the same experts."""
    from llmopt.quant import awq, smoothquant

    model = _family("upcycled")
    layer = model.model.layers[0]
    x = torch.randn(2, 5, 64)
    want, routing = model(IDS).logits, layer.mlp.gate(x.reshape(-1, 64) / 3)
    s = torch.rand(64, generator=torch.Generator().manual_seed(0)) * 4 + 0.25
    group = awq.scale_groups(layer)[-1]
    assert group.consumers == ("mlp.gate", "mlp.experts") and group.inspect == "mlp"
    awq.apply_scale(layer, group, s)
    torch.testing.assert_close(model(IDS).logits, want, rtol=1e-4, atol=1e-4)
    assert torch.equal(layer.mlp.gate((x.reshape(-1, 64) / 3) / s).experts, routing.experts)
    smoothquant.migrate(layer.post_attention_layernorm, [layer.mlp.gate, layer.mlp.experts], 1 / s)   # and back
    torch.testing.assert_close(model(IDS).logits, want, rtol=1e-4, atol=1e-4)
    assert not torch.equal(layer.mlp.experts.gate_up_proj, _family("upcycled").model.layers[0].mlp.experts.gate_up_proj)


def test_awq_experts_beat_round_to_nearest_where_activations_have_outliers():
    """AWQ on an MoE model with loud channels: the experts are scaled (one s for what the norm feeds them
    all, one per expert between up and down) and clipped before rounding, and the logits land far closer
    to the float model's than plain RTN's. The AWQ model computes exactly what its codes and its folded
    norms say (`_dequantized_copy`)."""
    model = _upcycled_with_outliers()
    calibration = torch.randint(0, 97, (8, 24), generator=torch.Generator().manual_seed(1))
    want = model(IDS).logits
    rtn, awq = copy.deepcopy(model), copy.deepcopy(model)
    quantize(rtn, QuantConfig(bits=4, group_size=16))
    quantize(awq, QuantConfig(bits=4, group_size=16, method="awq"), calibration)
    torch.testing.assert_close(awq(IDS).logits, _dequantized_copy(model, awq)(IDS).logits, rtol=1e-5, atol=1e-5)
    err = {name: (m(IDS).logits - want).pow(2).mean().item() for name, m in (("rtn", rtn), ("awq", awq))}
    assert err["awq"] < 0.6 * err["rtn"], err            # measured 0.26x
    # the experts got scales of their own: their codes are not RTN's of the float weights
    a, b = awq.model.layers[0].mlp.experts, rtn.model.layers[0].mlp.experts
    assert not torch.equal(a.gate_up_proj[0].qweight, b.gate_up_proj[0].qweight)


def test_smoothquant_experts_are_w8a8_and_smoothing_pays_on_outliers():
    """SmoothQuant on an MoE model: every expert matrix is a W8A8Linear (int8 weights, activations rounded
    per token), called on its own tokens; the experts compute what int8-rounded inputs times the int8
    weights give; smoothing the router + experts group cuts the error of plain W8A8 by far."""
    from llmopt.quant import smoothquant
    from llmopt.quant.smoothquant import W8A8Linear, quantize_per_token

    model = _upcycled_with_outliers()
    calibration = torch.randint(0, 97, (8, 24), generator=torch.Generator().manual_seed(1))
    want = model(IDS).logits
    plain, smooth = copy.deepcopy(model), copy.deepcopy(model)
    smoothquant.w8a8_model(plain)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        quantize(smooth, QuantConfig(bits=8, method="smoothquant"), calibration)
    experts = smooth.model.layers[1].mlp.experts
    assert isinstance(experts, QuantExperts) and experts.calls_modules
    assert all(isinstance(m, W8A8Linear) for m in [*experts.gate_up_proj, *experts.down_proj])
    assert isinstance(plain.model.layers[1].mlp.experts.down_proj[3], W8A8Linear)
    err = {name: (m(IDS).logits - want).pow(2).mean().item() for name, m in (("w8a8", plain), ("sq", smooth))}
    assert err["sq"] < 0.05 * err["w8a8"], err           # measured 0.008x
    # the forward against the arithmetic it stands for, expert by expert
    x, chosen = torch.randn(9, 64), torch.tensor([[0, 1], [2, 0], [3, 2], [1, 4], [0, 3]] + [[1, 2]] * 4)
    w = torch.rand(9, 2)

    def rounded(t):
        q, s = quantize_per_token(t)
        return q.float() * s

    gate_up, down = experts.stacked()
    ref = torch.zeros_like(x)
    for t in range(9):
        for slot in range(2):
            e = int(chosen[t, slot])
            if e < 4:
                g, u = (rounded(x[t:t + 1]) @ gate_up[e].T).chunk(2, dim=-1)
                ref[t] += w[t, slot] * (rounded(torch.nn.functional.silu(g) * u) @ down[e].T)[0]
    torch.testing.assert_close(experts(x, chosen, w), ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("method", ["awq", "smoothquant"])
def test_calibrated_moe_models_save_and_load(tmp_path, method):
    model = _family("mixtral")
    cfg = QuantConfig(bits=8, method="smoothquant") if method == "smoothquant" else QuantConfig(
        bits=4, group_size=16, method="awq")
    quantize(model, cfg, torch.randint(0, 97, (4, 16), generator=torch.Generator().manual_seed(2)))
    save_quantized(model, None, tmp_path / method)
    back, _ = load_quantized(tmp_path / method)
    assert torch.equal(back(IDS).logits, model(IDS).logits)
    assert type(back.model.layers[0].mlp.experts.down_proj[0]) is type(model.model.layers[0].mlp.experts.down_proj[0])


@pytest.mark.parametrize("cfg", [QuantConfig(bits=4, group_size=16), QuantConfig(bits=8, symmetric=False)],
                         ids=["w4", "w8-zero-point"])
def test_fused_experts_run_the_grouped_kernels(tmp_path, monkeypatch, cfg):
    """`kernels.fuse` stacks a 4- or 8-bit QuantExperts' codes into a KernelQuantExperts, which lesson 07's
    grouped MoE kernels read: same logits with the reference backend and with the Triton kernels in the
    interpreter, the same bytes per decode step, and a save that says to save before fusing."""
    from llmopt import bench, kernels
    from llmopt.kernels import KernelQuantExperts
    from llmopt.moe import triton_moe

    model = _family("upcycled")
    quantize(model, cfg)
    want = model(IDS[:, :6]).logits
    calls = []
    real = triton_moe.triton_dispatch
    monkeypatch.setattr(triton_moe, "triton_dispatch", lambda *a, **k: calls.append(a[0].device) or real(*a, **k))
    for backend in ("torch", "triton"):
        fused = kernels.fuse(copy.deepcopy(model), backend=backend)
        experts = [m for m in fused.modules() if isinstance(m, KernelQuantExperts)]
        assert len(experts) == 2 and not any(isinstance(m, (QuantExperts, QuantLinear)) for m in experts[0].modules())
        assert experts[0].gate_up_proj.qweight.shape[0] == 4 and experts[0].graph_safe == (backend != "torch")
        a, b = model.model.layers[0].mlp.experts.to_float(), experts[0].to_float()   # the same float weights
        assert torch.equal(a.gate_up_proj, b.gate_up_proj) and torch.equal(a.down_proj, b.down_proj)
        calls.clear()
        torch.testing.assert_close(fused(IDS[:, :6]).logits, want, rtol=1e-4, atol=1e-4)
        assert len(calls) == (2 if backend == "triton" else 0)   # the kernels ran, once per layer, with "triton"
        assert bench.weight_bytes(fused) == bench.weight_bytes(model)
    with pytest.raises(ValueError, match="save the model before fusing"):
        save_quantized(fused, None, tmp_path / "fused")


@pytest.mark.parametrize("cfg", [QuantConfig(bits=4, group_size=32), QuantConfig(bits=4, group_size=64,
                                                                                 symmetric=False),
                                 QuantConfig(bits=8)], ids=["w4-g32", "w4-zp-g64", "w8"])
def test_fused_experts_run_the_cpu_kernels(monkeypatch, cfg):
    """On a CPU with backend "auto", decode rows (AVX512's limits, whatever this CPU's: up to 2 in float32,
    64 (W8) or 256 (W4) in bfloat16) run each hit expert's matrices on PyTorch's weight-only kernels: the
    reference's logits (float32: 1e-4; bfloat16: 3% of the largest logit, both sides rounding
    differently), the kernels' copies not saved, a step's bytes counted once, and a spoiled copy spoils
    the output: the path is the one that runs."""
    from llmopt import bench, kernels
    from llmopt.kernels import KernelQuantExperts, cpu, qlinear

    if not cpu.has_cpu_kernels():
        pytest.skip("this PyTorch lacks the weight-only CPU kernels")
    monkeypatch.setattr(cpu, "CPU_KIND", "AVX512")
    model = quantize(_family("upcycled"), cfg)
    fused = kernels.fuse(copy.deepcopy(model))
    experts = [m for m in fused.modules() if isinstance(m, KernelQuantExperts)]
    assert len(experts) == 2 and all(m.cpu_kernel for m in experts) and "cpu kernel" in repr(experts[0])
    assert experts[0].cpu_gate_up_scales.dtype == torch.float32
    assert not any("cpu_" in key for key in fused.state_dict())
    if cfg.bits == 4:   # the codes are held once, in the kernels' order; saved and moved in the usual layout
        ex = experts[0]
        assert ex.gate_up_proj.qweight is None and ex.down_proj.qweight is None and "its codes only" in repr(ex)
        plain = kernels.set_backend(copy.deepcopy(fused), "torch")   # reads the usual layout: holds both
        mine, theirs = fused.state_dict(), plain.state_dict()
        assert list(mine) == list(theirs) and all(torch.equal(mine[k], theirs[k]) for k in theirs)
        assert ex.gate_up_proj.qweight is None   # dropped again once saved
        twice = sum(m.qweight.numel() for m in plain.modules() if isinstance(m, (qlinear.StackedQuantLinear,
                                                                                 qlinear.KernelQuantLinear)))
        assert bench.model_size_bytes(plain) - bench.model_size_bytes(fused) == twice
        moved = copy.deepcopy(fused).to("meta").model.layers[0].mlp.experts   # off the CPU: no kernel copies
        assert moved.gate_up_proj.qweight.device.type == "meta" and not moved.cpu_kernel
        assert moved.cpu_gate_up_codes is None
    runs = []
    real = qlinear.loop_dispatch
    monkeypatch.setattr(qlinear, "loop_dispatch", lambda *a, **k: runs.append(a[0].shape[0]) or real(*a, **k))
    ids = IDS[:1, :2]   # two rows: float32's decode
    torch.testing.assert_close(fused(ids).logits, model(ids).logits, rtol=1e-4, atol=1e-4)
    assert runs == [2, 2]   # both layers, on the kernels
    runs.clear()
    # 20 rows in float32: the reference, dequantizing the hit experts (W4: from the kernels' copy it holds)
    torch.testing.assert_close(fused(IDS).logits, model(IDS).logits, rtol=1e-4, atol=1e-4)
    assert runs == []
    plain_experts = model.model.layers[0].mlp.experts
    assert torch.equal(experts[0].to_float().down_proj, plain_experts.to_float().down_proj)
    with torch.no_grad():   # bfloat16: 20 rows go to the kernels too
        half = kernels.fuse(quantize(_family("upcycled").to(torch.bfloat16), cfg))
        assert half.model.layers[0].mlp.experts.cpu_gate_up_scales.dtype == torch.bfloat16
        got = half(IDS).logits.float()
        want = kernels.set_backend(copy.deepcopy(half), "torch")(IDS).logits.float()
    assert runs == [20, 20] and (got - want).abs().max() <= 0.03 * want.abs().max()
    # a step reads the kernels' copies, of top_k of the E experts: their scales are float32 (W4: a scale
    # and an offset per group of 32 here, against a float16 scale), so a little more than the saved codes
    from llmopt.moe.stats import _expert_bytes
    ex = experts[0]
    copies = [ex.gate_up_proj.qweight, ex.down_proj.qweight] if cfg.bits == 8 else [ex.cpu_gate_up_codes,
                                                                                      ex.cpu_down_codes]
    copies += [ex.cpu_gate_up_scales, ex.cpu_down_scales]
    assert _expert_bytes(fused.model.layers[0].mlp) * 4 == sum(t.numel() * t.element_size() for t in copies)
    read, saved = bench.weight_bytes(fused), bench.weight_bytes(model)
    assert saved < read < 1.4 * saved
    assert bench.weight_bytes(kernels.set_backend(copy.deepcopy(fused), "torch")) == saved
    experts[0].cpu_gate_up_scales.zero_()   # spoil the kernels' copy: "auto" goes wrong, "torch" does not
    assert not torch.allclose(fused(ids).logits, model(ids).logits, atol=1e-2)
    torch.testing.assert_close(kernels.set_backend(fused, "torch")(ids).logits, model(ids).logits)
    kernels.set_backend(fused, "auto")
    fused.load_state_dict(fused.state_dict())   # loading repacks the copies from the saved codes
    torch.testing.assert_close(fused(ids).logits, model(ids).logits, rtol=1e-4, atol=1e-4)


def test_only_plain_quantized_experts_are_stacked():
    """NF4, W8A8 and 2-bit experts have no grouped kernel: fuse leaves their QuantExperts as they are."""
    from llmopt import kernels
    from llmopt.kernels import KernelQuantExperts

    for cfg, calib in ((QuantConfig(bits=4, method="nf4"), None), (QuantConfig(bits=2, group_size=16), None),
                       (QuantConfig(bits=8, method="smoothquant"), IDS)):
        model = quantize(_family("upcycled"), cfg, calib)
        want = model(IDS[:1, :6]).logits
        fused = kernels.fuse(model)
        assert isinstance(fused.model.layers[0].mlp.experts, QuantExperts)
        assert not any(isinstance(m, KernelQuantExperts) for m in fused.modules())
        torch.testing.assert_close(fused(IDS[:1, :6]).logits, want, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="plain 4- or 8-bit"):
        KernelQuantExperts.from_quant_experts(fused.model.layers[0].mlp.experts)


@pytest.mark.gpu
def test_gpu_quantized_experts_in_bf16_and_fused():
    """On a GPU, in bf16: the quantized experts give the float experts' answer (same dequantized weights),
    plain and after `kernels.fuse` (its grouped W4 MoE kernels compiled, inside `KernelQuantExperts`)."""
    from llmopt.kernels import fuse

    model = _family("upcycled")
    quantize(model, QuantConfig(bits=4, group_size=32))
    model = model.to("cuda", torch.bfloat16)
    ids = IDS.cuda()
    want = _dequantized_copy(_family("upcycled").to("cuda", torch.bfloat16), model)(ids).logits.float()
    torch.testing.assert_close(model(ids).logits.float(), want, rtol=2e-2, atol=2e-2)
    fused = fuse(model)
    torch.testing.assert_close(fused(ids).logits.float(), want, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("family", ["upcycled", "mixtral"])
@pytest.mark.parametrize("learn_scales", [False, True], ids=["absmax", "lsq"])
def test_qat_trains_the_experts_through_their_rounding_and_converts(tmp_path, family, learn_scales):
    """QAT on an MoE model: `prepare_qat` gives every expert matrix a FakeQuantLinear (called on the
    expert's own tokens, so gradients reach the experts' float weights, their scales and the router);
    a few steps lower the loss; `convert` turns them into the QuantLinear codes they stand for, with the
    logits the fake-quant model had."""
    from llmopt.quant import FakeQuantLinear, convert, prepare_qat

    model = _family(family)
    cfg = QuantConfig(bits=4, group_size=16, skip=("lm_head", "self_attn"))   # the experts' fake quantization only
    prepare_qat(model, cfg, learn_scales=learn_scales)
    with pytest.raises(ValueError, match="cannot save a FakeQuantLinear .*quant.convert"):
        save_quantized(model, None, tmp_path / "prepared")
    experts = model.model.layers[0].mlp.experts
    assert isinstance(experts, QuantExperts) and experts.calls_modules
    assert all(isinstance(m, FakeQuantLinear) for m in [*experts.gate_up_proj, *experts.down_proj])
    assert not any(is_stacked_experts(m) for m in model.modules())
    ids = torch.randint(0, 97, (4, 16), generator=torch.Generator().manual_seed(3))
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    losses = []
    with torch.enable_grad():
        model.train()
        for _ in range(6):
            loss = model(ids, labels=ids).loss
            opt.zero_grad()
            loss.backward()
            losses.append(loss.item())
            opt.step()
        hit = {e for e in range(4) if experts.down_proj[e].weight.grad is not None
               and experts.down_proj[e].weight.grad.abs().sum() > 0}
        assert hit and model.model.layers[0].mlp.gate.weight.grad.abs().sum() > 0
        if learn_scales:
            assert experts.gate_up_proj[min(hit)].scale.grad.abs().sum() > 0
    assert losses[-1] < losses[0]
    model.eval()
    want = model(IDS).logits
    convert(model)
    assert all(type(m) is QuantLinear for m in [*experts.gate_up_proj, *experts.down_proj])
    experts = model.model.layers[0].mlp.experts
    assert not experts.calls_modules
    torch.testing.assert_close(model(IDS).logits, want, rtol=1e-5, atol=1e-5)
    save_quantized(model, None, tmp_path / "converted")
    assert torch.equal(load_quantized(tmp_path / "converted")[0](IDS).logits, model(IDS).logits)
