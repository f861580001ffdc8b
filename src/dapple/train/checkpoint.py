"""Training checkpoints: everything needed to continue a run exactly where it stopped.

Written atomically (temp file, fsync, rename), so a run killed mid-save still has its previous checkpoint.
Read back with torch's weights_only loader: a checkpoint is tensors, numbers and strings, never code.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(path.name + ".tmp")
    with open(temporary, "wb") as handle:
        torch.save(state, handle)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)


def load_checkpoint(path: Path) -> dict[str, Any] | None:
    """The saved state, or None when there is no checkpoint yet."""
    if not path.exists():
        return None
    return torch.load(path, map_location="cpu", weights_only=True)
