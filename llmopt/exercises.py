"""The checks behind the notebooks' exercises.

Each `check_*` takes the learner's function, tries it on inputs of its own, compares
with llmopt's implementation and prints what it found. It returns True or False and
never stops the notebook, so a learner who skips an exercise runs on; with
`LLMOPT_STRICT=1` (how CI runs the solutions) a failed check raises instead.
"""
from __future__ import annotations

import math
import os

import torch


def _result(name: str, passed: bool, message: str) -> bool:
    print(f"{'PASS' if passed else 'FAIL'} {name}: {message}")
    if not passed and os.environ.get("LLMOPT_STRICT") == "1":
        raise AssertionError(f"{name}: {message}")
    return passed


def _call(name, fn, *args):
    """Run the learner's function; (ok, value or the message to show)."""
    try:
        return True, fn(*args)
    except NotImplementedError:
        return False, "not attempted yet (the rest of the notebook uses llmopt's version)"
    except Exception as e:  # a learner's bug: show it, don't crash the notebook
        return False, f"raised {type(e).__name__}: {e}"


def _check_numbers(name, fn, cases, rel_tol, success) -> bool:
    """Call fn(*args) for each (args, want, what) case and compare with `want`."""
    for args, want, what in cases:
        ok, got = _call(name, fn, *args)
        if not ok:
            return _result(name, False, got)
        try:
            got = float(got)
        except (TypeError, ValueError):
            return _result(name, False, f"returned {type(got).__name__}, expected a number")
        if not math.isclose(got, want, rel_tol=rel_tol):
            return _result(name, False, f"got {got:.4g}, expected {want:.4g} for {what}")
    return _result(name, True, success)


# --------------------------------------------------------------------------- lesson 00

def check_perplexity(fn) -> bool:
    """Exercise 0.1: fn(logits (T, V), targets (T,)) -> perplexity (a float)."""
    g = torch.Generator().manual_seed(0)
    cases = []
    for logits, targets in [(torch.randn(50, 11, generator=g) * 3, torch.randint(0, 11, (50,), generator=g)),
                            (torch.zeros(7, 5), torch.randint(0, 5, (7,), generator=g))]:  # uniform: ppl = V
        want = math.exp(torch.nn.functional.cross_entropy(logits, targets).item())
        cases.append(((logits.clone(), targets.clone()), want, f"{tuple(logits.shape)} logits"))
    return _check_numbers("Exercise 0.1 (perplexity from logits)", fn, cases, 1e-4,
                          "matches exp(mean cross-entropy); uniform logits give perplexity = vocab size")


def check_roofline_floor(fn) -> bool:
    """Exercise 0.2: fn(weight_bytes, bandwidth_bytes_per_s) -> floor tokens/s at batch 1."""
    cases = [((wb, bw), bw / wb, f"{wb:.3g} bytes at {bw:.3g} bytes/s")
             for wb, bw in [(2.2e9, 4.2e12), (13.2e6, 20e9), (1, 1)]]
    return _check_numbers("Exercise 0.2 (decode roofline)", fn, cases, 1e-6,
                          "a 2.2 GB model at 4.2 TB/s cannot decode faster than ~1900 tok/s at batch 1")


# --------------------------------------------------------------------------- lesson 01

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


def check_absmax(quantize_fn, dequantize_fn) -> bool:
    """Exercise 1.1: quantize_fn(x, bits) -> (codes, scale) with one scale for the tensor,
    symmetric codes in [-(2^(b-1) - 1), 2^(b-1) - 1]; dequantize_fn(codes, scale) -> x_hat."""
    from .quant import primitives as P

    name = "Exercise 1.1 (absmax quantization)"
    for what, x, bits in _int_tensors():
        qmin, qmax = P.qrange(bits, symmetric=True)
        ref = P.quantize(x, bits, "tensor", symmetric=True)
        ok, out = _call(name, quantize_fn, x.clone(), bits)
        if not ok:
            return _result(name, False, out)
        if not (isinstance(out, (tuple, list)) and len(out) == 2):
            return _result(name, False, f"should return (codes, scale), got {type(out).__name__} for {what}")
        q, scale = out
        s, msg = _scalar(scale, what, "scale")
        if msg is None and x.abs().max() > 0 and not math.isclose(s, ref.scale.item(), rel_tol=1e-5):
            msg = f"scale {s:.6g}, expected {ref.scale.item():.6g} = max|x| / {qmax} for {what}"
        msg = msg or _codes_failure(q, ref.q.float(), x, what, qmin, qmax)
        if msg:
            return _result(name, False, msg)
        ok, xh = _call(name, dequantize_fn, torch.as_tensor(q).clone(), scale)
        if not ok:
            return _result(name, False, xh)
        msg = _dequant_failure(xh, P.dequantize(ref), x, what)
        if msg:
            return _result(name, False, msg)
    return _result(name, True, "codes and scale match llmopt.quant.quantize_tensor(x, bits, 'tensor'), "
                               "every value within half a step, 0.0 stays exactly 0.0")


