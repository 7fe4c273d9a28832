"""Every notebook runs top to bottom in smoke mode, in one kernel, with each exercise taken twice:
first solved (the solution's cell, then its check, strict: a FAIL raises), then skipped (the
learner's stub, then the check again, which must say "not attempted yet"). Every cell after an
exercise runs with its stub in place and, until the next solution's check, without strict
checks, as in the learner's copy (the solution with the regions stubbed, `llmopt.course`). One
run thus shows both that the solutions pass and that a learner who skips an exercise can still
run the rest; test_course checks each solution and each stub against its check on their own."""
import os
import re
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError

from llmopt import course

ROOT = Path(__file__).resolve().parents[1]
SKIPPED = "not attempted yet"


def solved_then_skipped(solution):
    """The solution notebook with, after each exercise's check cell, the learner's stub of that
    exercise and the check again. The solution's check runs under LLMOPT_STRICT=1; from the stub on
    the notebook runs as a learner's does, under LLMOPT_STRICT=0 (a later cell may ask the check
    again, quietly, to choose between the learner's function and llmopt's). Returns (notebook,
    number of exercises)."""
    learner = course.learner_copy(solution)
    strict = 'import os\nos.environ["LLMOPT_STRICT"] = "{}"'.format
    cells, stub, n = [], None, 0
    for sol, learner_cell in zip(solution.cells, learner.cells):
        if sol.cell_type == "code" and course.BEGIN not in sol.source and stub is not None:
            # the exercise's check (the next code cell)
            cells += [nbformat.v4.new_code_cell(strict(1)), sol, nbformat.v4.new_code_cell(strict(0)),
                      nbformat.v4.new_code_cell(stub.source), nbformat.v4.new_code_cell(sol.source)]  # new ids
            stub, n = None, n + 1
            continue
        cells.append(sol)
        if sol.cell_type == "code" and course.BEGIN in sol.source:
            stub = learner_cell
    nb = nbformat.v4.new_notebook(cells=cells, metadata=solution.metadata)
    return nb, n


def run(nb, tmp_path: Path):
    # TRITON_INTERPRET is left to the notebook (llmopt sets it on import), as in a learner's fresh Jupyter
    env = {"LLMOPT_SMOKE": "1", "LLMOPT_STRICT": "1", "MPLBACKEND": "Agg",
           "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "TRITON_INTERPRET": None}
    old = {k: os.environ.get(k) for k in env}
    for k, v in env.items():  # the kernel inherits this process's environment
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    try:
        NotebookClient(nb, timeout=900, kernel_name="python3",
                       resources={"metadata": {"path": str(tmp_path)}}).execute()
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return nb


def printed(nb) -> str:
    return "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs)


def test_each_exercise_is_run_solved_then_skipped():
    nb = nbformat.v4.new_notebook(cells=[
        nbformat.v4.new_markdown_cell("# a lesson"),
        nbformat.v4.new_code_cell("def f(x):\n    ### BEGIN SOLUTION\n    return x\n    ### END SOLUTION"),
        nbformat.v4.new_markdown_cell("check it"),
        nbformat.v4.new_code_cell("exercises.check(f)"),
        nbformat.v4.new_code_cell("print(f)"),
    ])
    merged, n = solved_then_skipped(nb)
    assert n == 1
    sources = [c.source for c in merged.cells]
    assert sources[:3] == [c.source for c in nb.cells[:3]] and sources[-1] == "print(f)"
    assert sources[3].endswith('"1"') and sources[4] == "exercises.check(f)" and sources[5].endswith('"0"')
    assert sources[6].startswith("def f(x):") and "raise NotImplementedError" in sources[6]
    assert sources[7] == "exercises.check(f)" and len(sources) == 9


def test_a_cell_that_needs_a_skipped_exercise_fails_the_run(tmp_path):
    check = ("def check(fn):\n    try:\n        fn(1)\n        print('PASS 0.1')\n"
             "    except NotImplementedError:\n        print('FAIL 0.1: not attempted yet')")
    nb = nbformat.v4.new_notebook(cells=[
        nbformat.v4.new_code_cell(check),
        nbformat.v4.new_code_cell("def f(x):\n    ### BEGIN SOLUTION\n    return x\n    ### END SOLUTION"),
        nbformat.v4.new_code_cell("check(f)"),
        nbformat.v4.new_code_cell("print(f(2))"),   # the learner's f, not llmopt's: breaks for a learner
    ])
    merged, _ = solved_then_skipped(nb)
    with pytest.raises(CellExecutionError, match="NotImplementedError"):
        run(merged, tmp_path)
    text = printed(merged)
    assert "PASS 0.1" in text and "FAIL 0.1: not attempted yet" in text


@pytest.mark.slow
@pytest.mark.parametrize("path", sorted((ROOT / "solutions").glob("*.ipynb")), ids=lambda p: p.name)
def test_notebook_runs_with_exercises_solved_then_skipped(path, tmp_path):
    nb, n = solved_then_skipped(nbformat.read(path, as_version=4))
    assert n >= 1, f"{path.name} has no exercises"
    text = printed(run(nb, tmp_path))
    fails = [line for line in text.splitlines() if re.match(r"\s*FAIL\b", line)]
    assert all(SKIPPED in line for line in fails), fails   # only the skipped exercises' checks
    assert text.count(SKIPPED) >= n and len(fails) == n
    assert text.count("PASS") >= n
