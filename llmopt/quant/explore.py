"""Looking at quantization error: the numbers and plots behind lesson 01.

Plain functions first (`quant_error`, `error_plot`, `error_vs_bits`), so a notebook runs
headless and a test can check every number; `interactive_error` then wires `error_plot`
to ipywidgets sliders for a person at the keyboard.

Error is measured on the weight itself, the way a quantized layer would see it:
relative error ||W - Q(W)||_F / ||W||_F, the worst single error, and the signal-to-
quantization-noise ratio in dB (each extra bit of a uniform grid buys about 6 dB).
"""
from __future__ import annotations

import math

import torch

from .primitives import _groups, dequantize_fp8, dequantize_nf4, fake_quantize, qrange, quantize_fp8, quantize_nf4

FORMATS = ("fp32", "bf16", "fp16", "fp8", "int", "nf4")
NF4_BLOCK = 64
SCALE_BITS = 16  # QuantLinear stores float16 scales and uint8 zero points
ZERO_BITS = 8


def _check_weight(weight) -> torch.Tensor:
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise ValueError(f"weight must be a 2-D tensor (out_features, in_features), got "
                         f"{getattr(weight, 'shape', type(weight).__name__)}")
    return weight.detach().float()


def roundtrip(weight: torch.Tensor, fmt: str = "int", bits: int = 4, granularity="channel",
              symmetric: bool = True) -> torch.Tensor:
    """`weight` stored in format `fmt` and read back as float32.

    fmt: "fp32", "bf16", "fp16" (plain casts), "fp8" (e4m3, scaled per `granularity`),
    "int" (uniform `bits`, `granularity`, `symmetric`) or "nf4" (blocks of 64).
    """
    w = _check_weight(weight)
    if fmt == "fp32":
        return w.clone()
    if fmt in ("bf16", "fp16"):
        return w.to(torch.bfloat16 if fmt == "bf16" else torch.float16).float()
    if fmt == "fp8":
        q, scale = quantize_fp8(w, granularity)
        return dequantize_fp8(q, scale, granularity)
    if fmt == "int":
        return fake_quantize(w, bits, granularity, symmetric)
    if fmt == "nf4":
        return dequantize_nf4(*quantize_nf4(w, NF4_BLOCK), NF4_BLOCK)
    raise ValueError(f"fmt must be one of {FORMATS}, got {fmt!r}")


def bits_per_weight(shape, fmt: str = "int", bits: int = 4, granularity="channel", symmetric: bool = True) -> float:
    """Storage per weight, scales included, with ideal packing (3-bit codes as 3 bits).

    Uniform: the codes plus one fp16 scale (and a uint8 zero point) per group. FP8 and NF4
    keep float32 scales, as llmopt.quant's functions return them (NF4: one per 64 values).
    """
    out_f, in_f = shape
    if fmt in ("fp32", "bf16", "fp16"):
        return {"fp32": 32.0, "bf16": 16.0, "fp16": 16.0}[fmt]
    n_scales = _groups(torch.empty(out_f, in_f, device="meta"), granularity).shape[:2].numel()
    if fmt == "fp8":
        return 8 + 32 * n_scales / (out_f * in_f)
    if fmt == "nf4":
        return 4 + 32 / NF4_BLOCK
    if fmt == "int":
        qrange(bits, symmetric)  # validates bits
        return bits + (SCALE_BITS + (0 if symmetric else ZERO_BITS)) * n_scales / (out_f * in_f)
    raise ValueError(f"fmt must be one of {FORMATS}, got {fmt!r}")


def error_stats(weight: torch.Tensor, approx: torch.Tensor) -> dict:
    """rel_error (Frobenius, relative), max_error (largest |difference|) and sqnr_db."""
    w, a = weight.detach().float(), approx.detach().float()
    if w.shape != a.shape:
        raise ValueError(f"approx has shape {tuple(a.shape)}, weight {tuple(w.shape)}")
    err = w - a
    signal, noise = w.pow(2).sum().item(), err.pow(2).sum().item()
    return {"rel_error": math.sqrt(noise / signal) if signal else 0.0,
            "max_error": err.abs().max().item() if err.numel() else 0.0,
            "sqnr_db": 10 * math.log10(signal / noise) if noise and signal else math.inf}


def label(fmt: str = "int", bits: int = 4, granularity="channel", symmetric: bool = True) -> str:
    """A short name such as 'int4 g128', 'int8 channel asym', 'nf4', 'fp8 e4m3 channel'."""
    g = f"g{granularity}" if isinstance(granularity, int) else granularity
    if fmt == "int":
        return f"int{bits} {g}" + ("" if symmetric else " asym")
    if fmt == "fp8":
        return f"fp8 e4m3 {g}"
    if fmt == "nf4":
        return f"nf4 b{NF4_BLOCK}"
    return fmt


