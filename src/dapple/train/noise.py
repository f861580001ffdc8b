"""Training noise for the diffusion stage.

Multi-resolution ("pyramid") noise (Whitaker, 2023, "Multi-Resolution Noise for Diffusion Model Training"; the
`multires_noise` option of kohya's sd-scripts): white noise plus upsampled coarser noise fields, renormalised to
unit variance per image.

Why the built-in model needs it: SD's scaled_linear schedule never reaches zero signal, so x_T still holds
sqrt(alpha_bar_T) ~ 0.07 of the latents (Lin et al., 2024, "Common Diffusion Noise Schedules and Sample Steps are
Flawed"). On 16x16 latents a whole shape spans dozens of latent pixels, enough for the UNet to find where the
shape is from the noisy input alone, so it never learns position from the caption: at inference it puts the shape
wherever the starting noise happens to look like one, whatever the prompt says. Coarse noise fields drown that
low-frequency leak, so the caption becomes the only reliable source of where the shape goes. Sampling is
unchanged (plain Gaussian noise), as with kohya's option.
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
