"""img2img, inpainting, outpainting and pixel-space hires fix on the shipped built-in model, judged by the scorer
and by pixel measurements (issue 24: they returned noise, because the built-in VAE's posterior std was ~1.0 and
these modes sample it; vae_posterior.py calibrated it to 0.01).

Inputs are pictures of the shapes world itself, with their canonical captions, at the model card's settings.
Measured when written (12 scenes): every attribute right for all 12 at strengths 0, 0.2 and 0.5 (before the fix:
colour 1, 1 and 10 of 12); strength 0 at 36.4 dB against the round trip's 36.4 (before: 11.2); no stray pixel in
an inpainted or outpainted background (before: up to 24% at strength 0.5); Lanczos hires at strength 0.3 within
29-31 dB of the upscaled base image (before: 15-16 dB)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL
from PIL import Image

import dapple
from dapple.api import BUILTIN_MODEL_DIR
from dapple.train.data.captions import canonical_caption
from dapple.train.data.shapes import ShapesWorld, images_psnr
from dapple.train.scorer import score_image
from dapple.train.vae_posterior import calibrate_posterior_std, set_posterior_std

CARD = dict(steps=20, guidance_scale=5.0, sampler="DPM++ 2M", guidance_min_timestep=600)
ATTRIBUTES = ("colour", "background", "shape", "position")


@pytest.fixture(scope="module")
def builtin_pipe():
    return dapple.load()


def _round_trip(pipe, image: Image.Image) -> Image.Image:
    """The VAE round trip through the posterior mean (what `dapple inspect vae` shows)."""
    pixels = torch.from_numpy(np.asarray(image, np.float32) / 127.5 - 1).permute(2, 0, 1)[None].to(pipe.dtype)
    with torch.no_grad():
        decoded = pipe.vae.decode(pipe.vae.encode(pixels).latent_dist.mean).sample[0].float()
    return Image.fromarray(((decoded.permute(1, 2, 0).clamp(-1, 1) + 1) * 127.5).round().byte().numpy())


def _stray_share(image: Image.Image, background: np.ndarray, region: np.ndarray) -> float:
    """Share of the region's pixels that are off the background colour by more than 32 in some channel."""
    return float((np.abs(np.asarray(image).astype(int) - background).max(axis=-1) > 32)[region].mean())


def _background_colour(scene) -> np.ndarray:
    return np.median(np.asarray(scene.image).astype(int)[~scene.mask.astype(bool)], axis=0)


def test_the_shipped_vae_samples_decode_like_its_mean() -> None:
    vae = AutoencoderKL.from_pretrained(str(BUILTIN_MODEL_DIR / "vae"), torch_dtype=torch.float32).eval()
    scenes = ShapesWorld(seed=3, split="all").scenes(0, 16)
    images = torch.stack([torch.from_numpy(np.asarray(s.image, np.float32) / 127.5 - 1).permute(2, 0, 1)
                          for s in scenes])
    with torch.no_grad():
        posterior = vae.encode(images).latent_dist
        assert float(posterior.std.max()) <= 0.02  # against a latent spread of ~0.27
        mean = vae.decode(posterior.mean).sample
        sample = vae.decode(posterior.sample(torch.Generator().manual_seed(0))).sample
    assert float((mean - sample).abs().mean()) < 0.01  # in [-1, 1]: 1.3/255 (before the fix: a sample was noise)


def test_inspect_vae_shows_the_sampled_round_trip(builtin_pipe, tmp_path) -> None:
    from dapple.inspect import vae_round_trip

    result = vae_round_trip(builtin_pipe, ShapesWorld(seed=3, split="all").scene(0).image, tmp_path)
    assert result.numbers["psnr"] > 30
    assert result.numbers["psnr_sampled"] > result.numbers["psnr"] - 1  # 11 dB lower before the fix