def _measure(w, fmt, bits, granularity, symmetric):
    approx = roundtrip(w, fmt, bits, granularity, symmetric)
    return approx, {"format": label(fmt, bits, granularity, symmetric),
                    "bits_per_weight": bits_per_weight(w.shape, fmt, bits, granularity, symmetric),
                    **error_stats(w, approx)}


def quant_error(weight: torch.Tensor, fmt: str = "int", bits: int = 4, granularity="channel",
                symmetric: bool = True) -> dict:
    """Store `weight` in a format, read it back, measure: error_stats plus format and bits_per_weight."""
    return _measure(_check_weight(weight), fmt, bits, granularity, symmetric)[1]


def error_plot(weight: torch.Tensor, bits: int = 4, granularity="channel", symmetric: bool = True,
               ax=None, max_points: int = 20000) -> dict:
    """Dequantized against original value for every weight (a subsample of `max_points`).

    Per tensor it is one staircase with 2^bits - 1 levels (2^bits with symmetric=False); finer
    granularity overlays many staircases, one per scale, each closer to the diagonal. Returns
    `quant_error`'s numbers.
    """
    w = _check_weight(weight)
    approx, result = _measure(w, "int", bits, granularity, symmetric)
    from ..report import _finish, _pyplot

    plt = _pyplot()
    fig, ax = (ax.figure, ax) if ax is not None else plt.subplots(figsize=(5, 4))
    idx = torch.randperm(w.numel(), generator=torch.Generator().manual_seed(0))[:max_points]
    x, y = w.flatten()[idx], approx.flatten()[idx]
    lim = w.abs().max().item()
    ax.plot([-lim, lim], [-lim, lim], color="grey", lw=0.8, ls="--", label="exact")
    ax.scatter(x, y, s=2, alpha=0.3, rasterized=True, label="stored value")
    ax.set(xlabel="original weight", ylabel="after quantize + dequantize",
           title=f"{result['format']}: rel. error {result['rel_error']:.2%}, SQNR {result['sqnr_db']:.1f} dB")
    ax.legend(loc="upper left", fontsize=8)
    _finish(fig, ax)
    return result


def error_vs_bits(weight: torch.Tensor, bits=(8, 4, 3, 2), granularities=("channel", 128),
                  symmetric: bool = True, ax=None) -> list[dict]:
    """Relative error against bits per weight: one line per granularity, plus NF4 and FP8.

    Returns one `quant_error` row per point; draws them on `ax` (a new figure if None).
    """
    w = _check_weight(weight)
    rows = {g: [quant_error(w, "int", b, g, symmetric) for b in sorted(bits)] for g in granularities}
    extra = [quant_error(w, "nf4"), quant_error(w, "fp8", granularity="channel")]
    from ..report import _finish, _pyplot

    plt = _pyplot()
    fig, ax = (ax.figure, ax) if ax is not None else plt.subplots(figsize=(6, 4))
    for g, rs in rows.items():
        ax.plot([r["bits_per_weight"] for r in rs], [r["rel_error"] for r in rs], "o-",
                label=f"int, {'g' + str(g) if isinstance(g, int) else 'per ' + g}")
    for r, marker in zip(extra, ("*", "D")):
        ax.scatter(r["bits_per_weight"], r["rel_error"], marker=marker, s=80, zorder=3, label=r["format"])
    ax.set(xlabel="bits per weight (codes + scales)", ylabel="relative error ||W - Q(W)|| / ||W||",
           yscale="log", title="quantization error vs storage")
    ax.legend(fontsize=8)
    _finish(fig, ax)
    return [r for rs in rows.values() for r in rs] + extra


def group_sizes(in_features: int, candidates=(16, 32, 64, 128, 256)) -> list[int]:
    """The candidate group sizes that divide `in_features` (smaller than a whole row)."""
    return [g for g in candidates if in_features % g == 0 and g < in_features]


def interactive_error(weight: torch.Tensor):
    """Sliders for bits, granularity and symmetric/zero-point, redrawing `error_plot`.

    Returns the widget box, or None (with a hint) when ipywidgets is not installed.
    """
    w = _check_weight(weight)
    try:
        import ipywidgets as widgets
    except ImportError:
        print("ipywidgets is not installed (pip install ipywidgets): call error_plot(weight, bits, "
              "granularity, symmetric) directly instead")
        return None
    from ..report import _pyplot

    plt = _pyplot()
    options = [("per tensor", "tensor"), ("per channel", "channel")] + \
        [(f"group {g}", g) for g in group_sizes(w.shape[1])]
    controls = {
        "bits": widgets.SelectionSlider(options=[2, 3, 4, 8], value=4, description="bits"),
        "granularity": widgets.Dropdown(options=options, value="channel", description="scale per"),
        "symmetric": widgets.Checkbox(value=True, description="symmetric (absmax)"),
    }

    def draw(bits, granularity, symmetric):
        error_plot(w, bits, granularity, symmetric)
        plt.show()

    out = widgets.interactive_output(draw, controls)
    return widgets.VBox([widgets.HBox(list(controls.values())), out])
