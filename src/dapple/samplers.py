"""Sampler registry: the names people know from AUTOMATIC1111 mapped onto diffusers' scheduler classes.

Dapple owns only the mapping; the sampling math is diffusers'. A sampler is a scheduler class plus config
overrides; a *schedule type* ("Automatic", "Karras", "Exponential") picks how the noise levels are spaced
(Karras et al., 2022, "Elucidating the Design Space of Diffusion-Based Generative Models", eq. 5, for Karras).
A1111's combined names such as "DPM++ 2M Karras" are accepted as well. Unknown names raise, never fall back.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import diffusers
from diffusers.schedulers.scheduling_utils import SchedulerMixin

from dapple.errors import UnknownSamplerError

# Schedule type -> the scheduler init argument that switches it on ("Automatic" keeps the model's own spacing).
SCHEDULE_TYPES: dict[str, dict[str, Any]] = {
    "Automatic": {},
    "Karras": {"use_karras_sigmas": True},
    "Exponential": {"use_exponential_sigmas": True},
}


@dataclass(frozen=True)
class SamplerSpec:
    """One user-facing sampler: a diffusers scheduler class and the config that makes it that sampler."""

    name: str
    class_name: str
    config: Mapping[str, Any] = field(default_factory=dict)
    aliases: tuple[str, ...] = ()
    description: str = ""

    @property
    def scheduler_class(self) -> type[SchedulerMixin]:
        return getattr(diffusers, self.class_name)

    @property
    def schedule_types(self) -> list[str]:
        """The schedule types this scheduler class implements."""
        params = inspect.signature(self.scheduler_class.__init__).parameters
        return [name for name, flags in SCHEDULE_TYPES.items() if all(key in params for key in flags)]


SAMPLERS: tuple[SamplerSpec, ...] = (
    SamplerSpec("Euler", "EulerDiscreteScheduler", aliases=("k_euler",),
                description="Euler method on the probability-flow ODE (Karras et al. 2022, Alg. 2 without churn)"),
    SamplerSpec("Euler a", "EulerAncestralDiscreteScheduler", aliases=("k_euler_a", "k_euler_ancestral"),
                description="Euler with ancestral noise at each step"),
    SamplerSpec("Heun", "HeunDiscreteScheduler", aliases=("k_heun",),
                description="Heun's 2nd-order method (Karras et al. 2022, Alg. 1); two model calls a step"),
    SamplerSpec("LMS", "LMSDiscreteScheduler", aliases=("k_lms",), description="linear multistep (k-diffusion)"),
    SamplerSpec("DDIM", "DDIMScheduler", aliases=("ddim",),
                description="denoising diffusion implicit models (Song et al. 2020), eta = 0"),
    SamplerSpec("PNDM", "PNDMScheduler", aliases=("PLMS", "plms", "pndm"),
                description="pseudo numerical methods (Liu et al. 2022); PLMS in the original SD repo"),
    SamplerSpec("DDPM", "DDPMScheduler", aliases=("ddpm",),
                description="ancestral sampling of Ho et al. 2020, with fewer steps"),
    SamplerSpec("DPM++ 2M", "DPMSolverMultistepScheduler", aliases=("k_dpmpp_2m",),
                description="DPM-Solver++ (Lu et al. 2022), 2nd-order multistep"),
    SamplerSpec("DPM++ 2M SDE", "DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++"},
                aliases=("k_dpmpp_2m_sde",), description="DPM-Solver++ 2M, SDE variant"),
    SamplerSpec("DPM++ SDE", "DPMSolverSDEScheduler", aliases=("k_dpmpp_sde",),
                description="DPM-Solver++ stochastic with Brownian-tree noise (needs torchsde)"),
    SamplerSpec("DPM2", "KDPM2DiscreteScheduler", aliases=("k_dpm_2",),
                description="DPM-Solver-2 (k-diffusion); two model calls a step"),
    SamplerSpec("DPM2 a", "KDPM2AncestralDiscreteScheduler", aliases=("k_dpm_2_a",),
                description="DPM-Solver-2 with ancestral noise"),
    SamplerSpec("UniPC", "UniPCMultistepScheduler", aliases=("unipc",),
                description="unified predictor-corrector (Zhao et al. 2023)"),
    SamplerSpec("DEIS", "DEISMultistepScheduler", aliases=("deis",),
                description="diffusion exponential integrator sampler (Zhang & Chen 2022)"),
    SamplerSpec("LCM", "LCMScheduler", aliases=("k_lcm", "lcm"),
                description="latent consistency models (Luo et al. 2023); for LCM-distilled weights"),
)

_BY_NAME: dict[str, SamplerSpec] = {}
for _spec in SAMPLERS:
    for _key in (_spec.name, *_spec.aliases):
        _BY_NAME[_key.casefold()] = _spec


@dataclass(frozen=True)
class SamplerChoice:
    """A resolved sampler and schedule type, e.g. ("DPM++ 2M", "Karras")."""

    spec: SamplerSpec
    schedule_type: str = "Automatic"

    @property
    def label(self) -> str:
        return self.spec.name if self.schedule_type == "Automatic" else f"{self.spec.name} {self.schedule_type}"


def sampler_names() -> list[str]:
    """Every accepted name: samplers and the combined "<sampler> <schedule type>" forms."""
    names = []
    for spec in SAMPLERS:
        names.append(spec.name)
        names += [f"{spec.name} {kind}" for kind in spec.schedule_types if kind != "Automatic"]
    return names


def _schedule_type(name: str) -> str | None:
    return next((kind for kind in SCHEDULE_TYPES if kind.casefold() == name.strip().casefold()), None)


def resolve_sampler(name: str, schedule_type: str | None = None) -> SamplerChoice:
    """Map a user-facing sampler name (and optional schedule type) to a SamplerChoice, or raise."""
    key = name.strip().casefold()
    spec = _BY_NAME.get(key)
    if spec is None:  # a combined alias such as "DPM++ 2M Karras"
        base, _, suffix = name.strip().rpartition(" ")
        suffix_type = _schedule_type(suffix)
        if suffix_type and base.casefold() in _BY_NAME and schedule_type in (None, "Automatic", suffix_type):
            spec, schedule_type = _BY_NAME[base.casefold()], suffix_type
    if spec is None:
        raise UnknownSamplerError(f"unknown sampler {name!r}; valid samplers: {', '.join(sampler_names())}")
    kind = "Automatic" if schedule_type is None else _schedule_type(schedule_type)
    if kind is None or kind not in spec.schedule_types:
        raise UnknownSamplerError(
            f"schedule type {schedule_type!r} is not available for {spec.name}; "
            f"valid: {', '.join(spec.schedule_types)}"
        )
    return SamplerChoice(spec, kind)


def create_scheduler(
    choice: SamplerChoice | str,
    base_config: Mapping[str, Any],
    *,
    seeds: Sequence[int] | None = None,
) -> SchedulerMixin:
    """A fresh scheduler for one run (schedulers keep per-run state, so never share one between runs).

    base_config is the model's scheduler config (its noise schedule); the sampler's overrides go on top.
    seeds make samplers with their own noise source (DPM++ SDE's Brownian tree) reproducible per image.
    """
    if isinstance(choice, str):
        choice = resolve_sampler(choice)
    spec = choice.spec
    overrides: dict[str, Any] = {**spec.config, **SCHEDULE_TYPES[choice.schedule_type]}
    params = inspect.signature(spec.scheduler_class.__init__).parameters
    if seeds is not None and "noise_sampler_seed" in params:
        overrides["noise_sampler_seed"] = list(seeds)
    # Keep only what this class takes: a PNDM config's skip_prk_steps means nothing to LCM (and would be logged).
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    config = {k: v for k, v in dict(base_config).items() if not k.startswith("_") and (takes_any or k in params)}
    if base_config.get("rescale_betas_zero_snr") and "rescale_betas_zero_snr" not in params:
        config["trained_betas"] = zero_terminal_snr_betas(base_config)
    return spec.scheduler_class.from_config(config, **overrides)


# The last alpha_bar of a zero-terminal-SNR schedule as samplers use it: 0 would make its sigma infinite.
ZERO_SNR_LAST_ALPHA_BAR = 2**-24


def zero_terminal_snr_betas(config: Mapping[str, Any]) -> list[float]:
    """The betas of a zero-terminal-SNR schedule (Lin et al., 2024, Algorithm 1), for scheduler classes that cannot
    rescale their own (Heun, LMS, PNDM, DPM2, DEIS...): passed as trained_betas, they give those samplers the
    schedule the model was trained on. The last alpha_bar is 2**-24 instead of 0, as diffusers' Euler keeps it,
    so that the first sigma is finite."""
    import torch
    from diffusers import DDPMScheduler

    keys = ("beta_start", "beta_end", "beta_schedule", "num_train_timesteps")
    schedule = DDPMScheduler(**{k: config[k] for k in keys if k in config}, rescale_betas_zero_snr=True)
    alphas_cumprod = schedule.alphas_cumprod.double().clone()
    alphas_cumprod[-1] = ZERO_SNR_LAST_ALPHA_BAR
    previous = torch.cat([torch.ones(1, dtype=torch.float64), alphas_cumprod[:-1]])
    return (1 - alphas_cumprod / previous).tolist()
