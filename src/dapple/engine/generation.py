"""What every mode shares around the one denoise loop: the run's setup (seeds, prompt embeddings, a fresh
scheduler, the per-image generators), img2img's strength schedule, the loop call, decoding and the result.

A mode is then a few lines: make its initial latents, pick its timesteps, add its hooks or extensions. A run is a
context manager: `with begin_run(...) as run:` holds the run's extension patches (attention processors, weight
patches) for exactly the run, and undoes them however it ends.
"""

from __future__ import annotations

import random
import time
from collections.abc import Iterable, Mapping, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from PIL import Image

from dapple._version import __version__
from dapple.engine.channels import default_input_channels
from dapple.engine.conditioning import Conditioning, encode_prompt, encode_prompt_xl, warn_unknown_words
from dapple.engine.extensions import Extension, Extensions
from dapple.engine.hooks import Previewer, StepHooks
from dapple.engine.latents import approximate_rgb, decode, draw_noise, make_generators, to_pil
from dapple.engine.loop import denoise
from dapple.engine.prompt_syntax import extract_extra_networks
from dapple.infotext import format_infotext
from dapple.models.components import Components
from dapple.models.embeddings import name_pattern
from dapple.models.memory import lent, stage_models
from dapple.request import MAX_SEED, GenerationRequest, GenerationResult
from dapple.samplers import SamplerChoice, create_scheduler, resolve_sampler, set_timesteps


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


def strength_timesteps(scheduler: SchedulerMixin, steps: int, strength: float) -> torch.Tensor:
    """The tail of a `steps`-step schedule that img2img runs: int(steps * strength) steps, starting at the noise
    level strength picks (diffusers' get_timesteps). The scheduler must already have set_timesteps(steps)."""
    run_steps = min(int(steps * strength), steps)
    return tail_timesteps(scheduler, steps - run_steps)


def tail_timesteps(scheduler: SchedulerMixin, skip: int) -> torch.Tensor:
    """The scheduler's timesteps without the first `skip` steps; tells the scheduler where it starts."""
    start = skip * scheduler.order
    if hasattr(scheduler, "set_begin_index"):
        scheduler.set_begin_index(start)
    return scheduler.timesteps[start:]


