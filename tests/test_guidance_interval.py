"""The guidance interval (Kynkaanniemi et al., 2024): classifier-free guidance only at timesteps >= a minimum;
later steps run the UNet on the prompt alone."""

import pytest
import torch

from dapple.errors import InvalidRequestError
from dapple.samplers import create_scheduler

FAST = dict(prompt="a red circle", negative_prompt="blue", steps=6, sampler="DPM++ 2M", seed=3, guidance_scale=6.0)


@pytest.fixture
def unet_batches(pipe, monkeypatch):
    """The batch size of every UNet call the pipeline makes."""
    unet = pipe.components.unet
    batches: list[int] = []
    forward = unet.forward

    def counting(sample, *args, **kwargs):
        batches.append(sample.shape[0])
        return forward(sample, *args, **kwargs)

    monkeypatch.setattr(unet, "forward", counting)
    return batches


def test_only_steps_at_or_above_the_minimum_are_guided(pipe, unet_batches) -> None:
    result = pipe.generate(**FAST, guidance_min_timestep=500)
    scheduler = create_scheduler("DPM++ 2M", pipe.components.scheduler_config)  # which timesteps are >= 500
    scheduler.set_timesteps(6)
    expected = [2 if int(t) >= 500 else 1 for t in scheduler.timesteps]
    assert unet_batches == expected and 1 in expected and 2 in expected
    assert "CFG min timestep: 500" in result.infotexts[0]


def test_a_minimum_above_every_timestep_is_the_prompt_alone(pipe) -> None:
    never_guided = pipe.generate(**FAST, guidance_min_timestep=1000)
    unguided = pipe.generate(**{**FAST, "guidance_scale": 1.0})  # CFG 1: the conditional prediction only
    assert torch.equal(never_guided.pixels, unguided.pixels)


def test_a_minimum_of_zero_guides_every_step_as_before(pipe) -> None:
    default = pipe.generate(**FAST)
    zero = pipe.generate(**FAST, guidance_min_timestep=0)
    partial = pipe.generate(**FAST, guidance_min_timestep=500)
    assert torch.equal(default.pixels, zero.pixels)
    assert "CFG min timestep" not in default.infotexts[0]
    assert (default.pixels - partial.pixels).abs().max() > 0  # the unguided late steps change the picture


def test_img2img_honours_the_interval_too(pipe, unet_batches) -> None:
    from PIL import Image

    pipe.img2img(Image.new("RGB", (64, 64), "white"), **FAST, strength=0.5, guidance_min_timestep=1000)
    assert unet_batches and set(unet_batches) == {1}


@pytest.mark.parametrize("value", [-1, 1001])
def test_out_of_range_minimums_are_refused(pipe, value) -> None:
    with pytest.raises(InvalidRequestError, match=rf"guidance_min_timestep={value} is invalid .*0..1000"):
        pipe.generate("x", guidance_min_timestep=value)
