"""Hires fix (A1111): generate at the base size, upscale (in latent space, or in pixels with a resampling filter
and back through the VAE), then redraw at the target size with an img2img pass of its own strength and steps."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from PIL import Image

from dapple.engine.generation import Run, tail_timesteps
from dapple.engine.images import to_vae_tensor
from dapple.engine.latents import decode, draw_noise, encode, to_pil
from dapple.request import LATENT_UPSCALERS


def hires_size(width: int, height: int, scale: float) -> tuple[int, int]:
    """The target size: the base size times scale, rounded down to a multiple of 8."""
    return int(width * scale) // 8 * 8, int(height * scale) // 8 * 8


def upscale(run: Run, latents: torch.Tensor, width: int, height: int, upscaler: str) -> torch.Tensor:
    """Latents at the base size -> latents at width x height, by the named upscaler."""
    components = run.components
    if upscaler in LATENT_UPSCALERS:
        mode, antialias = LATENT_UPSCALERS[upscaler]
        size = run.latent_shape(width, height)[1:]
        return F.interpolate(latents.float(), size=size, mode=mode, antialias=antialias).to(latents.dtype)
    resample = {"Lanczos": Image.LANCZOS, "Nearest": Image.NEAREST}[upscaler]
    images = to_pil(decode(components.vae, latents, components.latent_scaling_factor))
    pixels = to_vae_tensor([image.resize((width, height), resample) for image in images])
    # One posterior sample per image from its own generator, like img2img's init image.
    return torch.cat([
        encode(components.vae, pixels[i : i + 1], [generator], components.latent_scaling_factor)
        for i, generator in enumerate(run.generators)
    ]).to(latents.dtype)


def hires_pass(run: Run, latents: torch.Tensor) -> torch.Tensor:
    """Upscale the first pass's latents and redraw them. As in A1111, the second pass runs exactly hires_steps
    steps (default: steps) of a schedule int(hires_steps / strength) long, so strength sets where it starts."""
    request = run.request
    width, height = hires_size(run.width, run.height, request.hires_scale)
    steps = request.hires_steps or request.steps
    run.infotext_extra.update({
        "Denoising strength": request.hires_strength, "Hires upscale": request.hires_scale,
        "Hires steps": request.hires_steps or None, "Hires upscaler": request.hires_upscaler,
    })
    latents = upscale(run, latents, width, height, request.hires_upscaler)
    if request.hires_strength <= 0:
        return latents
    total = max(steps, int(steps / min(request.hires_strength, 0.999)))
    scheduler = run.scheduler(total)
    timesteps = tail_timesteps(scheduler, total - steps)
    noise = draw_noise(run.generators, run.latent_shape(width, height), device=run.device, dtype=run.dtype)
    latents = scheduler.add_noise(latents, noise, timesteps[:1].repeat(len(latents)))
    return run.denoise(scheduler, latents, timesteps, phase="hires")
