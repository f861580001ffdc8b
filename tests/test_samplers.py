"""The sampler registry: A1111 names and aliases -> diffusers scheduler classes and configs."""

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
    with pytest.raises(UnknownSamplerError, match="not available for DDIM; valid: Automatic"):
        resolve_sampler("DDIM Karras")
    with pytest.raises(UnknownSamplerError, match="not available for Euler"):
        resolve_sampler("Euler", "Polyexponential")


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
    assert float(scheduler.alphas_cumprod[-1]) <= 2**-24  # x_T is pure noise (up to the first finite sigma)
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
