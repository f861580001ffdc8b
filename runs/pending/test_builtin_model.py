"""The shipped built-in model: it loads with no path, follows its prompts, and inpaints towards a new prompt."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from PIL import Image

import dapple
from dapple.api import BUILTIN_MODEL_DIR
from dapple.train.data.captions import parse_caption
from dapple.train.scorer import score_image

# One prompt per position, every colour and background at least once, shapes and sizes mixed. Written before
# looking at any output; seeds are 0.. in order.
PROMPTS = [
    "a large red circle at the top left on a blue background",
    "a small green square at the top on a white background",
    "a large yellow triangle at the top right on a black background",
    "a large purple circle at the left on a yellow background",
    "a large orange square in the center on a purple background",
    "a small white circle at the right on a red background",
    "a large black square at the bottom left on an orange background",
    "a large blue triangle at the bottom on a green background",
    "a small red square at the bottom right on a white background",
]


@pytest.fixture(scope="module")
def builtin() -> dapple.Pipeline:
    return dapple.load(device="cpu")


def test_the_builtin_model_ships_inside_the_package() -> None:
    assert (BUILTIN_MODEL_DIR / "model_index.json").is_file()
    assert (BUILTIN_MODEL_DIR / "README.md").is_file()  # the model card
    weights = list(BUILTIN_MODEL_DIR.rglob("*.safetensors"))
    assert len(weights) == 3 and sum(w.stat().st_size for w in weights) < 30 * 2**20


def test_generated_images_show_the_prompted_colour_background_and_position(builtin) -> None:
    grades = {"colour": 0, "background": 0, "position": 0}
    for seed, prompt in enumerate(PROMPTS):
        image = builtin.generate(prompt, steps=20, guidance_scale=6.0, seed=seed).images[0]
        assert image.size == (64, 64)
        predicted, expected = score_image(image), parse_caption(prompt)
        for name in grades:
            grades[name] += getattr(predicted, name) == expected[name]
    # Chance is 1/8 for colours and 1/9 for positions; the model's held-out accuracy is in its model card.
    assert all(count >= 8 for count in grades.values()), grades


def test_words_the_model_never_saw_give_a_warning_and_still_an_image(builtin) -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = builtin.generate("a red astronaut on a blue background", steps=4, seed=0)
    assert any("astronaut" in str(w.message) for w in caught)
    assert result.images[0].size == (64, 64)


def test_inpainting_repaints_the_masked_half_towards_the_new_prompt(builtin) -> None:
    """Issue 4's built-in test: a yellow square replaces a red one under the mask; the rest stays."""
    original = builtin.generate("a large red square at the right on a blue background", steps=20,
                                guidance_scale=6.0, seed=3).images[0]
    mask = np.zeros((64, 64), np.uint8)
    mask[:, 32:] = 255
    result = builtin.inpaint(original, Image.fromarray(mask),
                             "a large yellow square at the right on a blue background", strength=1.0,
                             steps=20, guidance_scale=6.0, seed=3, mask_blur=2)
    before, after = (np.asarray(image, np.float32) for image in (original, result.images[0]))
    blur_reach = 2 * 2 + 1
    assert np.array_equal(before[:, : 32 - blur_reach], after[:, : 32 - blur_reach])  # the unmasked half stayed

    def distance_to(rgb, pixels):
        return np.linalg.norm(pixels - np.array(rgb, np.float32), axis=-1)

    yellow, red, blue = (240, 215, 35), (220, 35, 35), (35, 70, 220)
    changed = after[:, 32:]
    shape_pixels = distance_to(blue, changed) > 120  # whatever is not background in the repainted half
    assert shape_pixels.sum() > 100
    assert np.median(distance_to(yellow, changed[shape_pixels])) < np.median(distance_to(red, changed[shape_pixels]))
    assert score_image(result.images[0]).colour == "yellow"
