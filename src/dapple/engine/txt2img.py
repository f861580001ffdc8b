"""Text-to-image: pure noise in, the one denoise loop, VAE decode out (Rombach et al., 2022, "High-Resolution
Image Synthesis with Latent Diffusion Models"), with hires fix as an optional second pass."""

from __future__ import annotations

from collections.abc import Iterable

from dapple.engine.extensions import Extension
from dapple.engine.generation import begin_run
from dapple.engine.hires import hires_pass
from dapple.engine.hooks import StepHooks
from dapple.engine.latents import draw_noise
from dapple.models.components import Components
from dapple.request import GenerationRequest, GenerationResult


def txt2img(components: Components, request: GenerationRequest, hooks: StepHooks | None = None,
            extensions: Iterable[Extension] = ()) -> GenerationResult:
    """Generate request.batch_size images from text (and upscale them with hires fix when hires_scale > 1)."""
    width = request.width or components.native_size
    height = request.height or components.native_size
    with begin_run(components, request, hooks, width, height, extensions) as run:
        # Initial latents: seeded noise at the scheduler's starting noise level.
        scheduler = run.scheduler(request.steps)
        noise = draw_noise(run.generators, run.latent_shape(), device=run.device, dtype=run.dtype)
        latents = run.denoise(scheduler, noise * scheduler.init_noise_sigma)
        if request.hires_scale > 1:
            latents = hires_pass(run, latents)
        return run.result(run.decode(latents))
