"""Figure and picture helpers for the inspection lab: matplotlib without a screen, labelled image grids."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display on servers and CI

import matplotlib.pyplot as plt  # noqa: E402
from PIL import Image, ImageDraw, ImageFont  # noqa: E402


def new_figure(width: float = 7.0, height: float = 4.0, columns: int = 1):
    """A figure and its axes (a list when columns > 1)."""
    figure, axes = plt.subplots(1, columns, figsize=(width, height), squeeze=False)
    return figure, list(axes[0]) if columns > 1 else axes[0][0]


def save_figure(figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has one bitmap size
        return ImageFont.load_default()


def labelled_grid(
    cells: Sequence[Sequence[Image.Image]], column_labels: Sequence[str], row_labels: Sequence[str] = (),
    title: str = "", cell_size: int | None = None,
) -> Image.Image:
    """Images in rows and columns with a title, column labels above and row labels on the left, white margins."""
    cell = cell_size or max(image.width for row in cells for image in row)
    scale = max(1, 128 // cell)  # small images are enlarged (nearest) so that the labels fit
    side = cell * scale
    font = _font(12)
    left = max((int(font.getlength(label)) for label in row_labels), default=0) + (12 if row_labels else 4)
    top = (24 if title else 4) + 18
    columns = max(len(row) for row in cells)
    sheet = Image.new("RGB", (left + columns * (side + 4), top + len(cells) * (side + 4)), "white")
    draw = ImageDraw.Draw(sheet)
    if title:
        draw.text((4, 4), title, fill="black", font=_font(14))
    for c, label in enumerate(column_labels):
        draw.text((left + c * (side + 4), top - 16), label, fill="black", font=font)
    for r, row in enumerate(cells):
        if r < len(row_labels):
            draw.text((4, top + r * (side + 4) + side // 2 - 6), row_labels[r], fill="black", font=font)
        for c, image in enumerate(row):
            sheet.paste(image.resize((side, side), Image.NEAREST) if image.size != (side, side) else image,
                        (left + c * (side + 4), top + r * (side + 4)))
    return sheet


def save_image(image: Image.Image, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
    return path
