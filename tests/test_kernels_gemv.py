"""Lesson 08's decode GEMV with a prologue (`kernels.gemv`): RMSNorm -> matmul and SwiGLU -> matmul as
one kernel, against the separate ops, in Triton's interpreter (on a GPU: compiled, `gpu` tests).

The kernel keeps the normed / SwiGLU activations in float32 and rounds once, at the output; so the
spec here is the separate ops computed in float32 from the same inputs, and the tolerance is the
output dtype's rounding (fp32: the order of the sums). Outputs are poisoned with nan first."""
import pytest
import torch

from llmopt.kernels import common  # first: sets TRITON_INTERPRET=1 before triton is imported

pytest.importorskip("triton")

from llmopt.kernels import gemv as G  # noqa: E402

TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.float16: dict(atol=2e-3, rtol=2e-3),
       torch.bfloat16: dict(atol=1.6e-2, rtol=1.6e-2)}
DTYPES = [torch.float32, torch.float16]   # the interpreter has no bf16 arithmetic
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
NAN = float("nan")


def randn(*shape, dtype=torch.float32, scale=1.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g) * scale).to(DEVICE, dtype)


def layer(N, K, dtype, seed=0):
    """A weight scaled like a trained layer's (outputs of order 1), a norm weight around 1, a bias."""
    return (randn(N, K, dtype=dtype, scale=K ** -0.5, seed=seed), 1 + randn(K, dtype=dtype, scale=0.2, seed=seed + 1),
            randn(N, dtype=dtype, scale=0.1, seed=seed + 2))


def f32(*ts):
    return [None if t is None else t.float() for t in ts]


def poisoned(shape, dtype):
    return torch.full(shape, NAN, dtype=dtype, device=DEVICE)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows", [1, 3, 8])
