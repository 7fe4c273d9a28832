"""AWQ (Lin et al., 2023, "Activation-aware Weight Quantization"): the weights that
multiply large activations matter most, so protect them by scaling instead of keeping
them in float.

For y = x W^T, any positive per-input-channel vector s gives the same output:
y = (x / s) (W diag(s))^T. Scaling a column of W up by s_j shrinks its *relative* rounding
error, and the error it does make is multiplied by the small x_j / s_j. AWQ picks
s = mean|x|^alpha (normalised so max * min = 1), searching alpha on a grid in [0, 1) for
the one whose quantized output is closest to the float output on calibration inputs
(alpha = 0 is plain round-to-nearest, so the search never does worse on that data). The
1/s is folded into whatever makes x, so inference costs nothing extra:

    input_layernorm          -> q_proj, k_proj, v_proj   (norm weight / s)
    v_proj                   -> o_proj                   (v_proj output rows / s; only when the
                                                          shapes match: with grouped-query
                                                          attention they don't, and AWQ skips it)
    post_attention_layernorm -> gate_proj, up_proj       (norm weight / s)
    up_proj                  -> down_proj                (up_proj output rows / s)

In a Mixture-of-Experts layer (lesson 07) the second norm feeds the router and every expert:

    post_attention_layernorm -> router, every expert's gate/up  (one s; the router stays in float,
                                                                 its columns * s keep its logits)
    expert e's up rows       -> expert e's down                 (one s per expert, from its tokens)

Then weight clipping: for each group of each row, shrink the quantization range (a grid
of factors down to `max_shrink`) and keep the one with the lowest output error; q_proj and
k_proj are not clipped (their errors meet in the q.k product, which a per-linear output
error does not see), as in the paper's code. The codes are then plain round-to-nearest.

`duo` (on by default, as in AutoAWQ) lets the weights vote too: s = mean|x|^alpha /
wmean^(1 - alpha), wmean being how large each input's weights are within their groups. On the
bundled model, whose activations have no large outliers, it is what makes AWQ pay: W4 g128
symmetric perplexity 16.726 without it, 16.685 with it (RTN 16.769, float 16.586).

"Output" means what the scaled linears feed: the attention block's output for q/k/v, the
MLP's for gate/up (run on a few kept calibration batches), the linear's own otherwise. A
linear's output error over *every* calibration token needs no tokens kept:
||X W'^T - X W^T||^2 / n = sum over rows of dW H dW^T, with H = X^T X / n and dW = W' - W.

AWQ gains most where a few input channels are much louder than the rest (real LLMs have
them); a model without such channels leaves it little to protect.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from . import calibrate
from .experts import ExpertInputs, QuantExperts, expert_targets, is_stacked_experts
from .primitives import QTensor, _groups, fake_quantize, from_codes, qrange, scale_zero, to_codes
from .primitives import quantize as quantize_tensor

NOT_CLIPPED = ("q_proj", "k_proj")


def _check(w: torch.Tensor, bits: int, group_size, symmetric: bool, n_grid: int, H=None):
    qrange(bits, symmetric)  # validates bits
    if w.dim() != 2:
        raise ValueError(f"w must be a 2-D weight (out_features, in_features), got shape {tuple(w.shape)}")
    n = w.shape[1]
    if H is not None and H.shape != (n, n):
        raise ValueError(f"H must be ({n}, {n}) for a weight with {n} inputs, got {tuple(H.shape)}")
    if not isinstance(n_grid, int) or n_grid < 1:
        raise ValueError(f"n_grid must be a positive int, got {n_grid!r}")
    granularity = "channel" if group_size is None else group_size
    _groups(w, granularity)  # validates group_size
    return granularity


def _output_error(dw: torch.Tensor, H: torch.Tensor) -> float:
    """Mean squared output error over the tokens behind H, summed over output rows."""
    return ((dw @ H) * dw).sum().item()


def weight_absmean(w: torch.Tensor, group_size: int | None = 128) -> torch.Tensor:
    """Mean over output rows of |w| relative to its group's max, per input channel: how large
    each input's weights are compared to the rest of their groups (AWQ's "duo scaling")."""
    g = _groups(w.detach().float().abs(), "channel" if group_size is None else group_size)
    return (g / g.amax(-1, keepdim=True).clamp(min=1e-12)).reshape(w.shape).mean(0)


def _candidates(absmean: torch.Tensor, wmean: torch.Tensor | None, n_grid: int):
    """(alpha, s) for each alpha on the grid; with duo scaling, plain RTN (s = 1) first."""
    if wmean is not None:  # alpha = 0 is no longer s = 1: keep RTN in the race explicitly
        yield None, torch.ones_like(absmean)
    for i in range(n_grid):
        alpha = i / n_grid
        s = absmean.pow(alpha) if wmean is None else absmean.pow(alpha) / (wmean.pow(1 - alpha) + 1e-4)
        s = s.clamp(min=1e-4)
        yield alpha, s / (s.max() * s.min()).sqrt()  # centre the scales around 1 in log space


@torch.no_grad()
def search_scale(w: torch.Tensor, absmean: torch.Tensor, loss: Callable[[torch.Tensor], float],
                 bits: int = 4, group_size: int | None = 128, symmetric: bool = False, n_grid: int = 20,
                 duo: bool = False):
    """The input-channel scale s for the best alpha in {0, 1/n, ..., (n-1)/n}.

    s = absmean^alpha (the paper's), or with `duo` s = absmean^alpha / wmean^(1 - alpha), where
    wmean is `weight_absmean(w)`: inputs whose weights are small within their groups are scaled
    up further (AutoAWQ's default; with duo, s = 1 is tried too and reported as alpha None).
    `w` may be several weights stacked along the output dim (q, k and v read one input);
    `absmean` is mean|x| per input channel; `loss(w_eff)` says how far the output moves when
    the layer computes with w_eff = Q(w * s) / s instead of w (same thing as feeding x / s
    to Q(w * s)). Returns (s, alpha, losses) with the loss of every candidate, in order."""
    granularity = _check(w, bits, group_size, symmetric, n_grid)
    if absmean.shape != (w.shape[1],):
        raise ValueError(f"absmean must have shape ({w.shape[1]},), got {tuple(absmean.shape)}")
    w, absmean = w.detach().float(), absmean.float().to(w.device)
    best, losses = None, []
    for alpha, s in _candidates(absmean, weight_absmean(w, group_size) if duo else None, n_grid):
        losses.append(float(loss(fake_quantize(w * s, bits, granularity, symmetric) / s)))
        if best is None or losses[-1] < best[0]:
            best = (losses[-1], s, alpha)
    return best[1], best[2], losses


@torch.no_grad()
def clip_weight(w: torch.Tensor, H: torch.Tensor, bits: int = 4, group_size: int | None = 128,
                symmetric: bool = False, n_grid: int = 20, max_shrink: float = 0.5) -> torch.Tensor:
    """`w` with each (row, group) clamped to the shrunk range [f lo, f hi], f in
    {1, 1 - 1/n_grid, ..., 1 - max_shrink}, that gives that group's lowest output error.
    Groups are judged independently, each on its own inputs: the diagonal blocks of H."""
    granularity = _check(w, bits, group_size, symmetric, n_grid, H)
    if not 0 <= max_shrink < 1:
        raise ValueError(f"max_shrink must be in [0, 1), got {max_shrink!r}")
    g = _groups(w.detach().float(), granularity)                   # (rows, n_groups, gs)
    n_groups, gs = g.shape[1], g.shape[2]
    H = H.float().to(w.device)
    C = torch.stack([H[k * gs:(k + 1) * gs, k * gs:(k + 1) * gs] for k in range(n_groups)])
    hi = g.abs().amax(-1, keepdim=True) if symmetric else g.amax(-1, keepdim=True).clamp(min=0)
    lo = -hi if symmetric else g.amin(-1, keepdim=True).clamp(max=0)
    best_err = torch.full(g.shape[:2], float("inf"), device=w.device)
    best = g.clone()
    for i in range(int(max_shrink * n_grid) + 1):
        f = 1 - i / n_grid
        c = torch.minimum(torch.maximum(g, lo * f), hi * f)
        scale, zero = scale_zero(c, bits, symmetric)
        dq = from_codes(to_codes(c, scale, zero, bits), scale, zero) - g
        err = torch.einsum("rgk,gkl,rgl->rg", dq, C, dq)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best = torch.where(better[..., None], c, best)
    return best.reshape(w.shape).to(w.dtype)


@torch.no_grad()
def awq_quantize(w: torch.Tensor, x: torch.Tensor, bits: int = 4, group_size: int | None = 128,
                 symmetric: bool = False, n_grid: int = 20, clip: bool = True,
                 duo: bool = True) -> tuple[QTensor, torch.Tensor]:
    """AWQ one linear layer y = x w^T from sample inputs x (..., in_features).

    Returns (codes of w * s, s): the layer then computes (x / s) @ dequantize(qt)^T, and the
    caller folds 1/s into whatever produces x."""
    if w.dim() != 2 or x.dim() < 1 or x.shape[-1] != w.shape[-1] or x.numel() == 0:
        raise ValueError(f"x must be non-empty inputs (..., in_features) for w of shape "
                         f"{tuple(w.shape)}, got {tuple(x.shape)}")
    x = x.reshape(-1, x.shape[-1]).float().to(w.device)
    H = x.T @ x / x.shape[0]
    w32 = w.detach().float()
    s, _, _ = search_scale(w32, x.abs().mean(0), lambda wq: _output_error(wq - w32, H), bits, group_size,
                           symmetric, n_grid, duo)
    ws = w32 * s
    if clip:
        ws = clip_weight(ws, H / torch.outer(s, s), bits, group_size, symmetric, n_grid)
    granularity = "channel" if group_size is None else group_size
    return quantize_tensor(ws.to(w.dtype), bits, granularity, symmetric), s


# --------------------------------------------------------------------------- whole models

@dataclass(frozen=True)
class ScaleGroup:
    """Linears that read one input, the module (`prev`) whose output that input is, and the
    module (`inspect`) whose output judges a scale: the whole attention block for q/k/v (their
    errors meet in softmax(q k^T) v), the whole MLP for gate/up, the linear itself otherwise."""
    prev: str
    consumers: tuple
    inspect: str


def _moe(layer: nn.Module) -> bool:
    """A decoder layer whose feed-forward is a Mixtral-style MoE block: `mlp.gate` (the router) and
    `mlp.experts` (stacked float experts)."""
    mlp = getattr(layer, "mlp", None)
    return hasattr(mlp, "gate") and hasattr(mlp, "experts")


def scale_groups(layer: nn.Module) -> list[ScaleGroup]:
    """A Llama-family decoder layer's places to fold scales (its feed-forward dense or a Mixtral-style
    MoE block); ValueError for anything else."""
    attn = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
    linear_names = attn + ("self_attn.o_proj",)
    moe = _moe(layer)
    mlp = ("mlp.gate", "mlp.experts") if moe else ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
    names = ("input_layernorm", "post_attention_layernorm", "self_attn", "mlp") + linear_names + mlp
    have = dict(layer.named_modules())
    missing = [n for n in names if n not in have]
    if missing:
        raise ValueError(f"AWQ knows Llama-family layers (input_layernorm, self_attn.{{q,k,v,o}}_proj, "
                         f"post_attention_layernorm, then mlp.{{gate,up,down}}_proj or an MoE block's mlp.gate "
                         f"and mlp.experts); {type(layer).__name__} has no {', '.join(missing)}")
    calibrate.require_linears(layer, linear_names + (() if moe else mlp), "AWQ")
    if moe and not (is_stacked_experts(have["mlp.experts"]) and getattr(have["mlp.gate"], "weight", None) is not None
                    and have["mlp.gate"].weight.dim() == 2):
        raise ValueError(f"AWQ knows Mixtral-style MoE blocks (a router with a 2-D weight, float experts in "
                         f"stacked gate_up_proj / down_proj); {type(have['mlp']).__name__} is not one")
    groups = [ScaleGroup("input_layernorm", attn, "self_attn")]
    if have["self_attn.v_proj"].weight.shape[0] == have["self_attn.o_proj"].weight.shape[1]:
        groups.append(ScaleGroup("self_attn.v_proj", ("self_attn.o_proj",), "self_attn.o_proj"))
    if moe:   # the experts' up -> down scales are per expert: `_awq_experts`
        return groups + [ScaleGroup("post_attention_layernorm", ("mlp.gate", "mlp.experts"), "mlp")]
    return groups + [ScaleGroup("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj"), "mlp"),
                     ScaleGroup("mlp.up_proj", ("mlp.down_proj",), "mlp.down_proj")]


@torch.no_grad()
def apply_scale(layer: nn.Module, group: ScaleGroup, s: torch.Tensor) -> None:
    """Fold s into a group in place: consumers' input columns * s, `prev`'s output / s.
    The float layer computes exactly the same function afterwards (up to rounding)."""
    prev = layer.get_submodule(group.prev)
    s = s.float().to(prev.weight.device)
    bias = getattr(prev, "bias", None)
    probe = torch.randn(2, s.numel(), device=s.device, dtype=prev.weight.dtype)
    before = None if isinstance(prev, nn.Linear) else prev(probe).float()
    prev.weight.div_((s[:, None] if isinstance(prev, nn.Linear) else s).to(prev.weight.dtype))
    if bias is not None:
        bias.div_(s.to(bias.dtype))
    # a norm's output must scale with its weight (and bias); a Gemma-style x * (1 + w) does not
    if before is not None and not torch.allclose(prev(probe).float() * s, before, rtol=1e-2, atol=1e-4):
        prev.weight.mul_(s.to(prev.weight.dtype))
        if bias is not None:
            bias.mul_(s.to(bias.dtype))
        raise ValueError(f"cannot fold AWQ scales into {type(prev).__name__}: its output does not "
                         "scale with its weight")
    for name in group.consumers:   # column j of each reader (every expert's, for an MoE block) * s_j
        w = calibrate.input_weight(layer.get_submodule(name))
        w.mul_(s.to(w.dtype))


class _InputStats:
    """Per input of a layer's linears: H = X^T X / n and mean|X| per channel over every
    calibration token, and (inputs named in `keep`) the first `n_keep` batches themselves."""

    def __init__(self, keep: set, n_keep: int):
        self.H, self.absmean, self.n, self.kept, self.keep, self.n_keep = {}, {}, {}, {}, keep, n_keep

    def __call__(self, name: str, x: torch.Tensor) -> None:
        x = x.float()
        if name not in self.n:
            d = x.shape[1]
            self.H[name], self.absmean[name], self.n[name], self.kept[name] = x.new_zeros(d, d), x.new_zeros(d), 0, []
        n0, n1 = self.n[name], self.n[name] + x.shape[0]
        self.H[name].mul_(n0 / n1).add_(x.T @ x, alpha=1 / n1)
        self.absmean[name].mul_(n0 / n1).add_(x.abs().sum(0), alpha=1 / n1)
        self.n[name] = n1
        if name in self.keep and len(self.kept[name]) < self.n_keep:
            self.kept[name].append(x)


def _block_loss(layer: nn.Module, group: ScaleGroup, weights: list, batches: list) -> Callable:
    """loss(w_eff): squared error of the `inspect` module's output on the kept batches when the
    `weights` (parameters, stacked along their rows in w_eff) hold their rows of w_eff, against the
    float output."""
    block = layer.get_submodule(group.inspect)
    kwargs = group.inspect == "self_attn"  # attention needs the positions and mask the layer got

    def run():
        outs = [block(x, **kw) if kwargs else block(x) for x, kw in batches]
        return [o[0] if isinstance(o, tuple) else o for o in outs]

    target, original = run(), [p.data for p in weights]

    def loss(w_eff: torch.Tensor) -> float:
        try:
            for p, w in zip(weights, w_eff.split([p.numel() // p.shape[-1] for p in weights])):
                p.data = w.reshape(p.shape).to(p.dtype)
            return sum((o.float() - t.float()).pow(2).sum().item() for o, t in zip(run(), target))
        finally:
            for p, w in zip(weights, original):
                p.data = w
    return loss


def _kept(stats, name: str, inputs: list) -> list:
    """The kept calibration inputs of `name`, back in the shape (and with the kwargs) the layer got."""
    return [(x.reshape(h.shape[:-1] + x.shape[-1:]).to(h.dtype), kw) for x, (h, kw) in zip(stats.kept[name], inputs)]


@torch.no_grad()
def _awq_experts(layer: nn.Module, group: ScaleGroup, stats, expert_stats, inputs: list, cfg, n_grid: int,
                 clip: bool, max_shrink: float, duo: bool) -> None:
    """AWQ an MoE layer's experts in place (float weights, scaled and clipped; rounded afterwards):
    1. one scale s for what the norm feeds every expert, judged on the whole MoE block's output; the
       router's columns take s too, and as the router stays in float its logits do not change;
    2. per expert, a scale between its up rows and its down columns, judged on its own tokens;
    3. each expert matrix clipped against the tokens routed to it. Experts no token reached keep s=1."""
    experts = layer.get_submodule("mlp.experts")
    E, two_i, hidden = experts.gate_up_proj.shape
    inter = two_i // 2
    w = experts.gate_up_proj.detach().float().reshape(E * two_i, hidden)
    loss = _block_loss(layer, group, [experts.gate_up_proj], _kept(stats, "mlp.gate", inputs))
    s, _, _ = search_scale(w, stats.absmean["mlp.gate"], loss, cfg.bits, cfg.group_size, cfg.symmetric, n_grid, duo)
    apply_scale(layer, group, s)
    H = dict(expert_stats.H)
    for key in [k for k in H if k[0] == "gate_up_proj"]:   # expert e now reads x / s
        H[key] = H[key] / torch.outer(s, s)
    for e in range(E):
        key = ("down_proj", e)
        if key not in H:
            continue
        down = experts.down_proj[e].detach().float()
        loss = lambda wq, w=down, He=H[key]: _output_error(wq - w, He)  # noqa: E731
        se, _, _ = search_scale(down, expert_stats.absmean[key], loss, cfg.bits, cfg.group_size, cfg.symmetric,
                                n_grid, duo)
        experts.gate_up_proj.data[e, inter:].div_(se[:, None].to(experts.gate_up_proj.dtype))
        experts.down_proj.data[e].mul_(se.to(experts.down_proj.dtype))
        H[key] = H[key] / torch.outer(se, se)
    if clip:
        for (name, e), He in H.items():
            w = getattr(experts, name)
            w.data[e] = clip_weight(w[e], He, cfg.bits, cfg.group_size, cfg.symmetric, n_grid, max_shrink)


@torch.no_grad()
def awq_model(model: nn.Module, calibration: torch.Tensor, cfg, n_grid: int = 20, clip: bool = True,
              max_shrink: float = 0.5, search_batches: int = 4, duo: bool = True) -> nn.Module:
    """AWQ a whole model in place, one decoder layer at a time (`calibrate.layerwise`: each
    layer's inputs come from the layers before it as already quantized). Per layer: record
    the statistics of each linear's input, search and fold the scale of every scale group
    (judged on the first `search_batches` calibration batches), clip, and swap the linears
    for `QuantLinear` (RTN of the scaled, clipped weights), and an MoE layer's experts for
    `QuantExperts` (`_awq_experts`). Called by `quantize(model, cfg, calibration)`; linears
    outside the decoder layers (lm_head if not skipped) get plain RTN."""
    from .linear import QuantLinear, targets

    if not isinstance(n_grid, int) or n_grid < 1:
        raise ValueError(f"n_grid must be a positive int, got {n_grid!r}")
    if not isinstance(search_batches, int) or search_batches < 1:
        raise ValueError(f"search_batches must be a positive int, got {search_batches!r}")
    todo, expert_todo = targets(model, cfg), expert_targets(model, cfg)
    wanted = {id(m) for _, m in todo + expert_todo}
    for layer in calibrate.decoder_layers(model):
        scale_groups(layer)  # fail on an unknown architecture before changing anything
    done = set()
    for _, layer, inputs in calibrate.layerwise(model, calibration, cfg.calib_batch_size):
        groups = scale_groups(layer)
        found = {n: m for n, m in calibrate.linears(layer).items() if id(m) in wanted}
        # linears that read one input share its statistics: record them once, under the first
        reads = [[n for n in g.consumers if n in found] for g in groups]
        blocks = {r[0] for r, g in zip(reads, groups) if r and g.inspect not in r}  # need the inputs
        reads += [[n] for n in found if not any(n in r for r in reads)]  # o_proj under GQA
        observed = {r[0]: found[r[0]] for r in reads if r}
        experts = layer.get_submodule("mlp.experts") if _moe(layer) else None
        if experts is not None and id(experts) not in wanted:
            experts = None   # skipped: left as they are
        expert_stats = ExpertInputs(_InputStats(set(), 0))   # per expert, from the tokens routed to it
        if experts is not None:   # the router reads what every expert reads: its input stands for theirs
            observed["mlp.gate"] = layer.get_submodule("mlp.gate")
            blocks.add("mlp.gate")
        stats = _InputStats(blocks, search_batches)
        handle = None if experts is None else experts.register_forward_hook(expert_stats)
        try:
            calibrate.collect(layer, inputs, observed, stats)
        finally:
            if handle is not None:
                handle.remove()
        H = {n: stats.H[r[0]] for r in reads for n in r}
        for group in groups:
            names = [n for n in group.consumers if n in found]
            if not names:
                continue
            w = torch.cat([found[n].weight for n in names]).float()
            if group.inspect in names:  # one linear: its output error over every token, from H
                loss = lambda wq, w=w, H0=H[names[0]]: _output_error(wq - w, H0)  # noqa: E731
            else:
                loss = _block_loss(layer, group, [found[n].weight for n in names], _kept(stats, names[0], inputs))
            s, _, _ = search_scale(w, stats.absmean[names[0]], loss, cfg.bits, cfg.group_size, cfg.symmetric,
                                   n_grid, duo)
            apply_scale(layer, group, s)
            Hs = H[names[0]] / torch.outer(s, s)  # the consumers now read x / s
            H.update({n: Hs for n in names})
        if experts is not None:
            _awq_experts(layer, groups[-1], stats, expert_stats.observe, inputs, cfg, n_grid, clip, max_shrink, duo)
            calibrate.replace(layer, "mlp.experts", QuantExperts.from_experts(experts, cfg))
            done.add(id(experts))
        for name, linear in found.items():
            w = linear.weight
            if clip and name.rpartition(".")[2] not in NOT_CLIPPED:
                w = clip_weight(w, H[name], cfg.bits, cfg.group_size, cfg.symmetric, n_grid, max_shrink)
            qt = quantize_tensor(w, cfg.bits, cfg.granularity, cfg.symmetric)
            calibrate.replace(layer, name, QuantLinear.from_qtensor(qt, cfg, linear.bias))
            done.add(id(linear))
        del stats, H, expert_stats
    for name, module in expert_todo:
        if id(module) not in done:
            calibrate.replace(model, name, QuantExperts.from_experts(module, cfg))
    for name, linear in todo:
        if id(linear) not in done:
            calibrate.replace(model, name, QuantLinear.from_linear(linear, cfg))
    return model
