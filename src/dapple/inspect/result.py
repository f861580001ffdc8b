"""What an inspection returns."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class Inspection:
    """The files an inspection wrote and the numbers it measured (also as printable lines)."""

    files: list[Path] = field(default_factory=list)
    numbers: dict[str, float] = field(default_factory=dict)
    lines: list[str] = field(default_factory=list)
