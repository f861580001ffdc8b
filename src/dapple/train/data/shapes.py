"""The shapes world: seeded 64x64 scenes of one coloured shape on a plain background, with ground truth.

Every scene is a pure function of (world seed, index): the same numbers draw the same pixels on any machine.
Each scene carries its caption and its ground truth (shape, colours, size, position, bounding box, mask), which
the scorer, the evaluation and later modes (inpainting masks, control maps) reuse.

A set of (colour, shape, background) combinations is held out of training, so that evaluation measures
whether the model composes attributes it learned separately, not whether it remembers pictures.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from functools import cached_property

import numpy as np
from PIL import Image, ImageDraw

from dapple.train.data.captions import caption_for

IMAGE_SIZE = 64
SUPERSAMPLE = 4  # draw at 4x and downsample with a box filter: anti-aliased edges

SHAPES = ("circle", "square", "triangle")
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 35, 35),
    "green": (35, 165, 50),
    "blue": (35, 70, 220),
    "yellow": (240, 215, 35),
    "purple": (140, 45, 175),
    "orange": (245, 135, 25),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
}
SIZES: dict[str, tuple[int, int]] = {"small": (16, 20), "large": (30, 36)}  # side of the bounding box, pixels
# Position -> centre as fractions of the image side (x, y).
POSITIONS: dict[str, tuple[float, float]] = {
    "center": (0.5, 0.5),
    "left": (0.25, 0.5),
    "right": (0.75, 0.5),
    "top": (0.5, 0.25),
    "bottom": (0.5, 0.75),
    "top left": (0.25, 0.25),
    "top right": (0.75, 0.25),
    "bottom left": (0.25, 0.75),
    "bottom right": (0.75, 0.75),
}
JITTER = 2  # pixels the centre may move, so that positions are regions rather than single points

HELD_OUT_SEED = 2026
HELD_OUT_SHARE = 0.1


@dataclass(frozen=True)
class SceneSpec:
    """The attributes of a scene: what a caption can say."""

    shape: str
    colour: str
    background: str
    size: str
    position: str

    @property
    def combination(self) -> tuple[str, str, str]:
        """The (colour, shape, background) triple that the held-out split is made of."""
        return (self.colour, self.shape, self.background)


@dataclass(frozen=True)
class Scene:
    """A drawn scene: its attributes, the exact geometry, the caption and the pixels."""

    spec: SceneSpec
    centre: tuple[int, int]
    side: int
    caption: str

    @property
    def bbox(self) -> tuple[int, int, int, int]:
        """(left, top, right, bottom) in pixels, right and bottom exclusive."""
        x, y, half = self.centre[0], self.centre[1], self.side // 2
        return (x - half, y - half, x + half, y + half)

    @cached_property
    def _rendered(self) -> tuple[Image.Image, np.ndarray]:
        return render(self.spec, self.centre, self.side)

    @property
    def image(self) -> Image.Image:
        return self._rendered[0].copy()

    @property
    def mask(self) -> np.ndarray:
        """Boolean (64, 64) array, True where the shape covers at least half a pixel."""
        return self._rendered[1].copy()


def _outline(shape: str, centre: tuple[float, float], side: float) -> list[tuple[float, float]] | tuple:
    x, y, half = centre[0], centre[1], side / 2
    if shape == "triangle":  # upright, equal base and height
        return [(x, y - half), (x + half, y + half), (x - half, y + half)]
    return (x - half, y - half, x + half, y + half)


def render(spec: SceneSpec, centre: tuple[int, int], side: int) -> tuple[Image.Image, np.ndarray]:
    """Draw a scene: (RGB image, coverage mask)."""
    scale = SUPERSAMPLE
    big = IMAGE_SIZE * scale
    coverage = Image.new("L", (big, big), 0)
    draw = ImageDraw.Draw(coverage)
    outline = _outline(spec.shape, (centre[0] * scale, centre[1] * scale), side * scale)
    if spec.shape == "triangle":
        draw.polygon(outline, fill=255)
    else:
        box = (outline[0], outline[1], outline[2] - 1, outline[3] - 1)  # PIL's box includes its far edge
        (draw.ellipse if spec.shape == "circle" else draw.rectangle)(box, fill=255)
    alpha = np.asarray(coverage.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BOX), dtype=np.float32) / 255
    foreground = np.array(COLOURS[spec.colour], dtype=np.float32)
    background = np.array(COLOURS[spec.background], dtype=np.float32)
    pixels = alpha[..., None] * foreground + (1 - alpha[..., None]) * background
    return Image.fromarray(pixels.round().astype(np.uint8)), alpha >= 0.5


def all_combinations() -> list[tuple[str, str, str]]:
    return [(c, s, b) for c in COLOURS for s in SHAPES for b in COLOURS if b != c]


def held_out_combinations(seed: int = HELD_OUT_SEED, share: float = HELD_OUT_SHARE) -> frozenset:
    """A fixed ~10% of (colour, shape, background) triples that training never shows.

    Drawn so that every colour, shape and background still appears in training, in other combinations.
    """
    rng = random.Random(seed)
    combos = all_combinations()
    rng.shuffle(combos)
    target = round(len(combos) * share)
    held: list[tuple[str, str, str]] = []
    for combo in combos:
        if len(held) == target:
            break
        remaining = [c for c in all_combinations() if c not in held and c != combo]
        if all(any(c[i] == combo[i] for c in remaining) for i in range(3)):
            held.append(combo)
    return frozenset(held)


class ShapesWorld:
    """An endless, seeded stream of scenes. split="train" avoids the held-out combinations, "held_out" uses
    only them, "all" uses every combination."""

    def __init__(self, seed: int = 0, split: str = "train") -> None:
        if split not in ("train", "held_out", "all"):
            raise ValueError(f"unknown split {split!r}; use 'train', 'held_out' or 'all'")
        self.seed = seed
        self.split = split
        held = held_out_combinations()
        if split == "train":
            self.combinations = [c for c in all_combinations() if c not in held]
        elif split == "held_out":
            self.combinations = sorted(held)
        else:
            self.combinations = all_combinations()

    def scene(self, index: int) -> Scene:
        """Scene number `index`; the same (seed, split, index) always gives the same scene."""
        rng = random.Random(f"{self.seed}:{self.split}:{index}")
        colour, shape, background = rng.choice(self.combinations)
        size = rng.choice(list(SIZES))
        position = rng.choice(list(POSITIONS))
        spec = SceneSpec(shape, colour, background, size, position)
        low, high = SIZES[size]
        side = rng.randrange(low, high + 1, 2)  # even, so the shape's edges fall on pixel boundaries
        fx, fy = POSITIONS[position]
        half = side // 2
        # Jitter the centre, but keep the whole shape inside the picture.
        x = min(max(fx * IMAGE_SIZE + rng.randint(-JITTER, JITTER), half), IMAGE_SIZE - half)
        y = min(max(fy * IMAGE_SIZE + rng.randint(-JITTER, JITTER), half), IMAGE_SIZE - half)
        caption = caption_for(spec, rng)
        return Scene(spec=spec, centre=(round(x), round(y)), side=side, caption=caption)

    def scenes(self, start: int, count: int) -> list[Scene]:
        return [self.scene(i) for i in range(start, start + count)]


def images_psnr(reference: Image.Image, other: Image.Image) -> float:
    """Peak signal-to-noise ratio in dB between two 8-bit RGB images."""
    a = np.asarray(reference, dtype=np.float64)
    b = np.asarray(other, dtype=np.float64)
    mse = float(np.mean((a - b) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)
