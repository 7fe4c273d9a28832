"""Lesson 01: quantization basics (absmax, zero-point, groups, INT4 packing)."""
from __future__ import annotations

import math

import torch

from ._common import _call, _result


def _int_tensors():
    """(what, x, bits): the cases a per-tensor quantizer gets wrong, each a 2-D tensor."""
    g = torch.Generator().manual_seed(1)
    rnd = torch.randn(16, 64, generator=g)
    rnd.view(-1)[::5] = 0.0  # exact zeros must come back exactly
    outlier = torch.randn(8, 32, generator=g)
    outlier[3, 5] = 40.0
    return [
        ("a random (16, 64) tensor with exact zeros, 8 bits", rnd, 8),
        ("a random (7, 33) tensor, 4 bits", 3 * torch.randn(7, 33, generator=g), 4),
        ("a (8, 32) tensor with one outlier, 8 bits", outlier, 8),
        ("a negative-only (4, 16) tensor, 4 bits", -torch.rand(4, 16, generator=g) - 0.1, 4),
        ("a ReLU-like (6, 10) tensor (zeros and positives), 3 bits", torch.randn(6, 10, generator=g).relu(), 3),
        ("a constant (3, 10) tensor of 0.37, 8 bits", torch.full((3, 10), 0.37), 8),
        ("an all-zero (4, 8) tensor, 8 bits", torch.zeros(4, 8), 8),
        ("a single value (1, 1) of -2.5, 2 bits", torch.full((1, 1), -2.5), 2),
    ]


def _tensor(v, what, role):
    """The learner's output as a float tensor, or the message saying why it is not one."""
    try:
        t = torch.as_tensor(v).detach().float()
    except (TypeError, ValueError, RuntimeError):
        return None, f"the {role} should be a tensor or a number, got {type(v).__name__} for {what}"
    if not torch.isfinite(t).all():
        return None, f"NaN or inf in the {role} for {what} (a division by zero?)"
    return t, None


def _scalar(v, what, role):
    t, msg = _tensor(v, what, role)
    if msg is None and t.numel() != 1:
        return None, f"the {role} should be one number (per tensor), got shape {tuple(t.shape)} for {what}"
    return (None, msg) if msg else (t.item(), None)


def _codes_failure(q, want, x, what, qmin, qmax):
    """Why the learner's codes `q` are not llmopt's `want`, or None."""
    q, msg = _tensor(q, what, "codes")
    if msg:
        return msg
    if tuple(q.shape) != tuple(x.shape):
        return f"the codes have shape {tuple(q.shape)}, expected {tuple(x.shape)} for {what}"
    if not torch.equal(q, q.round()):
        return f"the codes must be integers (round them) for {what}"
    if q.min() < qmin or q.max() > qmax:
        return f"codes run from {q.min():.0f} to {q.max():.0f}, outside [{qmin}, {qmax}] for {what} (clamp them)"
    bad = q != want
    if bad.any():
        i = tuple(bad.nonzero()[0].tolist())
        return (f"{int(bad.sum())} of {q.numel()} codes differ for {what}; e.g. x{list(i)} = {x[i]:.4g} "
                f"gave {q[i]:.0f}, expected {want[i]:.0f}")
    return None


def _dequant_failure(xh, want, x, what):
    xh, msg = _tensor(xh, what, "dequantized tensor")
    if msg:
        return msg
    if tuple(xh.shape) != tuple(x.shape):
        return f"the dequantized tensor has shape {tuple(xh.shape)}, expected {tuple(x.shape)} for {what}"
    if not torch.allclose(xh, want, rtol=1e-5, atol=1e-6 * max(x.abs().max().item(), 1e-30)):
        diff = (xh - want).abs()
        i = tuple(torch.nonzero(diff == diff.max())[0].tolist())
        return f"dequantized x{list(i)} = {xh[i]:.4g}, expected {want[i]:.4g} for {what}"
    if (xh[x == 0] != 0).any():
        return f"0.0 did not come back as exactly 0.0 for {what}"
    return None


def _params_failure(scale, zero, ref, x, what, qmax):
    """Why the learner's scale (and zero point, for zero-point quantization) are wrong, or None."""
    s, msg = _scalar(scale, what, "scale")
    if zero is not None and msg is None:
        z, msg = _scalar(zero, what, "zero point")
    if msg or x.abs().max() == 0:
        return msg
    if zero is None:
        if not math.isclose(s, ref.scale.item(), rel_tol=1e-5):
            return f"scale {s:.6g}, expected {ref.scale.item():.6g} = max|x| / {qmax} for {what}"
        return None
    if not math.isclose(s, ref.scale.item(), rel_tol=1e-5):
        return (f"scale {s:.6g}, expected {ref.scale.item():.6g} = (max(x, 0) - min(x, 0)) / {qmax} "
                f"for {what} (the range must include 0)")
    if z != round(z):
        return f"zero point {z:.4g} is not an integer for {what}: round it, or 0.0 cannot come back exactly"
    if z != ref.zero.item():
        return f"zero point {z:g}, expected {ref.zero.item():g} = round(-min(x, 0) / scale) for {what}"
    return None


