"""The sampler registry: A1111 names and aliases -> diffusers scheduler classes and configs."""

import re

import pytest
from diffusers import (
    DPMSolverMultistepScheduler,
    DPMSolverSDEScheduler,
    EulerAncestralDiscreteScheduler,
    LCMScheduler,
    PNDMScheduler,
)

from dapple.errors import UnknownSamplerError
from dapple.models.tiny import SD15_SCHEDULER_CONFIG
from dapple.samplers import SAMPLERS, create_scheduler, resolve_sampler, sampler_names

REQUIRED = ["Euler", "Euler a", "Heun", "LMS", "DDIM", "PNDM", "DDPM", "DPM++ 2M", "DPM++ 2M SDE", "DPM++ SDE",
            "DPM2", "DPM2 a", "UniPC", "DEIS", "LCM"]


def test_every_required_sampler_is_registered() -> None:
    assert set(REQUIRED) <= {spec.name for spec in SAMPLERS}


def test_combined_alias_splits_into_sampler_and_schedule_type() -> None:
    choice = resolve_sampler("DPM++ 2M Karras")
    assert (choice.spec.name, choice.schedule_type) == ("DPM++ 2M", "Karras")
    assert resolve_sampler("DPM++ 2M", "Karras") == choice
    assert resolve_sampler("dpm++ 2m sde exponential").schedule_type == "Exponential"


def test_a1111_aliases_resolve() -> None:
    assert resolve_sampler("k_euler_a").spec.name == "Euler a"
    assert resolve_sampler("PLMS").spec.name == "PNDM"
    assert resolve_sampler("k_dpmpp_2m").spec.name == "DPM++ 2M"


def test_unknown_sampler_lists_the_valid_names() -> None:
    with pytest.raises(UnknownSamplerError, match="unknown sampler 'Euler b'; valid samplers: Euler, .*DPM\\+\\+ 2M"):
        resolve_sampler("Euler b")


def test_schedule_type_the_class_lacks_is_an_error() -> None:
    with pytest.raises(UnknownSamplerError, match=r"not available for DDIM \(DDIMScheduler steps by timesteps, "
                       r"not by a sigma schedule\); valid: Automatic, Uniform, SGM Uniform, Simple, Normal, DDIM$"):
        resolve_sampler("DDIM Karras")
    with pytest.raises(UnknownSamplerError, match="unknown schedule type 'Karas'; valid schedule types: Automatic, "
                       "Uniform, Karras, Exponential, Polyexponential, SGM Uniform, KL Optimal"):
        resolve_sampler("Euler", "Karas")
    with pytest.raises(UnknownSamplerError, match="names schedule type Karras but schedule type 'Exponential'"):
        resolve_sampler("DPM++ 2M Karras", "Exponential")


@pytest.mark.parametrize(
    ("name", "cls", "config"),
    [
        ("DPM++ 2M Karras", DPMSolverMultistepScheduler, {"use_karras_sigmas": True, "algorithm_type": "dpmsolver++"}),
        ("DPM++ 2M SDE", DPMSolverMultistepScheduler, {"algorithm_type": "sde-dpmsolver++"}),
        ("Euler a", EulerAncestralDiscreteScheduler, {}),
        ("PNDM", PNDMScheduler, {"skip_prk_steps": True}),
        ("LCM", LCMScheduler, {}),
    ],
)
def test_create_scheduler_builds_the_class_on_the_models_schedule(name, cls, config) -> None:
    scheduler = create_scheduler(name, SD15_SCHEDULER_CONFIG)
    assert type(scheduler) is cls
    assert scheduler.config.beta_schedule == "scaled_linear"
    assert scheduler.config.beta_end == pytest.approx(0.012)
    for key, value in config.items():
        assert scheduler.config[key] == value


def test_seeds_reach_the_brownian_tree_of_dpmpp_sde() -> None:
    scheduler = create_scheduler("DPM++ SDE", SD15_SCHEDULER_CONFIG, seeds=[7, 8])
    assert isinstance(scheduler, DPMSolverSDEScheduler)
    assert scheduler.noise_sampler_seed == [7, 8]


