"""Sampler registry: the names people know from AUTOMATIC1111 mapped onto diffusers' scheduler classes.

Dapple owns only the mapping; the sampling math is diffusers'. A sampler is a scheduler class plus config
overrides; a *schedule type* (A1111's list: "Automatic", "Karras", "SGM Uniform", "Beta"...) picks how the noise
levels are spaced (Karras et al., 2022, "Elucidating the Design Space of Diffusion-Based Generative Models", eq. 5,
for Karras), each as the diffusers setting that gives it: a timestep spacing (linspace, leading, trailing) for
every class, a sigma spacing for the classes with a sigma schedule. A1111's combined names such as "DPM++ 2M
Karras" are accepted as well. Unknown names, and combinations diffusers cannot honour, raise; never a fallback.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import diffusers
from diffusers.schedulers.scheduling_utils import SchedulerMixin

from dapple.errors import InvalidRequestError, UnknownSamplerError, did_you_mean

@dataclass(frozen=True)
class ScheduleType:
    """One of A1111's schedule types (its modules/sd_schedulers.py), as the diffusers scheduler config that gives
    the same spacing of noise levels. `name` is A1111's API name ("sgm_uniform"), `label` its display name."""

    name: str
    label: str
    config: Mapping[str, Any]
    aliases: tuple[str, ...] = ()
    default_rho: float = -1
    need_inner_model: bool = False
    description: str = ""
    sigmas: bool = False  # a spacing of sigmas (Karras...), which only classes with a sigma schedule can follow

    @property
    def names(self) -> tuple[str, ...]:
        return (self.label, self.name, *self.aliases)


# The sigma-spacing switches of diffusers' k-diffusion-style classes; a schedule type that sets one clears the others.
SIGMA_FLAGS = ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas")

SCHEDULE_TYPE_LIST: tuple[ScheduleType, ...] = (
    ScheduleType("automatic", "Automatic", {}, description="the model's own spacing (its scheduler config)"),
    ScheduleType("uniform", "Uniform", {"timestep_spacing": "linspace"}, need_inner_model=True,
                 description="timesteps evenly from the last to the first (k-diffusion's get_sigmas)"),
    ScheduleType("karras", "Karras", {"use_karras_sigmas": True}, default_rho=7.0, sigmas=True,
                 description="Karras et al. 2022, eq. 5 (rho 7)"),
    ScheduleType("exponential", "Exponential", {"use_exponential_sigmas": True}, sigmas=True,
                 description="sigmas evenly spaced in log sigma"),
    # k-diffusion's polyexponential at A1111's rho 1 is exp(linspace(log sigma_max, log sigma_min)): exponential.
    ScheduleType("polyexponential", "Polyexponential", {"use_exponential_sigmas": True}, default_rho=1.0,
                 sigmas=True, description="polyexponential at rho 1 (A1111's default), which is the exponential one"),
    ScheduleType("sgm_uniform", "SGM Uniform", {"timestep_spacing": "trailing"}, aliases=("SGMUniform",),
                 need_inner_model=True, description="timesteps evenly from the first, the last left out (trailing)"),
    # diffusers has no KL Optimal or Align Your Steps switch: its Karras switch with the spacing function swapped.
    ScheduleType("kl_optimal", "KL Optimal", {"use_karras_sigmas": True}, sigmas=True,
                 description="sigmas evenly spaced in arctan(sigma) (A1111's kl_optimal)"),
    ScheduleType("align_your_steps", "Align Your Steps", {"use_karras_sigmas": True}, sigmas=True,
                 description="Sabour et al. 2024's tabulated sigmas for SD 1.x and SDXL (align_your_steps_sigmas)"),
    ScheduleType("simple", "Simple", {"timestep_spacing": "trailing"}, need_inner_model=True,
                 description="every (1000/steps)-th timestep from the top (ComfyUI's simple; trailing)"),
    ScheduleType("normal", "Normal", {"timestep_spacing": "linspace"}, need_inner_model=True,
                 description="timesteps evenly from sigma_max's to sigma_min's (linspace)"),
    ScheduleType("ddim", "DDIM", {"timestep_spacing": "leading"}, need_inner_model=True,
                 description="every (1000/steps)-th timestep from the model's offset up (DDIM's leading spacing)"),
    ScheduleType("beta", "Beta", {"use_beta_sigmas": True}, need_inner_model=True, sigmas=True,
                 description="Lee et al. 2024, beta(0.6, 0.6) spacing of timesteps"),
)
# Label -> the scheduler init arguments that switch it on ("Automatic" keeps the model's own spacing).
SCHEDULE_TYPES: dict[str, dict[str, Any]] = {kind.label: dict(kind.config) for kind in SCHEDULE_TYPE_LIST}
_SCHEDULE_BY_NAME: dict[str, ScheduleType] = {
    key.casefold(): kind for kind in SCHEDULE_TYPE_LIST for key in kind.names
}
# The schedule types that older A1111 versions folded into sampler names ("DPM++ 2M Karras"); sampler_names()
# lists these combined forms, resolve_sampler accepts every "<sampler> <schedule type>" combination.
COMBINED_NAME_TYPES = ("Karras", "Exponential")


