import copy

import pytest
import torch

from llmopt.prune import nm_mask, prune, sparsegpt_prune, sparsity_report, wanda_mask
from llmopt.prune.model import targets
from llmopt.quant import calibrate
from llmopt.quant.gptq import hessian


def correlated(n, d, seed):
    """Samples of one distribution with strongly correlated channels, as LLM activations have."""
    mix = torch.randn(d, d, generator=torch.Generator().manual_seed(123)) / d**0.5 + 0.3 * torch.eye(d)
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed)) @ mix


def out_err(x, w, w2):
    return (x @ (w2 - w).T).pow(2).mean().item()


@pytest.mark.parametrize("nm", [None, (2, 4), (4, 8)])
def test_sparsegpt_beats_magnitude_on_held_out_inputs(nm):
    w = torch.randn(48, 128, generator=torch.Generator().manual_seed(0))
    fit, held = correlated(1024, 128, 1), correlated(512, 128, 2)
    pruned, mask = sparsegpt_prune(w, hessian(fit), 0.5, nm, block_size=32)
    assert torch.equal(pruned == 0, ~mask)
    if nm is None:
        assert int((~mask).sum()) == w.numel() // 2
        baseline = w * (w.abs() >= w.abs().flatten().kthvalue(w.numel() // 2).values)
    else:
        assert (mask.reshape(48, -1, nm[1]).sum(-1) == nm[0]).all()
        baseline = w * nm_mask(w.abs(), *nm)
    assert out_err(held, w, pruned) < 0.75 * out_err(held, w, baseline)


def test_sparsegpt_exact_count_with_odd_blocks_and_zero_sparsity():
    w, H = torch.randn(7, 45), hessian(correlated(200, 45, 3))
    for s in (0.3, 0.77):
        _, mask = sparsegpt_prune(w, H, s, block_size=16)
        assert int((~mask).sum()) == round(s * w.numel())
    same, mask = sparsegpt_prune(w, H, 0.0)
    assert mask.all() and torch.allclose(same, w)


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
def test_prune_model_exact_sparsity_per_layer(tiny, method):
    model, _ = tiny
    calib = torch.randint(0, model.config.vocab_size, (4, 32), generator=torch.Generator().manual_seed(0))
    p = prune(copy.deepcopy(model), method, 0.5, calibration=calib)
    report = sparsity_report(p)
    assert len(report) == 14 + 1 and all(v == 0.5 for v in report.values())
    assert torch.equal(p.lm_head.weight, model.lm_head.weight)
    assert torch.equal(p.get_input_embeddings().weight, model.get_input_embeddings().weight)
    p24 = prune(copy.deepcopy(model), method, calibration=calib, nm=(2, 4))
    for name, lin in targets(p24).items():
        assert ((lin.weight != 0).reshape(lin.weight.shape[0], -1, 4).sum(-1) <= 2).all(), name
        assert (lin.weight == 0).float().mean() >= 0.5


def test_global_magnitude_prunes_layers_unevenly(tiny):
    model = copy.deepcopy(tiny[0])
    model.model.layers[1].mlp.up_proj.weight.data *= 0.1  # a quiet layer: one threshold prunes it most
    report = sparsity_report(prune(model, "magnitude-global", 0.6))
    assert report["total"] == pytest.approx(0.6, abs=1e-4)
    assert report["model.layers.1.mlp.up_proj"] > 0.95 and report["model.layers.0.mlp.up_proj"] < 0.6


def test_wanda_uses_the_layers_input_norms(tiny):
    """Layer 0's inputs do not depend on any pruning: its masks must be Wanda's on those inputs."""
    model, _ = tiny
    calib = torch.randint(0, model.config.vocab_size, (4, 32), generator=torch.Generator().manual_seed(1))
    xs = {}
    layer0 = copy.deepcopy(calibrate.decoder_layers(model)[0])
    inputs = calibrate.first_layer_inputs(copy.deepcopy(model), calib)
    calibrate.collect(layer0, inputs, calibrate.linears(layer0),
                      lambda n, x: xs.setdefault(n, []).append(x.float()))
    p = prune(copy.deepcopy(model), "wanda", 0.5, calibration=calib)
    for name, lin in calibrate.linears(calibrate.decoder_layers(p)[0]).items():
        w = calibrate.decoder_layers(model)[0].get_submodule(name).weight
        want = wanda_mask(w, torch.cat(xs[name]).norm(dim=0), 0.5)
        assert torch.equal(lin.weight != 0, want & (w != 0)), name


def test_calibrated_methods_beat_magnitude_on_the_bundled_model(bundled):
    from llmopt import data
    from llmopt import eval as evaluate

    model, tok = bundled
    calib = data.calibration_batches(tok, 16, 128)
    stream = data.token_stream("test", tok)[:4096]
    ppl = {m: evaluate.perplexity(prune(copy.deepcopy(model), m, 0.5, calibration=calib), stream, progress=False)
           for m in ("magnitude", "sparsegpt")}
    dense = evaluate.perplexity(model, stream, progress=False)
    assert dense < ppl["sparsegpt"] < dense + 0.6 * (ppl["magnitude"] - dense), (dense, ppl)


def test_bad_input(tiny):
    model = copy.deepcopy(tiny[0])
    with pytest.raises(ValueError, match="unknown pruning method"):
        prune(model, "random")
    with pytest.raises(ValueError, match="sparsity"):
        prune(model, "magnitude", 1.0)
    with pytest.raises(ValueError, match="calibration"):
        prune(model, "wanda", 0.5)
    with pytest.raises(ValueError, match="0 < N <= M"):
        prune(model, "magnitude", nm=(4, 2))
    with pytest.raises(ValueError, match="magnitude-global"):
        prune(model, "magnitude-global", nm=(2, 4))
    with pytest.raises(ValueError, match="H must be"):
        sparsegpt_prune(torch.randn(4, 8), torch.eye(4))
    # structured pruning (lesson 04's prune_ffn) leaves widths N:M cannot split: named before any change
    from llmopt.prune import prune_ffn

    narrow = prune_ffn(copy.deepcopy(model), 0.3)   # 128 channels -> 90
    before = {n: p.clone() for n, p in narrow.named_parameters()}
    for method in ("magnitude", "wanda"):
        with pytest.raises(ValueError, match=r"cannot prune model\.layers\.0\.mlp\.down_proj \(64x90\) 2:4: "
                           r"in_features 90 is not a multiple of M = 4\. Nothing was changed"):
            prune(narrow, method, nm=(2, 4), calibration=torch.randint(1, 100, (2, 16)))
        assert all(torch.equal(p, before[n]) for n, p in narrow.named_parameters())
    for bad in ((2.0, 4), (2,), "2:4"):
        with pytest.raises(ValueError, match="nm must be"):
            prune(model, "magnitude", nm=bad)


def test_prune_refuses_models_without_float_linears(tiny):
    """GPT-2 (Conv1D projections) and a quantized model have no nn.Linear to prune: an error naming
    what prune expects, not a silent no-op; sparsity_report says the same instead of dividing by zero."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from llmopt.quant import QuantConfig, quantize

    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=32))
    for method in ("magnitude", "wanda"):
        with pytest.raises(ValueError, match="no nn.Linear in the decoder layers of GPT2LMHeadModel.*Conv1D"):
            prune(gpt2, method, 0.5, calibration=torch.randint(0, 64, (2, 8)))
    with pytest.raises(ValueError, match="sparsity_report found no nn.Linear"):
        sparsity_report(gpt2)
    q = quantize(copy.deepcopy(tiny[0]), QuantConfig(bits=8))
    with pytest.raises(ValueError, match="this model is quantized"):
        prune(q, "magnitude", 0.5)


def test_prune_on_a_mixture_of_experts_says_the_experts_stay_dense(tiny):
    """In an upcycled MoE prune zeroes the attention projections only; it warns that the experts stay
    dense, and sparsity_report counts them (0 zeros), so its total is the model's real share."""
    from llmopt import moe

    up = moe.upcycle(tiny[0], num_experts=4, top_k=2)
    with pytest.warns(UserWarning, match="Mixture-of-Experts experts, say"):
        prune(up, "magnitude", 0.5)
    report = sparsity_report(up)
    attn = {n: m.weight for n, m in targets(up).items()}
    assert attn and all("self_attn" in n and report[n] == 0.5 for n in attn)
    experts = {n: v for n, v in report.items() if ".experts." in n}
    assert len(experts) == 2 * 2 and set(experts.values()) == {0.0}
    n_attn = sum(w.numel() for w in attn.values())
    n_experts = sum(up.get_parameter(n).numel() for n in experts)
    assert report["total"] == pytest.approx(0.5 * n_attn / (n_attn + n_experts))
    assert report["total"] < 0.1


def test_is_2to4_and_semi_structured_checks_before_it_needs_a_gpu(bundled):
    from llmopt.prune import is_2to4, linear_speedup, to_semi_structured

    w = torch.randn(8, 16)
    assert not is_2to4(w) and is_2to4(w * nm_mask(w.abs(), 2, 4)) and is_2to4(w * nm_mask(w.abs(), 1, 4))
    assert not is_2to4(torch.zeros(4, 6))  # inputs not a multiple of 4
    # the pattern and the kernels' tile multiples are checked first, on any device, naming the layer
    with pytest.raises(ValueError, match="not 2:4 sparse"):
        to_semi_structured(copy.deepcopy(bundled[0]))
    from transformers import LlamaConfig, LlamaForCausalLM

    odd = LlamaForCausalLM(LlamaConfig(hidden_size=40, intermediate_size=128, num_attention_heads=2,
                                       num_key_value_heads=2, num_hidden_layers=1, vocab_size=64))
    p24 = prune(odd, "magnitude", nm=(2, 4)).half()
    with pytest.raises(ValueError, match=r"layers\.0\..*40 x 40.*multiple of 16.*multiple of 16"):
        to_semi_structured(p24)         # cuSPARSELt's 16 x 16 (CUTLASS asks 32 x 64)
    with pytest.raises(ValueError, match=r"multiple of 32.*multiple of 64"):
        to_semi_structured(p24, backend="cutlass")
    with pytest.raises(ValueError, match="backend must be one of"):
        to_semi_structured(p24, backend="cusparse")
    if torch.cuda.is_available():
        return
    ok = prune(copy.deepcopy(bundled[0]), "magnitude", nm=(2, 4)).half()
    before = {n: p.clone() for n, p in ok.named_parameters()}
    with pytest.raises(ValueError, match="CUDA"):
        to_semi_structured(ok)
    assert all(torch.equal(p, before[n]) for n, p in ok.named_parameters())   # nothing converted
    with pytest.raises(ValueError, match="CUDA"):
        linear_speedup(64, 64, 16, device="cpu")


def _backends_that_run():
    """The 2:4 backends that compress a weight on this GPU, and why the others do not."""
    from llmopt.prune import linear_speedup

    ok, failed = [], {}
    for backend in ("cusparselt", "cutlass"):
        try:
            linear_speedup(256, 256, 64, backend=backend, repeats=1)
            ok.append(backend)
        except RuntimeError as e:
            failed[backend] = str(e)[:300]
    print("2:4 backends:", ok, failed)
    return ok


@pytest.mark.gpu
def test_semi_structured_model_matches_masked_dense(bundled):
    from llmopt.prune import to_semi_structured

    backends = _backends_that_run()
    assert backends, "neither cuSPARSELt nor CUTLASS runs 2:4 on this GPU"
    model, _ = bundled
    dense = prune(copy.deepcopy(model), "magnitude", nm=(2, 4)).half().cuda()
    ids = torch.randint(1, model.config.vocab_size, (4, 64), generator=torch.Generator().manual_seed(0)).cuda()
    with torch.no_grad():
        a = dense(ids).logits.float()
        for backend in backends:
            b = to_semi_structured(copy.deepcopy(dense), backend=backend)(ids).logits.float()
            assert (a - b).abs().max() < 0.05 * a.abs().max(), backend


@pytest.mark.gpu
def test_a_big_2to4_linear_is_faster_on_ampere():
    """2:4 halves the multiplies of a compute-bound matmul: faster on Ampere/Ada (sm_8x), what the
    hardware was built for. On Hopper PyTorch's 2:4 kernels race cuBLAS's Hopper-only dense
    kernels and may lose (pytorch/pytorch#153825): there the speedup is measured and printed, and
    a loss is an xfail with the numbers, not a pass."""
    from llmopt.prune import linear_speedup

    runs = [linear_speedup(8192, 8192, 4096, backend=b) for b in _backends_that_run()]
    print(torch.cuda.get_device_name(), runs)
    assert runs and all(r["max_abs_diff"] < 1.0 for r in runs), runs
    slower = [r for r in runs if r["speedup"] <= 1.0]
    if torch.cuda.get_device_capability()[0] == 8:
        assert not slower, runs
    elif slower:
        pytest.xfail(f"2:4 slower than dense on {torch.cuda.get_device_name()}: {runs}")
