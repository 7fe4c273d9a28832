import copy
import math

import pytest
import torch
from torch import nn

from llmopt.lowrank import (
    LowRankLinear,
    asvd_scale,
    break_even_rank,
    cholesky_whitening,
    factor,
    factorize,
    linear_times,
    lowrank_params,
    model_times,
    rank_for_energy,
    rank_for_ratio,
    rank_grid,
    rank_report,
    targets,
)
from llmopt.quant import calibrate
from llmopt.quant.gptq import hessian


def correlated(n, d, seed):
    """Samples of one distribution with correlated channels of very different sizes, as LLM activations have."""
    g = torch.Generator().manual_seed(123)
    mix = torch.randn(d, d, generator=g) / d**0.5 + 0.3 * torch.eye(d)
    loud = torch.ones(d)
    loud[:: max(1, d // 8)] = 8.0  # a few loud channels
    return (torch.randn(n, d, generator=torch.Generator().manual_seed(seed)) @ mix) * loud


def out_err(x, w, w2):
    return (x @ (w2 - w).T).pow(2).sum().item()


# --------------------------------------------------------------------------- ranks and parameters

def test_rank_for_energy_by_hand():
    S = torch.tensor([3.0, 2.0, 1.0])  # S^2 = 9, 4, 1 of 14
    assert rank_for_energy(S, 0.5) == 1      # 9/14 = 0.64
    assert rank_for_energy(S, 9 / 14) == 1   # exactly the first value's share
    assert rank_for_energy(S, 0.65) == 2     # 13/14 = 0.93
    assert rank_for_energy(S, 0.93) == 3
    assert rank_for_energy(S, 1.0) == 3
    assert rank_for_energy(torch.tensor([1.0, 3.0, 2.0]), 0.65) == 2  # order does not matter
    assert rank_for_energy(torch.zeros(4), 0.9) == 1
    S = torch.rand(300, generator=torch.Generator().manual_seed(0)).sort(descending=True).values
    assert rank_for_energy(S, 1.0) == 300  # rounding in the cumulative sum must not overshoot


def test_params_and_break_even():
    assert lowrank_params(768, 256, 10) == 10 * 1024
    assert lowrank_params(768, 256, 10, bias=True) == 10 * 1024 + 768
    for out_f, in_f, bias in [(768, 256, False), (64, 256, True), (5, 3, True)]:
        layer = LowRankLinear(in_f, out_f, 2, bias=bias)
        assert sum(p.numel() for p in layer.parameters()) == lowrank_params(out_f, in_f, 2, bias)
        be = break_even_rank(out_f, in_f)
        assert be == out_f * in_f / (out_f + in_f)
        r = math.floor(be)
        assert lowrank_params(out_f, in_f, r) <= out_f * in_f < lowrank_params(out_f, in_f, r + 1)
    assert rank_for_ratio(256, 256, 0.5) == 64
    assert rank_for_ratio(768, 256, 1.0) == 192       # exactly the break-even: no saving
    assert rank_for_ratio(768, 256, 0.3) == 57
    assert rank_for_ratio(1000, 1000, 1e-4) == 1      # never below rank 1
    for ratio in (0.9, 0.55, 0.31):
        r = rank_for_ratio(300, 70, ratio)
        assert lowrank_params(300, 70, r) <= ratio * 300 * 70 < lowrank_params(300, 70, r + 1)


# --------------------------------------------------------------------------- one weight

@pytest.mark.parametrize("how", ["svd", "whitened", "asvd"])
def test_full_rank_reproduces_the_weight(how):
    g = torch.Generator().manual_seed(0)
    for out_f, in_f in [(24, 40), (40, 24)]:
        w = torch.randn(out_f, in_f, generator=g)
        x = correlated(200, in_f, 1)
        whiten = {"svd": None, "whitened": cholesky_whitening(hessian(x)), "asvd": asvd_scale(x.abs().mean(0))}[how]
        u, v = factor(w, min(out_f, in_f), whiten=whiten)
        assert u.shape == (out_f, min(out_f, in_f)) and v.shape == (min(out_f, in_f), in_f)
        assert u.dtype == w.dtype
        assert torch.allclose(u @ v, w, atol=1e-5)
        assert factor(w, energy=1.0, whiten=whiten)[0].shape[1] == min(out_f, in_f)


def test_lowrank_linear_from_linear_keeps_bias_and_output():
    torch.manual_seed(0)
    lin = nn.Linear(20, 12)
    x = torch.randn(3, 5, 20)
    full = LowRankLinear.from_linear(lin, 12)
    assert torch.allclose(full(x), lin(x), atol=1e-5)
    assert torch.equal(full.u.bias, lin.bias) and full.v.bias is None
    low = LowRankLinear.from_linear(lin, 4)
    assert torch.allclose(low(x), x @ low.dense_weight().T + lin.bias, atol=1e-5)
    assert "rank=4" in repr(low)
    half = LowRankLinear.from_linear(lin.to(torch.bfloat16), 4)
    assert half.u.weight.dtype == torch.bfloat16 and half(x.bfloat16()).dtype == torch.bfloat16


def test_plain_svd_is_eckart_young():
    w = torch.randn(30, 50, generator=torch.Generator().manual_seed(1))
    S = torch.linalg.svdvals(w.double())
    for r in (1, 7, 29):
        u, v = factor(w, r)
        err = (w.double() - (u @ v).double()).pow(2).sum()
        assert err.item() == pytest.approx(S[r:].pow(2).sum().item(), rel=1e-4)
    u, v = factor(w, energy=0.8)
    assert u.shape[1] == rank_for_energy(S, 0.8)


def test_whitened_beats_plain_on_the_outputs():
    """At equal rank, whitening gives a lower output error on the calibration inputs (where it is
    optimal) and on held-out inputs of the same distribution."""
    w = torch.randn(64, 96, generator=torch.Generator().manual_seed(2))
    fit, held = correlated(2000, 96, 3), correlated(1000, 96, 4)
    L = cholesky_whitening(hessian(fit), damp=0.0)
    for r in (8, 24, 48):
        plain, white = factor(w, r), factor(w, r, whiten=L)
        asvd = factor(w, r, whiten=asvd_scale(fit.abs().mean(0)))
        for x in (fit, held):
            assert out_err(x, w, white[0] @ white[1]) < 0.8 * out_err(x, w, plain[0] @ plain[1]), r
        assert out_err(fit, w, white[0] @ white[1]) <= out_err(fit, w, asvd[0] @ asvd[1]) * (1 + 1e-6)
        # ... while plain SVD stays the best on the weights themselves
        assert (w - plain[0] @ plain[1]).norm() <= (w - white[0] @ white[1]).norm() + 1e-5


def test_whitening_survives_a_singular_hessian():
    x = correlated(50, 32, 5)
    x[:, 3] = 0  # a dead input channel
    x[:, 7] = x[:, 8]  # two identical ones
    L = cholesky_whitening(x.T @ x, damp=0.0)  # singular: the damping must grow until it factors
    assert torch.isfinite(L).all()
    w = torch.randn(16, 32)
    u, v = factor(w, 16, whiten=L)
    assert torch.allclose(u @ v, w, atol=1e-4)


def test_bad_input():
    w = torch.randn(8, 12)
    for rank in (0, -1, 9, 2.5, True, "4"):
        with pytest.raises(ValueError, match=r"rank must be an integer in \[1, 8\]"):
            factor(w, rank)
    with pytest.raises(ValueError, match="rank must be"):
        LowRankLinear(12, 8, 0)
    with pytest.raises(ValueError, match="exactly one of rank and energy"):
        factor(w)
    with pytest.raises(ValueError, match="exactly one of rank and energy"):
        factor(w, 2, energy=0.5)
    for energy in (0, 1.01, -0.5, float("nan")):
        with pytest.raises(ValueError, match=r"energy must be a number in \(0, 1\]"):
            rank_for_energy(torch.ones(3), energy)
    for ratio in (0, 1.5, -0.1, None):
        with pytest.raises(ValueError, match=r"ratio must be a number in \(0, 1\]"):
            rank_for_ratio(8, 12, ratio)
    with pytest.raises(ValueError, match="whiten must be"):
        factor(w, 2, whiten=torch.eye(8))
    with pytest.raises(ValueError, match="2-D weight"):
        factor(torch.randn(8), 2)
    with pytest.raises(ValueError, match="square"):
        cholesky_whitening(torch.randn(3, 4))
    with pytest.raises(ValueError, match="nn.Linear"):
        LowRankLinear.from_linear(nn.Conv1d(3, 3, 1), 2)


# --------------------------------------------------------------------------- a whole model

def test_factorize_replaces_the_decoder_linears_and_still_generates(tiny):
    model, tok = tiny
    f = factorize(copy.deepcopy(model), "svd", ratio=0.5)
    report = rank_report(f)
    names = [n for n in report if n != "total"]
    assert len(names) == 14 and all(n.startswith("model.layers.") for n in names)
    for name in names:
        m = f.get_submodule(name)
        assert isinstance(m, LowRankLinear), name
        assert report[name]["rank"] == m.rank == rank_for_ratio(m.out_features, m.in_features, 0.5)
        assert report[name]["params"] == lowrank_params(m.out_features, m.in_features, m.rank)
    assert 0.45 < report["total"]["ratio"] <= 0.5
    assert report["total"]["dense_params"] == rank_report(model)["total"]["params"]
    assert torch.equal(f.lm_head.weight, model.lm_head.weight) and isinstance(f.lm_head, nn.Linear)
    assert torch.equal(f.get_input_embeddings().weight, model.get_input_embeddings().weight)
    ids = tok("def f(x):", return_tensors="pt").input_ids
    with torch.inference_mode():
        out = f.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, min_new_tokens=6,
                         do_sample=False, pad_token_id=0)
    assert out.shape == (1, ids.shape[1] + 6)
    # factorising again leaves the factors alone (no LowRankLinear inside a LowRankLinear)
    again = rank_report(factorize(f, "svd", ratio=0.5))
    assert [again[n]["rank"] for n in names] == [report[n]["rank"] for n in names]


def test_factorize_skips_what_does_not_save(tiny):
    model, _ = tiny
    # ratio 1: the square q_proj/o_proj (64x64) land exactly on the break-even rank 32 and stay
    # dense; k_proj/v_proj (32x64, break-even 21.3) get rank 21, a little smaller than W
    f = factorize(copy.deepcopy(model), "svd", ratio=1.0)
    assert isinstance(f.model.layers[0].self_attn.q_proj, nn.Linear)
    assert isinstance(f.model.layers[0].mlp.gate_proj, LowRankLinear)  # 128x64: break-even 42.67, rank 42 saves
    assert isinstance(f.model.layers[0].self_attn.k_proj, LowRankLinear)
    f = factorize(copy.deepcopy(model), "svd", energy=1.0)  # full rank everywhere: nothing saves
    assert all(r["rank"] is None for n, r in rank_report(f).items() if n != "total")
    f = factorize(copy.deepcopy(model), "svd", ratio=0.5, skip=("k_proj", r"layers\.1\.mlp"))
    assert isinstance(f.model.layers[0].self_attn.k_proj, nn.Linear)
    assert isinstance(f.model.layers[1].mlp.up_proj, nn.Linear)
    assert isinstance(f.model.layers[1].self_attn.v_proj, LowRankLinear)
    assert len(targets(f, dense_only=True)) == 2 + 3


def test_factorize_by_energy_uses_each_layers_spectrum(tiny):
    model, _ = tiny
    f = factorize(copy.deepcopy(model), "svd", energy=0.6)
    for name, row in rank_report(f).items():
        if name == "total":
            continue
        w = model.get_submodule(name).weight
        r = rank_for_energy(torch.linalg.svdvals(w.double()), 0.6)
        assert row["rank"] == (r if r < break_even_rank(*w.shape) else None), name


def test_whitened_factorize_calibrates_layer_by_layer(tiny):
    """Layer 0 is fitted to the embeddings' output; layer 1 to what layer 0 *as factorised* gives it."""
    model, _ = tiny
    calib = torch.randint(0, model.config.vocab_size, (4, 32), generator=torch.Generator().manual_seed(0))
    f = factorize(copy.deepcopy(model), "whitened", ratio=0.5, calibration=calib, batch_size=3)
    inputs = calibrate.first_layer_inputs(f, calib, batch_size=3)
    for i in range(2):
        dense = copy.deepcopy(calibrate.decoder_layers(model)[i])
        stats = calibrate.HessianAccumulator()
        calibrate.collect(dense, inputs, calibrate.linears(dense), stats)
        for name, lin in calibrate.linears(dense).items():
            got = calibrate.decoder_layers(f)[i].get_submodule(name)
            u, v = factor(lin.weight, got.rank, whiten=cholesky_whitening(stats.H[name]))
            assert torch.allclose(got.dense_weight(), u @ v, atol=1e-5), (i, name)
        inputs = calibrate.run_layer(calibrate.decoder_layers(f)[i], inputs)


def test_factorize_bad_input(tiny):
    model = copy.deepcopy(tiny[0])
    calib = torch.randint(0, 100, (2, 8))
    with pytest.raises(ValueError, match="unknown factorisation method"):
        factorize(model, "tucker", ratio=0.5)
    for ratio in (0, 1.2, -1, True):
        with pytest.raises(ValueError, match=r"ratio must be a number in \(0, 1\]"):
            factorize(model, "svd", ratio=ratio)
    with pytest.raises(ValueError, match=r"energy must be a number in \(0, 1\]"):
        factorize(model, "svd", energy=1.5)
    with pytest.raises(ValueError, match="exactly one of ratio"):
        factorize(model, "svd")
    with pytest.raises(ValueError, match="exactly one of ratio"):
        factorize(model, "svd", ratio=0.5, energy=0.9)
    for method in ("whitened", "asvd"):
        with pytest.raises(ValueError, match="needs calibration"):
            factorize(model, method, ratio=0.5)
    with pytest.raises(ValueError, match="2-D tensor of token ids"):
        factorize(model, "whitened", ratio=0.5, calibration=calib[0])
    with pytest.raises(ValueError, match="skip must be a tuple"):
        factorize(model, "svd", ratio=0.5, skip="k_proj")
    assert all(isinstance(m, nn.Linear) for m in targets(model).values())  # nothing changed on the way


@pytest.mark.slow
def test_whitened_beats_plain_on_the_bundled_model(bundled):
    from llmopt import data
    from llmopt import eval as evaluate

    model, tok = bundled
    calib = data.calibration_batches(tok, 8, 128)
    stream = data.token_stream("test", tok)[:4096]
    dense = evaluate.perplexity(model, stream, progress=False)
    ppl = {m: evaluate.perplexity(factorize(copy.deepcopy(model), m, ratio=0.5, calibration=calib), stream,
                                  progress=False) for m in ("svd", "whitened")}
    assert dense < ppl["whitened"] < dense + 0.7 * (ppl["svd"] - dense), (dense, ppl)


# --------------------------------------------------------------------------- speed

def test_linear_times_and_rank_grid():
    grid = rank_grid(96, 32)  # break-even 24
    assert min(grid) < 24 < max(grid) <= 32
    rows = linear_times(96, 32, grid, tokens=4, warmup=0, repeats=1)
    assert [r["rank"] for r in rows] == [None] + grid
    assert rows[0]["params"] == 96 * 32 and rows[0]["speedup"] == 1.0
    assert all(r["ms"] > 0 and r["params"] == lowrank_params(96, 32, r["rank"]) for r in rows[1:])
    with pytest.raises(ValueError, match="rank must be"):
        linear_times(96, 32, [33])


def test_model_times_runs_on_a_factorised_model(tiny):
    f = factorize(copy.deepcopy(tiny[0]), "svd", ratio=0.5)
    row = model_times(f, prefill_tokens=16, prompt_len=4, new_tokens=3, big_batch=2, warmup=0, repeats=1)
    assert set(row) == {"prefill_ms", "tok_s_b1", "tpot_ms", "tok_s_b2"}
    assert row["prefill_ms"] > 0 and row["tok_s_b1"] > 0 and row["tok_s_b2"] > 0
    assert math.isfinite(row["tpot_ms"])  # (total - first token) / steps: noise can push it below 0 on tiny runs


@pytest.mark.parametrize("how", [{"ratio": 0.5}, {"energy": 0.5}])
def test_ranks_in_multiples_let_4bit_groups_quantize_the_factors(tiny, how):
    """Factorise, then quantize the factors (lesson 06 then lesson 02): a group size must divide
    each factor's rank, and multiple_of rounds the ranks so that it does."""
    from llmopt.quant import QuantConfig, QuantLinear, fake_quantize, quantize

    model, tok = tiny
    plain = factorize(copy.deepcopy(model), "svd", **how)
    f = factorize(copy.deepcopy(model), "svd", multiple_of=16, **how)
    rows, plain_rows = rank_report(f), rank_report(plain)
    factored = [n for n, r in rows.items() if n != "total" and r["rank"] is not None]
    assert factored and any(plain_rows[n]["rank"] % 16 for n in factored)
    for name in factored:
        r, p = rows[name]["rank"], plain_rows[name]["rank"]
        assert r % 16 == 0 and r < rows[name]["break_even"], name
        assert r == (max(16, p // 16 * 16) if "ratio" in how else -(-p // 16) * 16), name
        lin = model.get_submodule(name)
        u, v = factor(lin.weight, r)          # the truncation at the rounded rank, nothing else
        assert torch.allclose(f.get_submodule(name).dense_weight(), u @ v, atol=1e-5), name
    cfg = QuantConfig(bits=4, group_size=16)
    with pytest.raises(ValueError, match=r"cannot quantize model\.layers\.\d\..*group_size 16 does not divide"):
        quantize(plain, cfg)
    assert not any(isinstance(m, QuantLinear) for m in plain.modules())   # nothing changed
    q = quantize(copy.deepcopy(f), cfg)
    for name in factored:
        low = q.get_submodule(name)
        assert isinstance(low.u, QuantLinear) and isinstance(low.v, QuantLinear), name
    # the quantized model computes what the low-rank one computes with each factor's weight rounded
    fq = copy.deepcopy(f)
    for m in fq.model.layers.modules():
        if isinstance(m, nn.Linear):
            m.weight.data = fake_quantize(m.weight.data, 4, 16)
    ids = torch.randint(1, 100, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = fq(ids).logits, q(ids).logits
    assert torch.allclose(a, b, atol=2e-3 * a.abs().max())
    with pytest.raises(ValueError, match="this model is quantized"):
        factorize(q, "svd", ratio=0.5)
    for bad in (0, 2.0, True):
        with pytest.raises(ValueError, match="multiple_of must be an int"):
            factorize(copy.deepcopy(model), "svd", ratio=0.5, multiple_of=bad)


def test_awq_and_smoothquant_refuse_a_low_rank_layer_by_name(tiny):
    from llmopt.quant import QuantConfig, quantize

    f = factorize(copy.deepcopy(tiny[0]), "svd", ratio=0.5, multiple_of=16)
    calib = torch.randint(1, 100, (2, 16))
    before = {n: type(m) for n, m in f.named_modules()}
    for cfg, who in ((QuantConfig(bits=4, group_size=16, method="awq"), "AWQ"),
                     (QuantConfig(bits=8, method="smoothquant"), "SmoothQuant")):
        with pytest.raises(ValueError, match=who + r" folds its scales .* LlamaDecoderLayer\.self_attn\.q_proj is a "
                                                   "LowRankLinear"):
            quantize(f, cfg, calib)
        assert {n: type(m) for n, m in f.named_modules()} == before


def test_low_rank_and_4bit_save_load_fuse_and_serve(tiny, tmp_path):
    """The stack a learner builds in lesson 11: low rank, 4-bit factors, saved and loaded back
    bit for bit, fused (low-rank projections are not merged) and served with greedy tokens equal to
    the model's own argmax."""
    from llmopt import models
    from llmopt.kernels.fuse import fuse
    from llmopt.quant import QuantConfig, QuantLinear, quantize, save_quantized
    from llmopt.serving import LLMEngine, SamplingParams
    from llmopt.serving.runner import graph_blocker

    model, tok = tiny
    m = factorize(copy.deepcopy(model), "svd", ratio=0.5, multiple_of=16, skip=("k_proj",))
    quantize(m, QuantConfig(bits=4, group_size=16, skip=("lm_head", r"layers\.0\.mlp\.down_proj\.u")))
    assert isinstance(m.model.layers[0].mlp.down_proj.u, nn.Linear)
    assert isinstance(m.model.layers[1].mlp.down_proj.u, QuantLinear)
    save_quantized(m, tok, tmp_path / "lr-w4")
    back, _ = models.load(tmp_path / "lr-w4", device="cpu")
    ids = torch.randint(1, 100, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(m(ids).logits, back(ids).logits)
    prompt, n = [5, 9, 100, 7], 8
    want = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            want.append(int(m(torch.tensor([want])).logits[0, -1].argmax()))
    for mode in ({}, {"merge": True}, {"gemv": True}):
        f = fuse(copy.deepcopy(m), backend="torch", **mode)
        mlp = f.model.layers[1].mlp           # gate and up are both low-rank: left as they are
        assert isinstance(mlp.gate_proj, LowRankLinear) and not hasattr(mlp, "gate_up_proj")
        with pytest.raises(ValueError, match="save the model before fusing"):
            save_quantized(f, tok, tmp_path / "fused")
        assert graph_blocker(f) is None        # dense MLPs, low-rank or not: a GPU records the decode step
        engine = LLMEngine(f, tok, block_size=4, num_kv_blocks=32, max_model_len=64)
        i = engine.add_request(prompt, SamplingParams(temperature=0, max_tokens=n, ignore_eos=True))
        assert engine.run()[i].outputs[0].token_ids == want[len(prompt):], mode


# --------------------------------------------------------------------------- save and load

@pytest.mark.parametrize("tie, dtype", [(False, torch.float32), (True, torch.bfloat16)])
def test_factorised_model_saves_and_reloads(tiny, tmp_path, tie, dtype):
    """save_pretrained + llmopt.load (and lowrank.load_factorized) give the factorised model back:
    the same low-rank layers at the same names, the same logits and greedy tokens."""
    from transformers import LlamaForCausalLM

    from llmopt import models

    model, tok = tiny
    if tie:
        torch.manual_seed(0)
        model = LlamaForCausalLM._from_config(models.tiny_config(tie_word_embeddings=True), dtype=dtype).eval()
    f = factorize(copy.deepcopy(model), "svd", ratio=0.5, skip=("k_proj",))
    f.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    ids = torch.randint(1, 100, (2, 12), generator=torch.Generator().manual_seed(0))

    def same(back):
        assert {n: type(m) for n, m in back.named_modules()} == {n: type(m) for n, m in f.named_modules()}
        assert back.dtype == dtype and back.lm_head.weight.dtype == dtype
        assert (back.lm_head.weight is back.get_input_embeddings().weight) == tie
        with torch.no_grad():
            assert torch.equal(back(ids).logits, f(ids).logits)
            out = back.generate(ids[:1], max_new_tokens=4, do_sample=False, pad_token_id=0)
            assert torch.equal(out, f.generate(ids[:1], max_new_tokens=4, do_sample=False, pad_token_id=0))

    same(models.load(tmp_path, device="cpu", dtype=dtype)[0])
    from llmopt.lowrank import load_factorized  # what llmopt.load calls for such a folder

    same(load_factorized(tmp_path, dtype=dtype))


def test_factorised_checkpoint_without_its_record_is_refused(tiny, tmp_path):
    """A checkpoint holding factors whose config does not say where they go (an older save) is an error,
    not a model with random projections; and a folder without factors is not taken for one."""
    import json

    from llmopt import models
    from llmopt.lowrank import load_factorized

    model, tok = tiny
    f = factorize(copy.deepcopy(model), "svd", ratio=0.5)
    f.save_pretrained(tmp_path / "lr")
    tok.save_pretrained(tmp_path / "lr")
    cfg = json.loads((tmp_path / "lr" / "config.json").read_text())
    del cfg["llmopt_lowrank"]
    (tmp_path / "lr" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"low-rank factors .*no 'llmopt_lowrank' entry"):
        models.load(tmp_path / "lr", device="cpu")
    model.save_pretrained(tmp_path / "dense")
    with pytest.raises(ValueError, match="not a model saved after lowrank.factorize"):
        load_factorized(tmp_path / "dense")


def test_factorize_refuses_models_it_cannot_factorise_and_says_what_it_skips(tiny):
    """GPT-2 (Conv1D projections) has nothing to factorise: an error, not a silent no-op. In an upcycled
    Mixture of Experts only attention is factorised: a warning says so and rank_report counts the experts."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from llmopt import moe

    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=32))
    with pytest.raises(ValueError, match="no nn.Linear in the decoder layers of GPT2LMHeadModel.*Conv1D"):
        factorize(gpt2, "svd", ratio=0.5)
    up = moe.upcycle(tiny[0], num_experts=4, top_k=2)
    with pytest.warns(UserWarning, match="Mixture-of-Experts experts, which factorize leaves dense"):
        factorize(up, "svd", ratio=0.5)
    rows = rank_report(up)
    experts = {n: r for n, r in rows.items() if ".experts." in n}
    assert len(experts) == 2 * 2 and all(r["rank"] is None and r["experts"] == 4 for r in experts.values())
    attn = sum(r["params"] for n, r in rows.items() if "self_attn" in n)
    attn_dense = sum(r["dense_params"] for n, r in rows.items() if "self_attn" in n)
    stacked = sum(r["params"] for r in experts.values())
    assert stacked == 2 * 4 * 3 * 64 * 128 and attn < 0.55 * attn_dense
    assert rows["total"]["ratio"] == pytest.approx((attn + stacked) / (attn_dense + stacked))
    assert rows["total"]["ratio"] > 0.9
