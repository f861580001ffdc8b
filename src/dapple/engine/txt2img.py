"""Text-to-image: pure noise in, the one denoise loop, VAE decode out (Rombach et al., 2022, "High-Resolution
Image Synthesis with Latent Diffusion Models")."""

from __future__ import annotations

import random
import time
from collections.abc import Sequence

import torch
from PIL import Image

from dapple._version import __version__
from dapple.engine.conditioning import encode_prompt, warn_unknown_words
from dapple.engine.hooks import Previewer, StepHooks
from dapple.engine.latents import approximate_rgb, decode, seeded_noise, to_pil
from dapple.engine.loop import denoise
from dapple.infotext import format_infotext
from dapple.models.components import Components
from dapple.request import MAX_SEED, GenerationRequest, GenerationResult
from dapple.samplers import SamplerChoice, create_scheduler, resolve_sampler


def batch_seeds(seed: int, batch_size: int) -> list[int]:
    """A1111's convention: seed -1 draws a random seed; image i of a batch uses seed + i."""
    if seed == -1:
        seed = random.randrange(0, MAX_SEED - batch_size + 2)
    return [seed + i for i in range(batch_size)]


def make_previewer(components: Components) -> Previewer:
    """Turn latents into preview images: "cheap" via a linear map, "full" via the VAE decoder."""

    def preview(latents: torch.Tensor, mode: str = "cheap") -> list[Image.Image]:
        if mode == "full":
            return to_pil(decode(components.vae, latents, components.latent_scaling_factor))
        if mode == "cheap":
            return to_pil(approximate_rgb(latents, components.latent_rgb_factors))
        raise ValueError(f"unknown preview mode {mode!r}; use 'cheap' or 'full'")

    return preview


def _format_number(value: float) -> str:
    return f"{value:g}"


def build_infotexts(
    request: GenerationRequest, choice: SamplerChoice, seeds: Sequence[int], width: int, height: int, model: str
) -> list[str]:
    """A1111-style parameters text for each image (only the seed differs)."""
    texts = []
    for seed in seeds:
        parameters = {
            "Steps": request.steps,
            "Sampler": choice.spec.name,
            "Schedule type": None if choice.schedule_type == "Automatic" else choice.schedule_type,
            "CFG scale": _format_number(request.guidance_scale),
            "Seed": seed,
            "Size": f"{width}x{height}",
            "Model hash": None,  # filled in once model hashing lands (model library issue)
            "Model": model,
            "Version": f"dapple {__version__}",
        }
        texts.append(format_infotext(request.prompt, request.negative_prompt, parameters))
    return texts


def txt2img(components: Components, request: GenerationRequest, hooks: StepHooks | None = None) -> GenerationResult:
    """Generate request.batch_size images from text."""
    timings: dict[str, float] = {}
    started = time.perf_counter()
    choice = resolve_sampler(request.sampler)
    width = request.width or components.native_size
    height = request.height or components.native_size
    seeds = batch_seeds(request.seed, request.batch_size)

    # 1. Encode the prompt and the negative prompt.
    warn_unknown_words(request.prompt, request.negative_prompt, components.vocabulary)
    clock = time.perf_counter()
    conditioning = encode_prompt(
        components.tokenizer,
        components.text_encoder,
        request.prompt,
        request.negative_prompt,
        guidance_scale=request.guidance_scale,
        batch_size=len(seeds),
    )
    timings["encode_prompt"] = time.perf_counter() - clock

    # 2. A fresh scheduler for this run, and its timesteps.
    scheduler = create_scheduler(choice, components.scheduler_config, seeds=seeds)
    scheduler.set_timesteps(request.steps, device=components.device)

    # 3. Initial latents: seeded noise at the scheduler's starting noise level.
    noise, generators = seeded_noise(seeds, components.latent_shape(width, height), device=components.device, dtype=components.dtype)
    latents = noise * scheduler.init_noise_sigma

    # 4. Denoise.
    clock = time.perf_counter()
    latents = denoise(
        components.unet,
        scheduler,
        latents,
        conditioning,
        request.guidance_scale,
        generators=generators,
        hooks=hooks,
        previewer=make_previewer(components),
    )
    timings["denoise"] = time.perf_counter() - clock

    # 5. Decode to pixels.
    clock = time.perf_counter()
    pixels = decode(components.vae, latents, components.latent_scaling_factor).cpu()
    timings["decode"] = time.perf_counter() - clock
    timings["total"] = time.perf_counter() - started
    return GenerationResult(
        images=to_pil(pixels),
        pixels=pixels,
        seeds=seeds,
        infotexts=build_infotexts(request, choice, seeds, width, height, components.name),
        request=request,
        timings=timings,
    )
