import copy

import pytest
import torch
from torch import nn

from llmopt import bench
from llmopt import eval as evaluate
from llmopt.quant import QuantConfig, QuantLinear, fake_quantize, quantize


@pytest.mark.parametrize("bits, group, symmetric", [(8, None, True), (4, 32, True), (4, 32, False),
                                                    (2, 64, True), (3, None, False), (8, 64, False)])
def test_quant_linear_equals_fake_quantized_linear(bits, group, symmetric):
    torch.manual_seed(0)
    lin = nn.Linear(128, 48, bias=True)
    cfg = QuantConfig(bits=bits, group_size=group, symmetric=symmetric)
    q = QuantLinear.from_linear(lin, cfg)
    ref_w = fake_quantize(lin.weight.detach(), bits, "channel" if group is None else group, symmetric)
    # scales are stored in float16: allow for their rounding
    assert torch.allclose(q.dequantized_weight(), ref_w, rtol=2e-3, atol=1e-6)
    x = torch.randn(5, 128)
    assert torch.allclose(q(x), nn.functional.linear(x, q.dequantized_weight(), lin.bias), atol=1e-5)
    assert torch.allclose(q(x), nn.functional.linear(x, ref_w, lin.bias), atol=1e-2)


def test_held_bytes_really_shrink():
    lin = nn.Linear(256, 256, bias=False).to(torch.bfloat16)
    bf16 = bench.model_size_bytes(lin)
    w8 = bench.model_size_bytes(QuantLinear.from_linear(lin, QuantConfig(bits=8)))
    w4 = bench.model_size_bytes(QuantLinear.from_linear(lin, QuantConfig(bits=4, group_size=128)))
    w4z = bench.model_size_bytes(QuantLinear.from_linear(lin, QuantConfig(bits=4, group_size=128, symmetric=False)))
    assert w8 == 256 * 256 + 256 * 2  # int8 codes + one fp16 scale per row
    assert w4 == 256 * 128 + 256 * 2 * 2  # two codes a byte + 2 groups of fp16 scales per row
    assert w4z / bf16 <= 0.30 and w8 / bf16 < 0.51


def test_quantize_model_swaps_linears_and_still_generates(tiny):
    model, tok = tiny
    q = quantize(copy.deepcopy(model), QuantConfig(bits=8))
    linears = [m for m in q.modules() if isinstance(m, nn.Linear)]
    assert [type(m) for m in linears] == [nn.Linear]  # only lm_head stays float
    assert sum(isinstance(m, QuantLinear) for m in q.modules()) == 7 * model.config.num_hidden_layers
    ids = torch.randint(1, 100, (2, 6))
    with torch.no_grad():
        a, b = model(ids).logits, q(ids).logits
    assert torch.allclose(a, b, atol=0.05 * a.abs().max())
    out = q.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert out.shape == (2, 10)


def test_quantize_errors(tiny):
    model, _ = tiny
    q = quantize(copy.deepcopy(model), QuantConfig(bits=4, group_size=32))
    with pytest.raises(ValueError, match="already quantized"):
        quantize(q, QuantConfig())
    with pytest.raises(ValueError, match="does not divide"):
        quantize(copy.deepcopy(model), QuantConfig(bits=4, group_size=48))
    with pytest.raises(ValueError, match="bits"):
        QuantConfig(bits=5)
    with pytest.raises(ValueError, match="group_size"):
        QuantConfig(group_size=0)
    with pytest.raises(ValueError, match="no nn.Linear"):
        quantize(copy.deepcopy(model), QuantConfig(skip=(".",)))


def test_quant_config_checks_its_fields():
    import numpy as np

    for kw, match in [(dict(skip="lm_head"), "skip must be a tuple"),   # a str would skip every name with an l, m, ...
                      (dict(skip=("lm_head", 3)), "skip must be a tuple"), (dict(skip=("(",)), "regular expression"),
                      (dict(group_size=True), "group_size"), (dict(group_size=32.0), "group_size"),
                      (dict(damp=-0.1), "damp"), (dict(damp=1.0), "damp"), (dict(damp=float("nan")), "damp"),
                      (dict(bits=8.0), "bits"), (dict(bits=True), "bits")]:
        with pytest.raises(ValueError, match=match):
            QuantConfig(**kw)
    assert QuantConfig(skip=["lm_head", "k_proj"]).skip == ("lm_head", "k_proj")   # from JSON: a list
    assert QuantConfig(bits=np.int64(4), group_size=32) == QuantConfig(bits=4, group_size=32)


