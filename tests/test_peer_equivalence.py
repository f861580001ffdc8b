"""Dapple's txt2img must match diffusers' StableDiffusionPipeline on the same components, seed and sampler."""

import numpy as np
import pytest
import torch

from dapple.samplers import create_scheduler, sampler_names

TOLERANCE = 1e-3  # max abs difference on float pixels in [0, 1]


def reference_images(reference_pipe, pipe, sampler, seeds, **kwargs) -> np.ndarray:
    reference_pipe.scheduler = create_scheduler(sampler, pipe.components.scheduler_config, seeds=seeds)
    generators = [torch.Generator("cpu").manual_seed(seed) for seed in seeds]
    return reference_pipe(
        num_images_per_prompt=len(seeds), generator=generators, output_type="np", **kwargs
    ).images


def dapple_images(pipe, **kwargs) -> np.ndarray:
    return pipe.generate(**kwargs).pixels.permute(0, 2, 3, 1).numpy()


@pytest.mark.parametrize("sampler", sampler_names())
def test_every_sampler_matches_diffusers(pipe, reference_pipe, sampler: str) -> None:
    ours = dapple_images(pipe, prompt="a red circle", negative_prompt="blurry", steps=4, guidance_scale=6.0,
                         seed=3, sampler=sampler, batch_size=2)
    theirs = reference_images(reference_pipe, pipe, sampler, [3, 4], prompt="a red circle",
                              negative_prompt="blurry", num_inference_steps=4, guidance_scale=6.0)
    assert ours.shape == theirs.shape == (2, 64, 64, 3)
    assert np.abs(ours - theirs).max() <= TOLERANCE


@pytest.mark.parametrize("sampler", ["DPM++ 2M Karras", "Euler a"])
def test_guidance_one_matches_diffusers(pipe, reference_pipe, sampler: str) -> None:
    ours = dapple_images(pipe, prompt="a blue square", steps=5, guidance_scale=1.0, seed=11, sampler=sampler,
                         width=64, height=96)
    theirs = reference_images(reference_pipe, pipe, sampler, [11], prompt="a blue square", num_inference_steps=5,
                              guidance_scale=1.0, width=64, height=96)
    assert ours.shape == theirs.shape == (1, 96, 64, 3)
    assert np.abs(ours - theirs).max() <= TOLERANCE


def test_the_comparison_can_fail(pipe, reference_pipe) -> None:
    """The tolerance is far below what a changed prompt, seed or guidance does to the tiny model's output."""
    base = dict(prompt="a red circle", steps=4, seed=3, sampler="Euler")
    ours = dapple_images(pipe, **base)
    for change in ({"prompt": "a blue circle"}, {"seed": 4}, {"guidance_scale": 3.0}, {"negative_prompt": "x"}):
        assert np.abs(ours - dapple_images(pipe, **{**base, **change})).max() > 5 * TOLERANCE


def test_no_unconditional_pass_when_guidance_is_one(pipe) -> None:
    batch_sizes = []
    hook = pipe.unet.register_forward_pre_hook(lambda module, args: batch_sizes.append(args[0].shape[0]))
    try:
        pipe.generate("a red circle", steps=2, guidance_scale=1.0, seed=1, batch_size=2)
        pipe.generate("a red circle", steps=2, guidance_scale=7.0, seed=1, batch_size=2)
    finally:
        hook.remove()
    assert batch_sizes[:2] == [2, 2]  # guidance 1: only the conditional half
    assert batch_sizes[2:] == [4, 4]  # guidance 7: uncond and cond in one batched call