def check_zero_point(quantize_fn, dequantize_fn) -> bool:
    """Exercise 1.2: quantize_fn(x, bits) -> (codes, scale, zero) with codes in [0, 2^b - 1]
    and an integer zero point; dequantize_fn(codes, scale, zero) -> x_hat."""
    from .quant import primitives as P

    name = "Exercise 1.2 (zero-point quantization)"
    for what, x, bits in _int_tensors():
        qmin, qmax = P.qrange(bits, symmetric=False)
        ref = P.quantize(x, bits, "tensor", symmetric=False)
        ok, out = _call(name, quantize_fn, x.clone(), bits)
        if not ok:
            return _result(name, False, out)
        if not (isinstance(out, (tuple, list)) and len(out) == 3):
            return _result(name, False, f"should return (codes, scale, zero), got {type(out).__name__} for {what}")
        q, scale, zero = out
        s, msg = _scalar(scale, what, "scale")
        z, zmsg = _scalar(zero, what, "zero point")
        msg = msg or zmsg
        if msg is None and x.abs().max() > 0:
            if not math.isclose(s, ref.scale.item(), rel_tol=1e-5):
                msg = (f"scale {s:.6g}, expected {ref.scale.item():.6g} = (max(x, 0) - min(x, 0)) / {qmax} "
                       f"for {what} (the range must include 0)")
            elif z != round(z):
                msg = f"zero point {z:.4g} is not an integer for {what}: round it, or 0.0 cannot come back exactly"
            elif z != ref.zero.item():
                msg = f"zero point {z:g}, expected {ref.zero.item():g} = round(-min(x, 0) / scale) for {what}"
        msg = msg or _codes_failure(q, ref.q.float(), x, what, qmin, qmax)
        if msg:
            return _result(name, False, msg)
        ok, xh = _call(name, dequantize_fn, torch.as_tensor(q).clone(), scale, zero)
        if not ok:
            return _result(name, False, xh)
        msg = _dequant_failure(xh, P.dequantize(ref), x, what)
        if msg:
            return _result(name, False, msg)
    return _result(name, True, "codes, scale and zero point match llmopt.quant.quantize_tensor(x, bits, 'tensor', "
                               "symmetric=False); one-sided ranges use every code, 0.0 stays exactly 0.0")


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
    from .quant import primitives as P

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
    from .quant import packing

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


# --------------------------------------------------------------------------- lesson 02

def check_gptq_column(fn) -> bool:
    """Exercise 2.1: fn(W, U, i, scale, bits) -> (codes of column i, W after the update), symmetric
    quantization, compared with llmopt.quant.gptq.column_update on a few random layers."""
    from .quant.gptq import column_update

    name = "Exercise 2.1 (one GPTQ column update)"
    g = torch.Generator().manual_seed(0)
    for rows, n, i, bits in [(6, 10, 0, 4), (5, 12, 7, 3), (4, 8, 7, 4), (3, 16, 2, 8)]:
        x = torch.randn(4 * n, n, generator=g) @ (torch.eye(n) + torch.randn(n, n, generator=g) / n**0.5)
        H = 2 * x.T @ x / x.shape[0] + 0.01 * torch.eye(n)
        U = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
        W = torch.randn(rows, n, generator=g)
        scale = W.abs().amax(dim=1) / (2 ** (bits - 1) - 1)
        want_W = W.clone()
        want_q, _ = column_update(want_W, U, i, scale[:, None], None, bits)
        ok, got = _call(name, fn, W.clone(), U.clone(), i, scale.clone(), bits)
        if not ok:
            return _result(name, False, got)
        if not (isinstance(got, tuple) and len(got) == 2):
            return _result(name, False, "return a pair (codes of column i, updated W)")
        q, W_new = (torch.as_tensor(t).float() for t in got)
        what = f"column {i} of a {rows}x{n} weight at {bits} bits"
        if q.shape != want_q.shape or not torch.equal(q.reshape(-1), want_q):
            return _result(name, False, f"codes differ from round(W[:, i] / scale) clamped to the range, for {what}")
        if W_new.shape != W.shape:
            return _result(name, False, f"W has shape {tuple(W_new.shape)}, expected {tuple(W.shape)}")
        if not torch.allclose(W_new[:, :i], W[:, :i]):
            return _result(name, False, f"columns before {i} changed; only columns i+1.. should move")
        if i + 1 < n and torch.allclose(W_new[:, i + 1 :], W[:, i + 1 :]):
            return _result(name, False, f"the later columns did not move: spread the error along U[i, i+1:] ({what})")
        if not torch.allclose(W_new[:, i + 1 :], want_W[:, i + 1 :], atol=1e-5, rtol=1e-4):
            err = (W_new[:, i + 1 :] - want_W[:, i + 1 :]).abs().max().item()
            return _result(name, False, f"later columns off by up to {err:.3g} for {what}: e = (w_i - q_i s) / U_ii, "
                           "w_j -= e U_ij")
    return _result(name, True, "codes and error feedback match llmopt.quant.gptq.column_update")


