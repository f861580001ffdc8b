"""SDXL on the one engine: two text encoders, pooled text and size conditioning, equal to diffusers' pipeline."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionXLPipeline

import dapple
from dapple.models.tiny import build_tiny_xl_pipeline
from dapple.samplers import create_scheduler

TOLERANCE = 1e-3


@pytest.fixture(scope="module")
def xl_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-xl")
    build_tiny_xl_pipeline(seed=2).save_pretrained(str(folder), safe_serialization=True)
    return folder


@pytest.fixture(scope="module")
def xl_reference(xl_dir):
    reference = StableDiffusionXLPipeline.from_pretrained(str(xl_dir), local_files_only=True)
    reference.set_progress_bar_config(disable=True)
    return reference


@pytest.mark.parametrize("sampler", ["Euler", "DPM++ 2M Karras", "Euler a", "DDIM"])
def test_sdxl_txt2img_matches_diffusers(xl_dir, xl_reference, sampler) -> None:
    pipe = dapple.load(xl_dir, device="cpu")
    assert pipe.components.is_xl and pipe.components.native_size == 64
    ours = pipe.generate("a red circle", negative_prompt="blurry", steps=4, guidance_scale=5.0, seed=3,
                         sampler=sampler, batch_size=2).pixels.permute(0, 2, 3, 1).numpy()
    xl_reference.scheduler = create_scheduler(sampler, pipe.components.scheduler_config, seeds=[3, 4])
    theirs = xl_reference("a red circle", negative_prompt="blurry", num_inference_steps=4, guidance_scale=5.0,
                          num_images_per_prompt=2, output_type="np",
                          generator=[torch.Generator().manual_seed(s) for s in (3, 4)]).images
    assert ours.shape == theirs.shape == (2, 64, 64, 3)
    assert np.abs(ours - theirs).max() <= TOLERANCE


def test_sdxl_without_guidance_and_at_another_size_matches_diffusers(xl_dir, xl_reference) -> None:
    pipe = dapple.load(xl_dir, device="cpu")
    ours = pipe.generate("a blue square", steps=3, guidance_scale=1.0, seed=7, sampler="Euler", width=96,
                         height=64).pixels.permute(0, 2, 3, 1).numpy()
    xl_reference.scheduler = create_scheduler("Euler", pipe.components.scheduler_config, seeds=[7])
    theirs = xl_reference("a blue square", num_inference_steps=3, guidance_scale=1.0, width=96, height=64,
                          output_type="np", generator=torch.Generator().manual_seed(7)).images
    assert np.abs(ours - theirs).max() <= TOLERANCE


def test_sdxl_size_conditioning_matters(xl_dir) -> None:
    """The time ids reach the UNet: the same latents conditioned on another size give another prediction."""
    from dapple.engine.conditioning import encode_prompt_xl

    pipe = dapple.load(xl_dir, device="cpu")
    c = pipe.components
    latents = torch.randn(1, 4, 32, 32, generator=torch.Generator().manual_seed(0))
    predictions = []
    for size in (64, 128):
        cond = encode_prompt_xl((c.tokenizer, c.tokenizer_2), (c.text_encoder, c.text_encoder_2), "a circle",
                                guidance_scale=1.0).with_time_ids(size, size)
        with torch.no_grad():
            predictions.append(c.unet(latents, 500, encoder_hidden_states=cond.unet_batch,
                                      added_cond_kwargs=cond.added_cond_kwargs).sample)
    assert not torch.allclose(*predictions)


def test_the_tutorial_building_blocks_work_for_sdxl(xl_dir) -> None:
    pipe = dapple.load(xl_dir, device="cpu")
    conditioning = pipe.encode_prompt("a red circle", "blurry", guidance_scale=5.0)
    assert conditioning.unet_batch.shape == (2, 77, 128)
    kwargs = conditioning.added_cond_kwargs
    assert kwargs["text_embeds"].shape == (2, 64) and kwargs["time_ids"].tolist()[0] == [64, 64, 0, 0, 64, 64]
