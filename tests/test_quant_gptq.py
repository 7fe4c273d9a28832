import pytest
import torch

from llmopt.quant import fake_quantize
from llmopt.quant.gptq import gptq_quantize, hessian
from llmopt.quant.primitives import dequantize


def correlated_inputs(n, d, seed):
    """Samples (by `seed`) of one distribution with correlated channels and a few loud ones,
    as LLM activations have."""
    mix = torch.randn(d, d, generator=torch.Generator().manual_seed(12345)) / d**0.5 + torch.eye(d)
    x = torch.randn(n, d, generator=torch.Generator().manual_seed(seed)) @ mix
    x[:, :4] *= 8
    return x


@pytest.mark.parametrize("bits, group, symmetric, act_order", [
    (4, None, True, False), (3, 32, True, False), (4, 32, False, False), (3, 32, True, True), (2, 64, False, True),
])
def test_gptq_beats_rtn_on_held_out_inputs(bits, group, symmetric, act_order):
    torch.manual_seed(0)
    w = torch.randn(48, 128)
    calib, held_out = correlated_inputs(2048, 128, 1), correlated_inputs(1024, 128, 2)
    qt = gptq_quantize(w, hessian(calib), bits, group, symmetric, act_order=act_order)
    gran = "channel" if group is None else group
    out_err = lambda wq: (held_out @ (w - wq).T).pow(2).mean().item()  # noqa: E731
    gptq_err, rtn_err = out_err(dequantize(qt)), out_err(fake_quantize(w, bits, gran, symmetric))
    assert gptq_err < 0.8 * rtn_err, (gptq_err, rtn_err)


@pytest.mark.parametrize("group", [None, 32])
def test_uncorrelated_inputs_reduce_to_rtn(group):
    """With H = I no column carries information about another: GPTQ is round-to-nearest."""
    w = torch.randn(16, 64)
    qt = gptq_quantize(w, torch.eye(64), 4, group, block_size=16)
    assert torch.equal(dequantize(qt), fake_quantize(w, 4, "channel" if group is None else group))


def test_dead_inputs_and_codes_in_range():
    w = torch.randn(8, 64)
    x = correlated_inputs(256, 64, 0)
    x[:, 5] = 0
    qt = gptq_quantize(w, hessian(x), 4, 32, symmetric=False)
    assert int(qt.q.min()) >= 0 and int(qt.q.max()) <= 15 and torch.all(dequantize(qt)[:, 5] == 0)


def test_gptq_bad_input():
    w = torch.randn(8, 64)
    with pytest.raises(ValueError, match="empty"):
        hessian(torch.empty(0, 64))
    with pytest.raises(ValueError, match="H must be"):
        gptq_quantize(w, torch.eye(32))
    with pytest.raises(ValueError, match="does not divide"):
        gptq_quantize(w, torch.eye(64), group_size=48)
    with pytest.raises(ValueError, match="bits"):
        gptq_quantize(w, torch.eye(64), bits=5)


def test_gptq_codes_load_into_quant_linear():
    from llmopt.quant import QuantConfig, QuantLinear

    w = torch.randn(16, 64)
    qt = gptq_quantize(w, hessian(correlated_inputs(512, 64, 0)), 4, 32)
    layer = QuantLinear.from_qtensor(qt, QuantConfig(bits=4, group_size=32))
    assert torch.allclose(layer.dequantized_weight(), dequantize(qt), rtol=2e-3, atol=1e-6)  # fp16 scales
    with pytest.raises(ValueError, match="do not match"):
        QuantLinear.from_qtensor(qt, QuantConfig(bits=8))


# --------------------------------------------------------------------------- the whole model