@pytest.mark.parametrize("strength", [0.0, 0.2, 0.5])
def test_img2img_keeps_the_input_scene(builtin_pipe, strength: float) -> None:
    scenes = ShapesWorld(seed=7, split="all").scenes(0, 6)
    right = 0
    for seed, scene in enumerate(scenes):
        result = builtin_pipe.img2img(scene.image, canonical_caption(scene.spec), strength=strength, seed=seed,
                                      **CARD).images[0]
        seen = score_image(result)
        right += all(getattr(seen, name) == getattr(scene.spec, name) for name in ATTRIBUTES)
        if strength == 0.0:  # strength 0 is the VAE round trip, up to the posterior's calibrated noise
            assert images_psnr(scene.image, result) > images_psnr(scene.image, _round_trip(builtin_pipe, scene.image)) - 2
    assert right >= 5, f"{right} of 6 scenes kept colour, background, shape and position at strength {strength}"


@pytest.mark.parametrize("strength", [0.5, 1.0])
def test_inpainting_a_background_area_leaves_no_blotches(builtin_pipe, strength: float) -> None:
    """The right 28 columns of scenes whose shape is at the left hold only background; repainted with the scene's
    own caption they must stay background (before the fix: 8-24% stray pixels at strength 0.5)."""
    scenes = [s for s in ShapesWorld(seed=11, split="all").scenes(0, 200)
              if s.spec.position in ("left", "top left", "bottom left")][:4]
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (36, 0, 64, 64))
    region = np.zeros((64, 64), bool)
    region[:, 36:] = True
    for seed, scene in enumerate(scenes):
        result = builtin_pipe.inpaint(scene.image, mask, canonical_caption(scene.spec), strength=strength,
                                      seed=seed, mask_blur=2, **CARD).images[0]
        assert _stray_share(result, _background_colour(scene), region) < 0.01, canonical_caption(scene.spec)
        assert score_image(result).shape == scene.spec.shape  # the kept shape is still there


def test_outpainting_extends_the_background_cleanly(builtin_pipe) -> None:
    scenes = [s for s in ShapesWorld(seed=11, split="all").scenes(0, 200)
              if s.spec.position in ("left", "top left", "bottom left")][:4]
    region = np.zeros((64, 96), bool)
    region[:, 64:] = True
    for seed, scene in enumerate(scenes):
        result = builtin_pipe.outpaint(scene.image, canonical_caption(scene.spec), right=32, seed=seed,
                                       **CARD).images[0]
        assert result.size == (96, 64)
        assert _stray_share(result, _background_colour(scene), region) < 0.01, canonical_caption(scene.spec)


@pytest.mark.parametrize("upscaler", ["Lanczos", "Nearest"])
def test_pixel_space_hires_at_low_strength_refines_instead_of_adding_noise(builtin_pipe, upscaler: str) -> None:
    for seed, scene in enumerate(ShapesWorld(seed=7, split="all").scenes(0, 2)):
        prompt = canonical_caption(scene.spec)
        base = builtin_pipe.generate(prompt, seed=seed, **CARD).images[0]
        hires = builtin_pipe.generate(prompt, seed=seed, hires=dapple.Hires(scale=2, upscaler=upscaler,
                                                                            strength=0.3), **CARD).images[0]
        assert hires.size == (128, 128)
        assert images_psnr(base.resize((128, 128), Image.LANCZOS), hires) > 25  # 15-16 dB before the fix


def test_calibration_keeps_the_mean_and_sets_one_std(tiny_model_dir) -> None:
    vae = AutoencoderKL.from_pretrained(str(tiny_model_dir / "vae"), torch_dtype=torch.float32).eval()
    images = torch.rand(4, 3, 64, 64, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        before = vae.encode(images).latent_dist
        std, mean_psnr, sampled_psnr = calibrate_posterior_std(vae, images, tolerance_db=0.1)
        after = vae.encode(images).latent_dist
    assert torch.equal(before.mean, after.mean)  # decoding the mean, so txt2img, is untouched
    assert torch.allclose(after.std, torch.full_like(after.std, std), rtol=1e-5)
    assert sampled_psnr >= mean_psnr - 0.1
    set_posterior_std(vae, 0.5)
    with torch.no_grad():
        assert torch.allclose(vae.encode(images).latent_dist.std, torch.tensor(0.5), rtol=1e-5)
