"""The one denoise loop every mode runs (txt2img, img2img, inpaint, outpaint, depth2img and hires fix compose
around it).

Each step: scale the latents for the sampler, predict the noise with the UNet (conditional and unconditional
halves in one batched call), mix them with classifier-free guidance (Ho & Salimans, 2022, eq. 6:
eps = eps_uncond + w * (eps_cond - eps_uncond)), and let the diffusers scheduler take the step.
A guidance interval (Kynkaanniemi et al., 2024, "Applying Guidance in a Limited Interval Improves Sample and
Distribution Quality in Diffusion Models") guides only the steps at t >= guidance_min_timestep; the later ones
run the UNet on the prompt alone, which also halves their cost.
Modes differ only in the latents, timesteps, hooks and extensions they pass in. The model call itself goes through
the extension seam (engine/extensions.py): the loop builds one ModelInputs per step, extensions add to it (extra
input channels, ControlNet residuals, attention kwargs) and may work on the guided prediction.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence

import torch
from diffusers import UNet2DConditionModel
from diffusers.schedulers.scheduling_utils import SchedulerMixin

from dapple.engine.conditioning import Conditioning
from dapple.engine.extensions import Extensions, ModelInputs
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
    extensions: Extensions | None = None,
    phase: str = "sampling",
    guidance_min_timestep: int = 0,
) -> torch.Tensor:
    """Run the sampler over `timesteps` (default: the scheduler's) and return the final latents.

    extensions work on each step's model inputs (their run-wide patches are entered by the caller, once per run).
    phase names this pass for the hooks ("sampling", "hires"). Steps at timesteps below guidance_min_timestep are
    not guided (0: all are)."""
    hooks = hooks or StepHooks()
    extensions = extensions or Extensions()
    timesteps = scheduler.timesteps if timesteps is None else timesteps
    step_kwargs = _step_kwargs(scheduler, generators)
    total = len(timesteps)
    prompt_only = conditioning.prompt_only()
    for index, t in enumerate(timesteps):
        context = StepContext(index, total, t, latents, previewer=previewer, phase=phase)
        hooks.run_before(context)
        extensions.before_step(context)
        latents = context.latents

        guided = conditioning.uses_guidance and float(t) >= guidance_min_timestep
        batch = conditioning if guided else prompt_only
        sample = torch.cat([latents] * 2) if guided else latents
        # added_cond_kwargs: SDXL's pooled text and size conditioning (None for SD 1.x/2.x)
        inputs = ModelInputs(scheduler.scale_model_input(sample, t), t, batch.unet_batch, guided,
                             added_cond_kwargs=batch.added_cond_kwargs)
        extensions.before_model(context, inputs)
        noise_pred = inputs.call(unet)
        if guided:
            noise_uncond, noise_cond = noise_pred.chunk(2)
            noise_pred = noise_uncond + guidance_scale * (noise_cond - noise_uncond)
        noise_pred = extensions.after_guidance(context, inputs, noise_pred)

        output = scheduler.step(noise_pred, t, latents, **step_kwargs, return_dict=True)
        context.latents = output.prev_sample
        context.denoised = _predicted_x0(output)
        extensions.after_step(context)
        hooks.run_after(context)
        latents = context.latents
    return latents
