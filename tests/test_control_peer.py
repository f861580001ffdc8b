"""ControlNet and T2I-Adapter units must match diffusers' own pipelines on the same tiny random components,
control models, seeds and samplers: StableDiffusionControlNetPipeline (one unit, and MultiControlNetModel for two),
StableDiffusionControlNetImg2ImgPipeline, StableDiffusionControlNetInpaintPipeline (4-channel blending, the
9-channel inpainting UNet, the inpaint ControlNet's -1-marked map), StableDiffusionXLControlNetPipeline,
StableDiffusionAdapterPipeline and StableDiffusionXLAdapterPipeline; for several samplers, weights, start/end
windows, guess mode ("ControlNet is more important") and without guidance."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import (
    StableDiffusionAdapterPipeline,
    StableDiffusionControlNetImg2ImgPipeline,
    StableDiffusionControlNetInpaintPipeline,
    StableDiffusionControlNetPipeline,
    StableDiffusionPipeline,
    StableDiffusionXLAdapterPipeline,
    StableDiffusionXLControlNetPipeline,
    StableDiffusionXLPipeline,
)
from diffusers.models.controlnets.multicontrolnet import MultiControlNetModel

import dapple
from control_fixtures import edge_map, perturbed_controlnet, save, tiny_adapter, union_controlnet
from dapple.models.control_models import load_control_model
from dapple.models.tiny import build_tiny_family_pipeline, build_tiny_xl_pipeline
from dapple.request import ControlUnit
from dapple.samplers import create_scheduler
from sample_images import half_mask, pixels, smooth_image

TOLERANCE = 1e-3
PROMPT, NEGATIVE = "a red circle", "blurry"
GUESS = "ControlNet is more important"


@pytest.fixture(scope="module")
def control_dir(tmp_path_factory, reference_pipe):
    folder = tmp_path_factory.mktemp("ControlNet")
    save(perturbed_controlnet(reference_pipe.unet, seed=1), folder / "tiny-cn")
    save(perturbed_controlnet(reference_pipe.unet, seed=2), folder / "tiny-cn-2")
    return folder


@pytest.fixture(scope="module")
def control_pipe(tiny_model_dir, control_dir):
    return dapple.load(tiny_model_dir, device="cpu", control_dirs=[control_dir])


def controlnet(control_dir, name: str):
    """The reference pipelines get the same weights, loaded by diffusers itself."""
    from diffusers import ControlNetModel

    return ControlNetModel.from_pretrained(str(control_dir / name), local_files_only=True)


def reference(pipeline_class, parts: dict, **models):
    import inspect

    accepted = inspect.signature(pipeline_class.__init__).parameters
    pipe = pipeline_class(**{k: v for k, v in {**parts, **models}.items() if k in accepted})
    pipe.set_progress_bar_config(disable=True)
    return pipe


def sd_parts(reference_pipe) -> dict:
    parts = dict(reference_pipe.components)
    return {**parts, "safety_checker": None, "feature_extractor": None, "requires_safety_checker": False}


def run_reference(pipe, config, sampler: str, seeds: list[int], **kwargs) -> np.ndarray:
    pipe.scheduler = create_scheduler(sampler, config, seeds=seeds)
    generators = [torch.Generator("cpu").manual_seed(seed) for seed in seeds]
    return pipe(prompt=PROMPT, negative_prompt=NEGATIVE, num_images_per_prompt=len(seeds), generator=generators,
                output_type="np", **kwargs).images


def guess_mode(mode: str) -> bool:
    return mode == GUESS


@pytest.mark.parametrize("sampler, weight, start, end, mode, cfg, batch", [
    ("Euler", 1.0, 0.0, 1.0, "Balanced", 6.0, 2),
    ("DPM++ 2M Karras", 0.7, 0.2, 0.8, "Balanced", 6.0, 1),
    ("Euler a", 1.3, 0.0, 0.6, GUESS, 6.0, 2),
    ("DDIM", 0.5, 0.3, 1.0, GUESS, 4.0, 1),
    ("Heun", 1.0, 0.0, 0.5, "Balanced", 6.0, 1),  # a second-order sampler: the window counts its 2n-1 calls
    ("UniPC", 2.0, 0.1, 0.9, GUESS, 1.0, 1),  # no guidance: guess mode scales the cond-only batch
])
def test_controlnet_txt2img_matches_diffusers(control_pipe, reference_pipe, control_dir, sampler, weight, start, end,
                                              mode, cfg, batch) -> None:
    control = edge_map(3)
    unit = ControlUnit(model="tiny-cn", image=control, weight=weight, guidance_start=start, guidance_end=end,
                       control_mode=mode)
    ours = pixels(control_pipe.generate(PROMPT, negative_prompt=NEGATIVE, steps=6, guidance_scale=cfg, seed=5,
                                        sampler=sampler, batch_size=batch, controls=[unit]))
    peer = reference(StableDiffusionControlNetPipeline, sd_parts(reference_pipe),
                     controlnet=controlnet(control_dir, "tiny-cn"))
    theirs = run_reference(peer, control_pipe.components.scheduler_config, sampler, [5 + i for i in range(batch)],
                           image=control, num_inference_steps=6, guidance_scale=cfg,
                           controlnet_conditioning_scale=weight, control_guidance_start=start,
                           control_guidance_end=end, guess_mode=guess_mode(mode))
    assert ours.shape == theirs.shape == (batch, 64, 64, 3)
    assert np.abs(ours - theirs).max() <= TOLERANCE
    plain = pixels(control_pipe.generate(PROMPT, negative_prompt=NEGATIVE, steps=6, guidance_scale=cfg, seed=5,
                                         sampler=sampler, batch_size=batch))
    assert np.abs(plain - theirs).max() > 20 * TOLERANCE  # the ControlNet did change the image


@pytest.mark.parametrize("sampler, modes", [("Euler", ("Balanced", "Balanced")), ("DPM++ 2M Karras", (GUESS, GUESS))])
def test_two_units_match_multicontrolnet(control_pipe, reference_pipe, control_dir, sampler, modes) -> None:
    maps = [edge_map(4), smooth_image(6)]
    second = next(entry.title for entry in control_pipe.control_models() if entry.name == "tiny-cn-2")
    units = [ControlUnit(model="tiny-cn", image=maps[0], weight=0.8, guidance_end=0.7, control_mode=modes[0]),
             ControlUnit(model=second, image=maps[1], weight=1.2, guidance_start=0.3,
                         control_mode=modes[1])]
    ours = pixels(control_pipe.generate(PROMPT, negative_prompt=NEGATIVE, steps=6, guidance_scale=6.0, seed=2,
                                        sampler=sampler, controls=units))
    multi = MultiControlNetModel([controlnet(control_dir, "tiny-cn"), controlnet(control_dir, "tiny-cn-2")])
    peer = reference(StableDiffusionControlNetPipeline, sd_parts(reference_pipe), controlnet=multi)
    theirs = run_reference(peer, control_pipe.components.scheduler_config, sampler, [2], image=maps,
                           num_inference_steps=6, guidance_scale=6.0, controlnet_conditioning_scale=[0.8, 1.2],
                           control_guidance_start=[0.0, 0.3], control_guidance_end=[0.7, 1.0],
                           guess_mode=modes[0] == GUESS)
    assert np.abs(ours - theirs).max() <= TOLERANCE


@pytest.mark.parametrize("sampler, strength, mode", [("DPM++ 2M Karras", 0.7, "Balanced"), ("Euler a", 0.6, GUESS),
                                                     ("DDIM", 0.9, "Balanced")])
def test_controlnet_img2img_matches_diffusers(control_pipe, reference_pipe, control_dir, sampler, strength,
                                              mode) -> None:
    image, control = smooth_image(7), edge_map(8)
    unit = ControlUnit(model="tiny-cn", image=control, weight=0.9, guidance_end=0.8, control_mode=mode)
    ours = pixels(control_pipe.img2img(image, PROMPT, negative_prompt=NEGATIVE, strength=strength, steps=8,
                                       guidance_scale=6.0, seed=7, sampler=sampler, batch_size=2, controls=[unit]))
    peer = reference(StableDiffusionControlNetImg2ImgPipeline, sd_parts(reference_pipe),
                     controlnet=controlnet(control_dir, "tiny-cn"))
    theirs = run_reference(peer, control_pipe.components.scheduler_config, sampler, [7, 8], image=image,
                           control_image=control, strength=strength, num_inference_steps=8, guidance_scale=6.0,
                           controlnet_conditioning_scale=0.9, control_guidance_end=0.8, guess_mode=mode == GUESS)
    assert np.abs(ours - theirs).max() <= TOLERANCE


def make_inpaint_condition(image, mask) -> torch.Tensor:
    """diffusers' documented recipe for control_v11p_sd15_inpaint's map (masked pixels = -1)."""
    pixels_ = np.array(image.convert("RGB")).astype(np.float32) / 255.0
    masked = np.array(mask.convert("L")).astype(np.float32) / 255.0 > 0.5
    pixels_[masked] = -1.0
    return torch.from_numpy(np.expand_dims(pixels_, 0).transpose(0, 3, 1, 2))


@pytest.mark.parametrize("sampler, strength, module", [("DPM++ 2M Karras", 1.0, "none"), ("DDIM", 0.75, "none"),
                                                       ("Euler", 0.8, "inpaint_only")])
def test_controlnet_four_channel_inpainting_matches_diffusers(control_pipe, reference_pipe, control_dir, sampler,
                                                              strength, module) -> None:
    """Deterministic samplers: diffusers also encodes the masked image for a 4-channel UNet (a random draw)."""
    image, mask = smooth_image(4), half_mask()
    control = make_inpaint_condition(image, mask) if module == "inpaint_only" else edge_map(9)
    unit = ControlUnit(model="tiny-cn", image=None if module == "inpaint_only" else control, module=module,
                       weight=1.1)
    ours = pixels(control_pipe.inpaint(image, mask, PROMPT, negative_prompt=NEGATIVE, strength=strength, steps=8,
                                       guidance_scale=6.0, seed=4, sampler=sampler, paste_back=False,
                                       controls=[unit]))
    peer = reference(StableDiffusionControlNetInpaintPipeline, sd_parts(reference_pipe),
                     controlnet=controlnet(control_dir, "tiny-cn"))
    theirs = run_reference(peer, control_pipe.components.scheduler_config, sampler, [4], image=image,
                           mask_image=mask, control_image=control, strength=strength, num_inference_steps=8,
                           guidance_scale=6.0, controlnet_conditioning_scale=1.1)
    assert np.abs(ours - theirs).max() <= TOLERANCE


@pytest.mark.parametrize("sampler, strength, mode", [("Euler a", 1.0, "Balanced"), ("DDIM", 0.6, GUESS)])
def test_controlnet_nine_channel_inpainting_matches_diffusers(inpaint_model_dir, tmp_path, sampler, strength,
                                                              mode) -> None:
    parts = StableDiffusionPipeline.from_pretrained(str(inpaint_model_dir), safety_checker=None,
                                                    requires_safety_checker=False, local_files_only=True).components
    # A ControlNet drives the UNet's encoder from the 4 latent channels only (diffusers' inpaint pipeline gives it
    # the latents without mask and masked image), so it is made from a 4-channel copy of the UNet's config.
    from diffusers import UNet2DConditionModel

    config = {key: value for key, value in parts["unet"].config.items() if not key.startswith("_")}
    four = UNet2DConditionModel(**{**config, "in_channels": 4})
    save(perturbed_controlnet(four, seed=3), tmp_path / "cn-inpaint")
    pipe = dapple.load(inpaint_model_dir, device="cpu", control_dirs=[tmp_path])
    image, mask, control = smooth_image(5), half_mask(), edge_map(5)
    unit = ControlUnit(model="cn-inpaint", image=control, weight=1.0, guidance_start=0.2, control_mode=mode)
    ours = pixels(pipe.inpaint(image, mask, PROMPT, negative_prompt=NEGATIVE, strength=strength, steps=8,
                               guidance_scale=6.0, seed=5, sampler=sampler, paste_back=False, controls=[unit]))
    peer = reference(StableDiffusionControlNetInpaintPipeline,
                     {**parts, "safety_checker": None, "feature_extractor": None, "requires_safety_checker": False},
                     controlnet=controlnet(tmp_path, "cn-inpaint"))
    theirs = run_reference(peer, pipe.components.scheduler_config, sampler, [5], image=image, mask_image=mask,
                           control_image=control, strength=strength, num_inference_steps=8, guidance_scale=6.0,
                           controlnet_conditioning_scale=1.0,  # the inpaint pipeline's default is 0.5
                           control_guidance_start=0.2, guess_mode=mode == GUESS)
    assert np.abs(ours - theirs).max() <= TOLERANCE


@pytest.fixture(scope="module")
def xl_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-xl")
    build_tiny_xl_pipeline(seed=2).save_pretrained(str(folder), safe_serialization=True)
    return folder


@pytest.fixture(scope="module")
def xl_parts(xl_dir):
    return dict(StableDiffusionXLPipeline.from_pretrained(str(xl_dir), local_files_only=True).components)


@pytest.fixture(scope="module")
def xl_control_dir(tmp_path_factory, xl_parts):
    folder = tmp_path_factory.mktemp("ControlNet-xl")
    save(perturbed_controlnet(xl_parts["unet"], seed=4), folder / "xl-cn")
    save(tiny_adapter(xl_parts["unet"], seed=5), folder / "xl-adapter")
    save(union_controlnet(xl_parts["unet"], seed=6), folder / "xl-union")
    return folder


@pytest.fixture(scope="module")
def xl_pipe(xl_dir, xl_control_dir):
    return dapple.load(xl_dir, device="cpu", control_dirs=[xl_control_dir])


@pytest.mark.parametrize("sampler, weight, end, mode, cfg", [("Euler", 1.0, 1.0, "Balanced", 5.0),
                                                             ("DPM++ 2M Karras", 0.6, 0.7, GUESS, 5.0),
                                                             ("Euler a", 1.5, 0.8, GUESS, 1.0)])
def test_sdxl_controlnet_matches_diffusers(xl_pipe, xl_parts, xl_control_dir, sampler, weight, end, mode,
                                           cfg) -> None:
    pipe = xl_pipe
    control = edge_map(10)
    unit = ControlUnit(model="xl-cn", image=control, weight=weight, guidance_end=end, control_mode=mode)
    ours = pixels(pipe.generate(PROMPT, negative_prompt=NEGATIVE, steps=5, guidance_scale=cfg, seed=3,
                                sampler=sampler, batch_size=2, controls=[unit]))
    peer = reference(StableDiffusionXLControlNetPipeline, xl_parts, controlnet=controlnet(xl_control_dir, "xl-cn"))
    theirs = run_reference(peer, pipe.components.scheduler_config, sampler, [3, 4], image=control,
                           num_inference_steps=5, guidance_scale=cfg, controlnet_conditioning_scale=weight,
                           control_guidance_end=end, guess_mode=mode == GUESS)
    assert ours.shape == theirs.shape == (2, 64, 64, 3)
    assert np.abs(ours - theirs).max() <= TOLERANCE


@pytest.mark.parametrize("sampler, weight, start, end, module, control_type", [
    ("Euler", 1.0, 0.0, 1.0, "lineart", 3), ("DPM++ 2M Karras", 0.8, 0.2, 0.8, "depth", 1)])
def test_sdxl_union_controlnet_matches_diffusers(xl_pipe, xl_parts, xl_control_dir, sampler, weight, start, end,
                                                 module, control_type) -> None:
    """A union ControlNet learns the kind of map from the module (lineart -> 3, depth -> 1: ControlNet++'s
    types); "lineart" and "depth" are maps the user gives, so the preprocessor passes them through."""
    from diffusers import ControlNetUnionModel, StableDiffusionXLControlNetUnionPipeline

    control = edge_map(13)
    unit = ControlUnit(model="xl-union", image=control, module=module, weight=weight, guidance_start=start,
                       guidance_end=end, resize_mode="Just Resize")
    ours = pixels(xl_pipe.generate(PROMPT, negative_prompt=NEGATIVE, steps=5, guidance_scale=5.0, seed=4,
                                   sampler=sampler, controls=[unit]))
    union = ControlNetUnionModel.from_pretrained(str(xl_control_dir / "xl-union"), local_files_only=True)
    peer = reference(StableDiffusionXLControlNetUnionPipeline, xl_parts, controlnet=union)
    theirs = run_reference(peer, xl_pipe.components.scheduler_config, sampler, [4], control_image=[control],
                           control_mode=[control_type], num_inference_steps=5, guidance_scale=5.0,
                           controlnet_conditioning_scale=weight, control_guidance_start=start,
                           control_guidance_end=end)
    assert np.abs(ours - theirs).max() <= TOLERANCE
    other = ControlUnit(model="xl-union", image=control, module="canny" if module == "depth" else "depth",
                        weight=weight, guidance_start=start, guidance_end=end)
    assert np.abs(pixels(xl_pipe.generate(PROMPT, negative_prompt=NEGATIVE, steps=5, guidance_scale=5.0, seed=4,
                                          sampler=sampler, controls=[other])) - theirs).max() > 10 * TOLERANCE


@pytest.mark.parametrize("sampler, weight, factor, cfg", [("Euler", 1.0, 1.0, 5.0), ("DPM++ 2M Karras", 0.7, 0.6, 5.0),
                                                          ("Euler a", 1.4, 0.5, 1.0)])
def test_sdxl_adapter_matches_diffusers(xl_pipe, xl_parts, xl_control_dir, sampler, weight, factor, cfg) -> None:
    pipe = xl_pipe
    control = edge_map(11)
    unit = ControlUnit(model="xl-adapter", image=control, weight=weight, guidance_end=factor)
    ours = pixels(pipe.generate(PROMPT, negative_prompt=NEGATIVE, steps=6, guidance_scale=cfg, seed=6,
                                sampler=sampler, batch_size=2, controls=[unit]))
    adapter = load_control_model(xl_control_dir / "xl-adapter")
    peer = reference(StableDiffusionXLAdapterPipeline, xl_parts, adapter=adapter)
    theirs = run_reference(peer, pipe.components.scheduler_config, sampler, [6, 7], image=control,
                           num_inference_steps=6, guidance_scale=cfg, adapter_conditioning_scale=weight,
                           adapter_conditioning_factor=factor)
    assert np.abs(ours - theirs).max() <= TOLERANCE
    plain = pixels(pipe.generate(PROMPT, negative_prompt=NEGATIVE, steps=6, guidance_scale=cfg, seed=6,
                                 sampler=sampler, batch_size=2))
    assert np.abs(plain - theirs).max() > 20 * TOLERANCE


@pytest.fixture(scope="module")
def sd1_adapter_setup(tmp_path_factory):
    """The SD 1.x-style tiny model (cross-attention in its first block, as SD 1.5) and adapters fitted to it."""
    model_dir = tmp_path_factory.mktemp("tiny-sd1")
    built = build_tiny_family_pipeline("sd1", seed=4)
    built.save_pretrained(str(model_dir), safe_serialization=True)
    adapters = tmp_path_factory.mktemp("adapters")
    save(tiny_adapter(built.unet, seed=6), adapters / "full")
    save(tiny_adapter(built.unet, seed=7, light=True), adapters / "light")
    save(tiny_adapter(built.unet, seed=8, in_channels=1), adapters / "sketch")
    parts = StableDiffusionPipeline.from_pretrained(str(model_dir), safety_checker=None,
                                                    requires_safety_checker=False, local_files_only=True).components
    return dapple.load(model_dir, device="cpu", control_dirs=[adapters]), parts, adapters


@pytest.mark.parametrize("name, sampler, weight, cfg", [("full", "Euler", 1.0, 6.0), ("light", "DPM++ 2M Karras", 0.8, 6.0),
                                                        ("sketch", "Euler a", 1.3, 6.0), ("full", "DDIM", 0.5, 1.0)])
def test_sd_adapter_matches_diffusers(sd1_adapter_setup, name, sampler, weight, cfg) -> None:
    pipe, parts, adapters = sd1_adapter_setup
    control = edge_map(12)
    unit = ControlUnit(model=name, image=control, weight=weight)
    ours = pixels(pipe.generate(PROMPT, negative_prompt=NEGATIVE, steps=4, guidance_scale=cfg, seed=8,
                                sampler=sampler, batch_size=2, controls=[unit]))
    peer = reference(StableDiffusionAdapterPipeline,
                     {**parts, "safety_checker": None, "feature_extractor": None, "requires_safety_checker": False},
                     adapter=load_control_model(adapters / name))
    theirs = run_reference(peer, pipe.components.scheduler_config, sampler, [8, 9],
                           image=control.convert("L") if name == "sketch" else control, num_inference_steps=4,
                           guidance_scale=cfg, adapter_conditioning_scale=weight)
    assert np.abs(ours - theirs).max() <= TOLERANCE
