"""Comparison tables and plots: one `Report` per experiment, one row per method.

A `Report` renders as an HTML table in a notebook, a text table in the terminal
(`print(report)`), and JSON for files; `Report.plot` draws any two columns against
each other (quality vs size, say) and `plot_roofline` the decode roofline.
"""
from __future__ import annotations

import html
import json
from dataclasses import dataclass, field
from pathlib import Path

# Column name -> (header, format). Columns not listed print with `str`/`.4g`.
COLUMNS = {
    "method": ("method", "{}"),
    "size_mb": ("size MB", "{:.2f}"),
    "params_m": ("params M", "{:.2f}"),
    "perplexity": ("perplexity", "{:.3f}"),
    "tok_s_b1": ("tok/s b=1", "{:.1f}"),
    "tok_s_b16": ("tok/s b=16", "{:.1f}"),
    "ttft_ms": ("TTFT ms", "{:.2f}"),
    "tpot_ms": ("TPOT ms", "{:.2f}"),
    "req_s_b16": ("req/s b=16", "{:.2f}"),
    "peak_mem_mb": ("peak mem MB", "{:.0f}"),
    "roofline_pct": ("% of roofline", "{:.1f}"),
    "joules_per_tok": ("J/tok", "{:.4f}"),
}


def _fmt(col, v):
    if v is None:
        return "-"
    fmt = COLUMNS.get(col, (col, "{:.4g}" if isinstance(v, float) else "{}"))[1]
    try:
        return fmt.format(v)
    except (ValueError, TypeError):
        return str(v)


@dataclass
class Report:
    title: str = "results"
    rows: list = field(default_factory=list)
    env: dict = field(default_factory=dict)   # where the numbers came from
    notes: list = field(default_factory=list)
    details: dict = field(default_factory=dict)  # method -> raw measurements (JSON only)

    def add(self, method: str, **metrics) -> dict:
        """Add (or replace) the row for `method`."""
        row = {"method": method, **metrics}
        self.rows = [r for r in self.rows if r["method"] != method] + [row]
        return row

    def __getitem__(self, method: str) -> dict:
        for r in self.rows:
            if r["method"] == method:
                return r
        raise KeyError(f"no row {method!r}; rows: {[r['method'] for r in self.rows]}")

    @property
    def columns(self) -> list:
        """Every column some row has a value for, in first-seen order."""
        cols = []
        for r in self.rows:
            cols += [c for c, v in r.items() if c not in cols and v is not None]
        return cols

    def _cells(self):
        cols = self.columns
        head = [COLUMNS.get(c, (c,))[0] for c in cols]
        body = [[_fmt(c, r.get(c)) for c in cols] for r in self.rows]
        return head, body

    def __str__(self) -> str:
        head, body = self._cells()
        widths = [max(len(x) for x in col) for col in zip(head, *body)]
        line = lambda cells: "  ".join(  # noqa: E731
            c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))
        out = [self.title, line(head), line(["-" * w for w in widths])] + [line(b) for b in body]
        if self.env:
            out.append("machine: " + ", ".join(f"{k}={v}" for k, v in self.env.items()))
        out += self.notes
        return "\n".join(out)

    def _repr_html_(self) -> str:
        head, body = self._cells()
        th = "".join(f"<th>{html.escape(h)}</th>" for h in head)
        trs = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in b) + "</tr>" for b in body)
        foot = ""
        if self.env:
            machine = ", ".join(f"{k}={v}" for k, v in self.env.items())
            foot = f"<p><small>machine: {html.escape(machine)}</small></p>"
        return f"<b>{html.escape(self.title)}</b><table><thead><tr>{th}</tr></thead><tbody>{trs}</tbody></table>{foot}"

    def to_dict(self) -> dict:
        return {"title": self.title, "rows": self.rows, "env": self.env, "notes": self.notes,
                "details": self.details}

    def to_json(self, path=None) -> str:
        text = json.dumps(self.to_dict(), indent=1, default=str)
        if path is not None:
            Path(path).write_text(text)
        return text

    @classmethod
    def load(cls, path) -> Report:
        """Read a report written by `to_json(path)`."""
        return cls(**json.loads(Path(path).read_text()))

    def plot(self, x: str = "size_mb", y: str = "perplexity", ax=None, path=None, logx: bool = False):
        """Scatter of column `y` against column `x`, one labelled point per method."""
        plt = _pyplot()
        rows = [r for r in self.rows if r.get(x) is not None and r.get(y) is not None]
        if not rows:
            raise ValueError(f"no row has both {x!r} and {y!r}; columns: {self.columns}")
        fig, ax = (ax.figure, ax) if ax is not None else plt.subplots(figsize=(5.5, 3.8))
        for r in rows:
            ax.scatter(r[x], r[y])
            ax.annotate(r["method"], (r[x], r[y]), textcoords="offset points", xytext=(4, 4), fontsize=8)
        ax.set(xlabel=COLUMNS.get(x, (x,))[0], ylabel=COLUMNS.get(y, (y,))[0], title=self.title)
        if logx:
            ax.set_xscale("log")
        return _finish(fig, ax, path)


def _pyplot():
    import matplotlib.pyplot as plt  # imported late: the package works without a display

    return plt


def _finish(fig, ax, path=None, grid_axis="both"):
    ax.grid(alpha=0.3, axis=grid_axis)
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=120)
    return fig


def plot_roofline(points: dict, floor_tok_s: float, ax=None, path=None, title="batch-1 decode vs the roofline"):
    """Bars of measured tokens/s per method against the weight-bytes/bandwidth floor."""
    plt = _pyplot()
    fig, ax = (ax.figure, ax) if ax is not None else plt.subplots(figsize=(5.5, 3.8))
    names = list(points)
    bars = ax.bar(names, [points[n] for n in names], color="tab:blue", label="measured")
    for bar, n in zip(bars, names):
        ax.annotate(f"{points[n]:,.0f} tok/s\n{100 * points[n] / floor_tok_s:.1f}% of floor",
                    (bar.get_x() + bar.get_width() / 2, points[n]), ha="center", va="bottom", fontsize=8)
    ax.axhline(floor_tok_s, color="tab:red", ls="--", label=f"roofline {floor_tok_s:,.0f} tok/s")
    ax.set(ylabel="tokens/s (batch 1)", title=title, ylim=(0, 1.12 * max(floor_tok_s, *points.values())))
    ax.legend()
    return _finish(fig, ax, path, grid_axis="y")