def test_every_listed_name_resolves_and_builds() -> None:
    for name in sampler_names():
        assert create_scheduler(name, SD15_SCHEDULER_CONFIG) is not create_scheduler(name, SD15_SCHEDULER_CONFIG)


ZERO_SNR_V = {**SD15_SCHEDULER_CONFIG, "prediction_type": "v_prediction", "rescale_betas_zero_snr": True,
              "timestep_spacing": "trailing", "steps_offset": 0}


@pytest.mark.parametrize("name", [spec.name for spec in SAMPLERS if spec.name != "LCM"])
def test_every_sampler_runs_a_zero_terminal_snr_model_on_its_own_schedule(name) -> None:
    """Classes that cannot rescale their betas get the rescaled ones as trained_betas: the same alpha_bar as
    diffusers' own zero-SNR schedulers, sampling from t=999, and finite numbers all the way down."""
    import torch
    from diffusers import DDPMScheduler

    reference = DDPMScheduler(**{k: SD15_SCHEDULER_CONFIG[k] for k in ("beta_start", "beta_end", "beta_schedule")},
                              rescale_betas_zero_snr=True).alphas_cumprod
    scheduler = create_scheduler(name, ZERO_SNR_V, seeds=[0])
    assert torch.allclose(scheduler.alphas_cumprod[:-1], reference[:-1], atol=1e-6)
    # x_T is pure noise (up to the first finite sigma): 2**-24, within float32's rounding of the cumulative product
    assert float(scheduler.alphas_cumprod[-1]) <= 2**-24 * (1 + 1e-6)
    scheduler.set_timesteps(8)
    assert int(scheduler.timesteps[0]) == 999
    sample = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0)) * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        model_input = scheduler.scale_model_input(sample, t)
        velocity = -0.5 * model_input  # any smooth model output will do: the numbers must stay finite
        sample = scheduler.step(velocity, t, sample).prev_sample
    assert torch.isfinite(sample).all()
    assert float(sample.abs().max()) < 100


def test_a_plain_schedule_gets_no_trained_betas() -> None:
    assert create_scheduler("Heun", SD15_SCHEDULER_CONFIG).config.trained_betas is None


# A1111's schedule types (modules/sd_schedulers.py): label, API name, the diffusers setting that gives the spacing.
A1111_SCHEDULE_TYPES = [
    ("Automatic", "automatic", {}), ("Uniform", "uniform", {"timestep_spacing": "linspace"}),
    ("Karras", "karras", {"use_karras_sigmas": True}), ("Exponential", "exponential", {"use_exponential_sigmas": True}),
    ("Polyexponential", "polyexponential", {"use_exponential_sigmas": True}),
    ("SGM Uniform", "sgm_uniform", {"timestep_spacing": "trailing"}), ("KL Optimal", "kl_optimal", {"use_karras_sigmas": True}),
    ("Align Your Steps", "align_your_steps", {"use_karras_sigmas": True}), ("Simple", "simple", {"timestep_spacing": "trailing"}),
    ("Normal", "normal", {"timestep_spacing": "linspace"}), ("DDIM", "ddim", {"timestep_spacing": "leading"}),
    ("Beta", "beta", {"use_beta_sigmas": True}),
]
TIMESTEP_SAMPLERS = ("DDIM", "PNDM", "DDPM", "LCM")  # alpha-bar steppers: no sigma schedule to space


