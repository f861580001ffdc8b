"""Control units arriving over HTTP, shared by the native job API and the A1111 dialect (a1111_controlnet.py).

- check_unit: one unit's fields as a client sent them, checked before a job is queued: the control image is
  base64 (never a server path) within the pixel limit, read from its header only; the control model is one of
  the server's (by name, with or without A1111's " [hash]"); the preprocessor module is known. The image is
  passed on as a data: URL, so it can never be read as a path later (a short base64 text could be one).
- control_catalog / model_title: the server's control models (dapple.models.control_models), titled as
  sd-webui-controlnet lists them ("name [hash]").
- detect: a unit's detected map (the preprocessed image a control model sees: dapple.engine.control_maps), for
  the studio's preview, /controlnet/detect and the maps an A1111 response carries after its images.
"""

from __future__ import annotations

import base64
import io
from collections.abc import Mapping, Sequence
from typing import Any

from PIL import Image

from dapple.engine.images import DEFAULT_MAX_PIXELS, check_encoded_image, open_image
from dapple.errors import InvalidRequestError
from dapple.service.models import UnknownModelError

# The biggest detected map a preview makes when the client names no size (each side; a job's map has its size).
MAX_PREVIEW_SIDE = 2048


class ControlImageError(InvalidRequestError):
    """A unit's control image is not a readable base64 image within the pixel limit."""


def pipeline_of(service: Any) -> Any:
    """The server's default pipeline (loaded at start): it knows the control-model folders."""
    return service.models.get(None)


def max_pixels_of(pipeline: Any) -> int:
    limits = getattr(pipeline, "limits", None)
    return int(getattr(limits, "max_image_pixels", DEFAULT_MAX_PIXELS))


def control_catalog(pipeline: Any) -> list[Any]:
    """The control models a unit may name (ControlModelEntry: name, path, kind, short_hash); none for a
    pipeline that has no control folders."""
    listing = getattr(pipeline, "control_models", None)
    return list(listing()) if callable(listing) else []


def model_title(entry: Any) -> str:
    """sd-webui-controlnet's model name: 'name [hash]'."""
    digest = getattr(entry, "short_hash", None)
    return f"{entry.name} [{digest}]" if digest else entry.name


def find_control_model(name: Any, pipeline: Any, what: str) -> Any:
    """The catalog entry a unit names, found as the engine will find it (dapple.models.control_models: with or
    without " [hash]", a stale hash too), or UnknownModelError naming the field and listing the valid names."""
    from dapple.models.control_models import find_control_model as find

    try:
        return find(str(name), getattr(pipeline, "control_dirs", ()))
    except InvalidRequestError as error:
        names = [entry.name for entry in control_catalog(pipeline)]
        hint = "" if names else " (give the server control models with `dapple serve --control-dir FOLDER`)"
        raise UnknownModelError(f"{what}: {error}{hint}", names) from None


def canonical_module(module: Any, what: str) -> str:
    """The preprocessor's canonical name, or InvalidRequestError naming the field and the valid modules."""
    from dapple.engine.control_maps import check_module

    try:
        return check_module(str(module))
    except InvalidRequestError as error:
        raise InvalidRequestError(f"{what}: {error}") from None


def as_data_url(text: str) -> str:
    """A checked base64 image as a data: URL (the form open_image always decodes, whatever its length)."""
    return text if text.startswith("data:") else "data:image/png;base64," + text


def check_unit(unit: Mapping[str, Any], pipeline: Any, *, what: str, has_init_image: bool,
               max_pixels: int = DEFAULT_MAX_PIXELS) -> dict[str, Any]:
    """One unit's fields (ControlUnit's names), checked as described above; returns them with the canonical
    module and the image as a data: URL. `what` names the unit in messages ("controls[0]")."""
    fields = dict(unit)
    image = fields.get("image")
    if image is None:
        if not has_init_image:
            raise InvalidRequestError(f"{what}.image is missing: a control unit needs its control image here "
                                      "(only img2img and inpaint units may leave it out, to use the init image)")
    else:
        try:
            check_encoded_image(image, max_pixels=max_pixels, what=f"{what}.image")
        except InvalidRequestError as error:
            raise ControlImageError(str(error)) from None
        fields["image"] = as_data_url(image)
    find_control_model(fields.get("model", ""), pipeline, f"{what}.model")
    fields["module"] = canonical_module(fields.get("module", "none"), f"{what}.module")
    return fields


def check_units(units: Sequence[Mapping[str, Any]], pipeline: Any, *, has_init_image: bool,
                labels: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """check_unit for each unit of a request; labels name them in messages (default: controls[i])."""
    if not units:
        return []
    limit = max_pixels_of(pipeline)
    return [check_unit(unit, pipeline, what=labels[index] if labels else f"controls[{index}]",
                       has_init_image=has_init_image, max_pixels=limit) for index, unit in enumerate(units)]


def preview_size(image: Image.Image, processor_res: int | None) -> tuple[int, int]:
    """The size of a map made without an output size: the image's own (short side = processor_res when one is
    given, as sd-webui-controlnet's detect answers), within MAX_PREVIEW_SIDE."""
    width, height = image.size
    scale = processor_res / min(width, height) if processor_res else 1.0
    scale = min(scale, MAX_PREVIEW_SIDE / max(width, height))
    return max(1, round(width * scale)), max(1, round(height * scale))


def detect(image: Any, module: str, width: int | None = None, height: int | None = None, *,
           resize_mode: str = "Crop and Resize", processor_res: int | None = None, pixel_perfect: bool = False,
           threshold_a: float | None = None, threshold_b: float | None = None, mask: Any = None,
           max_pixels: int = DEFAULT_MAX_PIXELS, what: str = "image") -> Image.Image:
    """The detected map of a control image (base64, data: URL or PIL image) at width x height (default:
    preview_size), through dapple.engine.control_maps.control_map."""
    from dapple.engine.control_maps import control_map

    if isinstance(image, str):
        check_encoded_image(image, max_pixels=max_pixels, what=what)
        image = as_data_url(image)
    picture = open_image(image, max_pixels=max_pixels, what=what).convert("RGB")
    if mask is not None:
        if isinstance(mask, str):
            check_encoded_image(mask, max_pixels=max_pixels, what=f"{what} mask")
            mask = as_data_url(mask)
        mask = open_image(mask, max_pixels=max_pixels, what=f"{what} mask")
    if width is None or height is None:
        width, height = preview_size(picture, processor_res)
    made = control_map(picture, module, width, height, resize_mode=resize_mode, processor_res=processor_res,
                       pixel_perfect=pixel_perfect, threshold_a=threshold_a, threshold_b=threshold_b, mask=mask)
    return made if isinstance(made, Image.Image) else _inpaint_picture(made)


def _inpaint_picture(condition: Any) -> Image.Image:
    """The inpaint modules' map (a tensor in [0, 1], masked pixels -1) as a picture: the image, the masked area
    half transparent (as sd-webui-controlnet's visualize_inpaint_mask shows it)."""
    import numpy as np

    array = condition[0].permute(1, 2, 0).float().cpu().numpy()
    masked = (array < 0).any(axis=2)
    rgb = (np.clip(array, 0, 1) * 255).round().astype(np.uint8)
    alpha = np.where(masked, 127, 255).astype(np.uint8)
    return Image.fromarray(np.dstack([rgb, alpha]), "RGBA")


def png_base64(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()
