"""Grade a shapes-world image by image analysis (no neural network): which colour, shape, size and position
does it show, on which background?

1. Background: every pixel of the outer ring votes for its nearest palette colour; the most common one wins
   (a large shape in a corner covers well under half of the ring).
2. Shape colour: the palette colour nearest to the median of the pixels clearly unlike the background.
3. Mask: pixels nearer the shape colour than the background colour (the 50% coverage line, as the ground-truth
   mask is drawn), reduced to its largest connected region.
4. Size from the mask's bounding-box side, position from the bounding-box centre on a 3x3 grid, shape class from
   how much of its bounding box the mask fills (square 1, circle pi/4 ~ 0.79, triangle 1/2).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import numpy as np
from PIL import Image
from scipy import ndimage

from dapple.train.data.shapes import COLOURS, IMAGE_SIZE, POSITIONS

ATTRIBUTES = ("colour", "background", "shape", "size", "position")
_PALETTE_NAMES = list(COLOURS)
_PALETTE = np.array([COLOURS[name] for name in _PALETTE_NAMES], dtype=np.float32)
FOREGROUND_DISTANCE = 60.0  # RGB distance from the background that surely belongs to the shape
SIZE_THRESHOLD = 25  # bounding-box side between small (16..20 px) and large (30..36 px)
SQUARE_FILL, TRIANGLE_FILL = 0.88, 0.64  # fill ratios separating square / circle / triangle
GRID_EDGES = (0.375 * IMAGE_SIZE, 0.625 * IMAGE_SIZE)  # between the 1/4, 1/2 and 3/4 position centres


@dataclass
class Prediction:
    """What the scorer sees in an image; None where it could not tell (e.g. no shape found)."""

    background: str | None = None
    colour: str | None = None
    shape: str | None = None
    size: str | None = None
    position: str | None = None
    mask: np.ndarray | None = field(default=None, repr=False)

    def as_dict(self) -> dict[str, str | None]:
        return {name: getattr(self, name) for name in ATTRIBUTES}


def _nearest_colour_index(pixels: np.ndarray) -> np.ndarray:
    distances = np.linalg.norm(pixels[..., None, :] - _PALETTE, axis=-1)
    return distances.argmin(axis=-1)


def _to_pixels(image: Image.Image | np.ndarray) -> np.ndarray:
    if isinstance(image, np.ndarray):
        image = Image.fromarray(image.astype(np.uint8))
    image = image.convert("RGB")
    if image.size != (IMAGE_SIZE, IMAGE_SIZE):
        image = image.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BOX)
    return np.asarray(image, dtype=np.float32)


def _grid_cell(value: float) -> int:
    return int(value >= GRID_EDGES[0]) + int(value >= GRID_EDGES[1])


_CELL_TO_POSITION = {
    (round((fx - 0.25) * 4), round((fy - 0.25) * 4)): name for name, (fx, fy) in POSITIONS.items()
}


def score_image(image: Image.Image | np.ndarray) -> Prediction:
    """Read the attributes off one image (any size; it is resized to 64x64)."""
    pixels = _to_pixels(image)
    ring = np.concatenate([pixels[:2].reshape(-1, 3), pixels[-2:].reshape(-1, 3),
                           pixels[:, :2].reshape(-1, 3), pixels[:, -2:].reshape(-1, 3)])
    votes = Counter(_nearest_colour_index(ring).tolist())
    background_index = votes.most_common(1)[0][0]
    prediction = Prediction(background=_PALETTE_NAMES[background_index])

    background_rgb = _PALETTE[background_index]
    distance_to_background = np.linalg.norm(pixels - background_rgb, axis=-1)
    clearly_shape = distance_to_background > FOREGROUND_DISTANCE
    if not clearly_shape.any():
        return prediction
    colour_index = int(_nearest_colour_index(np.median(pixels[clearly_shape], axis=0)))
    if colour_index == background_index:
        return prediction
    prediction.colour = _PALETTE_NAMES[colour_index]

    distance_to_shape = np.linalg.norm(pixels - _PALETTE[colour_index], axis=-1)
    labels, count = ndimage.label(distance_to_shape < distance_to_background)
    if count == 0:
        return prediction
    sizes = ndimage.sum(np.ones_like(labels), labels, index=range(1, count + 1))
    mask = labels == (int(np.argmax(sizes)) + 1)
    prediction.mask = mask

    rows, cols = np.nonzero(mask)
    top, bottom, left, right = rows.min(), rows.max() + 1, cols.min(), cols.max() + 1
    side = max(bottom - top, right - left)
    prediction.size = "large" if side >= SIZE_THRESHOLD else "small"
    fill = mask.sum() / float((bottom - top) * (right - left))
    prediction.shape = "square" if fill >= SQUARE_FILL else "circle" if fill >= TRIANGLE_FILL else "triangle"
    cell = (_grid_cell((left + right) / 2), _grid_cell((top + bottom) / 2))
    prediction.position = _CELL_TO_POSITION[cell]
    return prediction


def grade(prediction: Prediction, expected: Mapping[str, str]) -> dict[str, bool]:
    """For each attribute the expectation names: did the image show it?"""
    return {name: getattr(prediction, name) == value for name, value in expected.items() if name in ATTRIBUTES}


@dataclass
class AccuracyTable:
    """Per-attribute accuracy over a set of graded images, and the share with every named attribute right."""

    correct: Counter = field(default_factory=Counter)
    total: Counter = field(default_factory=Counter)
    images: int = 0
    all_right: int = 0

    def add(self, grades: Mapping[str, bool]) -> None:
        self.images += 1
        self.all_right += all(grades.values())
        for name, ok in grades.items():
            self.total[name] += 1
            self.correct[name] += ok

    def accuracy(self, name: str) -> float:
        return self.correct[name] / self.total[name] if self.total[name] else float("nan")

    @property
    def all_right_share(self) -> float:
        return self.all_right / self.images if self.images else float("nan")

    def rows(self) -> list[tuple[str, float, int]]:
        names = [n for n in ATTRIBUTES if self.total[n]]
        return [(n, self.accuracy(n), self.total[n]) for n in names] + [("all", self.all_right_share, self.images)]

    def format(self) -> str:
        lines = [f"{'attribute':<12} {'accuracy':>9} {'images':>7}"]
        lines += [f"{name:<12} {value:>9.1%} {count:>7}" for name, value, count in self.rows()]
        return "\n".join(lines)


def score_all(images: Iterable[Image.Image | np.ndarray], expectations: Iterable[Mapping[str, str]]) -> AccuracyTable:
    table = AccuracyTable()
    for image, expected in zip(images, expectations, strict=True):
        table.add(grade(score_image(image), expected))
    return table
