"""The image modes must match diffusers' own pipelines on the same tiny random components, seeds and samplers:
img2img = StableDiffusionImg2ImgPipeline, inpainting = StableDiffusionInpaintPipeline (9-channel, and the
4-channel blending path), depth2img = StableDiffusionDepth2ImgPipeline given the same depth map."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import dapple
from dapple.samplers import create_scheduler
from sample_images import half_mask, pixels, smooth_image

TOLERANCE = 1e-3  # max abs difference on float pixels in [0, 1], as for txt2img
PROMPT, NEGATIVE = "a red circle", "blurry"


def reference_run(reference, pipe, sampler: str, seeds: list[int], **kwargs) -> np.ndarray:
    reference.scheduler = create_scheduler(sampler, pipe.components.scheduler_config, seeds=seeds)
    generators = [torch.Generator("cpu").manual_seed(seed) for seed in seeds]
    return reference(prompt=PROMPT, negative_prompt=NEGATIVE, num_images_per_prompt=len(seeds),
                     generator=generators, output_type="np", guidance_scale=6.0, **kwargs).images


@pytest.fixture(scope="module")
def img2img_reference(reference_pipe):
    from diffusers import StableDiffusionImg2ImgPipeline

    reference = StableDiffusionImg2ImgPipeline.from_pipe(reference_pipe)
    reference.set_progress_bar_config(disable=True)
    return reference


@pytest.mark.parametrize("sampler, strength, seed", [
    ("DPM++ 2M Karras", 0.6, 3), ("Euler a", 0.75, 5), ("DDIM", 0.3, 7), ("Heun", 0.5, 2), ("UniPC", 0.8, 1),
    ("DPM++ SDE Karras", 0.7, 4),
])
def test_img2img_matches_diffusers(pipe, img2img_reference, sampler: str, strength: float, seed: int) -> None:
    image = smooth_image(seed)
    ours = pixels(pipe.img2img(image, PROMPT, negative_prompt=NEGATIVE, strength=strength, steps=8,
                               guidance_scale=6.0, seed=seed, sampler=sampler, batch_size=2))
    theirs = reference_run(img2img_reference, pipe, sampler, [seed, seed + 1], image=image, strength=strength,
                           num_inference_steps=8)
    assert ours.shape == theirs.shape == (2, 64, 64, 3)
    assert np.abs(ours - theirs).max() <= TOLERANCE


@pytest.fixture(scope="module")
def inpaint_pipe(inpaint_model_dir):
    return dapple.load(inpaint_model_dir, device="cpu")


@pytest.fixture(scope="module")
def inpaint_reference(inpaint_model_dir):
    from diffusers import StableDiffusionInpaintPipeline

    reference = StableDiffusionInpaintPipeline.from_pretrained(
        str(inpaint_model_dir), safety_checker=None, requires_safety_checker=False, local_files_only=True)
    reference.set_progress_bar_config(disable=True)
    return reference


@pytest.mark.parametrize("sampler, strength, seed", [
    ("DPM++ 2M Karras", 1.0, 3), ("Euler a", 1.0, 8), ("Euler", 0.7, 5), ("DDIM", 0.5, 2),
])
def test_nine_channel_inpainting_matches_diffusers(inpaint_pipe, inpaint_reference, sampler, strength, seed) -> None:
    assert inpaint_pipe.components.unet_kind == "inpainting"
    image, mask = smooth_image(seed), half_mask()
    ours = pixels(inpaint_pipe.inpaint(image, mask, PROMPT, negative_prompt=NEGATIVE, strength=strength, steps=8,
                                       guidance_scale=6.0, seed=seed, sampler=sampler, paste_back=False))
    theirs = reference_run(inpaint_reference, inpaint_pipe, sampler, [seed], image=image, mask_image=mask,
                           strength=strength, num_inference_steps=8)
    assert np.abs(ours - theirs).max() <= TOLERANCE


@pytest.mark.parametrize("sampler, strength", [("DPM++ 2M Karras", 1.0), ("DDIM", 0.75), ("Euler", 0.6)])
def test_four_channel_inpainting_matches_diffusers(pipe, reference_pipe, sampler: str, strength: float) -> None:
    """The blending path. Deterministic samplers only: diffusers also encodes the masked image for a 4-channel
    UNet (a random draw whose result it never uses), which shifts a stochastic sampler's noise."""
    from diffusers import StableDiffusionInpaintPipeline

    reference = StableDiffusionInpaintPipeline.from_pipe(reference_pipe)
    reference.set_progress_bar_config(disable=True)
    image, mask = smooth_image(4), half_mask()
    ours = pixels(pipe.inpaint(image, mask, PROMPT, negative_prompt=NEGATIVE, strength=strength, steps=8,
                               guidance_scale=6.0, seed=4, sampler=sampler, paste_back=False))
    theirs = reference_run(reference, pipe, sampler, [4], image=image, mask_image=mask, strength=strength,
                           num_inference_steps=8)
    assert np.abs(ours - theirs).max() <= TOLERANCE


@pytest.mark.parametrize("sampler, strength, seed", [("DPM++ 2M Karras", 0.8, 3), ("Euler a", 0.5, 6),
                                                     ("DDIM", 0.9, 1)])
def test_depth2img_matches_diffusers(depth_model_dir, sampler: str, strength: float, seed: int) -> None:
    from diffusers import StableDiffusionDepth2ImgPipeline, StableDiffusionPipeline

    depth_pipe = dapple.load(depth_model_dir, device="cpu")
    assert depth_pipe.components.unet_kind == "depth"
    parts = StableDiffusionPipeline.from_pretrained(
        str(depth_model_dir), safety_checker=None, requires_safety_checker=False, local_files_only=True).components
    reference = StableDiffusionDepth2ImgPipeline(
        vae=parts["vae"], text_encoder=parts["text_encoder"], tokenizer=parts["tokenizer"], unet=parts["unet"],
        scheduler=parts["scheduler"], depth_estimator=None, feature_extractor=None)
    reference.set_progress_bar_config(disable=True)
    image = smooth_image(seed)
    depth = np.random.default_rng(seed).random((48, 48)).astype(np.float32)
    ours = pixels(depth_pipe.depth2img(image, depth, PROMPT, negative_prompt=NEGATIVE, strength=strength, steps=8,
                                       guidance_scale=6.0, seed=seed, sampler=sampler, batch_size=2))
    theirs = reference_run(reference, depth_pipe, sampler, [seed, seed + 1], image=image,
                           depth_map=torch.from_numpy(depth)[None], strength=strength, num_inference_steps=8)
    assert np.abs(ours - theirs).max() <= TOLERANCE


def test_image_comparison_can_fail(pipe) -> None:
    """Changing strength, seed or the image moves the output far beyond the tolerance."""
    image = smooth_image(3)
    base = dict(strength=0.6, steps=8, seed=3, sampler="Euler")
    ours = pixels(pipe.img2img(image, PROMPT, **base))
    for change in ({"strength": 0.3}, {"seed": 4}):  # 0.3: 2 steps of 8 instead of 4
        assert np.abs(ours - pixels(pipe.img2img(image, PROMPT, **{**base, **change}))).max() > 5 * TOLERANCE
    assert np.abs(ours - pixels(pipe.img2img(smooth_image(9), PROMPT, **base))).max() > 5 * TOLERANCE
