"""The course machinery: learner notebooks are generated from the solutions.

Notebooks are authored once, in `solutions/`, with each exercise's answer between
`### BEGIN SOLUTION` and `### END SOLUTION` (an optional `### HINT: ...` line inside).
`python -m llmopt.course` (`make notebooks`) writes `notebooks/`, replacing each region
by a stub that raises `NotImplementedError` with the hint, and strips outputs.
`python -m llmopt.course --check` exits non-zero when the two are out of sync.
"""
from __future__ import annotations

import argparse
import copy
import re
import sys
from pathlib import Path

import nbformat

BEGIN, END, HINT = "### BEGIN SOLUTION", "### END SOLUTION", "### HINT:"
ROOT = Path(__file__).resolve().parents[1]


def stub_source(source: str, exercise: str = "this exercise") -> str:
    """Replace every solution region in a cell's source by a stub at the same indent."""
    out, lines, i = [], source.splitlines(), 0
    while i < len(lines):
        line = lines[i]
        if line.strip() != BEGIN:
            if line.strip() == END:
                raise ValueError(f"{exercise}: '{END}' without '{BEGIN}'")
            out.append(line)
            i += 1
            continue
        indent = line[: len(line) - len(line.lstrip())]
        j = i + 1
        while j < len(lines) and lines[j].strip() != END:
            if lines[j].strip() == BEGIN:
                raise ValueError(f"{exercise}: nested '{BEGIN}'")
            j += 1
        if j == len(lines):
            raise ValueError(f"{exercise}: '{BEGIN}' without '{END}'")
        hints = [ln.strip()[len(HINT):].strip() for ln in lines[i + 1 : j] if ln.strip().startswith(HINT)]
        hint = " ".join(hints) or "see the text above"
        out.append(f"{indent}# YOUR CODE HERE ({exercise}). Hint: {hint}")
        out.append(f"{indent}raise NotImplementedError({f'{exercise}: {hint}'!r})")
        i = j + 1
    return "\n".join(out)


def _exercise_name(source: str, previous: str) -> str:
    m = re.search(r"Exercise\s+(\d+\.\d+)", source) or re.search(r"Exercise\s+(\d+\.\d+)", previous)
    return f"Exercise {m.group(1)}" if m else "this exercise"


def strip_outputs(nb):
    for cell in nb.cells:
        if cell.cell_type == "code":
            cell.outputs = []
            cell.execution_count = None
        cell.metadata.pop("execution", None)
    return nb


def learner_copy(solution_nb):
    """The learner's notebook: solution regions stubbed, outputs stripped."""
    nb = strip_outputs(copy.deepcopy(solution_nb))
    previous = ""
    for cell in nb.cells:
        if cell.cell_type == "code" and BEGIN in cell.source:
            cell.source = stub_source(cell.source, _exercise_name(cell.source, previous))
        previous = cell.source
    return nb


def has_outputs(nb) -> bool:
    return any(c.cell_type == "code" and (c.outputs or c.execution_count) for c in nb.cells)


def _dump(nb) -> str:
    return nbformat.writes(nb) + "\n"


def sync(root: Path = ROOT, check: bool = False) -> list[str]:
    """Write (or, with check, compare) notebooks/ from solutions/; returns the problems."""
    sol_dir, nb_dir = root / "solutions", root / "notebooks"
    problems = []
    sources = sorted(sol_dir.glob("*.ipynb"))
    for sol in sources:
        nb = nbformat.read(sol, as_version=4)
        if has_outputs(nb):
            problems.append(f"{sol.relative_to(root)} holds outputs (strip them: make notebooks)")
            if not check:
                nbformat.write(strip_outputs(nb), sol)
        want = _dump(learner_copy(nb))
        target = nb_dir / sol.name
        if check:
            if not target.exists() or target.read_text() != want:
                problems.append(f"{target.relative_to(root)} is out of date with {sol.relative_to(root)} "
                                "(run: make notebooks)")
        else:
            nb_dir.mkdir(exist_ok=True)
            target.write_text(want)
    for extra in sorted(nb_dir.glob("*.ipynb")):
        if not (sol_dir / extra.name).exists():
            problems.append(f"{extra.relative_to(root)} has no source in solutions/")
    return problems


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m llmopt.course", description=__doc__.splitlines()[0])
    p.add_argument("--check", action="store_true", help="only check that notebooks/ is in sync")
    p.add_argument("--root", type=Path, default=ROOT)
    args = p.parse_args(argv)
    problems = sync(args.root, check=args.check)
    for line in problems:
        print(line, file=sys.stderr)
    if not args.check:
        print(f"wrote {args.root / 'notebooks'}")
    return 1 if args.check and problems else 0


if __name__ == "__main__":
    sys.exit(main())
