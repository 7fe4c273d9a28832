"""Every Triton kernel compiles for sm_90 (H100/H200) on this GPU-less machine: `scripts/compile_check.py`,
in its own process since it needs Triton with the interpreter off."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_every_kernel_compiles_for_sm90():
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "0", "PYTHONPATH": str(ROOT)}
    run = subprocess.run([sys.executable, str(ROOT / "scripts" / "compile_check.py")], capture_output=True,
                         text=True, env=env, timeout=600)
    lines = run.stdout.splitlines()
    if run.returncode == 2:   # another Triton version's offline-compile API: nothing was checked
        pytest.skip(run.stdout.strip())
    assert run.returncode == 0, run.stdout + run.stderr[-3000:]
    assert len(lines) >= 15 and all(line.startswith("ok ") for line in lines), run.stdout
