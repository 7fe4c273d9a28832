"""Every notebook runs top to bottom in smoke mode: the solutions with strict checks,
the learner copies (exercises unsolved) to show a learner can skip an exercise."""
import os
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parents[1]


def run(path: Path, strict: bool, tmp_path: Path):
    nb = nbformat.read(path, as_version=4)
    # TRITON_INTERPRET is left to the notebook (llmopt sets it on import), as in a learner's fresh Jupyter
    env = {"LLMOPT_SMOKE": "1", "LLMOPT_STRICT": "1" if strict else "0", "MPLBACKEND": "Agg",
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


@pytest.mark.slow
@pytest.mark.parametrize("path", sorted((ROOT / "solutions").glob("*.ipynb")), ids=lambda p: p.name)
def test_solution_notebook_runs(path, tmp_path):
    text = printed(run(path, strict=True, tmp_path=tmp_path))
    assert "FAIL" not in text
    assert text.count("PASS") >= 1


@pytest.mark.slow
@pytest.mark.parametrize("path", sorted((ROOT / "notebooks").glob("*.ipynb")), ids=lambda p: p.name)
def test_learner_notebook_runs_with_exercises_unsolved(path, tmp_path):
    text = printed(run(path, strict=False, tmp_path=tmp_path))
    assert "not attempted yet" in text
