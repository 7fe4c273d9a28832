"""Lesson 01's checks: each passes on a correct learner implementation (written here from
the formulas, not by calling llmopt), fails with a useful message on a plausible mistake,
and says "not attempted yet" for the notebook's stub."""
import pytest
import torch

from llmopt import exercises


def stub(*args):
    raise NotImplementedError("Exercise 1.x: see the text above")


# --------------------------------------------------------------------------- correct answers

def absmax_q(x, bits):
    qmax = 2 ** (bits - 1) - 1
    scale = x.abs().max() / qmax
    scale = scale if scale > 0 else torch.tensor(1.0)
    return torch.clamp(torch.round(x / scale), -qmax, qmax).to(torch.int8), scale


def absmax_dq(q, scale):
    return q.float() * scale


def zp_q(x, bits):
    qmax = 2**bits - 1
    lo, hi = min(x.min().item(), 0.0), max(x.max().item(), 0.0)
    scale = (hi - lo) / qmax if hi > lo else 1.0
    zero = round(-lo / scale)
    return torch.clamp(torch.round(x / scale) + zero, 0, qmax).to(torch.uint8), scale, zero


def zp_dq(q, scale, zero):
    return (q.float() - zero) * scale


def groupwise(w, bits, group_size):
    out_f, in_f = w.shape
    g = w.reshape(out_f, in_f // group_size, group_size)
    q, s = absmax_rows(g, bits)
    return (q * s).reshape(out_f, in_f)


def absmax_rows(g, bits):
    qmax = 2 ** (bits - 1) - 1
    s = (g.abs().amax(dim=-1, keepdim=True) / qmax).clamp(min=1e-12)
    return torch.clamp(torch.round(g / s), -qmax, qmax), s


def pack4(codes):
    c = codes.to(torch.uint8)
    return c[..., 0::2] | (c[..., 1::2] << 4)


def unpack4(packed):
    return torch.stack([packed & 0xF, packed >> 4], dim=-1).flatten(-2)


# --------------------------------------------------------------------------- plausible mistakes

def absmax_q_qmax_128(x, bits):  # uses 2^(b-1) instead of 2^(b-1) - 1
    scale = x.abs().max().clamp(min=1e-12) / 2 ** (bits - 1)
    return torch.clamp(torch.round(x / scale), -(2 ** (bits - 1)), 2 ** (bits - 1) - 1), scale


def absmax_q_floor(x, bits):  # truncates instead of rounding
    qmax = 2 ** (bits - 1) - 1
    scale = x.abs().max().clamp(min=1e-12) / qmax
    return torch.trunc(x / scale), scale


def absmax_q_nan_on_zeros(x, bits):  # divides by max|x| = 0
    qmax = 2 ** (bits - 1) - 1
    scale = x.abs().max() / qmax
    return torch.round(x / scale), scale


def zp_q_float_zero(x, bits):  # zero point left as a float
    qmax = 2**bits - 1
    lo, hi = min(x.min().item(), 0.0), max(x.max().item(), 0.0)
    scale = (hi - lo) / qmax if hi > lo else 1.0
    zero = -lo / scale
    return torch.clamp(torch.round(x / scale + zero), 0, qmax), scale, zero


def zp_q_range_without_zero(x, bits):  # min/max not widened to include 0
    qmax = 2**bits - 1
    lo, hi = x.min().item(), x.max().item()
    scale = (hi - lo) / qmax if hi > lo else 1.0
    zero = round(-lo / scale)
    return torch.clamp(torch.round(x / scale) + zero, 0, qmax), scale, zero


def groupwise_per_row(w, bits, group_size):  # ignores group_size
    q, s = absmax_rows(w, bits)
    return q * s


def groupwise_per_tensor(w, bits, group_size):
    q, s = absmax_rows(w.reshape(1, -1), bits)
    return (q * s).reshape(w.shape)


def groupwise_down_columns(w, bits, group_size):  # groups run down the columns
    t = w.T.contiguous()
    return groupwise(t.reshape(-1, group_size), bits, group_size).reshape(t.shape).T


def pack4_swapped(codes):
    c = codes.to(torch.uint8)
    return (c[..., 0::2] << 4) | c[..., 1::2]


def pack4_int64(codes):
    return pack4(codes).long()


def unpack4_no_mask(packed):
    return torch.stack([packed, packed >> 4], dim=-1).flatten(-2)


# --------------------------------------------------------------------------- tests

@pytest.fixture(autouse=True)
def not_strict(monkeypatch):
    monkeypatch.delenv("LLMOPT_STRICT", raising=False)


TENSOR_CHECKS = {"1.1": (exercises.check_absmax, absmax_q, absmax_dq),
                 "1.2": (exercises.check_zero_point, zp_q, zp_dq)}


@pytest.mark.parametrize("ex", TENSOR_CHECKS)
def test_tensor_quantizer_checks_pass_on_a_correct_answer(ex, capsys):
    check, quantize, dequantize = TENSOR_CHECKS[ex]
    assert check(quantize, dequantize) is True
    assert f"PASS Exercise {ex}" in capsys.readouterr().out


@pytest.mark.parametrize("ex, wrong, says", [
    ("1.1", absmax_q_qmax_128, "scale"),
    ("1.1", absmax_q_floor, "codes differ"),
    ("1.1", absmax_q_nan_on_zeros, "NaN"),
    ("1.2", zp_q_float_zero, "not an integer"),
    ("1.2", zp_q_range_without_zero, "must include 0"),
])
def test_tensor_quantizer_checks_fail_on_mistakes(ex, wrong, says, capsys):
    check, _, dequantize = TENSOR_CHECKS[ex]
    assert check(wrong, dequantize) is False
    out = capsys.readouterr().out
    assert f"FAIL Exercise {ex}" in out and says in out


def test_absmax_check_tests_dequantize_and_shape(capsys):
    assert exercises.check_absmax(absmax_q, lambda q, s: q.float() * s + 1e-3) is False
    assert exercises.check_absmax(lambda x, b: absmax_q(x, b)[0], absmax_dq) is False
    assert exercises.check_absmax(lambda x, b: (absmax_q(x, b)[0].flatten(), absmax_q(x, b)[1]), absmax_dq) is False
    out = capsys.readouterr().out
    assert "dequantized" in out and "(codes, scale)" in out and "shape" in out


def test_zero_point_check_catches_a_dequantize_that_forgets_the_zero(capsys):
    assert exercises.check_zero_point(zp_q, lambda q, s, z: q.float() * s) is False
    assert "dequantized" in capsys.readouterr().out


def test_groupwise_check_passes_on_a_correct_answer(capsys):
    assert exercises.check_groupwise(groupwise) is True
    assert "PASS Exercise 1.3" in capsys.readouterr().out


@pytest.mark.parametrize("wrong, says", [
    (groupwise_per_row, "one scale per row"),
    (groupwise_per_tensor, "whole tensor"),
    (groupwise_down_columns, "differs"),
    (lambda w, b, g: groupwise(w, b, g)[:, :-1], "shape"),
])
def test_groupwise_check_fails_on_mistakes(wrong, says, capsys):
    assert exercises.check_groupwise(wrong) is False
    out = capsys.readouterr().out
    assert "FAIL Exercise 1.3" in out and says in out


def test_pack_check_passes_on_a_correct_answer(capsys):
    assert exercises.check_pack_int4(pack4, unpack4) is True
    assert "PASS Exercise 1.4" in capsys.readouterr().out


@pytest.mark.parametrize("pack, unpack, says", [
    (pack4_swapped, unpack4, "high nibble"),
    (pack4_int64, unpack4, "uint8"),
    (pack4, unpack4_no_mask, "0xF"),
    (lambda c: c.to(torch.uint8), unpack4, "shape"),
])
def test_pack_check_fails_on_mistakes(pack, unpack, says, capsys):
    assert exercises.check_pack_int4(pack, unpack) is False
    out = capsys.readouterr().out
    assert "FAIL Exercise 1.4" in out and says in out


@pytest.mark.parametrize("check, n_fns", [
    (exercises.check_absmax, 2), (exercises.check_zero_point, 2),
    (exercises.check_groupwise, 1), (exercises.check_pack_int4, 2),
])
def test_stubs_are_not_attempted_and_do_not_raise(check, n_fns, capsys):
    assert check(*[stub] * n_fns) is False
    assert "not attempted yet" in capsys.readouterr().out


def test_a_half_done_pair_is_not_attempted(capsys):
    assert exercises.check_absmax(absmax_q, stub) is False
    assert exercises.check_pack_int4(pack4, stub) is False
    assert capsys.readouterr().out.count("not attempted yet") == 2


def test_strict_mode_raises(monkeypatch):
    monkeypatch.setenv("LLMOPT_STRICT", "1")
    with pytest.raises(AssertionError, match="Exercise 1.3"):
        exercises.check_groupwise(groupwise_per_row)
    with pytest.raises(AssertionError, match="not attempted"):
        exercises.check_pack_int4(stub, stub)


def test_a_learner_bug_is_reported_not_raised(capsys):
    def buggy(x, bits):
        return x.reshape(3, -1, 7)

    assert exercises.check_absmax(buggy, absmax_dq) is False
    assert "raised RuntimeError" in capsys.readouterr().out


def test_checks_do_not_modify_their_reference_cases():
    def clobber(x, bits):
        x.zero_()
        return absmax_q(x, bits)

    exercises.check_absmax(clobber, absmax_dq)  # fails, but must not poison later cases
    assert exercises.check_absmax(absmax_q, absmax_dq) is True