@pytest.mark.parametrize(("label", "api_name", "config"), A1111_SCHEDULE_TYPES)
def test_every_sampler_takes_every_a1111_schedule_type_or_refuses_it_by_name(label, api_name, config) -> None:
    """By its label, its API name or its combined form, each schedule type gives the diffusers setting it means,
    for every sampler; a combination diffusers cannot honour is refused naming what that sampler allows."""
    sigma_based = label in ("Karras", "Exponential", "Polyexponential", "Beta", "KL Optimal", "Align Your Steps")
    for spec in SAMPLERS:
        honoured = config is not None and not (sigma_based and spec.name in TIMESTEP_SAMPLERS)
        for asked in ((spec.name, label), (spec.name, api_name), (f"{spec.name} {label}", None),
                      (f"{spec.name.lower()} {api_name}", None)):
            if not honoured:
                with pytest.raises(UnknownSamplerError, match=f"not available for {re.escape(spec.name)} .*; valid: Automatic, "
                                   "Uniform"):
                    resolve_sampler(*asked)
                continue
            choice = resolve_sampler(*asked)
            assert (choice.spec.name, choice.schedule_type) == (spec.name, label)
            scheduler = create_scheduler(choice, SD15_SCHEDULER_CONFIG)
            for key, value in config.items():
                if spec.name == "Euler a" and key.startswith("use_"):  # diffusers' Euler a has no such switch
                    assert type(scheduler).spacing == (api_name if label in ("KL Optimal", "Align Your Steps") else
                                                       key.removeprefix("use_").removesuffix("_sigmas"))
                else:
                    assert scheduler.config[key] == value
            # one spacing at a time: the other sigma switches are off
            for flag in ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas"):
                if flag in scheduler.config and flag not in config and label != "Automatic":
                    assert scheduler.config[flag] is False


def test_a_schedule_type_overrides_the_model_configs_own_spacing() -> None:
    karras_model = {**SD15_SCHEDULER_CONFIG, "use_karras_sigmas": True}
    assert create_scheduler("DPM++ 2M", karras_model).config.use_karras_sigmas is True  # Automatic keeps it
    normal = create_scheduler(resolve_sampler("DPM++ 2M", "Normal"), karras_model)
    assert (normal.config.use_karras_sigmas, normal.config.timestep_spacing) == (False, "linspace")
    beta = create_scheduler(resolve_sampler("DPM++ 2M", "beta"), karras_model)
    assert (beta.config.use_karras_sigmas, beta.config.use_beta_sigmas) == (False, True)


@pytest.mark.parametrize("spacing", ["Karras", "Exponential", "Beta"])
def test_euler_a_follows_the_same_sigmas_and_timesteps_as_diffusers_euler(spacing) -> None:
    """diffusers' Euler a has no sigma switches: Dapple's subclass spaces it exactly as diffusers' Euler does."""
    import torch

    ancestral = create_scheduler(f"Euler a {spacing}", SD15_SCHEDULER_CONFIG)
    euler = create_scheduler(f"Euler {spacing}", SD15_SCHEDULER_CONFIG)
    assert isinstance(ancestral, EulerAncestralDiscreteScheduler)
    for steps in (1, 2, 7, 20):
        ancestral.set_timesteps(steps)
        euler.set_timesteps(steps)
        assert torch.allclose(ancestral.sigmas, euler.sigmas) and torch.allclose(ancestral.timesteps, euler.timesteps)
    plain = create_scheduler("Euler a", SD15_SCHEDULER_CONFIG)
    plain.set_timesteps(20)
    assert not torch.allclose(plain.sigmas, ancestral.sigmas)  # the spacing really changed
    assert float(ancestral.init_noise_sigma) == pytest.approx(float((ancestral.sigmas.max() ** 2 + 1) ** 0.5))


def test_pndm_skips_the_runge_kutta_warm_up_unless_the_model_config_asks_for_it() -> None:
    """PLMS as SD and A1111 run it: a model config without skip_prk_steps (the built-in model's DDIM config) gets
    PLMS's warm-up; one that sets it false keeps PNDM's Runge-Kutta steps, which need 4 steps at least."""
    from dapple.errors import InvalidRequestError
    from dapple.samplers import set_timesteps

    without = {key: value for key, value in SD15_SCHEDULER_CONFIG.items() if key != "skip_prk_steps"}
    assert create_scheduler("PLMS", without).config.skip_prk_steps is True
    prk = create_scheduler("PLMS", {**SD15_SCHEDULER_CONFIG, "skip_prk_steps": False})
    assert prk.config.skip_prk_steps is False
    set_timesteps(prk, resolve_sampler("PLMS"), 4)
    assert len(prk.prk_timesteps) > 0
    with pytest.raises(InvalidRequestError, match="steps=3 is not possible with sampler 'PNDM'.*at least 4 steps"):
        set_timesteps(prk, resolve_sampler("PLMS"), 3)


