"""Lesson 11's check: passes on an answer written here from the definition, fails with a useful message on
plausible mistakes, and says "not attempted yet" for the stub; llmopt's pareto_front on small cases."""
import math

import pytest

from llmopt.exercises import lesson11 as exercises


def front(rows, keys, honour_max=True, keep_order=True, strict_everywhere=False, incomplete="leave out"):
    if incomplete == "leave out":
        rows = [r for r in rows if all(r.get(k) is not None for k in keys)]
    elif incomplete == "as worst":      # a missing value counted as the worst possible one
        rows = [{**r, **{k: (math.inf if s == "min" else -math.inf) for k, s in keys.items() if r.get(k) is None}}
                for r in rows]
    pts = [[-r[k] if honour_max and s == "max" else r[k] for k, s in keys.items()] for r in rows]

    def dominates(a, b):
        if strict_everywhere:
            return all(x < y for x, y in zip(a, b))
        return all(x <= y for x, y in zip(a, b)) and any(x < y for x, y in zip(a, b))

    out = [r["method"] for r, p in zip(rows, pts) if not any(dominates(q, p) for q in pts)]
    return out if keep_order else sorted(out, reverse=True)


def test_reference_on_small_cases():
    rows = [{"method": "a", "ppl": 1.0, "mb": 3.0}, {"method": "b", "ppl": 2.0, "mb": 1.0},
            {"method": "c", "ppl": 2.0, "mb": 2.0}, {"method": "d", "ppl": 1.0, "mb": 3.0}, {"method": "e", "ppl": 1.0}]
    assert exercises.pareto_front(rows, {"ppl": "min", "mb": "min"}) == ["a", "b", "d"]
    assert exercises.pareto_front(rows, {"ppl": "min", "mb": "max"}) == ["a", "d"]
    with pytest.raises(ValueError, match="'min' or 'max'"):
        exercises.pareto_front(rows, {"ppl": "lower"})


def test_check_passes_on_a_correct_answer():
    assert exercises.check_pareto_front(front)


@pytest.mark.parametrize("mistake, message", [
    (dict(honour_max=False), "higher"),
    (dict(keep_order=False), "rows' order"),
    (dict(strict_everywhere=True), "expected"),
    (dict(incomplete="as worst"), "leave out rows missing a key"),
    (dict(incomplete="kept"), "raised KeyError"),
])
def test_check_fails_on_mistakes(mistake, message, capsys):
    assert not exercises.check_pareto_front(lambda r, k: front(r, k, **mistake))
    assert message in capsys.readouterr().out


def test_stub_says_not_attempted(capsys):
    def stub(rows, keys):
        raise NotImplementedError("Exercise 11.1")

    assert not exercises.check_pareto_front(stub)
    assert "not attempted yet" in capsys.readouterr().out
