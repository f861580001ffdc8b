"""Image-to-image (SDEdit, Meng et al., 2022): encode the init image, noise it to the step that `strength` picks,
and run the rest of the schedule. Depth2img is the same with a depth map as the UNet's fifth input channel
(SD 2 depth, as diffusers' StableDiffusionDepth2ImgPipeline), given to the loop as an extension."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from PIL import Image

from dapple.engine.channels import DepthChannels
from dapple.engine.depth import depth_tensor
from dapple.engine.extensions import Extension
from dapple.engine.generation import begin_run, noised_start, output_size, strength_timesteps
from dapple.engine.hooks import StepHooks
from dapple.engine.images import resize_to, to_vae_tensor
from dapple.engine.latents import draw_noise, encode
from dapple.errors import InvalidRequestError
from dapple.models.components import Components
from dapple.request import GenerationRequest, GenerationResult


def img2img(
    components: Components,
    request: GenerationRequest,
    hooks: StepHooks | None,
    init_image: Image.Image,
    input_channels: Extension | None = None,
    extensions: Iterable[Extension] = (),
) -> GenerationResult:
    """Redraw init_image after `request.prompt`. input_channels: the UNet's extra inputs when the model's default
    does not fit (depth2img's map, see depth2img()).

    strength 1 ignores the image entirely (the same image as txt2img with that seed); strength 0 returns the
    image's VAE round trip; in between, int(steps * strength) steps run."""
    width, height = output_size(request, init_image)
    image = resize_to(init_image.convert("RGB"), width, height, request.resize_mode)
    with begin_run(components, request, hooks, width, height, extensions) as run:
        run.infotext_extra["Denoising strength"] = request.strength
        scheduler = run.scheduler(request.steps)

        if request.strength >= 1.0:
            noise = draw_noise(run.generators, run.latent_shape(), device=run.device, dtype=run.dtype)
            latents, timesteps = noise * scheduler.init_noise_sigma, None
        else:
            timesteps = strength_timesteps(scheduler, request.steps, request.strength)
            image_latents = encode(components.vae, to_vae_tensor([image]), run.generators,
                                   components.latent_scaling_factor).to(run.dtype)
            latents = noised_start(run, scheduler, image_latents, timesteps)

        if input_channels is not None:
            run.input_channels = input_channels
        latents = run.denoise(scheduler, latents, timesteps)
        return run.result(run.decode(latents))


def depth2img(
    components: Components,
    request: GenerationRequest,
    hooks: StepHooks | None,
    init_image: Image.Image,
    depth: torch.Tensor | None = None,
    extensions: Iterable[Extension] = (),
) -> GenerationResult:
    """img2img on a depth UNet: `depth` (1, H, W, larger = nearer) guides the layout; without it, the plugged-in
    depth estimator reads the (resized) init image."""
    if depth is None:
        width, height = output_size(request, init_image)
        depth = estimate_depth(components, resize_to(init_image.convert("RGB"), width, height, request.resize_mode))
    return img2img(components, request, hooks, init_image, DepthChannels(depth), extensions)


def estimate_depth(components: Components, image: Image.Image) -> torch.Tensor:
    """The depth-estimator seam: a model plugged into components.depth_estimator, or a clear error."""
    if components.depth_estimator is None:
        raise InvalidRequestError(
            "this depth model (5-channel UNet) needs depth_map: an image or (H, W) array, brighter = nearer "
            "(no depth estimator is plugged in; none is downloaded)"
        )
    return depth_tensor(components.depth_estimator(image))
