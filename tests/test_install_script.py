"""scripts/install.sh picks the torch build for the machine: the CPU build (a local wheel, else PyTorch's CPU
index) without an NVIDIA GPU, PyPI's CUDA build with one; CI runs it for real (the CPU path, .ci/run)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "install.sh"


def _plan(*args: str, path: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SCRIPT), "--plan", "--venv", "/nonexistent-venv", *args], text=True,
                          capture_output=True, env={**os.environ, "PATH": path}, timeout=30)


def _path_without_nvidia_smi(folder: Path) -> str:
    """PATH with this machine's nvidia-smi (a GPU machine has one) shadowed by a copy that finds no GPU."""
    shadow = folder / "no-gpu"
    shadow.mkdir(exist_ok=True)
    return _fake_nvidia_smi(shadow, works=False)


def _fake_nvidia_smi(folder: Path, works: bool) -> str:
    tool = folder / "nvidia-smi"
    tool.write_text(f"#!/bin/sh\nexit {0 if works else 9}\n")
    tool.chmod(0o755)
    return f"{folder}:{os.environ['PATH']}"


def test_without_a_gpu_it_installs_the_cpu_build(tmp_path) -> None:
    for path in (_path_without_nvidia_smi(tmp_path), _fake_nvidia_smi(tmp_path, works=False)):  # none; no GPU
        result = _plan(path=path)
        assert result.returncode == 0, result.stderr
        assert "cpu build" in result.stderr
        assert "--no-index torch==2.13.0" in result.stdout
        assert "--index-url https://download.pytorch.org/whl/cpu torch==2.13.0" in result.stdout


def test_with_a_gpu_it_installs_pypis_cuda_build(tmp_path) -> None:
    result = _plan("--dev", path=_fake_nvidia_smi(tmp_path, works=True))
    assert "cuda build" in result.stderr
    assert "pip install -q torch==2.13.0\n" in result.stdout
    assert "download.pytorch.org" not in result.stdout
    assert '-c constraints.txt -e .[dev]' in result.stdout
    assert "cpu build" in _plan("--cpu", path=_fake_nvidia_smi(tmp_path, works=True)).stderr  # asked: honoured


def test_the_script_pins_the_same_torch_as_constraints_and_refuses_unknown_options() -> None:
    pinned = [line for line in (SCRIPT.parent.parent / "constraints.txt").read_text().splitlines()
              if line.startswith("torch==")]
    assert pinned and f'TORCH="{pinned[0]}"' in SCRIPT.read_text()
    result = _plan("--gpu", path=os.environ["PATH"])
    assert result.returncode == 2 and "unknown option '--gpu'" in result.stderr
