"""Training noise for the diffusion stage.

Multi-resolution ("pyramid") noise (Whitaker, 2023, "Multi-Resolution Noise for Diffusion Model Training"; the
`multires_noise` option of kohya's sd-scripts): white noise plus upsampled coarser noise fields, renormalised to
unit variance per image.

An option of the built-in recipe, off by default. It was tried against SD's signal leak (x_T keeps
sqrt(alpha_bar_T) ~ 0.07 of the latents, enough on 16x16 latents for the UNet to find a shape in the noise and
ignore the caption's position words): coarse noise fields were meant to drown that low-frequency leak. A
4000-step run with it still placed shapes by the seed; zero-terminal-SNR betas (Lin et al., 2024) remove the
leak instead, and are what the recipe uses (dapple.train.builtin_training).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def multires_noise(shape: tuple[int, ...], generator: torch.Generator, discount: float) -> torch.Tensor:
    """Gaussian noise of `shape` (batch, channels, h, w) with coarser fields (h/2, h/4, ... 1) added, the field k
    levels down weighted discount**k, each image rescaled to unit standard deviation. discount 0 = white noise."""
    noise = torch.randn(shape, generator=generator)
    if discount <= 0:
        return noise
    batch, channels, height, width = shape
    level = 1
    while min(height, width) >> (level - 1) > 1:
        coarse = torch.randn((batch, channels, max(1, height >> level), max(1, width >> level)), generator=generator)
        noise = noise + discount**level * F.interpolate(coarse, size=(height, width), mode="bilinear",
                                                         align_corners=False)
        level += 1
    return noise / noise.std(dim=(1, 2, 3), keepdim=True)
