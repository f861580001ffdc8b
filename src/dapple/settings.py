"""Run-time configuration, built once at an entry point (CLI, server, user code) and passed down.

Nothing here reads argv, the environment or devices at import time.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from dapple.request import Limits

if TYPE_CHECKING:  # (torch stays unimported until a model loads: the CLI's --help is instant)
    from dapple.models.memory import MemoryOptions


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
    # "medvram", "lowvram", MemoryOptions(...) or None (all off); dapple.models.memory, docs/memory.md
    memory: str | MemoryOptions | None = None
    backend: str = "torch"  # "torch" or "openvino" (dapple.models.openvino_backend)
    openvino_cache_dir: Path | None = None  # converted OpenVINO models; None: ~/.cache/dapple/openvino