@pytest.mark.parametrize("name", ["Euler", "Euler a", "DPM++ 2M", "LMS", "UniPC"])
def test_kl_optimal_sigmas_are_a1111s(name) -> None:
    """A1111's kl_optimal: sigma_i = tan(i/n atan(sigma_min) + (1 - i/n) atan(sigma_max)), i = 0..n-1, between the
    ends diffusers' Karras switch uses for that class, then 0; the timesteps are the ones those sigmas belong to."""
    import numpy as np
    import torch

    steps = 6
    karras = create_scheduler(resolve_sampler(name, "Karras"), SD15_SCHEDULER_CONFIG)
    karras.set_timesteps(steps)
    sigma_max, sigma_min = float(karras.sigmas[0]), float(karras.sigmas[-2])  # Karras's ends are the class's ends
    scheduler = create_scheduler(resolve_sampler(name, "kl_optimal"), SD15_SCHEDULER_CONFIG)
    scheduler.set_timesteps(steps)
    i = np.arange(steps) / steps
    expected = np.tan(i * np.arctan(sigma_min) + (1 - i) * np.arctan(sigma_max))
    assert np.allclose(scheduler.sigmas[:-1].numpy(), expected, rtol=1e-5)
    assert float(scheduler.sigmas[-1]) == 0.0
    assert not torch.allclose(scheduler.sigmas, karras.sigmas)
    assert (np.diff(scheduler.timesteps.numpy().astype(float)) < 0).all()
    assert isinstance(scheduler, type(create_scheduler(name, SD15_SCHEDULER_CONFIG)))


@pytest.mark.parametrize("name", ["Euler", "Euler a", "DPM++ 2M", "Heun", "UniPC"])
@pytest.mark.parametrize("family", ["sd", "sdxl"])
def test_align_your_steps_is_a1111s_table_for_the_model_family(name, family) -> None:
    """A1111's align_your_steps: NVIDIA's 11 sigmas for SD 1.5 or SDXL at 11 steps, their log-linear interpolation
    otherwise (A1111's loglinear_interp), then 0; SD 1.5's 10-step timesteps are NVIDIA's published ones."""
    import numpy as np

    from dapple.samplers import ALIGN_YOUR_STEPS_SIGMAS

    table = np.array(ALIGN_YOUR_STEPS_SIGMAS[family])
    scheduler = create_scheduler(resolve_sampler(name, "Align Your Steps"), SD15_SCHEDULER_CONFIG, family=family)
    scheduler.set_timesteps(11)
    assert np.allclose(np.unique(scheduler.sigmas.numpy())[::-1], np.append(table, 0.0), rtol=1e-4)
    scheduler.set_timesteps(6)
    xs, reference = np.linspace(0, 1, 11), np.log(table[::-1])
    expected = np.exp(np.interp(np.linspace(0, 1, 6), xs, reference))[::-1]
    assert np.allclose(np.unique(scheduler.sigmas.numpy())[::-1], np.append(expected, 0.0), rtol=1e-4)
    if family == "sd" and name in ("Euler", "DPM++ 2M"):
        # NVIDIA's SD 1.5 timesteps for its table (research.nvidia.com/labs/toronto-ai/AlignYourSteps); A1111, and
        # so Dapple, uses the 11-entry table as is at 11 steps (and interpolates it at any other count, 10 too).
        scheduler.set_timesteps(11)
        nvidia = [999, 850, 736, 645, 545, 455, 343, 233, 124, 24]
        assert np.abs(scheduler.timesteps.numpy()[:10].astype(float) - nvidia).max() <= 1.5


def test_align_your_steps_refuses_a_model_on_another_noise_schedule() -> None:
    from dapple.errors import InvalidRequestError
    from dapple.samplers import set_timesteps

    choice = resolve_sampler("Euler", "Align Your Steps")
    with pytest.raises(InvalidRequestError, match="tabulated for SD 1.x/SDXL's noise schedule .*first sigma is 4096"):
        set_timesteps(create_scheduler(choice, ZERO_SNR_V), choice, 10)
