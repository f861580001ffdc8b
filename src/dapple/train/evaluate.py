"""Held-out evaluation: generate images for captions of combinations training never showed, grade each with
the image-analysis scorer, and report per-attribute accuracy."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict

import numpy as np

from dapple.train.data.captions import canonical_caption
from dapple.train.data.shapes import ShapesWorld, images_psnr
from dapple.train.scorer import AccuracyTable, grade, score_image


def held_out_cases(n: int, seed: int = 0) -> list[tuple[str, dict[str, str]]]:
    """n (caption, expected attributes) pairs over the held-out combinations, every attribute named."""
    world = ShapesWorld(seed=seed, split="held_out")
    return [(canonical_caption(scene.spec), asdict(scene.spec)) for scene in world.scenes(0, n)]


def evaluate_pipeline(
    pipe,
    n: int = 200,
    *,
    steps: int = 20,
    guidance_scale: float = 6.0,
    sampler: str = "DPM++ 2M Karras",
    seed: int = 0,
    guidance_min_timestep: int = 0,
    on_image: Callable[[int, str, object], None] | None = None,
) -> AccuracyTable:
    """Generate one image per held-out case (seed + i) and grade it."""
    table = AccuracyTable()
    for index, (caption, expected) in enumerate(held_out_cases(n, seed)):
        image = pipe.generate(caption, steps=steps, guidance_scale=guidance_scale, sampler=sampler,
                              seed=seed + index, guidance_min_timestep=guidance_min_timestep).images[0]
        table.add(grade(score_image(image), expected))
        if on_image is not None:
            on_image(index, caption, image)
    return table


def evaluate_reconstructions(encode_decode: Callable[[list], list], n: int = 200, seed: int = 0) -> tuple[float, AccuracyTable]:
    """The VAE's quality bar: mean PSNR of reconstructions of held-out scenes, and how the scorer grades them."""
    scenes = ShapesWorld(seed=seed, split="held_out").scenes(0, n)
    reconstructions = encode_decode([s.image for s in scenes])
    table = AccuracyTable()
    for scene, image in zip(scenes, reconstructions, strict=True):
        table.add(grade(score_image(image), asdict(scene.spec)))
    psnr = float(np.mean([images_psnr(s.image, r) for s, r in zip(scenes, reconstructions, strict=True)]))
    return psnr, table
