"""Latent space: seeded initial noise, VAE encoding and decoding, and the cheap latent -> RGB preview.

The VAE's memory switches are diffusers' own attributes on the model (models/memory.py sets them):
``use_slicing`` decodes one image of a batch at a time, ``use_tiling`` decodes overlapping tiles of
``tile_latent_min_size`` latents and blends their borders (diffusers' AutoencoderKL.tiled_decode, reused as it
is), for latents larger than one tile, with its group norms sharing one set of statistics unless the memory
options say "per-tile" (models/tiled_norms.py). A VAE under model CPU offload is lent to its device for each call.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from diffusers import AutoencoderKL
from PIL import Image

from dapple.models.memory import execution_device, lent
from dapple.models.tiled_norms import needs_tiles, shared_norms


def make_generators(seeds: Sequence[int]) -> list[torch.Generator]:
    """One CPU generator per image, so that a seed gives the same image on any device and image i of a batch
    equals a single run with seed + i. Every random draw of a run (VAE posterior samples, initial noise, the
    stochastic samplers' noise) comes from these, in diffusers' order."""
    return [torch.Generator("cpu").manual_seed(int(seed)) for seed in seeds]


def draw_noise(
    generators: Sequence[torch.Generator], shape: tuple[int, int, int], *, device: torch.device, dtype: torch.dtype
) -> torch.Tensor:
    """Standard normal noise (batch, *shape), image i drawn from generators[i]."""
    noise = torch.cat([torch.randn((1, *shape), generator=g, dtype=torch.float32) for g in generators])
    return noise.to(device=device, dtype=dtype)


def seeded_noise(
    seeds: Sequence[int], shape: tuple[int, int, int], *, device: torch.device, dtype: torch.dtype
) -> tuple[torch.Tensor, list[torch.Generator]]:
    """Noise and the generators it came from, whose state has advanced past the draw: stochastic samplers
    continue from them, as diffusers' pipelines do with a list of generators."""
    generators = make_generators(seeds)
    return draw_noise(generators, shape, device=device, dtype=dtype), generators


def encode(
    vae: AutoencoderKL, images: torch.Tensor, generators: Sequence[torch.Generator], scaling_factor: float
) -> torch.Tensor:
    """Scaled latents of images in [-1, 1]: one posterior sample per image, image i drawn from generators[i]
    (diffusers' retrieve_latents with sample_mode="sample"). A single image is shared by the whole batch.
    Images larger than a tile are encoded in tiles when the VAE's use_tiling is on."""
    with lent(vae):
        images = images.to(device=execution_device(vae), dtype=vae.dtype)
        latents = [
            vae.encode(images[min(i, len(images) - 1)][None]).latent_dist.sample(generator=generator)
            for i, generator in enumerate(generators)
        ]
    return torch.cat(latents) * scaling_factor


def decode(vae: AutoencoderKL, latents: torch.Tensor, scaling_factor: float) -> torch.Tensor:
    """VAE-decode latents to images in [0, 1], shape (batch, 3, H, W), float32, on the latents' device.

    With the VAE's use_slicing on, one image at a time: each is converted to float32 in [0, 1] and moved off the
    device before the next one decodes, so the device never holds the batch's decoded images. With use_tiling on,
    latents larger than a tile go through diffusers' tiled_decode (in vae.decode), by default with one set of
    group-norm statistics for every tile (dapple.models.tiled_norms)."""
    with lent(vae):
        device = execution_device(vae)
        batches = latents.split(1) if getattr(vae, "use_slicing", False) else [latents]
        images = [_decode_batch(vae, batch.to(device, vae.dtype) / scaling_factor).to(latents.device)
                  for batch in batches]
    return images[0] if len(images) == 1 else torch.cat(images)


def _decode_batch(vae: AutoencoderKL, scaled: torch.Tensor) -> torch.Tensor:
    # vae.decode itself tiles when use_tiling is on and the latents are larger than one tile; the memory options
    # set shared_tile_norms on the VAE when its tiles are to share one set of group-norm statistics.
    if getattr(vae, "shared_tile_norms", False) and needs_tiles(vae, scaled):
        with shared_norms(vae, scaled):
            images = vae.decode(scaled, return_dict=False)[0]
    else:
        images = vae.decode(scaled, return_dict=False)[0]
    return (images.float() / 2 + 0.5).clamp(0, 1)


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    """(batch, 3, H, W) floats in [0, 1] -> 8-bit RGB PIL images."""
    array = images.detach().cpu().permute(0, 2, 3, 1).numpy()
    return [Image.fromarray((image * 255).round().astype(np.uint8)) for image in array]


def approximate_rgb(latents: torch.Tensor, factors: Sequence[Sequence[float]]) -> torch.Tensor:
    """A linear map from latent channels to RGB in [0, 1]: a preview without running the VAE decoder.

    Each output pixel stands for one latent cell, so the preview is 1/8 the size of the image.
    """
    weights = torch.tensor(factors, dtype=torch.float32, device=latents.device)
    if weights.shape[0] != latents.shape[1]:  # no factors for this latent space: show the first channels
        rgb = latents[:, :3].float()
        rgb = (rgb - rgb.amin()) / (rgb.amax() - rgb.amin() + 1e-8) * 2 - 1
    else:
        rgb = torch.einsum("bchw,cr->brhw", latents.float(), weights)
    return (rgb / 2 + 0.5).clamp(0, 1)
