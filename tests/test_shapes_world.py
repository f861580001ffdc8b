"""The shapes world: deterministic scenes, faithful captions and ground truth, a held-out split."""

from dataclasses import asdict

import numpy as np
import pytest

from dapple.train.data import COLOURS, POSITIONS, SHAPES, ShapesWorld, held_out_combinations
from dapple.train.data.captions import canonical_caption, parse_caption


def test_same_seed_and_index_draw_the_same_scene() -> None:
    first, again = ShapesWorld(seed=3).scene(17), ShapesWorld(seed=3).scene(17)
    assert first == again
    assert np.array_equal(np.asarray(first.image), np.asarray(again.image))
    assert ShapesWorld(seed=4).scene(17) != first


def test_scenes_are_64px_rgb_with_a_mask_and_bbox_that_agree() -> None:
    for scene in ShapesWorld(seed=0, split="all").scenes(0, 60):
        assert scene.image.size == (64, 64) and scene.image.mode == "RGB"
        left, top, right, bottom = scene.bbox
        assert 0 <= left < right <= 64 and 0 <= top < bottom <= 64
        rows, cols = np.nonzero(scene.mask)
        assert (cols.min(), rows.min()) == (left, top) or scene.spec.shape == "triangle"
        assert cols.max() < right and rows.max() < bottom
        pixels = np.asarray(scene.image)
        assert tuple(pixels[~scene.mask].mean(axis=0).round()) != tuple(COLOURS[scene.spec.colour])
        assert scene.spec.colour != scene.spec.background


def test_captions_name_the_scene_truthfully() -> None:
    for scene in ShapesWorld(seed=1).scenes(0, 200):
        named = parse_caption(scene.caption)
        assert {"colour", "shape", "background"} <= set(named)
        assert all(asdict(scene.spec)[key] == value for key, value in named.items())


def test_canonical_caption_form() -> None:
    scene = ShapesWorld(seed=1).scene(0)
    caption = canonical_caption(scene.spec)
    assert caption.startswith(f"a {scene.spec.size} {scene.spec.colour} {scene.spec.shape} ")
    assert parse_caption(caption) == asdict(scene.spec)
    assert parse_caption("a red circle on a blue background") == {
        "background": "blue", "colour": "red", "shape": "circle"}
    assert parse_caption("a small red circle at the top left on a blue background")["position"] == "top left"


def test_every_attribute_value_occurs() -> None:
    specs = [s.spec for s in ShapesWorld(seed=0, split="all").scenes(0, 600)]
    assert {s.shape for s in specs} == set(SHAPES)
    assert {s.colour for s in specs} == set(COLOURS) == {s.background for s in specs}
    assert {s.position for s in specs} == set(POSITIONS)
    assert {s.size for s in specs} == {"small", "large"}


def test_held_out_combinations_never_appear_in_training() -> None:
    held = held_out_combinations()
    assert 10 <= len(held) <= 25
    train = [s.spec for s in ShapesWorld(seed=0, split="train").scenes(0, 1000)]
    assert not {s.combination for s in train} & held
    # ... while every colour, shape and background on its own is still trained
    assert {s.colour for s in train} == set(COLOURS) and {s.shape for s in train} == set(SHAPES)
    assert {s.background for s in train} == set(COLOURS)
    held_scenes = ShapesWorld(seed=0, split="held_out").scenes(0, 100)
    assert {s.spec.combination for s in held_scenes} <= held


def test_unknown_split_is_an_error() -> None:
    with pytest.raises(ValueError, match="unknown split 'test'"):
        ShapesWorld(split="test")


def test_the_caption_vocabulary_covers_every_caption() -> None:
    from dapple.models.vocabulary import unknown_words
    from dapple.train.data.captions import caption_vocabulary

    vocabulary = frozenset(caption_vocabulary())
    for scene in ShapesWorld(seed=2, split="all").scenes(0, 300):
        assert unknown_words(scene.caption, vocabulary) == []
        assert unknown_words(canonical_caption(scene.spec), vocabulary) == []
