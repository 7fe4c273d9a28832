"""llmopt's NF4 against bitsandbytes' own, and the bitsandbytes loading flow.

Skipped, with the reason, where bitsandbytes is not installed."""
import pytest
import torch
from torch import nn

from llmopt import bench
from llmopt import eval as evaluate
from llmopt.quant import QuantConfig, nf4_codebook
from llmopt.quant import bnb as llm_bnb
from llmopt.quant.nf4 import DQ_BLOCK, NF4Linear, dynamic_map

bnb = pytest.importorskip("bitsandbytes", reason="bitsandbytes is not installed (pip install bitsandbytes)")
F = bnb.functional

SHAPES = [(256, 256), (768, 256), (64, 768), (40, 64), (3, 320)]


def _weight(shape, seed=0):
    torch.manual_seed(seed)
    w = torch.randn(shape) * 0.02
    w[0, :5] *= 8  # a few outliers, as trained weights have
    return w


def test_available_and_codebook():
    assert llm_bnb.available()
    # bitsandbytes hard-codes its table; llmopt computes it from the normal quantiles
    assert torch.allclose(nf4_codebook(), llm_bnb.codebook(), rtol=0, atol=2e-7)
    assert torch.equal(dynamic_map(), F.create_dynamic_map())  # the 8-bit map of double quant


@pytest.mark.parametrize("shape", SHAPES)
def test_nf4_equals_bitsandbytes(shape):
    w = _weight(shape)
    ours = NF4Linear.from_linear(_linear(w), QuantConfig(bits=4, method="nf4")).dequantized_weight()
    ref = llm_bnb.nf4_reference(w, 64, double_quant=False)
    # same codes, same float32 absmax: equal up to the codebook's float32 rounding (<= 2e-7 relative)
    assert torch.allclose(ours, ref, rtol=0, atol=2e-7 * float(w.abs().max()))


@pytest.mark.parametrize("shape", SHAPES)
def test_nf4_double_quant_equals_bitsandbytes_within_one_scale_step(shape):
    w = _weight(shape, seed=1)
    q = NF4Linear.from_linear(_linear(w), QuantConfig(bits=4, method="nf4", double_quant=True))
    ours = q.dequantized_weight()
    qw, state = F.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
    ref = F.dequantize_4bit(qw, state)
    assert torch.allclose(ref, llm_bnb.nf4_reference(w, 64, double_quant=True))

    # the 8-bit absmax codes: the same offset and per-256 scales; the codes agree but for a few,
    # where bitsandbytes' CPU search (an approximate bucket lookup) lands one level off the
    # nearest. Ours is the exact nearest level, so never further from the true absmax.
    assert torch.allclose(q.absmax_offset, state.offset, rtol=1e-6)
    assert torch.allclose(q.absmax_scales, state.state2.absmax, rtol=1e-6)
    diff = q.absmax.long() - state.absmax.long()
    assert diff.abs().max() <= 1
    assert int((diff != 0).sum()) <= max(2, 0.01 * diff.numel())  # seen: about 0.2%
    true_absmax = w.reshape(-1, 64).abs().amax(1)
    ref_absmax = F.dequantize_blockwise(state.absmax, state.state2) + state.offset
    ours_absmax = q.block_absmax()
    assert torch.all((ours_absmax - true_absmax).abs() <= (ref_absmax - true_absmax).abs() + 1e-7)

    # the weights: equal where the absmax code agrees; elsewhere off by at most one 8-bit step of
    # that block's absmax (the 4-bit values are in [-1, 1]).
    same = (diff == 0).repeat_interleave(64).reshape(w.shape)
    tol = 2e-7 * float(w.abs().max())
    assert torch.allclose(ours[same], ref[same], rtol=0, atol=tol)
    step = dynamic_map().diff().max() * q.absmax_scales.repeat_interleave(DQ_BLOCK)[: diff.numel()]
    bound = (step.repeat_interleave(64).reshape(w.shape) + tol)
    assert torch.all((ours - ref).abs() <= bound)
    assert (ours - ref).abs().max() <= 0.05 * w.abs().max()


def _linear(w):
    lin = nn.Linear(w.shape[1], w.shape[0], bias=False)
    with torch.no_grad():
        lin.weight.copy_(w)
    return lin


def test_bundled_q_proj_against_bitsandbytes(bundled):
    model, _ = bundled
    lin = model.model.layers[0].self_attn.q_proj
    for dq in (False, True):
        ours = NF4Linear.from_linear(lin, QuantConfig(bits=4, method="nf4", double_quant=dq))
        ref = llm_bnb.nf4_reference(lin.weight, 64, double_quant=dq)
        err = (ours.dequantized_weight() - ref).abs().max()
        assert err <= (1e-6 if not dq else 0.02) * lin.weight.abs().max()


def test_load_errors():
    with pytest.raises(ValueError, match="mode"):
        llm_bnb.load("tinypy", mode="int4")
    with pytest.raises(ValueError, match="in memory"):
        llm_bnb.load("tiny-random")
    with pytest.raises(ValueError, match="compute_dtype"):
        llm_bnb.load("tinypy", compute_dtype="fp32")


def test_missing_bitsandbytes_gives_install_hint(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # makes `import bitsandbytes` fail
    assert not llm_bnb.available()
    with pytest.raises(ValueError, match="pip install bitsandbytes"):
        llm_bnb.load("tinypy")


PPL_TOKENS = 2048  # four windows of 512 tokens from the test split


@pytest.fixture(scope="module")
def float_ppl(bundled):
    model, tok = bundled
    return evaluate.perplexity(model, tokenizer=tok, split="test", max_tokens=PPL_TOKENS, progress=False)


@pytest.mark.parametrize("mode, kind", [("nf4", "Linear4bit"), ("int8", "Linear8bitLt")])
def test_bnb_load_generates_and_keeps_perplexity(bundled, float_ppl, mode, kind):
    model, tok = bundled
    q, qtok = llm_bnb.load("tinypy", mode=mode, double_quant=True, device="cpu")
    assert qtok.padding_side == "left" and qtok.pad_token is not None
    linears = [m for m in q.modules() if type(m).__name__ == kind]
    assert len(linears) == 7 * model.config.num_hidden_layers
    if mode == "nf4":
        assert all(m.weight.quant_state.nested for m in linears)
    size = bench.model_size_bytes(q) + llm_bnb.quant_state_bytes(q)
    assert size < 0.85 * bench.model_size_bytes(model)  # fp32 embeddings and lm_head stay
    ids = qtok(["def main():\n    "], return_tensors="pt")
    out = q.generate(**ids, max_new_tokens=6, do_sample=False, pad_token_id=qtok.pad_token_id)
    assert out.shape == (1, ids["input_ids"].shape[1] + 6)
    ppl = evaluate.perplexity(q, tokenizer=qtok, split="test", max_tokens=PPL_TOKENS, progress=False)
    assert abs(ppl / float_ppl - 1) < (0.15 if mode == "nf4" else 0.03), (float_ppl, ppl)
