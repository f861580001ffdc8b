"""Control maps: the picture a ControlNet or T2I-Adapter sees, made from the user's image by a weight-free
preprocessor ("module", as sd-webui-controlnet calls it) and fitted to the output size.

Modules that need downloaded weights (depth, normal, pose and lineart estimators) are not here: the user gives
those maps and picks module "none" (or the map's own name, e.g. "depth", which means the same: a passthrough).
Names and slider defaults follow sd-webui-controlnet, so the module names A1111 clients send are accepted.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import cv2
import numpy as np
import torch
from PIL import Image

from dapple.engine.images import resize_to
from dapple.engine.preprocessors import CANNY_HIGH, CANNY_LOW, canny
from dapple.errors import InvalidRequestError, did_you_mean


def _threshold(image: Image.Image, a: float, b: float) -> Image.Image:
    """Binarise the luminance at `a` (0..255): white where brighter (sd-webui-controlnet's threshold)."""
    grey = np.asarray(image.convert("L"))
    return Image.fromarray(np.where(grey > a, 255, 0).astype(np.uint8)).convert("RGB")


def _scribble(image: Image.Image, a: float, b: float) -> Image.Image:
    """Scribble from a sketch on a light background: dark strokes become white lines on black."""
    grey = np.asarray(image.convert("L"))
    return Image.fromarray(np.where(grey < a, 255, 0).astype(np.uint8)).convert("RGB")


def _soft_edges(image: Image.Image, a: float, b: float) -> Image.Image:
    """Soft edges from the image gradient: the Scharr gradient magnitude over the colour channels, scaled to
    0..255 (a weight-free stand-in for HED/PiDiNet soft edges)."""
    pixels = np.asarray(image.convert("RGB"), dtype=np.float32)
    magnitude = np.zeros(pixels.shape[:2], dtype=np.float32)
    for channel in range(3):
        gx = cv2.Scharr(pixels[..., channel], cv2.CV_32F, 1, 0)
        gy = cv2.Scharr(pixels[..., channel], cv2.CV_32F, 0, 1)
        magnitude = np.maximum(magnitude, np.hypot(gx, gy))
    peak = float(magnitude.max())
    scaled = magnitude / peak * 255.0 if peak > 0 else magnitude
    return Image.fromarray(scaled.round().astype(np.uint8)).convert("RGB")


def _tile(image: Image.Image, a: float, b: float) -> Image.Image:
    """Tile: downsample by `a` (>= 1) and back, a blurred copy for tile ControlNets (tile_resample)."""
    factor = max(1.0, float(a))
    small = image.convert("RGB").resize((max(1, round(image.width / factor)), max(1, round(image.height / factor))),
                                        Image.BICUBIC)
    return small.resize(image.size, Image.BICUBIC)


def _invert(image: Image.Image, a: float, b: float) -> Image.Image:
    """Invert: black lines on white (line art, scribbles) become the white-on-black maps ControlNets take."""
    return Image.fromarray(255 - np.asarray(image.convert("RGB")))


def _canny(image: Image.Image, a: float, b: float) -> Image.Image:
    return canny(image, a, b)


def _same(image: Image.Image, a: float, b: float) -> Image.Image:
    return image.convert("RGB")


@dataclass(frozen=True)
class Module:
    """One preprocessor: its function, what it does, and its sliders as sd-webui-controlnet lists them."""

    run: Callable[[Image.Image, float, float], Image.Image]
    description: str
    threshold_a: tuple[str, float, float, float] | None = None  # (name, default, min, max)
    threshold_b: tuple[str, float, float, float] | None = None
    resolution: bool = True  # runs at a processor resolution (else at the output size)
    nearest: bool = False  # colour-coded maps are resized without blending colours
    aliases: tuple[str, ...] = field(default=())


MODULES: dict[str, Module] = {
    "none": Module(_same, "the image already is the control map", resolution=False),
    "canny": Module(_canny, "Canny edges (OpenCV), white on black",
                    ("Canny Low Threshold", CANNY_LOW, 1, 255), ("Canny High Threshold", CANNY_HIGH, 1, 255)),
    "threshold": Module(_threshold, "black and white at a brightness threshold",
                        ("Binarization Threshold", 127, 0, 255)),
    "scribble": Module(_scribble, "dark strokes on a light background -> white lines on black",
                       ("Stroke Threshold", 127, 0, 255), aliases=("scribble_threshold",)),
    "softedge_gradient": Module(_soft_edges, "soft edges from the image gradient (Scharr magnitude)",
                                aliases=("softedge",)),
    "tile_resample": Module(_tile, "a down- and up-sampled copy for tile ControlNets",
                            ("Down Sampling Rate", 1.0, 1.0, 8.0), aliases=("tile",)),
    "invert": Module(_invert, "inverts black lines on white into white on black",
                     aliases=("invert (from white bg & black line)",)),
    "inpaint_only": Module(_same, "the image with the masked area marked -1 for the inpaint ControlNet "
                           "(needs the mask)", resolution=False, aliases=("inpaint", "inpaint_global_harmonious")),
    "segmentation": Module(_same, "a colour-coded segmentation map, kept exactly", resolution=False, nearest=True,
                           aliases=("seg",)),
    # Maps that need a model to detect: the user gives them.
    "depth": Module(_same, "a depth map you give (brighter = nearer)", resolution=False),
    "normal": Module(_same, "a normal map you give", resolution=False, aliases=("normal_map",)),
    "openpose": Module(_same, "a pose skeleton you give", resolution=False, aliases=("pose",)),
    "lineart": Module(_same, "line art you give, white lines on black", resolution=False),
}
_ALIASES = {alias: name for name, module in MODULES.items() for alias in module.aliases}


def check_module(name: str) -> str:
    """The canonical module name for `name` (any case, sd-webui-controlnet's aliases too), or a clear error."""
    key = str(name).strip().lower()
    if key in MODULES:
        return key
    if key in _ALIASES:
        return _ALIASES[key]
    names = list(MODULES)
    raise InvalidRequestError(f"module {name!r} is unknown{did_you_mean(key, names)}; allowed: {', '.join(names)}")


def processor_resolution(width: int, height: int, processor_res: int | None, pixel_perfect: bool) -> int:
    """The short side the preprocessor runs at: processor_res, or (None / pixel perfect) the output's short side."""
    if processor_res is None or pixel_perfect:
        return min(width, height)
    return int(processor_res)


def _at_short_side(image: Image.Image, side: int) -> Image.Image:
    scale = side / min(image.size)
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    return image if size == image.size else image.resize(size, Image.LANCZOS)


def control_map(image: Image.Image, module: str, width: int, height: int, *, resize_mode: str = "Crop and Resize",
                processor_res: int | None = None, pixel_perfect: bool = False, threshold_a: float | None = None,
                threshold_b: float | None = None, mask: Image.Image | None = None) -> Image.Image | torch.Tensor:
    """The map a control model sees at width x height: run the module at its processor resolution, then fit the
    result to the output with the resize mode ("Just Resize", "Crop and Resize", "Resize and Fill").

    Returns an RGB image, except for the inpaint modules: a (1, 3, H, W) tensor in [0, 1] with the masked pixels
    set to -1 (diffusers' make_inpaint_condition), which no 8-bit image can hold."""
    name = check_module(module)
    spec = MODULES[name]
    a = spec.threshold_a[1] if threshold_a is None and spec.threshold_a else (threshold_a or 0.0)
    b = spec.threshold_b[1] if threshold_b is None and spec.threshold_b else (threshold_b or 0.0)
    picture = image.convert("RGB")
    if spec.resolution:
        picture = _at_short_side(picture, processor_resolution(width, height, processor_res, pixel_perfect))
    made = spec.run(picture, a, b)
    mode = resize_mode.strip().lower()
    if spec.nearest and made.size != (width, height) and mode == "just resize":
        fitted = made.resize((width, height), Image.NEAREST)
    else:
        fitted = resize_to(made, width, height, mode)
    if name != "inpaint_only":
        return fitted
    if mask is None:
        raise InvalidRequestError("module 'inpaint_only' needs a mask (white = repaint); give the unit's image "
                                  "with a mask, or use it in inpainting")
    from dapple.engine.control import inpaint_condition

    return inpaint_condition(fitted, resize_to(mask.convert("RGB"), width, height, mode))


def module_details() -> dict[str, dict[str, Any]]:
    """sd-webui-controlnet's /controlnet/module_list "module_detail": per module, whether it needs a model and
    its sliders (name, value, min, max), the processor resolution first where the module has one."""
    details: dict[str, dict[str, Any]] = {}
    for name, spec in MODULES.items():
        sliders: list[dict[str, Any]] = []
        if spec.resolution:
            sliders.append({"name": "Preprocessor Resolution", "value": 512, "min": 64, "max": 2048})
        for slider in (spec.threshold_a, spec.threshold_b):
            if slider is not None:
                label, value, low, high = slider
                sliders.append({"name": label, "value": value, "min": low, "max": high})
        details[name] = {"model_free": True, "sliders": sliders, "description": spec.description}
    return details
