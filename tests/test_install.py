"""`pip install .` (not editable) must ship the bundled model and find it."""
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_wheel_ships_and_finds_the_bundled_model(tmp_path):
    pip = [sys.executable, "-m", "pip"]
    subprocess.run(pip + ["wheel", str(ROOT), "--no-deps", "-q", "-w", str(tmp_path / "wheels")],
                   check=True, timeout=600, cwd=tmp_path)
    wheel = next((tmp_path / "wheels").glob("llmopt-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    for f in ("model.safetensors", "config.json", "tokenizer.json"):
        assert any(n.endswith(f"share/llmopt/tinypy/{f}") for n in names), f

    # a fresh venv holding only the installed wheel; torch & co. come from this venv
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    py = venv / "bin" / "python"
    subprocess.run(pip + ["--python", str(py), "install", "--no-deps", "-q", str(wheel)], check=True, timeout=600)
    code = ("import llmopt, llmopt.models as m; p = m.bundled_path();"
            "model, tok = llmopt.load(); print(p); print(type(model).__name__)")
    r = subprocess.run([str(py), "-c", code], capture_output=True, text=True, timeout=600, cwd=tmp_path,
                       env={"PYTHONPATH": sysconfig.get_paths()["purelib"], "HF_HUB_OFFLINE": "1",
                            "PATH": "/usr/bin:/bin"})
    assert r.returncode == 0, r.stderr
    assert str(venv) in r.stdout and "share/llmopt/tinypy" in r.stdout and "LlamaForCausalLM" in r.stdout
