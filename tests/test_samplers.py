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