def _check_tensor_quantizer(name, symmetric, quantize_fn, dequantize_fn, success) -> bool:
    """Exercises 1.1 and 1.2: one scale (and zero point) for the whole tensor, against llmopt."""
    from ..quant import primitives as P

    returns = "(codes, scale)" if symmetric else "(codes, scale, zero)"
    for what, x, bits in _int_tensors():
        qmin, qmax = P.qrange(bits, symmetric=symmetric)
        ref = P.quantize(x, bits, "tensor", symmetric=symmetric)
        ok, out = _call(name, quantize_fn, x.clone(), bits)
        if not ok:
            return _result(name, False, out)
        if not (isinstance(out, (tuple, list)) and len(out) == len(returns.split(","))):
            return _result(name, False, f"should return {returns}, got {type(out).__name__} for {what}")
        q, scale, *zero = out
        msg = _params_failure(scale, zero[0] if zero else None, ref, x, what, qmax)
        msg = msg or _codes_failure(q, ref.q.float(), x, what, qmin, qmax)
        if msg:
            return _result(name, False, msg)
        ok, xh = _call(name, dequantize_fn, torch.as_tensor(q).clone(), scale, *zero)
        if not ok:
            return _result(name, False, xh)
        msg = _dequant_failure(xh, P.dequantize(ref), x, what)
        if msg:
            return _result(name, False, msg)
    return _result(name, True, success)


def check_absmax(quantize_fn, dequantize_fn) -> bool:
    """Exercise 1.1: quantize_fn(x, bits) -> (codes, scale) with one scale for the tensor,
    symmetric codes in [-(2^(b-1) - 1), 2^(b-1) - 1]; dequantize_fn(codes, scale) -> x_hat."""
    return _check_tensor_quantizer(
        "Exercise 1.1 (absmax quantization)", True, quantize_fn, dequantize_fn,
        "codes and scale match llmopt.quant.quantize_tensor(x, bits, 'tensor'), "
        "every value within half a step, 0.0 stays exactly 0.0")


def check_zero_point(quantize_fn, dequantize_fn) -> bool:
    """Exercise 1.2: quantize_fn(x, bits) -> (codes, scale, zero) with codes in [0, 2^b - 1]
    and an integer zero point; dequantize_fn(codes, scale, zero) -> x_hat."""
    return _check_tensor_quantizer(
        "Exercise 1.2 (zero-point quantization)", False, quantize_fn, dequantize_fn,
        "codes, scale and zero point match llmopt.quant.quantize_tensor(x, bits, 'tensor', symmetric=False); "
        "one-sided ranges use every code, 0.0 stays exactly 0.0")


def _group_cases():
    """(what, w, bits, group_size) for a group-wise quantizer."""
    g = torch.Generator().manual_seed(2)
    w = torch.randn(8, 64, generator=g)
    w[2, 40] = 25.0  # an outlier should spoil only its own group
    w.view(-1)[::9] = 0.0
    edges = torch.randn(6, 32, generator=g)
    edges[1] = 0.0          # an all-zero row
    edges[3] = -0.8         # a constant row
    edges[4, 8:16] = 0.0    # an all-zero group
    return [
        ("w (8, 64) with an outlier, groups of 16, 4 bits", w, 4, 16),
        ("w (3, 96), groups of 32, 3 bits", torch.randn(3, 96, generator=g), 3, 32),
        ("w (5, 12), one group per row (group_size 12), 8 bits", torch.randn(5, 12, generator=g), 8, 12),
        ("w (4, 8), groups of 1, 2 bits", torch.randn(4, 8, generator=g), 2, 1),
        ("w (6, 32) with an all-zero row, a constant row and an all-zero group, groups of 8, 4 bits",
         edges, 4, 8),
        ("a negative-only w (2, 256), groups of 128, 4 bits", -torch.rand(2, 256, generator=g), 4, 128),
    ]


def _close(got, want, w) -> bool:
    return torch.allclose(got, want, rtol=1e-5, atol=1e-6 * w.abs().max().item())