def layer_inputs(model, ids, layer_index):
    """Inputs of every linear of one decoder layer when the (partly quantized) model runs `ids`."""
    from llmopt.quant import calibrate

    layer, seen = calibrate.decoder_layers(model)[layer_index], {}
    hooks = [m.register_forward_hook(lambda mod, a, o, n=n: seen.setdefault(n, []).append(a[0].reshape(
        -1, a[0].shape[-1]))) for n, m in layer.named_modules() if hasattr(m, "weight") and m.weight.dim() == 2]
    with torch.no_grad():
        model(ids, use_cache=False)
    for h in hooks:
        h.remove()
    return {n: torch.cat(v) for n, v in seen.items()}


def test_gptq_model_is_sequential(tiny):
    """Layer 1 is quantized with the Hessian of inputs that went through the *quantized* layer 0:
    redo both layers by hand and get the same codes."""
    import copy

    from llmopt.quant import QuantConfig, QuantLinear, quantize

    model, _ = tiny
    cfg = QuantConfig(bits=4, group_size=32, method="gptq")
    ids = torch.randint(0, model.config.vocab_size, (4, 24), generator=torch.Generator().manual_seed(0))
    q = quantize(copy.deepcopy(model), cfg, ids)

    by_hand = copy.deepcopy(model)
    for i in range(2):
        x = layer_inputs(by_hand, ids, i)
        layer = by_hand.model.layers[i]
        for name, lin in list(layer.named_modules()):
            if isinstance(lin, torch.nn.Linear):
                qt = gptq_quantize(lin.weight, hessian(x[name]), 4, 32)
                with torch.no_grad():  # as the model holds it: fp16 scales
                    lin.weight.copy_(QuantLinear.from_qtensor(qt, cfg).dequantized_weight())
                assert torch.equal(q.model.layers[i].get_submodule(name).codes(), qt.q.to(torch.int16)), (i, name)
    assert not hasattr(q.lm_head, "codes")  # skipped by default


def test_gptq_model_beats_rtn_on_bundled(bundled):
    import copy

    from llmopt import data
    from llmopt import eval as evaluate
    from llmopt.quant import QuantConfig, quantize

    model, tok = bundled
    calib = data.calibration_batches(tok, n_samples=8, seq_len=128)
    ppl = {}
    for method in ("rtn", "gptq"):
        q = quantize(copy.deepcopy(model), QuantConfig(bits=3, group_size=128, method=method), calib)
        ppl[method] = evaluate.perplexity(q, tokenizer=tok, max_tokens=4096, progress=False)
    base = evaluate.perplexity(model, tokenizer=tok, max_tokens=4096, progress=False)
    assert base < ppl["gptq"] < ppl["rtn"], (base, ppl)


def test_gptq_model_needs_calibration(tiny):
    import copy

    from llmopt.quant import QuantConfig, quantize

    model, _ = tiny
    cfg = QuantConfig(bits=4, group_size=32, method="gptq")
    for bad, match in [(None, "needs calibration"), (torch.empty(0, 16, dtype=torch.long), "empty"),
                       (torch.arange(10), "2-D")]:
        with pytest.raises(ValueError, match=match):
            quantize(copy.deepcopy(model), cfg, bad)
    vocab = model.config.vocab_size
    for bad, match in [(torch.rand(2, 8), "integer token ids, got dtype torch.float32"),
                       (torch.ones(2, 8, dtype=torch.bool), "integer token ids"),
                       (torch.full((2, 8), vocab), rf"token ids in \[0, {vocab}\).*from {vocab} to {vocab}"),
                       (torch.full((2, 8), -1), "token ids in")]:
        for method in ("gptq", "awq"):   # awq: checked where the calibration first meets the model
            with pytest.raises(ValueError, match=match):
                quantize(copy.deepcopy(model), QuantConfig(bits=4, group_size=32, method=method), bad)
    lm = quantize(copy.deepcopy(model), QuantConfig(bits=4, group_size=32, method="gptq", skip=()),
                  torch.randint(0, 100, (2, 8)))
    assert hasattr(lm.lm_head, "codes")  # outside the decoder layers: round-to-nearest