def output_size(request: GenerationRequest, image: Image.Image) -> tuple[int, int]:
    """The request's size, or the init image's rounded down to a multiple of 8 (at least 64)."""
    width = request.width or max(64, image.width // 8 * 8)
    height = request.height or max(64, image.height // 8 * 8)
    return width, height


def noised_start(run: "Run", scheduler, image_latents: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """Fresh seeded noise added to image_latents at the first timestep (diffusers' img2img prepare_latents)."""
    noise = draw_noise(run.generators, tuple(image_latents.shape[1:]), device=run.device, dtype=run.dtype)
    if len(timesteps) == 0:  # strength too small for a single step: the VAE round trip
        return image_latents
    return scheduler.add_noise(image_latents, noise, timesteps[:1].repeat(len(image_latents)))


@dataclass
class Run:
    """One generation in progress: what was decided before the first step."""

    components: Components
    request: GenerationRequest
    choice: SamplerChoice
    seeds: list[int]
    width: int
    height: int
    conditioning: Conditioning
    generators: list[torch.Generator]
    hooks: StepHooks
    extensions: Extensions = field(default_factory=Extensions)
    # The UNet's extra inputs (inpainting mask, depth map); a mode that has its own replaces the model's default.
    input_channels: Extension | None = None
    timings: dict[str, float] = field(default_factory=dict)
    started: float = field(default_factory=time.perf_counter)
    infotext_extra: dict[str, Any] = field(default_factory=dict)
    _patches: ExitStack | None = None

    def __enter__(self) -> "Run":
        """Enter the extensions' run-wide patches (in order)."""
        self._patches = ExitStack()
        self._patches.enter_context(self.extensions.patched(self))
        return self

    def __exit__(self, *exc_info: object) -> None:
        """Undo the patches in reverse order, on success, error and cancel alike."""
        patches, self._patches = self._patches, None
        if patches is not None:
            patches.__exit__(*exc_info)

    @property
    def device(self) -> torch.device:
        return self.components.device

    @property
    def dtype(self) -> torch.dtype:
        """The latents' dtype: float32 whatever the models run in, so that the sampler's arithmetic over many
        steps keeps fp32 precision with a bf16/fp16 UNet (the model call casts its input and output)."""
        return torch.float32

    def latent_shape(self, width: int | None = None, height: int | None = None) -> tuple[int, int, int]:
        return self.components.latent_shape(width or self.width, height or self.height)

    def scheduler(self, steps: int) -> SchedulerMixin:
        """A fresh scheduler for this run's sampler with `steps` timesteps set."""
        scheduler = create_scheduler(self.choice, self.components.scheduler_config, seeds=self.seeds,
                                     family="sdxl" if self.components.is_xl else "sd")  # Align Your Steps' table
        set_timesteps(scheduler, self.choice, steps, self.device)  # a step count it cannot take is refused
        return scheduler

    def denoise(
        self,
        scheduler: SchedulerMixin,
        latents: torch.Tensor,
        timesteps: torch.Tensor | None = None,
        *,
        hooks: StepHooks | None = None,
        extensions: Iterable[Extension] = (),
        phase: str = "sampling",
    ) -> torch.Tensor:
        """The one loop, with this run's conditioning, generators, previews, input channels and extensions (and
        the pass's own `extensions`), and the caller's hooks after the mode's own (so that a progress callback sees
        the blended latents). A hook or extension name used twice is an error, never a silent replacement."""
        clock = time.perf_counter()
        merged = merge_hooks(self.hooks, hooks)
        pass_extensions = [self.input_channels] if self.input_channels is not None else []
        pass_extensions = self.extensions.merged([*pass_extensions, *extensions])
        # Under CPU offload the UNet stage borrows the UNet and the models its extensions call inside the loop
        # (ControlNets, adapters; the VAE for an inpainting UNet's default input channels).
        with lent(self.components.unet, *stage_models(pass_extensions)):
            latents = denoise(
                self.components.unet, scheduler, latents, self.conditioning, self.request.guidance_scale,
                timesteps=timesteps, generators=self.generators, hooks=merged,
                previewer=make_previewer(self.components), phase=phase,
                extensions=pass_extensions,
                guidance_min_timestep=self.request.guidance_min_timestep,
            )
        key = "denoise" if phase == "sampling" else f"denoise_{phase}"
        self.timings[key] = self.timings.get(key, 0.0) + time.perf_counter() - clock
        return latents

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        clock = time.perf_counter()
        pixels = decode(self.components.vae, latents, self.components.latent_scaling_factor).cpu()
        self.timings["decode"] = time.perf_counter() - clock
        return pixels

    def _vae_name(self) -> str | None:
        """The swapped-in VAE's file name, as A1111's "VAE" infotext entry (None: the model's own VAE)."""
        return Path(self.components.vae_source).name if self.components.vae_source else None

    def result(self, pixels: torch.Tensor, images: list[Image.Image] | None = None) -> GenerationResult:
        self.timings["total"] = time.perf_counter() - self.started
        return GenerationResult(
            images=images if images is not None else to_pil(pixels),
            pixels=pixels,
            seeds=self.seeds,
            infotexts=build_infotexts(self.request, self.choice, self.seeds, self.width, self.height,
                                      self.components.name, {**self.infotext_extra, **self.extensions.infotext()},
                                      model_hash=self.components.short_hash, vae=self._vae_name(),
                                      vae_hash=self.components.vae_short_hash, loras=self.components.lora_hashes,
                                      embeddings=used_embeddings(self.request, self.components)),
            request=self.request,
            timings=self.timings,
        )


def merge_hooks(caller: StepHooks, mode: StepHooks | None) -> StepHooks:
    """The caller's before-step hooks run first (cancel before any work), the mode's after-step hooks first (a
    progress callback sees the blended latents). A name in both is an error: no hook replaces another."""
    if mode is None:
        return caller
    for point in ("before_step", "after_step"):
        taken = set(getattr(caller, point)) & set(getattr(mode, point))
        if taken:
            raise ValueError(f"{point} hook name(s) {sorted(taken)} are the mode's own; give your hooks other names")
    return StepHooks(before_step={**caller.before_step, **mode.before_step},
                     after_step={**mode.after_step, **caller.after_step})


def begin_run(
    components: Components, request: GenerationRequest, hooks: StepHooks | None, width: int, height: int,
    extensions: Iterable[Extension] = (),
) -> Run:
    """Resolve the sampler and seeds, encode the prompts, and make the generators. Use the run as a context
    manager (`with begin_run(...) as run:`) so that the extensions' patches hold for exactly the run."""
    choice = resolve_sampler(request.sampler)
    seeds = batch_seeds(request.seed, request.batch_size)
    prompt, _ = extract_extra_networks(request.prompt)  # <lora:...> tags were applied to the weights already
    warn_unknown_words(prompt, request.negative_prompt, components.vocabulary)
    prompt, negative = expand_embeddings(prompt, components), expand_embeddings(request.negative_prompt, components)
    clock = time.perf_counter()
    with lent(components.text_encoder, components.text_encoder_2):  # the text-encoder stage (CPU offload)
        if components.is_xl:
            conditioning = encode_prompt_xl(
                (components.tokenizer, components.tokenizer_2), (components.text_encoder, components.text_encoder_2),
                prompt, negative, guidance_scale=request.guidance_scale, batch_size=len(seeds),
            ).with_time_ids(height, width)
        else:
            conditioning = encode_prompt(
                components.tokenizer, components.text_encoder, prompt, negative,
                guidance_scale=request.guidance_scale, batch_size=len(seeds),
            )
    run = Run(components, request, choice, seeds, width, height, conditioning, make_generators(seeds),
              hooks or StepHooks(), Extensions(extensions), default_input_channels(components))
    run.timings["encode_prompt"] = time.perf_counter() - clock
    return run


def expand_embeddings(text: str, components: Components) -> str:
    """Textual inversion: each installed embedding's name, as a whole word, becomes its placeholder tokens."""
    for name, placeholder in components.embedding_triggers.items():
        text = name_pattern(name).sub(placeholder, text)
    return text


def used_embeddings(request: GenerationRequest, components: Components) -> dict[str, str]:
    """name -> hash of the installed embeddings the prompt or negative prompt uses (A1111's "TI hashes")."""
    text = f"{request.prompt} {request.negative_prompt}"
    return {name: digest for name, digest in components.embedding_hashes.items() if name_pattern(name).search(text)}


def _format_number(value: float) -> str:
    return f"{value:g}"


def build_infotexts(
    request: GenerationRequest, choice: SamplerChoice, seeds: Sequence[int], width: int, height: int, model: str,
    extra: Mapping[str, Any] | None = None, model_hash: str | None = None, vae: str | None = None,
    vae_hash: str | None = None, loras: Mapping[str, str] | None = None,
    embeddings: Mapping[str, str] | None = None,
) -> list[str]:
    """A1111-style parameters text for each image (only the seed differs); `extra` holds the mode's entries
    (Denoising strength, Mask blur, Hires upscale, ...) in A1111's order, after Model."""
    texts = []
    lora_hashes = ", ".join(f"{name}: {digest}" for name, digest in (loras or {}).items()) or None
    ti_hashes = ", ".join(f"{name}: {digest}" for name, digest in (embeddings or {}).items()) or None
    for seed in seeds:
        parameters = {
            "Steps": request.steps,
            "Sampler": choice.spec.name,
            "Schedule type": None if choice.schedule_type == "Automatic" else choice.schedule_type,
            "CFG scale": _format_number(request.guidance_scale),
            "CFG min timestep": request.guidance_min_timestep or None,  # Dapple's own entry (guidance interval)
            "Seed": seed,
            "Size": f"{width}x{height}",
            "Model hash": model_hash,
            "Model": model,
            "VAE hash": vae_hash,
            "VAE": vae,
            "Lora hashes": lora_hashes,
            "TI hashes": ti_hashes,
            **{key: _format_number(value) if isinstance(value, float) else value
               for key, value in (extra or {}).items()},
            "Version": f"dapple {__version__}",
        }
        texts.append(format_infotext(request.prompt, request.negative_prompt, parameters))
    return texts
