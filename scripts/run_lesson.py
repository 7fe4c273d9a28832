"""Run solution notebooks top to bottom, full size, and keep what they printed.

The lessons quote numbers from "our run"; this is the run. Each notebook executes in a fresh
kernel exactly as a learner's Jupyter would run it (no smoke mode), and the record keeps, per
code cell, its wall time and its text output (stdout, stderr, plain-text results; plots are
noted, not kept), with the machine, torch version and thread count on top:

    python scripts/run_lesson.py 07 10 --out results/cpu_2026-12-07

writes results/cpu_2026-12-07/lesson07_run.txt and lesson10_run.txt (`--smoke`: the CI-sized run,
lessonNN_smoke_run.txt). A cell that raises stops that notebook; its record ends with the error,
and the script exits non-zero.
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError

ROOT = Path(__file__).resolve().parents[1]


def machine() -> str:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    return (f"{cpu}, {os.cpu_count()} cores, {gpu}; torch {torch.__version__}, "
            f"{torch.get_num_threads()} threads; Python {platform.python_version()}")


def cell_text(cell) -> str:
    parts = []
    for out in cell.get("outputs", []):
        if out.output_type == "stream":
            parts.append(out.text)
        elif out.output_type in ("execute_result", "display_data"):
            data = out.get("data", {})
            if "image/png" in data:
                parts.append("[figure]\n")
            elif "text/plain" in data:
                parts.append(data["text/plain"] + "\n")
        elif out.output_type == "error":
            parts.append(f"{out.ename}: {out.evalue}\n")
    return "".join(parts)


def run(stem: str, out_dir: Path, timeout: int, smoke: bool = False) -> bool:
    path = next(iter(sorted((ROOT / "solutions").glob(f"{stem}*.ipynb"))), None)
    if path is None:
        raise SystemExit(f"no solution notebook starts with {stem!r}")
    nb = nbformat.read(path, as_version=4)
    os.environ.update({"MPLBACKEND": "Agg", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
                       "LLMOPT_SMOKE": "1" if smoke else "0"})
    client = NotebookClient(nb, timeout=timeout, kernel_name="python3",
                            resources={"metadata": {"path": str(ROOT / "solutions")}})
    times, ok, start = {}, True, time.perf_counter()
    with client.setup_kernel():
        for i, cell in enumerate(nb.cells):
            if cell.cell_type != "code":
                continue
            t = time.perf_counter()
            try:
                client.execute_cell(cell, i)
            except CellExecutionError:
                ok = False
            times[i] = time.perf_counter() - t
            if not ok:
                break
    total = time.perf_counter() - start
    kind = "smoke run (LLMOPT_SMOKE=1)" if smoke else "full run"
    lines = [f"# {path.name}, {kind} ({time.strftime('%Y-%m-%d %H:%M')})", f"# {machine()}",
             f"# total {total:.1f} s" + ("" if ok else " (stopped at an error)"), ""]
    for i, cell in enumerate(nb.cells):
        if i not in times:
            continue
        first = cell.source.strip().splitlines()[0] if cell.source.strip() else ""
        lines.append(f"## cell {i} ({times[i]:.1f} s): {first[:90]}")
        text = cell_text(cell).rstrip()
        if text:
            lines.append(text)
        lines.append("")
    out_dir.mkdir(parents=True, exist_ok=True)
    out = out_dir / f"lesson{path.name[:2]}_{'smoke_' if smoke else ''}run.txt"
    out.write_text("\n".join(lines) + "\n")
    print(f"{path.name}: {total:.1f} s, {'ok' if ok else 'FAILED'} -> {out}")
    return ok


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("lessons", nargs="+", help="notebook number prefixes, e.g. 07 10")
    ap.add_argument("--out", type=Path, required=True, help="folder for lessonNN_run.txt")
    ap.add_argument("--timeout", type=int, default=3600, help="seconds a cell may run")
    ap.add_argument("--smoke", action="store_true", help="LLMOPT_SMOKE=1: the smaller run CI makes")
    args = ap.parse_args()
    ok = [run(stem, args.out, args.timeout, args.smoke) for stem in args.lessons]
    sys.exit(0 if all(ok) else 1)


if __name__ == "__main__":
    main()
