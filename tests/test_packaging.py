"""Install-level promises: torch pinned, no torchvision."""

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_torchvision_is_not_installed() -> None:
    assert importlib.util.find_spec("torchvision") is None


def test_constraints_pin_torch() -> None:
    pins = [line.strip() for line in (ROOT / "constraints.txt").read_text().splitlines() if line.strip()[:1].isalpha()]
    assert "torch==2.13.0" in pins


def test_import_dapple_is_light() -> None:
    """`import dapple` must not import torch (the CLI's light commands rely on it)."""
    import subprocess
    import sys

    code = "import sys, dapple; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
