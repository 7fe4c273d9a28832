"""The course machinery: learner notebooks in sync with solutions, no stored outputs,
parameters cells, and every exercise's check passing on the solution, failing on the stub."""
import os
import re
from pathlib import Path

import nbformat
import pytest
import torch

from llmopt import course

ROOT = Path(__file__).resolve().parents[1]
SOLUTIONS = sorted((ROOT / "solutions").glob("*.ipynb"))


def test_there_are_notebooks():
    assert SOLUTIONS and SOLUTIONS[0].name.startswith("00_")


def test_stub_source_replaces_regions_at_their_indent():
    src = "def f(x):\n    ### BEGIN SOLUTION\n    ### HINT: double it.\n    return 2 * x\n    ### END SOLUTION\n\ny = 1"
    out = course.stub_source(src, "Exercise 9.9")
    assert "return 2 * x" not in out and "y = 1" in out
    assert "    raise NotImplementedError('Exercise 9.9: double it.')" in out
    ns = {}
    exec(out, ns)
    with pytest.raises(NotImplementedError, match="double it"):
        ns["f"](1)


@pytest.mark.parametrize("bad, match", [
    ("### BEGIN SOLUTION\nx = 1", "without"),
    ("x = 1\n### END SOLUTION", "without"),
    ("### BEGIN SOLUTION\n### BEGIN SOLUTION\n### END SOLUTION", "nested"),
])
def test_unbalanced_markers_are_errors(bad, match):
    with pytest.raises(ValueError, match=match):
        course.stub_source(bad)


def test_learner_notebooks_are_in_sync_with_solutions():
    problems = course.sync(ROOT, check=True)
    assert not problems, "\n".join(problems)


def test_sync_detects_a_stale_copy(tmp_path):
    (tmp_path / "solutions").mkdir()
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("### BEGIN SOLUTION\nx = 1\n### END SOLUTION")])
    nbformat.write(nb, tmp_path / "solutions" / "00_x.ipynb")
    assert course.sync(tmp_path, check=True)  # notebooks/ missing
    assert not course.sync(tmp_path)
    assert not course.sync(tmp_path, check=True)
    assert "x = 1" not in (tmp_path / "notebooks" / "00_x.ipynb").read_text()
    nb.cells[0].source += "\ny = 2"
    nbformat.write(nb, tmp_path / "solutions" / "00_x.ipynb")
    assert any("out of date" in p for p in course.sync(tmp_path, check=True))


ALL = SOLUTIONS + sorted((ROOT / "notebooks").glob("*.ipynb"))


@pytest.mark.parametrize("path", ALL, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_committed_notebooks_hold_no_outputs(path):
    nb = nbformat.read(path, as_version=4)
    assert not course.has_outputs(nb), f"{path} has outputs: run `make notebooks`"


@pytest.mark.parametrize("path", SOLUTIONS, ids=lambda p: p.name)
def test_one_parameters_cell_with_model_and_smoke(path):
    nb = nbformat.read(path, as_version=4)
    params = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(params) == 1
    assert re.search(r"^MODEL\s*=.*LLMOPT_MODEL", params[0].source, re.M)
    assert re.search(r"^SMOKE\s*=.*LLMOPT_SMOKE", params[0].source, re.M)
    assert nb.cells[0].cell_type == "markdown" and "What you will learn" in nb.cells[0].source


def _exercises(solution, other):
    """(exercise cell in `other`, its check cell) pairs, found by the solution's markers;
    the check is the next code cell."""
    sol = [c for c in solution.cells if c.cell_type == "code"]
    code = [c for c in other.cells if c.cell_type == "code"]
    return [(code[i], code[i + 1]) for i, c in enumerate(sol) if course.BEGIN in c.source]


@pytest.mark.parametrize("path", SOLUTIONS, ids=lambda p: p.name)
def test_checks_pass_on_solutions_and_fail_on_stubs(path, capsys, monkeypatch):
    monkeypatch.delenv("LLMOPT_STRICT", raising=False)
    solution = nbformat.read(path, as_version=4)
    learner = course.learner_copy(solution)
    pairs = list(zip(_exercises(solution, solution), _exercises(solution, learner)))
    assert pairs, f"{path.name} has no exercises"
    if torch.cuda.is_available() and any("@triton.jit" in sol.source for (sol, _), _ in pairs):
        pytest.skip("compiling a Triton kernel needs its source file; exec'd cells have none "
                    "(on CPU the interpreter runs them, and the notebook runs them on a GPU)")
    prelude = "import math, torch\nimport llmopt\nfrom llmopt import exercises\n"
    for (sol, check), (stub, _) in pairs:
        assert "exercises.check_" in check.source
        for cell, want in ((sol, True), (stub, False)):
            ns = {}
            exec(prelude + cell.source, ns)
            result = eval(check.source.strip().splitlines()[-1], ns)
            which = "solution" if want else "stub"
            assert result is want, f"{path.name}: {check.source!r} gave {result} on the {which}"
    out = capsys.readouterr().out
    assert "not attempted yet" in out


def test_strict_mode_raises_on_failure(monkeypatch):
    from llmopt import exercises

    monkeypatch.setenv("LLMOPT_STRICT", "1")
    with pytest.raises(AssertionError, match="Exercise 0.2"):
        exercises.check_roofline_floor(lambda wb, bw: wb / bw)
    monkeypatch.setenv("LLMOPT_STRICT", "0")
    assert exercises.check_roofline_floor(lambda wb, bw: wb / bw) is False
    assert exercises.check_perplexity(lambda lg, t: "nan?") is False


def test_env_does_not_leak():
    assert os.environ.get("LLMOPT_STRICT") != "1"


def test_every_exercise_named_exists_and_every_check_is_used():
    """Each "Exercise N.M" that a notebook or the README names starts a line of lesson N's notebook
    (a heading, or in bold), and each check in `llmopt.exercises` is called by a notebook: a check without its
    exercise, or a reference to an exercise that was never added, fails here."""
    from llmopt import exercises

    texts = {p.name: p.read_text() for p in SOLUTIONS}
    defined, start = set(), r"^(?:#+ |\*\*)Exercise \d+\.(\d+)"
    for name, text in texts.items():
        for cell in nbformat.reads(text, as_version=4).cells:
            if cell.cell_type == "markdown":
                defined |= {(int(name[:2]), m) for m in re.findall(start, cell.source, re.M)}
    named = set()
    for text in [*texts.values(), (ROOT / "README.md").read_text()]:
        for a, b, c, d in re.findall(r"Exercises? (\d+)\.(\d+)(?:-(\d+)\.(\d+))?", text):
            named |= {(int(a), b)} | ({(int(c), d)} if c else set())
    assert named and named <= defined, f"named but not in their lesson: {sorted(named - defined)}"
    used = "".join(texts.values())
    assert not [c for c in exercises.__all__ if f"exercises.{c}(" not in used]
