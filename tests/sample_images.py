"""Small input pictures and masks the image-mode tests share."""

from __future__ import annotations

import numpy as np
from PIL import Image


def smooth_image(seed: int, size: int = 64) -> Image.Image:
    """A smooth random picture (a VAE's favourite kind of input)."""
    coarse = np.random.default_rng(seed).random((8, 8, 3)) * 255
    return Image.fromarray(coarse.astype(np.uint8)).resize((size, size), Image.BICUBIC)


def half_mask(size: int = 64) -> Image.Image:
    """White (repaint) on the right half."""
    mask = np.zeros((size, size), np.uint8)
    mask[:, size // 2 :] = 255
    return Image.fromarray(mask)


def pixels(result) -> np.ndarray:
    """A result's float pixels as (batch, H, W, 3), as diffusers' output_type="np" gives them."""
    return result.pixels.permute(0, 2, 3, 1).numpy()
