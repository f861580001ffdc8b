"""Write generated images as PNGs that carry their A1111 infotext, named NNNNN-SEED.png like A1111 does."""

from __future__ import annotations

import os
import re
from pathlib import Path

from PIL import Image, PngImagePlugin

from dapple.infotext import PNG_KEY
from dapple.request import GenerationResult

_NUMBERED = re.compile(r"^(\d{5,})-")


def next_image_number(folder: Path) -> int:
    """One past the highest NNNNN- prefix in the folder (0 for an empty or new folder)."""
    numbers = [int(m.group(1)) for p in folder.glob("*.png") if (m := _NUMBERED.match(p.name))]
    return max(numbers, default=-1) + 1


def save_png(image: Image.Image, path: Path, infotext: str) -> Path:
    """Write atomically (temp name, fsync, rename) so a crash never leaves half a PNG under the real name."""
    info = PngImagePlugin.PngInfo()
    info.add_text(PNG_KEY, infotext)
    temporary = path.with_name(f".{path.name}.tmp")
    with open(temporary, "wb") as handle:
        image.save(handle, format="PNG", pnginfo=info)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)
    return path


def save_result(result: GenerationResult, folder: str | Path) -> list[Path]:
    """Save every image of a result into folder; return the paths in batch order."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    number = next_image_number(folder)
    paths = []
    for offset, (image, seed, infotext) in enumerate(zip(result.images, result.seeds, result.infotexts)):
        paths.append(save_png(image, folder / f"{number + offset:05d}-{seed}.png", infotext))
    return paths


def read_infotext(path: str | Path) -> str | None:
    """The `parameters` text of a PNG (None when it has none). Raises OSError for unreadable files."""
    with Image.open(path) as image:
        image.load()
        text = image.info.get(PNG_KEY)
        if text is None and hasattr(image, "text"):
            text = image.text.get(PNG_KEY)
    return text