def _beta_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("scipy") is not None  # diffusers' beta sigmas use scipy.stats


@dataclass(frozen=True)
class SamplerSpec:
    """One user-facing sampler: a diffusers scheduler class and the config that makes it that sampler."""

    name: str
    class_name: str
    config: Mapping[str, Any] = field(default_factory=dict)
    aliases: tuple[str, ...] = ()
    description: str = ""
    defaults: Mapping[str, Any] = field(default_factory=dict)  # config a model's scheduler config may override

    @property
    def scheduler_class(self) -> type[SchedulerMixin]:
        return getattr(diffusers, self.class_name)

    @property
    def schedule_types(self) -> list[str]:
        """The schedule types this sampler follows: timestep spacings for every class; sigma spacings (Karras,
        Exponential, Beta, KL Optimal, Align Your Steps) for the classes with a sigma schedule (diffusers'
        switch, or Dapple's subclasses below where diffusers has none)."""
        params = inspect.signature(self.scheduler_class.__init__).parameters
        sigma_based = all(flag in params for flag in SIGMA_FLAGS) or self.name in SIGMA_SPACED
        kinds = []
        for kind in SCHEDULE_TYPE_LIST:
            if kind.sigmas and not sigma_based:
                continue
            if kind.label == "Beta" and not _beta_available():
                continue
            if all(key in params for key in kind.config) or (kind.sigmas and self.name in SIGMA_SPACED):
                kinds.append(kind.label)
        return kinds


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
    # PLMS as the original SD repo (and A1111) run it starts with lower-order multistep steps, not PNDM's
    # Runge-Kutta warm-up (which needs 4 steps at least): skip_prk_steps, unless the model's config says otherwise.
    SamplerSpec("PNDM", "PNDMScheduler", aliases=("PLMS", "plms", "pndm"), defaults={"skip_prk_steps": True},
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
    """The samplers and the combined "<sampler> <schedule type>" names older A1111 versions listed ("DPM++ 2M
    Karras"); resolve_sampler takes every other combination (spec.schedule_types) as well."""
    names = []
    for spec in SAMPLERS:
        names.append(spec.name)
        names += [f"{spec.name} {kind}" for kind in spec.schedule_types if kind in COMBINED_NAME_TYPES]
    return names


def find_schedule_type(name: str) -> ScheduleType | None:
    """A schedule type by its label, A1111 API name or alias, in any case ("Karras", "karras", "SGMUniform")."""
    return _SCHEDULE_BY_NAME.get(name.strip().casefold())


def _split_combined(name: str) -> tuple[SamplerSpec, ScheduleType] | None:
    """A combined name such as "DPM++ 2M Karras" or "Euler a sgm_uniform" -> its sampler and schedule type."""
    stripped = name.strip()
    for kind in SCHEDULE_TYPE_LIST:
        for option in kind.names:
            if stripped.casefold().endswith(" " + option.casefold()):
                spec = _BY_NAME.get(stripped[: -len(option) - 1].strip().casefold())
                if spec is not None:
                    return spec, kind
    return None


def _why_not(spec: SamplerSpec, kind: ScheduleType) -> str:
    if kind.label == "Beta" and not _beta_available():
        return "diffusers' beta sigmas need scipy (pip install scipy)"
    return f"{spec.class_name} steps by timesteps, not by a sigma schedule"


def resolve_sampler(name: str, schedule_type: str | None = None) -> SamplerChoice:
    """Map a user-facing sampler name (and optional schedule type: a label such as "SGM Uniform", or A1111's API
    name such as "sgm_uniform") to a SamplerChoice, or raise."""
    key = name.strip().casefold()
    spec = _BY_NAME.get(key)
    if spec is None:  # a combined alias such as "DPM++ 2M Karras"
        combined = _split_combined(name)
        if combined is not None:
            given = None if schedule_type is None else find_schedule_type(schedule_type)
            if given is not None and given.label not in ("Automatic", combined[1].label):
                raise UnknownSamplerError(f"sampler {name!r} names schedule type {combined[1].label} but "
                                          f"schedule type {schedule_type!r} was asked for; give one of them")
            spec, schedule_type = combined[0], combined[1].label
    if spec is None:
        raise UnknownSamplerError(f"unknown sampler {name!r}; valid samplers: {', '.join(sampler_names())}"
                                  f"{did_you_mean(name, sampler_names())}")
    kind = find_schedule_type("Automatic" if schedule_type is None else schedule_type)
    if kind is None:
        labels = [kind.label for kind in SCHEDULE_TYPE_LIST]
        raise UnknownSamplerError(f"unknown schedule type {schedule_type!r}; valid schedule types: "
                                  f"{', '.join(labels)}{did_you_mean(schedule_type, labels)}")
    if kind.label not in spec.schedule_types:
        raise UnknownSamplerError(
            f"schedule type {schedule_type!r} is not available for {spec.name} ({_why_not(spec, kind)}); "
            f"valid: {', '.join(spec.schedule_types)}"
        )
    return SamplerChoice(spec, kind.label)


def kl_optimal_sigmas(self: SchedulerMixin, in_sigmas: Any, num_inference_steps: int | None = None) -> Any:
    """A1111's KL Optimal schedule, in the place of a diffusers class's _convert_to_karras (same arguments, same
    sigma_min/sigma_max: the config's, else the ends of in_sigmas): sigma_i = tan(i/n * atan(sigma_min) +
    (1 - i/n) * atan(sigma_max)) for i = 0..n-1, the first n of A1111's n + 1 (whose last, sigma_min, is the 0
    that every diffusers schedule ends on here)."""
    import numpy as np

    steps = num_inference_steps or self.num_inference_steps
    sigma_min = getattr(self.config, "sigma_min", None)
    sigma_max = getattr(self.config, "sigma_max", None)
    sigma_min = float(sigma_min if sigma_min is not None else in_sigmas[-1])
    sigma_max = float(sigma_max if sigma_max is not None else in_sigmas[0])
    fraction = np.arange(steps) / steps
    return np.tan(fraction * np.arctan(sigma_min) + (1 - fraction) * np.arctan(sigma_max))


# Align Your Steps (Sabour et al., 2024, "Align Your Steps: Optimizing Sampling Schedules in Diffusion Models"):
# NVIDIA's optimized 10-step sigmas per model family, as A1111 tabulates them (modules/sd_schedulers.py).
ALIGN_YOUR_STEPS_SIGMAS = {
    "sd": (14.615, 6.475, 3.861, 2.697, 1.886, 1.396, 0.963, 0.652, 0.399, 0.152, 0.029),
    "sdxl": (14.615, 6.315, 3.771, 2.181, 1.342, 0.862, 0.555, 0.380, 0.234, 0.113, 0.029),
}


def align_your_steps_sigmas(self: SchedulerMixin, in_sigmas: Any, num_inference_steps: int | None = None) -> Any:
    """Align Your Steps for the subclass's model family (`ays_table`), in the place of _convert_to_karras: the
    table itself for 11 steps, else its log-linear interpolation to n steps, as A1111's loglinear_interp. The
    tables are absolute sigmas of SD's noise schedule (sigma_max 14.615): a model on another schedule (a
    zero-terminal-SNR one's first sigma is 4096) is refused rather than started from the wrong noise level."""
    import numpy as np

    steps = num_inference_steps or self.num_inference_steps
    table = np.array(self.ays_table, dtype=np.float64)
    model_max = float(((1 - self.alphas_cumprod[-1]) / self.alphas_cumprod[-1]) ** 0.5)
    if abs(model_max / table[0] - 1) > 0.01:
        raise InvalidRequestError(
            f"schedule type 'Align Your Steps' is tabulated for SD 1.x/SDXL's noise schedule (first sigma "
            f"{table[0]}); this model's first sigma is {model_max:.4g}: use another schedule type")
    if steps == len(table):
        return table
    log_sigmas = np.interp(np.linspace(0, 1, steps), np.linspace(0, 1, len(table)), np.log(table[::-1]))
    return np.exp(log_sigmas)[::-1].copy()


SPACING_FUNCTIONS = {"kl_optimal": kl_optimal_sigmas, "align_your_steps": align_your_steps_sigmas}


class _SigmaSpacedEulerAncestral(diffusers.EulerAncestralDiscreteScheduler):
    """Euler a on a Karras, exponential, beta, KL Optimal or Align Your Steps spacing of sigmas (diffusers' Euler
    a has no such switch).

    The sigmas are diffusers' Euler's for the same switch (its _convert_to_* on the spaced sigmas) and the
    timesteps the UNet sees are the ones those sigmas belong to (its _sigma_to_t), as EulerDiscreteScheduler
    computes them; the ancestral step itself is diffusers' unchanged. `spacing` is set by the subclasses."""

    spacing = ""
    ays_table: tuple[float, ...] = ALIGN_YOUR_STEPS_SIGMAS["sd"]

    def set_timesteps(self, num_inference_steps: int, device: Any = None) -> None:
        import numpy as np
        import torch

        super().set_timesteps(num_inference_steps, device=device)
        euler = diffusers.EulerDiscreteScheduler
        convert = {"karras": euler._convert_to_karras, "exponential": euler._convert_to_exponential,
                   "beta": euler._convert_to_beta, **SPACING_FUNCTIONS}[self.spacing]
        log_sigmas = np.log(np.array(((1 - self.alphas_cumprod) / self.alphas_cumprod) ** 0.5))
        sigmas = np.asarray(convert(self, in_sigmas=self.sigmas[:-1].numpy(),
                                    num_inference_steps=num_inference_steps), dtype=np.float64)
        timesteps = np.array([euler._sigma_to_t(self, sigma, log_sigmas) for sigma in sigmas], dtype=np.float32)
        self.sigmas = torch.from_numpy(np.concatenate([sigmas, [0.0]]).astype(np.float32))  # kept on the CPU
        self.timesteps = torch.from_numpy(timesteps).to(device=device)
        self._step_index = None
        self._begin_index = None


# Samplers whose diffusers class lacks the sigma switches: _SigmaSpacedEulerAncestral's subclasses space them.
SIGMA_SPACED = {"Euler a": _SigmaSpacedEulerAncestral}
_RESPACED: dict[tuple[type, str, str], type] = {}


def _respaced_class(base: type[SchedulerMixin], spacing: str, family: str) -> type[SchedulerMixin]:
    """`base` on a spacing diffusers has no switch for: Euler a's subclass with that spacing, or a class's Karras
    switch with the spacing function swapped in (one subclass per class, spacing and model family)."""
    key = (base, spacing, family)
    if key not in _RESPACED:
        attrs: dict[str, Any] = {"ays_table": ALIGN_YOUR_STEPS_SIGMAS[family], "__module__": __name__}
        if issubclass(base, _SigmaSpacedEulerAncestral):
            attrs["spacing"] = spacing
            name = f"EulerAncestral{spacing.title().replace('_', '')}Scheduler"
        else:
            attrs["_convert_to_karras"] = SPACING_FUNCTIONS[spacing]
            name = f"{base.__name__.removesuffix('Scheduler')}{spacing.title().replace('_', '')}Scheduler"
        _RESPACED[key] = type(name, (base,), attrs)
    return _RESPACED[key]


def create_scheduler(
    choice: SamplerChoice | str,
    base_config: Mapping[str, Any],
    *,
    seeds: Sequence[int] | None = None,
    family: str = "sd",
) -> SchedulerMixin:
    """A fresh scheduler for one run (schedulers keep per-run state, so never share one between runs).

    base_config is the model's scheduler config (its noise schedule); the sampler's overrides go on top.
    seeds make samplers with their own noise source (DPM++ SDE's Brownian tree) reproducible per image.
    family ("sd" or "sdxl") picks Align Your Steps' table, as A1111 does by the model's kind.
    """
    if isinstance(choice, str):
        choice = resolve_sampler(choice)
    spec = choice.spec
    scheduler_class = spec.scheduler_class
    kind_config = dict(SCHEDULE_TYPES[choice.schedule_type])
    params = inspect.signature(scheduler_class.__init__).parameters
    if choice.schedule_type != "Automatic":  # one sigma spacing, not the model config's as well
        kind_config = {**{flag: False for flag in SIGMA_FLAGS if flag in params}, **kind_config}
    kind = find_schedule_type(choice.schedule_type)
    flag = next((key for key in kind_config if key in SIGMA_FLAGS and key not in params), None)
    if flag is not None:  # e.g. Euler a Karras: diffusers' class has no switch; Dapple's subclass spaces it
        spacing = kind.name if kind.name in SPACING_FUNCTIONS else flag[4:].removesuffix("_sigmas")
        scheduler_class = _respaced_class(SIGMA_SPACED[spec.name], spacing, family)
        kind_config.pop(flag)
    elif kind.name in SPACING_FUNCTIONS:  # the class's Karras switch, with this spacing's function in its place
        scheduler_class = _respaced_class(scheduler_class, kind.name, family)
    overrides: dict[str, Any] = {**spec.config, **kind_config}
    if seeds is not None and "noise_sampler_seed" in params:
        overrides["noise_sampler_seed"] = list(seeds)
    # Keep only what this class takes: a PNDM config's skip_prk_steps means nothing to LCM (and would be logged).
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    config = {k: v for k, v in dict(base_config).items() if not k.startswith("_") and (takes_any or k in params)}
    config.update({k: v for k, v in spec.defaults.items() if k not in config and (takes_any or k in params)})
    if base_config.get("rescale_betas_zero_snr") and "rescale_betas_zero_snr" not in params:
        config["trained_betas"] = zero_terminal_snr_betas(base_config)
    return scheduler_class.from_config(config, **overrides)


def set_timesteps(scheduler: SchedulerMixin, choice: SamplerChoice, steps: int, device: Any = None) -> None:
    """scheduler.set_timesteps(steps), refusing (InvalidRequestError, never a crash or a NaN image) a step count
    the sampler cannot take on this schedule: PNDM's Runge-Kutta warm-up below 4 steps, or a schedule whose
    timesteps or sigmas are not finite (DPM2 a's ancestral step from a zero-terminal-SNR model's first sigma
    straight to its last makes diffusers' interpolated sigma 0 and its timestep NaN)."""
    import torch

    def refuse(reason: str) -> InvalidRequestError:
        return InvalidRequestError(f"steps={steps} is not possible with sampler {choice.label!r} on this model's "
                                   f"schedule: {reason}; use more steps or another sampler or schedule type")

    if getattr(scheduler.config, "skip_prk_steps", True) is False and steps < 4:
        raise refuse("PNDM's Runge-Kutta warm-up (skip_prk_steps false in the model's scheduler config) needs "
                     "at least 4 steps")
    try:
        scheduler.set_timesteps(steps, device=device)
    except InvalidRequestError:
        raise
    except (ValueError, IndexError, ZeroDivisionError) as error:
        raise refuse(f"diffusers' {type(scheduler).__name__} says: {error}") from None
    for name in ("timesteps", "sigmas"):
        values = getattr(scheduler, name, None)
        if isinstance(values, torch.Tensor) and not torch.isfinite(values.float()).all():
            raise refuse(f"diffusers' {type(scheduler).__name__} makes non-finite {name} for it")


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