@pytest.mark.parametrize("N,K", [(37, 100), (64, 300), (5, 1000)])   # odd sizes: masked tails in N and K
@pytest.mark.parametrize("with_residual", [False, True])
def test_norm_linear_matches_the_separate_ops(dtype, rows, N, K, with_residual):
    W, nw, b = layer(N, K, dtype)
    x, r = randn(rows, K, dtype=dtype, scale=3.0, seed=5), randn(rows, K, dtype=dtype, seed=6)
    out, h_out = poisoned((rows, N), dtype), poisoned((rows, K), dtype)
    got = G.gemv_triton(x, W, b, prologue=G.NORM, norm_weight=nw, eps=1e-5, residual=r if with_residual else None,
                        out=out, residual_out=h_out if with_residual else None)
    h = x + r if with_residual else x          # the residual stream, added in x's dtype as the model does
    want = G.norm_linear_reference(*f32(h, nw), 1e-5, *f32(W, b)).to(dtype)
    if with_residual:
        got, got_h = got
        assert got_h is h_out
        torch.testing.assert_close(got_h, h, rtol=0, atol=0)
    assert got is out
    torch.testing.assert_close(got, want, **TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows", [1, 5])
def test_swiglu_linear_on_the_halves_of_merged_gate_up(dtype, rows):
    inter, N = 300, 45
    gate, up = randn(1, rows, 2 * inter, dtype=dtype, scale=2.0).split(inter, dim=-1)   # strided views, no copy
    W, _, b = layer(N, inter, dtype)
    out = poisoned((1, rows, N), dtype)
    got = G.gemv_triton(gate, W, b, prologue=G.SWIGLU, up=up, out=out)
    want = G.swiglu_linear_reference(*f32(gate, up, W, b)).to(dtype)
    assert got is out
    torch.testing.assert_close(got, want, **TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
def test_plain_gemv_matches_linear(dtype):
    W, _, b = layer(70, 129, dtype)
    x = randn(2, 129, dtype=dtype)
    want = torch.nn.functional.linear(*f32(x, W, b)).to(dtype)
    torch.testing.assert_close(G.gemv(x, W, b, backend="triton"), want, **TOL[dtype])
    torch.testing.assert_close(G.gemv(x, W, backend="triton"), torch.nn.functional.linear(*f32(x, W)).to(dtype),
                               **TOL[dtype])


@pytest.mark.parametrize("config", G.GEMV_CONFIGS, ids=lambda c: "-".join(map(str, c.values())))
@pytest.mark.parametrize("rows", [1, 3])
def test_every_config(config, rows):
    """Each GPU candidate tile (the interpreter's own is wider), on the norm and the SwiGLU prologues."""
    N, K = 19, 1100    # K over two tiles of the widest config, with a tail
    W, nw, b = layer(N, K, torch.float32)
    x, r = randn(rows, K, seed=7), randn(rows, K, seed=8)
    y, h = G.gemv_triton(x, W, b, prologue=G.NORM, norm_weight=nw, residual=r, config=config)
    torch.testing.assert_close(y, G.norm_linear_reference(x + r, nw, 1e-6, W, b), **TOL[torch.float32])
    torch.testing.assert_close(h, x + r, rtol=0, atol=0)
    got = G.gemv_triton(x, W, None, prologue=G.SWIGLU, up=r, config=config)
    torch.testing.assert_close(got, G.swiglu_linear_reference(x, r, W), **TOL[torch.float32])


def test_configs_fit_the_rows():
    assert G.fitting_configs(1) == G.GEMV_CONFIGS                   # at one row every candidate fits
    kept = [len(G.fitting_configs(rows)) for rows in range(1, G.MAX_ROWS + 1)]
    assert kept == sorted(kept, reverse=True) and kept[-1] >= 3       # fewer as rows grow, never none


def test_configs_offered_on_a_gpu(monkeypatch):
    monkeypatch.setattr(G, "interpreted", lambda: False)
    assert G.configs_for(1) == G.GEMV_CONFIGS
    for rows in range(2, G.MAX_ROWS + 1):      # a few: each is a compile, and batch 1 matters most
        offered = G.configs_for(rows)
        assert 3 <= len(offered) <= 5 and all(c in G.fitting_configs(rows) and not c.get("PREFETCH")
                                               for c in offered), rows


def test_wrappers_take_the_separate_ops_past_eight_rows(monkeypatch):
    W, nw, b = layer(40, 64, torch.float32)
    x, r = randn(1, 9, 64, seed=3), randn(1, 9, 64, seed=4)   # a 9-token prefill chunk
    ran = []
    monkeypatch.setattr(G, "gemv_triton", lambda *a, **kw: ran.append(1))
    y, h = G.norm_linear(x, nw, 1e-6, W, b, r, backend="triton")   # the rmsnorm kernel, then F.linear
    assert not ran
    torch.testing.assert_close(h, x + r, rtol=0, atol=0)
    torch.testing.assert_close(y, G.norm_linear_reference(x, nw, 1e-6, W, b, r)[0], **TOL[torch.float32])
    torch.testing.assert_close(G.swiglu_linear(x, r, W, b, backend="triton"), G.swiglu_linear_reference(x, r, W, b),
                               **TOL[torch.float32])
    assert not ran
    G.norm_linear(x[:, :8], nw, 1e-6, W, b, r[:, :8], backend="triton")   # 8 rows: the GEMV
    assert ran == [1]
    ran.clear()
    G.norm_linear(x[:, :8], nw, 1e-6, W, b, r[:, :8], backend="torch")
    assert not ran


def test_the_separate_ops_are_a_candidate_and_run_where_they_win(monkeypatch):
    """On a GPU `pick_config` times the fused tiles and the separate ops (norm or SwiGLU kernel, then
    cuBLAS) together; where the separate ops win, the wrappers run them and the GEMV never launches."""
    W, nw, b = layer(40, 64, torch.float32)
    x, r = randn(1, 64, seed=3), randn(1, 64, seed=4)
    seen = []

    def separate_wins(key, candidates, launch, cold=False):
        assert cold   # weights timed as they stream in a decode step
        seen.append(candidates)
        return candidates[-1]

    class NoLaunch:
        def __getitem__(self, grid):
            raise AssertionError("the fused GEMV launched")
    monkeypatch.setattr(G, "pick_config", separate_wins)
    monkeypatch.setattr(G, "_gemv_kernel", NoLaunch())
    y, h = G.norm_linear(x, nw, 1e-6, W, b, r, backend="triton")
    torch.testing.assert_close(h, x + r, rtol=0, atol=0)
    torch.testing.assert_close(y, G.norm_linear_reference(x, nw, 1e-6, W, b, r)[0], **TOL[torch.float32])
    torch.testing.assert_close(G.swiglu_linear(x, r, W, backend="triton"), G.swiglu_linear_reference(x, r, W),
                               **TOL[torch.float32])
    torch.testing.assert_close(G.gemv(x, W, b, backend="triton"), torch.nn.functional.linear(x, W, b))
    assert len(seen) == 3 and all(c[-1] == G.SEPARATE and c[:-1] == G.configs_for(1) for c in seen)


def test_programmatic_dependent_launch_only_on_a_hopper_gpu(monkeypatch):
    """`set_pdl(True)` asks for programmatic dependent launch; off a CUDA tensor (the interpreter here)
    nothing changes: the kernels run without it, with the same results."""
    W, nw, b = layer(24, 40, torch.float32)
    x, r = randn(1, 40, seed=3), randn(1, 40, seed=4)
    want = G.norm_linear(x, nw, 1e-6, W, b, r, backend="triton")
    monkeypatch.setattr(common, "_PDL", True)
    assert common.pdl(x) is (x.is_cuda and common.HAS_PDL and torch.cuda.get_device_capability()[0] >= 9)
    assert common.pdl_launch(False) == {} and common.pdl_launch(True) == {"launch_pdl": True}
    got = G.norm_linear(x, nw, 1e-6, W, b, r, backend="triton")
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    common.set_pdl(False)
    assert not common.pdl(x)


def test_bad_input():
    W, nw, b = layer(8, 16, torch.float32)
    x = randn(2, 16)
    with pytest.raises(ValueError, match="last dim must be 16"):
        G.gemv_triton(randn(2, 15), W)
    with pytest.raises(ValueError, match="at most 8 rows"):
        G.gemv_triton(randn(9, 16), W)
    with pytest.raises(ValueError, match="norm_weight"):
        G.gemv_triton(x, W, prologue=G.NORM, norm_weight=nw[:8])
    with pytest.raises(ValueError, match="up must have"):
        G.gemv_triton(x, W, prologue=G.SWIGLU)
    with pytest.raises(ValueError, match="residual must match"):
        G.gemv_triton(x, W, prologue=G.NORM, norm_weight=nw, residual=x.half())
    with pytest.raises(ValueError, match="bias"):
        G.gemv_triton(x, W, b[:3])
    with pytest.raises(ValueError, match="out must be"):
        G.gemv_triton(x, W, out=torch.empty(2, 9, device=DEVICE))


# ---------------------------------------------------------------- on a GPU, in bfloat16

@pytest.mark.gpu
@pytest.mark.parametrize("config", G.GEMV_CONFIGS, ids=lambda c: "-".join(map(str, c.values())))
@pytest.mark.parametrize("rows", [1, 4])
def test_gpu_every_config_bf16(config, rows):
    if config not in G.fitting_configs(rows):
        pytest.skip("configs_for never offers this tile for this many rows")
    N, K = 2560, 2048          # TinyLlama's merged qkv
    W, nw, b = layer(N, K, torch.bfloat16)
    x, r = randn(rows, K, dtype=torch.bfloat16, seed=3), randn(rows, K, dtype=torch.bfloat16, seed=4)
    y, h = G.gemv_triton(x, W, b, prologue=G.NORM, norm_weight=nw, residual=r, config=config)
    torch.testing.assert_close(h, x + r, rtol=0, atol=0)
    want = G.norm_linear_reference(*f32(x + r, nw), 1e-6, *f32(W, b)).bfloat16()
    torch.testing.assert_close(y, want, **TOL[torch.bfloat16])
    gate, up = randn(rows, 2 * 5632, dtype=torch.bfloat16, scale=2.0).split(5632, dim=-1)
    Wd = randn(2048, 5632, dtype=torch.bfloat16, scale=5632 ** -0.5)
    got = G.gemv_triton(gate, Wd, None, prologue=G.SWIGLU, up=up, config=config)
    torch.testing.assert_close(got, G.swiglu_linear_reference(*f32(gate, up, Wd)).bfloat16(), **TOL[torch.bfloat16])


@pytest.mark.gpu
def test_gpu_wrappers_pick_and_match_bf16():
    """The wrappers time the tiles and the separate ops once per shape, then run the winner."""
    W, nw, b = layer(2560, 2048, torch.bfloat16)
    x, r = randn(1, 2048, dtype=torch.bfloat16, seed=3), randn(1, 2048, dtype=torch.bfloat16, seed=4)
    for _ in range(2):   # the first call picks, the second reuses the pick
        y, h = G.norm_linear(x, nw, 1e-6, W, b, r)
        torch.testing.assert_close(h, x + r, rtol=0, atol=0)
        want = G.norm_linear_reference(*f32(x + r, nw), 1e-6, *f32(W, b)).bfloat16()
        torch.testing.assert_close(y, want, **TOL[torch.bfloat16])
