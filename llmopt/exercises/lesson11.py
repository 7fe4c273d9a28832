"""Lesson 11: the Pareto front of a comparison table (which methods no other method beats on every axis)."""
from __future__ import annotations

from ._common import _call, _result

SENSES = ("min", "max")


def pareto_front(rows: list[dict], keys: dict[str, str]) -> list[str]:
    """The methods of `rows` (dicts with a "method" and the columns in `keys`) that no other row dominates,
    in the rows' order. `keys`: column -> "min" (lower is better: perplexity, size) or "max" (tok/s).
    Row a dominates row b if a is at least as good as b in every key and better in at least one; two rows
    with equal values in every key do not dominate each other. Rows missing a key are left out."""
    bad = {k: s for k, s in keys.items() if s not in SENSES}
    if bad or not keys:
        raise ValueError(f"keys maps columns to 'min' or 'max', got {keys!r}")
    sign = {k: 1.0 if s == "min" else -1.0 for k, s in keys.items()}
    pts = [(r["method"], [sign[k] * r[k] for k in keys]) for r in rows if all(r.get(k) is not None for k in keys)]

    def dominates(a, b):
        return all(x <= y for x, y in zip(a, b)) and any(x < y for x, y in zip(a, b))

    return [m for m, p in pts if not any(dominates(q, p) for _, q in pts)]


def _rows(values, cols=("perplexity", "size_mb", "tok_s")):
    return [{"method": f"m{i}", **dict(zip(cols, v))} for i, v in enumerate(values)]


def check_pareto_front(fn) -> bool:
    """Exercise 11.1: fn(rows, keys) -> the methods on the Pareto front, in the rows' order."""
    name = "Exercise 11.1 (the Pareto front)"
    cases = [
        (_rows([(16.6, 26.5, 170), (16.8, 10.7, 75), (17.7, 17.4, 236), (18.2, 17.4, 340), (17.0, 26.5, 180)]),
         {"perplexity": "min", "size_mb": "min"}, "perplexity vs size"),
        (_rows([(16.6, 26.5, 170), (16.8, 10.7, 75), (17.7, 17.4, 236), (18.2, 17.4, 340), (17.0, 26.5, 180)]),
         {"perplexity": "min", "tok_s": "max"}, "perplexity vs tok/s (higher is better)"),
        (_rows([(16.6, 26.5, 170), (16.6, 26.5, 170), (16.6, 30.0, 170), (17.0, 12.0, 100)]),
         {"perplexity": "min", "size_mb": "min"}, "ties: two equal rows, one only worse in size"),
        (_rows([(16.6, 26.5, 170), (16.8, 10.7, 75), (18.2, 17.4, 340), (16.7, 12.0, 80)]),
         {"perplexity": "min", "size_mb": "min", "tok_s": "max"}, "three keys"),
        (_rows([(16.6, 26.5, 170), (16.8, 10.7, 75), (15.9, None, 90), (15.5,), (17.7, 17.4, 236)]),
         {"perplexity": "min", "size_mb": "min"}, "rows with a size of None or none at all"),
    ]
    for rows, keys, what in cases:
        want = pareto_front(rows, keys)
        ok, got = _call(name, fn, [dict(r) for r in rows], dict(keys))
        if not ok:
            return _result(name, False, got)
        try:
            got = [str(m) for m in got]
        except TypeError:
            return _result(name, False, f"return a list of method names, got {type(got).__name__}")
        if got == want:
            continue
        incomplete = [m for m in got if any(r.get(k) is None for r in rows if r["method"] == m for k in keys)]
        if incomplete:
            return _result(name, False, f"got {got}, expected {want} for {what}: leave out rows missing a key "
                                        f"({incomplete})")
        if sorted(got) == sorted(want):
            return _result(name, False, f"got {got}: the right methods, but keep the rows' order ({what})")
        if got == pareto_front(rows, {k: "min" for k in keys}):
            return _result(name, False, f"got {got}, expected {want} for {what}: a 'max' key is better when "
                                        "higher")
        return _result(name, False, f"got {got}, expected {want} for {what} (a row is dominated when another is "
                                    "at least as good in every key and better in one)")
    return _result(name, True, "the rows no other row beats on every axis: the only ones worth choosing between")
