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
    """The float model holding the quantized model's weights, dequantized: what it must compute."""
    ref = copy.deepcopy(float_model)
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
                                 QuantConfig(bits=4, group_size=16, method="gptq")],
                         ids=["w4g16", "w8", "nf4", "gptq"])
def test_quantize_covers_the_experts_and_computes_with_their_codes(family, cfg):
    model = _family(family)
    q = copy.deepcopy(model)
    calibration = torch.randint(0, 97, (4, 24), generator=torch.Generator().manual_seed(1))
    with warnings.catch_warnings():
        warnings.simplefilter("error")          # no "stays in float" warning: the experts are covered
        quantize(q, cfg, calibration if cfg.method == "gptq" else None)
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


@pytest.mark.parametrize("method", ["awq", "smoothquant"])
def test_methods_that_fold_scales_into_norms_point_to_those_that_quantize_experts(method):
    model = _family("upcycled")
    cfg = QuantConfig(bits=8 if method == "smoothquant" else 4, method=method)
    with pytest.raises(ValueError, match="Mixture-of-Experts layer: rtn, gptq and nf4 quantize it"), \
            warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quantize(model, cfg, torch.randint(0, 97, (2, 16)))


@pytest.mark.gpu
def test_gpu_quantized_experts_in_bf16_and_fused():
    """On a GPU, in bf16: the quantized experts give the float experts' answer (same dequantized weights),
    plain and after `kernels.fuse` (whose W4 modules then sit inside QuantExperts)."""
    from llmopt.kernels import fuse

    model = _family("upcycled")
    quantize(model, QuantConfig(bits=4, group_size=32))
    model = model.to("cuda", torch.bfloat16)
    ids = IDS.cuda()
    want = _dequantized_copy(_family("upcycled").to("cuda", torch.bfloat16), model)(ids).logits.float()
    torch.testing.assert_close(model(ids).logits.float(), want, rtol=2e-2, atol=2e-2)
    fused = fuse(model)
    torch.testing.assert_close(fused(ids).logits.float(), want, rtol=2e-2, atol=2e-2)
