"""File modes for what Dapple writes: the mode a plain open() gives, whatever library wrote the file."""

from __future__ import annotations

import os
from pathlib import Path


def current_umask() -> int:
    """The process's umask, read without changing it where the system tells (Linux's /proc), since setting it to
    read it would briefly change the mode of files other threads create."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def normal_permissions(path: str | Path) -> Path:
    """Give a written file, or every file under a written folder, the mode a plain open() would have (0666 less the
    umask: 0644 usually). safetensors writes through a private temporary file and renames it, which leaves 0600:
    a model folder that other users, a web server or a container's other uid cannot read."""
    path = Path(path)
    mode = 0o666 & ~current_umask()
    for each in [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file() and not p.is_symlink()]:
        if each.stat().st_mode & 0o777 != mode:
            each.chmod(mode)
    return path