def check_groupwise(fn) -> bool:
    """Exercise 1.3: fn(w, bits, group_size) -> w_hat, symmetric absmax with one scale per
    `group_size` consecutive values of each row (quantized then dequantized)."""
    from ..quant import primitives as P

    name = "Exercise 1.3 (group-wise quantization)"
    for what, w, bits, gs in _group_cases():
        ok, got = _call(name, fn, w.clone(), bits, gs)
        if not ok:
            return _result(name, False, got)
        got, msg = _tensor(got, what, "result")
        if msg is None and tuple(got.shape) != tuple(w.shape):
            msg = f"the result has shape {tuple(got.shape)}, expected {tuple(w.shape)} for {what}"
        if msg:
            return _result(name, False, msg)
        if not _close(got, P.fake_quantize(w, bits, gs, symmetric=True), w):
            hint = ""
            if gs != w.shape[1] and _close(got, P.fake_quantize(w, bits, "channel"), w):
                hint = ": it matches one scale per row; split each row into groups of group_size"
            elif _close(got, P.fake_quantize(w, bits, "tensor"), w):
                hint = ": it matches one scale for the whole tensor"
            elif (got[w == 0] != 0).any():
                hint = ": 0.0 did not come back as exactly 0.0"
            return _result(name, False, f"result differs from llmopt.quant.fake_quantize(w, {bits}, {gs}) "
                                        f"for {what}{hint}")
    return _result(name, True, "matches llmopt.quant.fake_quantize(w, bits, group_size) on odd shapes, "
                               "all-zero and constant rows and groups, and an outlier")


def check_pack_int4(pack_fn, unpack_fn) -> bool:
    """Exercise 1.4: pack_fn(codes uint8 in [0, 16), last dim even) -> uint8 bytes, element 2i
    in the low nibble and 2i+1 in the high one; unpack_fn(bytes) -> the codes."""
    from ..quant import packing

    name = "Exercise 1.4 (INT4 packing)"
    g = torch.Generator().manual_seed(3)
    rand = lambda *shape: torch.randint(0, 16, shape, generator=g, dtype=torch.uint8)  # noqa: E731
    cases = [("codes (2, 8)", rand(2, 8)), ("codes (5, 2)", rand(5, 2)), ("3-D codes (3, 4, 6)", rand(3, 4, 6)),
             ("1-D codes (1000,)", rand(1000)), ("codes all 15 (4, 6)", torch.full((4, 6), 15, dtype=torch.uint8)),
             ("codes all 0 (1, 2)", torch.zeros(1, 2, dtype=torch.uint8))]
    for what, codes in cases:
        want = packing.pack(codes, 4)
        ok, got = _call(name, pack_fn, codes.clone())
        if not ok:
            return _result(name, False, got)
        if not isinstance(got, torch.Tensor) or got.dtype != torch.uint8:
            kind = got.dtype if isinstance(got, torch.Tensor) else type(got).__name__
            return _result(name, False, f"pack should return a uint8 tensor (one byte per two codes), got {kind}")
        if tuple(got.shape) != tuple(want.shape):
            return _result(name, False, f"packed {what} to shape {tuple(got.shape)}, expected {tuple(want.shape)} "
                                        "(the last dimension halves)")
        if not torch.equal(got, want):
            swapped = (want & 0xF) << 4 | want >> 4
            i = int((got.flatten() != want.flatten()).nonzero()[0])
            why = ("element 2i went to the high nibble; llmopt (and most kernels) put it in the low one"
                   if torch.equal(got, swapped) else f"byte {i} (flattened) is {int(got.flatten()[i])}, "
                   f"expected {int(want.flatten()[i])} = codes[{2 * i}] | codes[{2 * i + 1}] << 4")
            return _result(name, False, f"packed bytes differ from llmopt.quant.pack for {what}: {why}")
        ok, back = _call(name, unpack_fn, want.clone())
        if not ok:
            return _result(name, False, back)
        if not isinstance(back, torch.Tensor) or tuple(back.shape) != tuple(codes.shape):
            shape = tuple(back.shape) if isinstance(back, torch.Tensor) else type(back).__name__
            return _result(name, False, f"unpack gave {shape} for {what}, expected shape {tuple(codes.shape)}")
        if back.is_floating_point() or not torch.equal(back.long(), codes.long()):
            return _result(name, False, f"unpack(pack(codes)) != codes for {what} (mask each nibble with 0xF; "
                                        "return integers)")
    return _result(name, True, "matches llmopt.quant.pack/unpack (element 2i in the low nibble); "
                               "exact round trip on 1-D, 2-D and 3-D codes")
