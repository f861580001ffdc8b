"""Control maps in closed form: canny finds a drawn square's outline, the resize modes keep their geometry,
pixel perfect picks the output's short side, each module does what it says, and names are checked."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from dapple.engine.control_maps import MODULES, check_module, control_map, module_details, processor_resolution
from dapple.errors import InvalidRequestError


def square(size: int = 64, box=(16, 16, 47, 47), fill=(220, 35, 35), background=(35, 70, 220)) -> Image.Image:
    image = Image.new("RGB", (size, size), background)
    ImageDraw.Draw(image).rectangle(box, fill=fill)
    return image


def test_canny_edges_lie_on_the_squares_outline() -> None:
    edges = np.asarray(control_map(square(), "canny", 64, 64))[..., 0] > 0
    ys, xs = np.nonzero(edges)
    assert len(xs) > 100
    near_outline = (np.minimum(np.abs(xs - 16), np.abs(xs - 47)) <= 1) | (np.minimum(np.abs(ys - 16), np.abs(ys - 47)) <= 1)
    assert near_outline.all()
    assert not edges[24:40, 24:40].any() and not edges[:8, :8].any()


def test_equal_brightness_colours_still_give_edges() -> None:
    """Canny on the colour image, not on grey: two colours of the same luminance still meet at an edge."""
    grey_twin = square(fill=(0, 128, 0), background=(255, 0, 255))  # about equal luma
    assert (np.asarray(control_map(grey_twin, "canny", 64, 64)) > 0).any()


def test_resize_modes_keep_their_geometry() -> None:
    wide = Image.new("RGB", (128, 64), (0, 0, 0))
    ImageDraw.Draw(wide).rectangle((0, 0, 31, 63), fill=(255, 255, 255))  # the left quarter is white
    stretched = np.asarray(control_map(wide, "none", 64, 64, resize_mode="Just Resize"))
    cropped = np.asarray(control_map(wide, "none", 64, 64, resize_mode="Crop and Resize"))
    filled = np.asarray(control_map(wide, "none", 64, 64, resize_mode="Resize and Fill"))
    assert stretched[:, :14].min() > 200 and stretched[:, 18:].max() < 50  # a quarter of 64 = 16 columns
    assert cropped.max() < 50  # the centre crop misses the white left quarter
    # letterboxed: the image fills rows 16..47 whole, the borders repeat its edge rows
    assert (filled[:16] == filled[16]).all() and (filled[48:] == filled[47]).all()
    assert filled[32, :14].min() > 200 and filled[32, 18:].max() < 50


def test_pixel_perfect_uses_the_outputs_short_side() -> None:
    assert processor_resolution(512, 768, None, False) == 512
    assert processor_resolution(512, 768, 256, True) == 512
    assert processor_resolution(512, 768, 256, False) == 256


def test_modules_do_what_they_say() -> None:
    picture = square(fill=(250, 250, 250), background=(10, 10, 10))
    assert np.array_equal(np.asarray(control_map(picture, "invert", 64, 64)), 255 - np.asarray(picture))
    binary = np.asarray(control_map(picture, "threshold", 64, 64))
    assert set(np.unique(binary)) == {0, 255}
    soft = np.asarray(control_map(picture, "softedge_gradient", 64, 64))[..., 0]
    assert soft[16, 30] > 200 and soft[30, 30] == 0
    tiled = np.asarray(control_map(picture, "tile_resample", 64, 64, threshold_a=4))
    assert 0 < np.abs(tiled.astype(int) - np.asarray(picture)).mean() < 40
    seg = Image.new("RGB", (32, 32), (120, 120, 70))
    ImageDraw.Draw(seg).rectangle((0, 0, 15, 31), fill=(6, 230, 230))
    colours = {tuple(c) for c in np.asarray(control_map(seg, "segmentation", 64, 64, resize_mode="Just Resize")).reshape(-1, 3)}
    assert colours == {(120, 120, 70), (6, 230, 230)}  # no blended colours


def test_inpaint_only_marks_the_mask_with_minus_one() -> None:
    mask = Image.new("L", (64, 64), 0)
    ImageDraw.Draw(mask).rectangle((0, 0, 31, 63), fill=255)
    made = control_map(square(), "inpaint_only", 64, 64, mask=mask)
    assert isinstance(made, torch.Tensor) and made.shape == (1, 3, 64, 64)
    assert (made[..., :, :30] == -1).all() and (made[..., :, 34:] >= 0).all()
    with pytest.raises(InvalidRequestError, match="needs a mask"):
        control_map(square(), "inpaint_only", 64, 64)


def test_names_aliases_and_unknown_modules() -> None:
    assert check_module("Canny") == "canny"
    assert check_module("invert (from white bg & black line)") == "invert"
    with pytest.raises(InvalidRequestError, match="'cany' is unknown.*canny"):
        check_module("cany")
    details = module_details()
    assert list(details) == list(MODULES)
    assert details["canny"]["sliders"][1] == {"name": "Canny Low Threshold", "value": 100, "min": 1, "max": 255}