# --------------------------------------------------------------------------- lesson 03

def _leaf(t: torch.Tensor) -> torch.Tensor:
    return t.detach().clone().requires_grad_(True)


def _forward_backward(name, fn, inputs: list, upstream: torch.Tensor):
    """fn(*inputs) on fresh leaves, then backward with `upstream`: (ok, out or message, leaves)."""
    leaves = [_leaf(t) if isinstance(t, torch.Tensor) and t.is_floating_point() else t for t in inputs]
    ok, out = _call(name, fn, *leaves)
    if not ok:
        return False, out, leaves
    if not isinstance(out, torch.Tensor) or out.shape != upstream.shape:
        return False, f"returned {type(out).__name__} {tuple(getattr(out, 'shape', ()))}, expected a tensor of " \
                      f"shape {tuple(upstream.shape)}", leaves
    if not out.requires_grad:
        return False, "no gradient flows back through the result (is it detached, or made under no_grad?)", leaves
    try:
        out.backward(upstream)
    except Exception as e:  # a learner's graph: show what went wrong, do not crash
        return False, f"backward raised {type(e).__name__}: {e}", leaves
    return True, out.detach(), leaves


def check_ste(fn) -> bool:
    """Exercise 3.1: fn(x) -> round(x) in the forward pass, gradient 1 in the backward pass."""
    name = "Exercise 3.1 (straight-through round)"
    g = torch.Generator().manual_seed(0)
    for x in (torch.randn(4, 50, generator=g) * 5, torch.randn(3, 7, generator=g) * 0.4):
        upstream = torch.randn(x.shape, generator=g)
        ok, out, (leaf,) = _forward_backward(name, fn, [x], upstream)
        if not ok:
            return _result(name, False, out)
        if not torch.equal(out, torch.round(x)):
            bad = (out != torch.round(x)).float().mean().item()
            return _result(name, False, f"the forward value differs from torch.round(x) in {100 * bad:.0f}% of entries")
        if leaf.grad is None or not leaf.grad.abs().sum() > 0:
            return _result(name, False, "the gradient is zero: round's own derivative is 0 almost everywhere, "
                            "so pass the incoming gradient straight through instead")
        if not torch.allclose(leaf.grad, upstream):
            return _result(name, False, "the gradient should be the incoming gradient unchanged (d round / dx := 1)")
    return _result(name, True, "round(x) forward, identity gradient backward: the straight-through estimator")


def check_fake_quant(fn) -> bool:
    """Exercise 3.2: fn(w, scale, zero, bits) -> (clamp(round(w/s) + z) - z) * s, with the STE."""
    from .quant.qat import fake_quant

    name = "Exercise 3.2 (fake quantization with the STE)"
    g = torch.Generator().manual_seed(0)
    for bits, symmetric in [(2, True), (3, True), (2, False), (4, False)]:
        w = torch.randn(6, 3, 16, generator=g)
        qmax = 2 ** (bits - 1) - 1 if symmetric else 2**bits - 1
        if symmetric:
            scale, zero = 0.6 * w.abs().amax(-1, keepdim=True) / qmax, None  # 0.6: some weights clamp
        else:
            lo, hi = w.amin(-1, keepdim=True), w.amax(-1, keepdim=True)
            scale = 0.6 * (hi - lo) / qmax
            zero = torch.round(-lo / scale).clamp(0, qmax)
        what = f"{bits}-bit {'symmetric' if symmetric else 'zero-point'} groups"
        upstream = torch.randn(w.shape, generator=g)
        ok, out, leaves = _forward_backward(name, fn, [w, scale, zero, bits], upstream)
        if not ok:
            return _result(name, False, out)
        ref_w, ref_s = _leaf(w), _leaf(scale)
        want = fake_quant(ref_w, ref_s, zero, bits)
        want.backward(upstream)
        if not torch.allclose(out, want.detach(), atol=1e-6):
            return _result(name, False, f"values differ from (clamp(round(w/s) + z, qmin, qmax) - z) * s for {what}")
        w_grad, s_grad = leaves[0].grad, leaves[1].grad
        if w_grad is None or not w_grad.abs().sum() > 0:
            return _result(name, False, f"no gradient reaches w for {what}: round with the straight-through estimator")
        if not torch.allclose(w_grad, ref_w.grad, atol=1e-6):
            clamped = ref_w.grad == 0
            if torch.allclose(w_grad[~clamped], upstream[~clamped]):
                return _result(name, False, f"weights the clamp cut off should get no gradient ({what})")
            return _result(name, False, f"the gradient to w is wrong for {what}: 1 inside the range, 0 outside")
        if s_grad is None or not torch.allclose(s_grad, ref_s.grad, atol=1e-4, rtol=1e-4):
            return _result(name, False, f"the gradient to the scale is wrong for {what} (keep s in the graph, "
                            "compute q with the STE round and return (q - z) * s)")
    return _result(name, True, "values and gradients (to the weights and the scale, as in LSQ) match "
                   "llmopt.quant.qat.fake_quant")
