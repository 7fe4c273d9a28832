import builtins
import math

import matplotlib
import pytest
import torch

matplotlib.use("Agg")

from llmopt.quant import explore  # noqa: E402
from llmopt.quant import primitives as P  # noqa: E402


def weight(shape=(64, 256), seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * 0.05


def test_error_stats_against_hand_computation():
    w = torch.tensor([[3.0, -4.0], [0.0, 0.0]])
    a = torch.tensor([[3.0, -4.5], [0.0, 0.0]])
    s = explore.error_stats(w, a)
    assert s["rel_error"] == pytest.approx(0.5 / 5.0)
    assert s["max_error"] == pytest.approx(0.5)
    assert s["sqnr_db"] == pytest.approx(10 * math.log10(25 / 0.25))
    exact = explore.error_stats(w, w)
    assert exact["rel_error"] == 0 and exact["sqnr_db"] == math.inf


def test_quant_error_is_the_error_of_fake_quantize():
    w = weight()
    got = explore.quant_error(w, "int", 4, 128, symmetric=False)
    want = (w - P.fake_quantize(w, 4, 128, symmetric=False)).norm() / w.norm()
    assert got["rel_error"] == pytest.approx(want.item(), rel=1e-6)
    assert got["format"] == "int4 g128 asym"


def test_roundtrip_formats():
    w = weight()
    assert torch.equal(explore.roundtrip(w, "fp32"), w)
    assert torch.equal(explore.roundtrip(w, "bf16"), w.bfloat16().float())
    assert torch.equal(explore.roundtrip(w, "fp16"), w.half().float())
    assert torch.equal(explore.roundtrip(w, "nf4"), P.dequantize_nf4(*P.quantize_nf4(w, 64), 64))
    fp8 = explore.roundtrip(w, "fp8", granularity="channel")
    assert torch.equal(fp8, P.dequantize_fp8(*P.quantize_fp8(w, "channel"), "channel"))


def test_bits_per_weight_counts_scales():
    shape = (64, 256)
    assert explore.bits_per_weight(shape, "fp32") == 32
    assert explore.bits_per_weight(shape, "int", 4, 128) == 4 + 16 / 128
    assert explore.bits_per_weight(shape, "int", 4, 128, symmetric=False) == 4 + 24 / 128
    assert explore.bits_per_weight(shape, "int", 8, "channel") == 8 + 16 / 256
    assert explore.bits_per_weight(shape, "int", 3, "tensor") == 3 + 16 / (64 * 256)
    assert explore.bits_per_weight(shape, "nf4") == 4.5
    assert explore.bits_per_weight(shape, "fp8", granularity="channel") == 8 + 32 / 256


def test_error_falls_with_bits_and_with_finer_groups():
    w = weight()
    w[5, 7] = 2.0  # an outlier: 40 standard deviations
    by_bits = [explore.quant_error(w, "int", b, "channel")["rel_error"] for b in (2, 3, 4, 8)]
    assert by_bits == sorted(by_bits, reverse=True)
    by_gran = [explore.quant_error(w, "int", 4, g)["rel_error"] for g in ("tensor", "channel", 128, 32)]
    assert by_gran == sorted(by_gran, reverse=True)
    # a uniform grid gains about 6 dB per bit
    s4, s8 = (explore.quant_error(weight(), "int", b, "channel")["sqnr_db"] for b in (4, 8))
    assert 20 < s8 - s4 < 28
    # fp16 keeps ~11 significant bits; bf16 ~8
    assert explore.quant_error(w, "fp16")["rel_error"] < 1e-3 < explore.quant_error(w, "bf16")["rel_error"] < 1e-2


def test_error_plot_draws_and_returns_the_numbers():
    import matplotlib.pyplot as plt

    w = weight()
    fig, ax = plt.subplots()
    got = explore.error_plot(w, 3, 64, True, ax=ax)
    assert got == explore.quant_error(w, "int", 3, 64, True)
    assert "int3 g64" in ax.get_title() and len(ax.collections) == 1
    assert len(ax.collections[0].get_offsets()) == w.numel()  # below max_points: every weight
    plt.close(fig)


def test_error_vs_bits_rows_and_plot():
    import matplotlib.pyplot as plt

    w = weight()
    fig, ax = plt.subplots()
    rows = explore.error_vs_bits(w, bits=(8, 4, 2), granularities=("channel", 128), ax=ax)
    assert [r["format"] for r in rows] == ["int2 channel", "int4 channel", "int8 channel",
                                           "int2 g128", "int4 g128", "int8 g128", "nf4 b64", "fp8 e4m3 channel"]
    assert len(ax.lines) == 2 and ax.get_yscale() == "log"
    nf4, int4 = rows[-2], rows[1]
    assert nf4["rel_error"] < int4["rel_error"]  # NF4 suits bell-shaped weights
    plt.close(fig)


def test_group_sizes():
    assert explore.group_sizes(256) == [16, 32, 64, 128]
    assert explore.group_sizes(96) == [16, 32]


@pytest.mark.parametrize("call, match", [
    (lambda: explore.roundtrip(weight(), "int5"), "fmt"),
    (lambda: explore.quant_error(weight(), "int", 5), "bits"),
    (lambda: explore.quant_error(weight(), "int", 4, 100), "group_size"),
    (lambda: explore.quant_error(torch.randn(8), "int"), "2-D"),
    (lambda: explore.bits_per_weight((4, 8), "mx"), "fmt"),
    (lambda: explore.bits_per_weight((4, 8), "int", 6), "bits"),
    (lambda: explore.error_stats(torch.ones(2, 2), torch.ones(2, 3)), "shape"),
])
def test_bad_input_gets_a_clear_error(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_interactive_error_builds_sliders_that_redraw(monkeypatch):
    ipywidgets = pytest.importorskip("ipywidgets")
    import matplotlib.pyplot as plt

    drawn = []
    real = explore.error_plot
    monkeypatch.setattr(explore, "error_plot", lambda *a, **k: drawn.append(a[1:]) or real(*a, **k))
    monkeypatch.setattr(plt, "show", lambda: plt.close("all"))
    box = explore.interactive_error(weight((8, 96)))
    assert isinstance(box, ipywidgets.VBox)
    bits, gran, sym = box.children[0].children
    assert drawn == [(4, "channel", True)]  # drawn once on creation
    assert [v for _, v in gran.options] == ["tensor", "channel", 16, 32]
    bits.value = 2
    gran.value = 32
    sym.value = False
    assert drawn[-1] == (2, 32, False)


def test_interactive_error_without_ipywidgets(monkeypatch, capsys):
    real_import = builtins.__import__

    def no_widgets(name, *args, **kwargs):
        if name == "ipywidgets":
            raise ImportError("no ipywidgets")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_widgets)
    assert explore.interactive_error(weight()) is None
    assert "error_plot" in capsys.readouterr().out