@pytest.mark.parametrize("method", ["rtn", "gptq", "awq", "nf4"])
def test_a_layer_that_does_not_fit_the_format_is_named_before_anything_changes(tiny, method):
    """Structured pruning and low-rank factors make odd widths: every target's shape is checked
    before the first module is swapped, so a failed quantize() leaves the float model whole."""
    model = copy.deepcopy(tiny[0])
    down = model.model.layers[1].mlp.down_proj           # 64 x 128: cut it to 64 x 100
    model.model.layers[1].mlp.down_proj = nn.Linear(100, 64, bias=False)
    model.model.layers[1].mlp.up_proj = nn.Linear(64, 100, bias=False)
    model.model.layers[1].mlp.gate_proj = nn.Linear(64, 100, bias=False)
    assert down.in_features == 128
    before = {n: type(m) for n, m in model.named_modules()}
    calib = torch.randint(1, 100, (2, 16))
    # nf4's blocks run over all out*in weights: 512 divides the other layers', not 100x64 = 6400
    cfg = QuantConfig(bits=4, group_size=512 if method == "nf4" else 32, method=method)
    first = r"gate_proj \(100x64\)" if method == "nf4" else r"down_proj \(64x100\)"
    with pytest.raises(ValueError, match=r"cannot quantize model\.layers\.1\.mlp\." + first + " with "
                       + method + r" 4-bit: .*Nothing was changed"):
        quantize(model, cfg, calib)
    assert {n: type(m) for n, m in model.named_modules()} == before
    for bits, why in ((4, "packed 2 to a byte"), (2, "packed 4 to a byte")):
        odd = copy.deepcopy(tiny[0])
        odd.model.layers[0].mlp.down_proj = nn.Linear(127, 64, bias=False)
        with pytest.raises(ValueError, match=why):
            quantize(odd, QuantConfig(bits=bits))
        assert not any(isinstance(m, QuantLinear) for m in odd.modules())
    quantize(copy.deepcopy(model), QuantConfig(bits=4, group_size=4))   # 4 divides 64 and 100: fine


@pytest.mark.slow
def test_bundled_w8_rtn_keeps_perplexity_and_w4_shrinks_bytes(bundled):
    model, tok = bundled
    stream = None  # the test split
    kw = dict(tokenizer=tok, max_tokens=32768, progress=False)
    base = evaluate.perplexity(model, stream, **kw)
    w8 = quantize(copy.deepcopy(model), QuantConfig(bits=8))
    assert evaluate.perplexity(w8, stream, **kw) < 1.01 * base
    w4 = quantize(copy.deepcopy(model), QuantConfig(bits=4, group_size=128))
    layers = lambda m: sum(bench.model_size_bytes(x) for x in m.model.layers)  # noqa: E731
    bf16_layers = 2 * sum(p.numel() for p in model.model.layers.parameters())
    assert layers(w4) <= 0.30 * bf16_layers


def test_weights_outside_nn_linear_are_named_in_a_warning(tiny):
    """Matrices held by a module quantize() does not know stay float: it says so. A Mixture-of-Experts
    model's experts (3-D stacks) are quantized (tests/test_quant_experts.py), so it says nothing."""
    import warnings

    from llmopt import moe

    class RawDown(nn.Module):           # a down projection that is not an nn.Linear
        def __init__(self, linear):
            super().__init__()
            self.weight = linear.weight

        def forward(self, x):
            return nn.functional.linear(x, self.weight)

    odd = copy.deepcopy(tiny[0])
    for layer in odd.model.layers:
        layer.mlp.down_proj = RawDown(layer.mlp.down_proj)
    with pytest.warns(UserWarning, match=r"\d+% of the decoder layers' weights .* stay in float: rtn quantizes "
                                         r"nn.Linear modules and Mixture-of-Experts experts"):
        q = quantize(odd, QuantConfig(bits=8))
    assert isinstance(q.model.layers[0].self_attn.q_proj, QuantLinear)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        quantize(moe.upcycle(copy.deepcopy(tiny[0]), num_experts=4, top_k=2), QuantConfig(bits=8))
        quantize(copy.deepcopy(tiny[0]), QuantConfig(bits=8))    # a dense model: nothing to say


def test_quant_exports_its_methods_and_targets(tiny):
    from llmopt import prune, quant

    assert "gptq" in quant.METHODS and hasattr(prune, "METHODS")   # as prune and lowrank export theirs
    names = [name for name, _ in quant.targets(tiny[0], QuantConfig(bits=8))]
    assert "lm_head" not in names and any(n.endswith("q_proj") for n in names)
