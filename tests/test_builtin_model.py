"""The shipped built-in model, judged by the image-analysis scorer: the prompt's colour, background, position and
size show up in the picture, unknown words are reported, and inpainting repaints only the masked half.

These run the real weights in src/dapple/models/assets/builtin (64x64, 20 steps: about half a second an image)."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

import dapple
from dapple.api import BUILTIN_MODEL_DIR
from dapple.engine.conditioning import UnknownWordsWarning
from dapple.interfaces.cli import app
from dapple.train.data.captions import parse_caption
from dapple.train.scorer import score_image

# The settings its model card recommends. Guidance only at t >= 600 (a guidance interval): guided to the end, the
# model draws squares with pinched sides and outward corners that read as circles (200 held-out captions, DPM++ 2M,
# CFG 5: shape 86% guided at every step, 92% at t >= 600 only). Karras spacing on this zero-terminal-SNR schedule
# spends 11 of 20 steps above t=970, where the picture barely changes, hence DPM++ 2M.
STEPS, CFG, SAMPLER, GUIDANCE_MIN_T = 20, 5.0, "DPM++ 2M", 600

# One prompt per position, colours, shapes and backgrounds varied, some held-out combinations among them.
# "a orange", not "an orange": the training captions never say "an", so the model does not know the word.
POSITION_PROMPTS = [
    "a red circle at the left on a blue background",
    "a yellow square at the right on a black background",
    "a green triangle at the top on a white background",
    "a white circle at the bottom on a purple background",
    "a blue square in the center on a yellow background",
    "a orange circle at the top left on a green background",
    "a purple square at the top right on a white background",
    "a black circle at the bottom left on a orange background",
    "a red square at the bottom right on a green background",
]


@pytest.fixture(scope="module")
def builtin_pipe():
    assert (BUILTIN_MODEL_DIR / "model_index.json").is_file(), "the built-in model's weights are missing"
    return dapple.load()


def _generate(pipe, prompt: str, seed: int, guidance_min_t: int = GUIDANCE_MIN_T) -> Image.Image:
    return pipe.generate(prompt, steps=STEPS, guidance_scale=CFG, sampler=SAMPLER, seed=seed,
                         guidance_min_timestep=guidance_min_t).images[0]


def test_builtin_model_is_a_small_fp16_diffusers_folder() -> None:
    weights = list(BUILTIN_MODEL_DIR.rglob("*.safetensors"))
    assert {w.parent.name for w in weights} >= {"unet", "vae", "text_encoder"}
    assert sum(w.stat().st_size for w in weights) < 30 * 2**20
    assert (BUILTIN_MODEL_DIR / "README.md").is_file()  # the model card


def test_prompts_colour_background_and_position_show_up(builtin_pipe) -> None:
    hits = {"colour": 0, "background": 0, "position": 0}
    for seed, prompt in enumerate(POSITION_PROMPTS, start=100):
        expected = parse_caption(prompt)
        seen = score_image(_generate(builtin_pipe, prompt, seed))
        for name in hits:
            hits[name] += getattr(seen, name) == expected[name]
    assert all(count >= 8 for count in hits.values()), f"right out of 9: {hits}"


def test_small_squares_come_out_square(builtin_pipe) -> None:
    """The hardest shape: 16 small squares of the shapes world (held-out combinations among them), canonical
    captions. Measured when written: 14 of 16 at the card's settings; guided at every step, 5 of 16."""
    from dapple.train.data.captions import canonical_caption
    from dapple.train.data.shapes import ShapesWorld

    scenes = [s for s in ShapesWorld(seed=5, split="all").scenes(0, 400)
              if (s.spec.shape, s.spec.size) == ("square", "small")][:16]
    right = [score_image(_generate(builtin_pipe, canonical_caption(scene.spec), seed)).shape == "square"
             for seed, scene in enumerate(scenes)]
    assert len(scenes) == 16 and sum(right) >= 12, f"right: {right}"


def test_size_words_change_the_shape_size(builtin_pipe) -> None:
    sizes = []
    for seed in (7, 8):
        for size in ("small", "large"):
            image = _generate(builtin_pipe, f"a {size} green circle in the center on a black background", seed)
            sizes.append((size, score_image(image).size))
    assert sum(expected == seen for expected, seen in sizes) >= 3, sizes


def test_a_word_the_model_never_saw_is_reported_and_it_still_generates(builtin_pipe) -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        image = _generate(builtin_pipe, "a red dragon on a blue background", 3)
    messages = [str(w.message) for w in caught if issubclass(w.category, UnknownWordsWarning)]
    assert len(messages) == 1 and "'dragon'" in messages[0]
    assert image.size == (64, 64)
    assert score_image(image).background == "blue"


def test_inpainting_repaints_the_masked_half_towards_the_new_prompt(builtin_pipe) -> None:
    """Issue 4's built-in check: a red circle at the left; repaint the right half asking for a yellow square there."""
    original = _generate(builtin_pipe, "a large red circle at the left on a blue background", 11)
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (32, 0, 64, 64))
    result = builtin_pipe.inpaint(original, mask, "a large yellow square at the right on a blue background",
                                  strength=1.0, steps=STEPS, guidance_scale=CFG, sampler=SAMPLER,
                                  guidance_min_timestep=GUIDANCE_MIN_T, seed=12, mask_blur=2).images[0]
    before, after = np.asarray(original).astype(int), np.asarray(result).astype(int)

    def yellow_pixels(pixels: np.ndarray) -> int:
        red, green, blue = pixels[..., 0], pixels[..., 1], pixels[..., 2]
        return int(((red > 160) & (green > 160) & (blue < 100)).sum())

    # The kept half, beyond the blurred edge (a Gaussian of radius 2 px reaches ~6 px), is the original exactly.
    assert np.array_equal(before[:, :24], after[:, :24])
    # The masked half turned yellow where it had none; it is still on blue.
    assert yellow_pixels(before[:, 32:]) < 20
    assert yellow_pixels(after[:, 32:]) > 150
    assert score_image(result).background == "blue"


def test_generate_without_model_uses_the_builtin_and_prints_the_png_path(tmp_path) -> None:
    result = CliRunner().invoke(app, ["generate", "a red circle on a blue background", "--seed", "5",
                                      "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    # its folder's generation_defaults.json: the card's recommended settings, with nothing on the command line
    assert "the model's recommended settings: sampler=DPM++ 2M, steps=20, guidance_scale=5.0, " \
           "guidance_min_timestep=600" in result.stderr
    path = result.stdout.strip().splitlines()[-1]
    image = Image.open(path)
    assert image.size == (64, 64)
    seen = score_image(image)
    assert (seen.colour, seen.background) == ("red", "blue")
