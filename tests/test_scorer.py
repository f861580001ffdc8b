"""The image-analysis scorer must grade the generator's own drawings (nearly) perfectly."""

from dataclasses import asdict

import numpy as np
from PIL import Image, ImageFilter

from dapple.train.data import ShapesWorld
from dapple.train.scorer import ATTRIBUTES, grade, score_all, score_image


def test_ground_truth_scores_100_percent_on_every_attribute() -> None:
    scenes = ShapesWorld(seed=5, split="all").scenes(0, 300)
    table = score_all([s.image for s in scenes], [asdict(s.spec) for s in scenes])
    for name in ATTRIBUTES:
        assert table.accuracy(name) == 1.0, table.format()
    assert table.all_right_share == 1.0


def test_the_mask_matches_the_ground_truth_mask() -> None:
    for scene in ShapesWorld(seed=6).scenes(0, 40):
        mask = score_image(scene.image).mask
        assert (mask != scene.mask).sum() <= 4  # at most a few anti-aliased edge pixels differ


def test_blurred_noisy_images_still_score_high() -> None:
    """Generated images are soft and noisy; the scorer must not depend on crisp edges."""
    rng = np.random.default_rng(0)
    scenes = ShapesWorld(seed=7, split="all").scenes(0, 200)
    images = [
        np.clip(np.asarray(s.image.filter(ImageFilter.GaussianBlur(1.0)), np.float32)
                + rng.normal(0, 8, (64, 64, 3)), 0, 255).astype(np.uint8)
        for s in scenes
    ]
    table = score_all(images, [asdict(s.spec) for s in scenes])
    assert table.all_right_share >= 0.97, table.format()


def test_wrong_attributes_are_caught() -> None:
    scene = ShapesWorld(seed=8).scene(0)
    wrong_colour = "blue" if scene.spec.colour != "blue" else "red"
    grades = grade(score_image(scene.image), {"colour": wrong_colour, "shape": scene.spec.shape})
    assert grades == {"colour": False, "shape": True}


def test_a_plain_image_has_no_shape() -> None:
    prediction = score_image(Image.new("RGB", (64, 64), (35, 70, 220)))
    assert prediction.background == "blue" and prediction.colour is None and prediction.shape is None


def test_larger_images_are_scored_at_64px() -> None:
    scene = ShapesWorld(seed=9).scene(3)
    big = scene.image.resize((256, 256), Image.Resampling.NEAREST)
    assert grade(score_image(big), asdict(scene.spec)) == {name: True for name in ATTRIBUTES}
