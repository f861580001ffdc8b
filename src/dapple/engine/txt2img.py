"""Text-to-image: pure noise in, the one denoise loop, VAE decode out (Rombach et al., 2022, "High-Resolution
Image Synthesis with Latent Diffusion Models"), with hires fix as an optional second pass."""

from __future__ import annotations

from dapple.engine.generation import begin_run
from dapple.engine.hires import hires_pass
from dapple.engine.hooks import StepHooks
from dapple.engine.inpaint import unmasked_inpainting_channels
from dapple.engine.latents import draw_noise
from dapple.errors import InvalidRequestError
from dapple.models.components import Components
from dapple.request import GenerationRequest, GenerationResult


def txt2img(components: Components, request: GenerationRequest, hooks: StepHooks | None = None) -> GenerationResult:
    """Generate request.batch_size images from text (and upscale them with hires fix when hires_scale > 1)."""
    if components.unet_kind == "depth":
        raise InvalidRequestError("this is a depth model (5-channel UNet): give init_image and depth_map (depth2img)")
    width = request.width or components.native_size
    height = request.height or components.native_size
    run = begin_run(components, request, hooks, width, height)

    # Initial latents: seeded noise at the scheduler's starting noise level.
    scheduler = run.scheduler(request.steps)
    noise = draw_noise(run.generators, run.latent_shape(), device=run.device, dtype=run.dtype)
    latents = noise * scheduler.init_noise_sigma

    # An inpainting UNet draws a whole new image when everything is masked (as A1111 does for txt2img).
    extra = unmasked_inpainting_channels(components, len(run.seeds), width, height) \
        if components.unet_kind == "inpainting" else None
    latents = run.denoise(scheduler, latents, extra_channels=extra)

    if request.hires_scale > 1:
        latents = hires_pass(run, latents)
    return run.result(run.decode(latents))

