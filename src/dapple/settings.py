"""Run-time configuration, built once at an entry point (CLI, server, user code) and passed down.

Nothing here reads argv, the environment or devices at import time.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from dapple.request import Limits


@dataclass(frozen=True)
class Settings:
    """Where things are and what hardware to use. device/dtype None mean "pick for this machine"."""

    model: Path | None = None
    device: str | None = None
    dtype: str | None = None
    output_dir: Path = Path("outputs")
    limits: Limits = field(default_factory=Limits)
    allow_pickle: bool = False
    models_dir: Path | None = None  # an A1111 or ComfyUI folder (dapple.models.library)
    threads: int | None = None  # torch's CPU threads; None lets dapple.load pick (dapple.models.devices)
    control_dirs: tuple[Path, ...] = ()  # ControlNet / T2I-Adapter folders (dapple.models.control_models)
