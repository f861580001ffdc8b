"""Inpainting and outpainting on the one denoise loop.

Two paths, chosen by the UNet (as diffusers' StableDiffusionInpaintPipeline chooses):
- a standard 4-channel UNet repaints by blending: after every step, the area outside the mask is replaced by the
  original latents noised to the next step's level (the "inpaint mask" hook; RePaint-style conditioning,
  Lugmayr et al., 2022, without resampling);
- a 9-channel inpainting UNet gets the mask and the masked image's latents as extra input channels.
Afterwards the original pixels outside the mask are pasted back through a blurred mask (A1111's mask blur).
Outpainting extends the canvas (edge-stretch + noise), builds the mask for the new area, and inpaints.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from dapple.engine.channels import InputChannels
from dapple.engine.extensions import Extension
from dapple.engine.generation import batch_seeds, begin_run, output_size, strength_timesteps
from dapple.engine.hooks import StepContext, StepHooks
from dapple.engine.images import (
    MaskResizedWarning,
    blur_mask,
    fill_masked_area,
    mask_from_image,
    mask_tensor,
    prepare_mask,
    resize_to,
    to_vae_tensor,
)
from dapple.engine.latents import draw_noise, encode, to_pil
from dapple.models.components import Components
from dapple.request import GenerationRequest, GenerationResult


def mask_blend_hook(scheduler, timesteps: torch.Tensor, image_latents: torch.Tensor, noise: torch.Tensor,
                    latent_mask: torch.Tensor):
    """After each step keep the sampler's latents inside the mask and the original outside, noised to the level
    of the next step (the last step blends in the clean original)."""

    def blend(context: StepContext) -> None:
        known = image_latents
        if context.index < len(timesteps) - 1:
            known = scheduler.add_noise(image_latents, noise, timesteps[context.index + 1 : context.index + 2])
        context.latents = (1 - latent_mask) * known + latent_mask * context.latents

    return blend


def fit_mask(mask_source: Image.Image, init_size: tuple[int, int], size: tuple[int, int], request: GenerationRequest
             ) -> Image.Image:
    """The mask at the output size: a mask the size of the init image follows the image's resize mode; any
    other size is stretched with a warning."""
    mask = mask_from_image(mask_source)
    if mask.size == init_size and init_size != size:
        mask = resize_to(mask.convert("RGB"), *size, request.resize_mode).convert("L")
    return prepare_mask(mask, size, invert=request.invert_mask)


def inpaint(
    components: Components, request: GenerationRequest, hooks: StepHooks | None, init_image: Image.Image,
    mask_source: Image.Image, extensions: Iterable[Extension] = (),
) -> GenerationResult:
    """Repaint the white area of the mask after request.prompt."""
    width, height = output_size(request, init_image)
    image = resize_to(init_image.convert("RGB"), width, height, request.resize_mode)
    with warnings.catch_warnings():
        warnings.simplefilter("always", MaskResizedWarning)  # each run says so, not only the first
        mask = fit_mask(mask_source, init_image.size, (width, height), request)
    return inpaint_fitted(components, request, hooks, image, mask, extensions=extensions)


def inpaint_fitted(
    components: Components, request: GenerationRequest, hooks: StepHooks | None, image: Image.Image,
    mask: Image.Image, infotext: dict | None = None, extensions: Iterable[Extension] = (),
) -> GenerationResult:
    """Inpaint an RGB image and an "L" mask that already have the output size."""
    width, height = image.size
    with begin_run(components, request, hooks, width, height, extensions) as run:
        run.infotext_extra.update({"Denoising strength": request.strength, "Mask blur": request.mask_blur,
                                   "Masked content": request.inpainting_fill, **(infotext or {})})
        batch = len(run.seeds)
        scheduler = run.scheduler(request.steps)
        timesteps = strength_timesteps(scheduler, request.steps, request.strength)
        strength_max = request.strength >= 1.0
        # An inpainting UNet sees the mask as input channels; a standard one repaints by blending (see above).
        channel_inputs = run.input_channels is not None

        start_image = fill_masked_area(image, mask) if request.inpainting_fill == "fill" else image
        mask_full = mask_tensor(mask)  # (1, 1, H, W) of 0/1
        latent_mask = F.interpolate(mask_full, size=run.latent_shape()[1:]).to(run.device, run.dtype)

        # Random draws in diffusers' order: image latents, initial noise, masked-image latents.
        image_latents = None
        if not channel_inputs or not strength_max:
            image_latents = encode(components.vae, to_vae_tensor([start_image]), run.generators,
                                   components.latent_scaling_factor).to(run.dtype)
        noise = draw_noise(run.generators, run.latent_shape(), device=run.device, dtype=run.dtype)
        if strength_max:
            latents = noise * scheduler.init_noise_sigma
        else:
            start = image_latents
            if request.inpainting_fill in ("latent noise", "latent nothing"):
                replacement = torch.zeros_like(start) if request.inpainting_fill == "latent nothing" else \
                    draw_noise(run.generators, run.latent_shape(), device=run.device, dtype=run.dtype)
                start = (1 - latent_mask) * start + latent_mask * replacement
            latents = start if len(timesteps) == 0 else \
                scheduler.add_noise(start, noise, timesteps[:1].repeat(batch))

        mode_hooks = StepHooks()
        if channel_inputs:
            masked_image = to_vae_tensor([image]) * (mask_full < 0.5)
            masked_latents = encode(components.vae, masked_image, run.generators, components.latent_scaling_factor)
            run.input_channels = InputChannels(
                torch.cat([latent_mask.expand(batch, -1, -1, -1), masked_latents.to(run.dtype)], dim=1))
        else:
            mode_hooks.after_step["inpaint mask"] = mask_blend_hook(scheduler, timesteps, image_latents, noise,
                                                                    latent_mask)
        latents = run.denoise(scheduler, latents, timesteps, hooks=mode_hooks)
        pixels = run.decode(latents)
        images = to_pil(pixels)
        if request.paste_back:
            soft_mask = blur_mask(mask, request.mask_blur)
            images = [Image.composite(generated, image, soft_mask) for generated in images]
        return run.result(pixels, images)


def extend_canvas(image: Image.Image, left: int, right: int, top: int, bottom: int, *, overlap: int, seed: int
                  ) -> tuple[Image.Image, Image.Image]:
    """Outpainting's canvas and mask: the image with its edge pixels stretched outwards plus seeded noise in the
    new area, and a mask that is white over the new area and `overlap` pixels into the image on the extended
    sides (A1111's poor man's outpainting reaches 2 x mask blur in, so the seam gets repainted)."""
    rgb = np.asarray(image.convert("RGB"), dtype=np.float32)
    canvas = np.pad(rgb, ((top, bottom), (left, right), (0, 0)), mode="edge")
    new_area = np.ones(canvas.shape[:2], dtype=bool)
    new_area[top : top + image.height, left : left + image.width] = False
    noise = np.random.default_rng(seed).normal(0.0, 24.0, canvas.shape).astype(np.float32)
    canvas = np.where(new_area[..., None], canvas + noise, canvas)
    mask = np.full(canvas.shape[:2], 255, dtype=np.uint8)
    keep_top = top + (overlap if top else 0)
    keep_left = left + (overlap if left else 0)
    keep_bottom = top + image.height - (overlap if bottom else 0)
    keep_right = left + image.width - (overlap if right else 0)
    mask[keep_top:keep_bottom, keep_left:keep_right] = 0
    return (Image.fromarray(np.clip(canvas, 0, 255).round().astype(np.uint8)), Image.fromarray(mask))


def outpaint(
    components: Components, request: GenerationRequest, hooks: StepHooks | None, init_image: Image.Image,
    extensions: Iterable[Extension] = (),
) -> GenerationResult:
    """Extend the image by the request's outpaint sides and draw the new area."""
    width, height = output_size(request, init_image)
    image = resize_to(init_image.convert("RGB"), width, height, request.resize_mode)
    sides = (request.outpaint_left, request.outpaint_right, request.outpaint_top, request.outpaint_bottom)
    if request.seed == -1:  # fix the seed now: it also draws the canvas noise, and the infotext must reproduce it
        request = request.model_copy(update={"seed": batch_seeds(-1, request.batch_size)[0]})
    canvas, mask = extend_canvas(image, *sides, overlap=2 * request.mask_blur, seed=request.seed)
    infotext = {"Outpaint": " ".join(f"{name}={value}" for name, value in zip(
        ("left", "right", "top", "bottom"), sides) if value)}
    return inpaint_fitted(components, request, hooks, canvas, mask, infotext, extensions)
