"""The one denoise loop every mode runs (txt2img, img2img, inpaint, outpaint, depth2img and hires fix compose
around it).

Each step: scale the latents for the sampler, predict the noise with the UNet (conditional and unconditional
halves in one batched call), mix them with classifier-free guidance (Ho & Salimans, 2022, eq. 6:
eps = eps_uncond + w * (eps_cond - eps_uncond)), and let the diffusers scheduler take the step.
A guidance interval (Kynkaanniemi et al., 2024, "Applying Guidance in a Limited Interval Improves Sample and
Distribution Quality in Diffusion Models") guides only the steps at t >= guidance_min_timestep; the later ones
run the UNet on the prompt alone, which also halves their cost.
Modes differ only in the latents, timesteps and hooks they pass in, and in the extra input channels an inpainting
(mask + masked-image latents) or depth (depth map) UNet takes beside the latents.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence

import torch
from diffusers import UNet2DConditionModel
from diffusers.schedulers.scheduling_utils import SchedulerMixin

from dapple.engine.conditioning import Conditioning
from dapple.engine.hooks import Previewer, StepContext, StepHooks


def _step_kwargs(scheduler: SchedulerMixin, generators: Sequence[torch.Generator] | None) -> dict:
    """Stochastic samplers take the per-image generators so that their noise follows the seeds too."""
    if generators and "generator" in inspect.signature(scheduler.step).parameters:
        return {"generator": list(generators)}
    return {}


def _predicted_x0(output: object) -> torch.Tensor | None:
    """The sampler's prediction of the clean latents, where it reports one (LCM calls it "denoised")."""
    for name in ("pred_original_sample", "denoised"):
        value = getattr(output, name, None)
        if value is not None:
            return value
    return None


def denoise(
    unet: UNet2DConditionModel,
    scheduler: SchedulerMixin,
    latents: torch.Tensor,
    conditioning: Conditioning,
    guidance_scale: float,
    *,
    timesteps: Sequence[torch.Tensor] | torch.Tensor | None = None,
    generators: Sequence[torch.Generator] | None = None,
    hooks: StepHooks | None = None,
    previewer: Previewer | None = None,
    extra_channels: torch.Tensor | None = None,
    phase: str = "sampling",
    guidance_min_timestep: int = 0,
) -> torch.Tensor:
    """Run the sampler over `timesteps` (default: the scheduler's) and return the final latents.

    extra_channels: (batch, C, h, w) appended to the scaled latents on every UNet call, as diffusers' inpaint and
    depth2img pipelines do. phase names this pass for the hooks ("sampling", "hires"). Steps at timesteps below
    guidance_min_timestep are not guided (0: all are)."""
    hooks = hooks or StepHooks()
    timesteps = scheduler.timesteps if timesteps is None else timesteps
    step_kwargs = _step_kwargs(scheduler, generators)
    total = len(timesteps)
    prompt_only = conditioning.prompt_only()
    for index, t in enumerate(timesteps):
        context = StepContext(index, total, t, latents, previewer=previewer, phase=phase)
        hooks.run_before(context)
        latents = context.latents

        guided = conditioning.uses_guidance and float(t) >= guidance_min_timestep
        batch = conditioning if guided else prompt_only
        model_input = torch.cat([latents] * 2) if guided else latents
        model_input = scheduler.scale_model_input(model_input, t)
        if extra_channels is not None:
            extra = torch.cat([extra_channels] * 2) if guided else extra_channels
            model_input = torch.cat([model_input, extra.to(model_input.dtype)], dim=1)
        # added_cond_kwargs: SDXL's pooled text and size conditioning (None for SD 1.x/2.x)
        noise_pred = unet(model_input, t, encoder_hidden_states=batch.unet_batch, return_dict=False,
                          added_cond_kwargs=batch.added_cond_kwargs)[0]
        if guided:
            noise_uncond, noise_cond = noise_pred.chunk(2)
            noise_pred = noise_uncond + guidance_scale * (noise_cond - noise_uncond)

        output = scheduler.step(noise_pred, t, latents, **step_kwargs, return_dict=True)
        context.latents = output.prev_sample
        context.denoised = _predicted_x0(output)
        hooks.run_after(context)
        latents = context.latents
    return latents
