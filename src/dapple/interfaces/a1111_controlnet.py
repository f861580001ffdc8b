"""sd-webui-controlnet's HTTP dialect on Dapple's control units (the extension's scripts/api.py and
internal_controlnet/args.py, API version 3), as clients such as webuiapi speak it.

- controlnet_units: `alwayson_scripts.controlnet.args` of a txt2img/img2img body -> ControlUnit fields. A unit
  is a dict as the extension's ControlNetUnit.from_dict reads it: image (or its old name input_image) as base64,
  a data: URL, {"image": ..., "mask": ...} or [image, mask]; module; model with or without " [hash]"; weight;
  resize_mode and control_mode by name or index (resize_mode 3, "Just Resize (Latent upscale)", is Just Resize;
  the old "Inner Fit (Scale to Fit)" names too); processor_res and threshold_a/b, where -1 is the module's
  default; guidance_start/end (old name: guidance); pixel_perfect; enabled. low_vram changes nothing here.
  Units with "enabled": false are skipped, and so are placeholders that name no model; a unit that leaves
  `enabled` out counts as enabled (the extension's default was True until 2024; a client that sends a unit with
  a model means it). Fields Dapple does not act on are named under "ignored" in the response's info.
- A response carries each unit's detected map after the generated images (as the extension appends them),
  unless the unit says save_detected_map: false or the option control_net_no_detectmap is set.
- The routes /controlnet/version, /model_list, /module_list, /settings and /detect, answering as the extension
  does; their errors are in A1111's shape.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from fastapi import APIRouter
from pydantic import Field, ValidationError

from dapple.errors import InvalidRequestError
from dapple.interfaces.a1111 import A1111Body, A1111Error, A1111Route, _in_thread
from dapple.interfaces.controls import (
    ControlImageError,
    canonical_module,
    check_units,
    control_catalog,
    detect,
    max_pixels_of,
    model_title,
    pipeline_of,
    png_base64,
)
from dapple.request import MAX_CONTROL_UNITS, ControlUnit, describe_errors
from dapple.service.jobs import JobService
from dapple.service.models import UnknownModelError

API_VERSION = 3  # what the extension's /controlnet/version answers (external_code.get_api_version)
SCRIPT_NAME = "controlnet"  # the alwayson script's name (A1111 matches it without regard to case)
MAX_DETECT_IMAGES = 16
RESIZE_ALIASES = {  # the extension's older resize-mode names (external_code.resize_mode_aliases)
    "inner fit (scale to fit)": "Crop and Resize", "scale to fit (inner fit)": "Crop and Resize",
    "outer fit (shrink to fit)": "Resize and Fill", "envelope (outer fit)": "Resize and Fill",
    "just resize (latent upscale)": "Just Resize",
}
LEGACY_ALIASES = {"input_image": "image", "guidance": "guidance_end", "lowvram": "low_vram", "mask_image": "mask"}
# The extension's unit fields Dapple does not act on, with their defaults: named as ignored when set otherwise.
EXTENSION_DEFAULTS: dict[str, Any] = {
    "is_ui": False, "input_mode": "simple", "batch_images": None, "output_dir": "", "loopback": False,
    "inpaint_crop_input_image": True, "hr_option": "Both", "advanced_weighting": None,
    "effective_region_mask": None, "pulid_mode": "Fidelity", "union_control_type": "Unknown",
    "ipadapter_input": None, "batch_mask_dir": None, "animatediff_batch": False, "batch_modifiers": [],
    "batch_image_files": [], "batch_keyframe_idx": None,
}
HANDLED = {"enabled", "image", "mask", "module", "model", "weight", "resize_mode", "low_vram", "processor_res",
           "threshold_a", "threshold_b", "guidance_start", "guidance_end", "pixel_perfect", "control_mode",
           "save_detected_map"}


@dataclass(frozen=True)
class A1111Unit:
    """One enabled unit: where it was in the body, its ControlUnit fields, and whether its map is returned."""

    label: str  # "alwayson_scripts.controlnet.args[2]"
    fields: dict[str, Any]
    save_detected_map: bool = True


def _script_args(body: dict[str, Any]) -> tuple[str, Any] | None:
    scripts = body.get("alwayson_scripts") or {}
    if not isinstance(scripts, dict):
        raise A1111Error(422, "alwayson_scripts must be an object: {script name: {\"args\": [...]}}")
    for name, entry in scripts.items():
        if name.strip().lower() == SCRIPT_NAME:
            args = entry.get("args", []) if isinstance(entry, dict) else entry
            if not isinstance(args, list):
                raise A1111Error(422, f"alwayson_scripts.{name}.args must be a list of ControlNet units; got "
                                      f"{type(args).__name__}")
            return name, args
    return None


def other_scripts(body: dict[str, Any]) -> list[str]:
    """The alwayson scripts a body names that Dapple does not run (for `ignored`)."""
    scripts = body.get("alwayson_scripts") or {}
    return [f"alwayson_scripts.{name}" for name in scripts if name.strip().lower() != SCRIPT_NAME] \
        if isinstance(scripts, dict) else []


def _image_and_mask(value: Any, where: str) -> tuple[Any, Any]:
    """The extension's image forms: base64 text, {"image", "mask"}, [image, mask], [{"image", "mask"}]."""
    if value in (None, ""):
        return None, None
    if isinstance(value, str):
        return value, None
    if isinstance(value, dict):
        return value.get("image") or None, value.get("mask") or None
    if isinstance(value, list) and value:
        if isinstance(value[0], dict):
            if len(value) > 1:
                raise A1111Error(422, f"{where} holds {len(value)} images; allowed: one per unit (several "
                                      "inputs are for IP-Adapter units, which Dapple does not run)")
            return _image_and_mask(value[0], where)
        if len(value) == 2:
            return value[0] or None, value[1] or None
    raise A1111Error(422, f"{where} must be a base64 image, a data: URL, {{\"image\": ..., \"mask\": ...}} or "
                          f"[image, mask]; got {type(value).__name__}")


def _default_resolution(module: str) -> int | None:
    """The module's processor resolution slider's start (module_details; the extension's 512), None for a module
    that runs at the output's size."""
    from dapple.engine.control_maps import module_details

    for slider in module_details()[module]["sliders"]:
        if slider["name"] == "Preprocessor Resolution":
            return int(slider["value"])
    return None


def _unit_fields(unit: dict[str, Any], label: str, ignored: list[str]) -> tuple[dict[str, Any], bool]:
    values = dict(unit)
    for old, new in LEGACY_ALIASES.items():
        value = values.pop(old, None)
        if value in (None, ""):
            continue
        if values.get(new) not in (None, ""):
            raise A1111Error(422, f"{label}: give either {old!r} or {new!r} (the same field), not both")
        values[new] = value
    image, mask = _image_and_mask(values.get("image"), f"{label}.image")
    mask = mask or values.get("mask") or None
    if mask is not None:
        ignored.append(f"{label}.mask (a unit's own mask; inpaint modules use the img2img mask)")
    fields: dict[str, Any] = {"image": image, "model": values.get("model") or "None"}
    module = values.get("module") or "none"
    fields["module"] = module
    for name in ("weight", "guidance_start", "guidance_end", "pixel_perfect", "control_mode"):
        if values.get(name) is not None:
            fields[name] = values[name]
    resize = values.get("resize_mode")
    if isinstance(resize, str):
        resize = RESIZE_ALIASES.get(resize.strip().lower(), resize)
    elif isinstance(resize, int) and not isinstance(resize, bool) and resize == 3:
        resize = "Just Resize"
    if resize is not None:
        fields["resize_mode"] = resize
    for name in ("threshold_a", "threshold_b"):
        value = values.get(name)
        if value is not None and value != -1:  # -1: the module's default
            fields[name] = value
    resolution = values.get("processor_res")
    if not fields.get("pixel_perfect"):
        if resolution is None or (isinstance(resolution, (int, float)) and not isinstance(resolution, bool)
                                  and resolution < 0):
            resolution = _default_resolution(canonical_module(module, f"{label}.module"))
        fields["processor_res"] = resolution
    for name, default in EXTENSION_DEFAULTS.items():
        value = values.get(name, default)
        if value != default and value not in (None, "", [], {}) and \
                not (isinstance(default, str) and str(value).lower() == default.lower()):
            ignored.append(f"{label}.{name}")
    ignored += [f"{label}.{name}" for name in values if name not in HANDLED and name not in EXTENSION_DEFAULTS]
    return fields, values.get("save_detected_map", True) is not False


def controlnet_units(body: dict[str, Any], mode: str, ignored: list[str]) -> list[A1111Unit]:
    """The enabled units of a body, as ControlUnit fields checked against the unit's bounds; a bad one is a
    422 naming it (alwayson_scripts.controlnet.args[i]) and its field. Model, module and image are checked
    against the server by controls.check_units before the job is queued."""
    found = _script_args(body)
    if found is None:
        return []
    name, args = found
    units: list[A1111Unit] = []
    for index, unit in enumerate(args):
        label = f"alwayson_scripts.{name}.args[{index}]"
        if not isinstance(unit, dict):
            raise A1111Error(422, f"{label} must be an object (a ControlNet unit); got {type(unit).__name__}")
        if "enabled" in unit and not unit["enabled"]:
            continue
        if "enabled" not in unit and str(unit.get("model") or "None").strip() in ("None", ""):
            continue  # a placeholder, as clients pad the extension's unit count with
        fields, save_map = _unit_fields(unit, label, ignored)
        try:
            checked = ControlUnit(**fields)
        except ValidationError as error:
            lines = []
            for item in error.errors():
                if not item["loc"]:  # a rule across fields (guidance_start after guidance_end)
                    lines.append(f"{label}: {str(item['msg']).removeprefix('Value error, ')}")
                    continue
                text = describe_errors([{**item, "loc": ("controls", index, *item["loc"])}])
                lines.append(text.replace(f"controls.{index}.", f"{label}.", 1))
            raise A1111Error(422, "; ".join(lines)) from None
        fields = checked.model_dump()
        units.append(A1111Unit(label, fields, save_map))
    if len(units) > MAX_CONTROL_UNITS:
        raise A1111Error(422, f"{len(units)} enabled ControlNet units; allowed: at most {MAX_CONTROL_UNITS}")
    if mode == "img2img":
        return units
    for unit in units:
        if unit.fields["image"] is None:
            raise A1111Error(422, f"{unit.label}.image is missing: a txt2img ControlNet unit needs its control "
                                  "image (base64 or a data: URL); only img2img units may leave it out, to use "
                                  "the init image")
    return units


def detected_maps(units: list[A1111Unit], fields: dict[str, Any], width: int, height: int,
                  max_pixels: int) -> list[str]:
    """The detected map of each unit that keeps one, at the output's size, as base64 PNGs (what the extension
    appends to a response's images). The job ran with these maps, so they are made the same way here."""
    maps = []
    for unit in units:
        if not unit.save_detected_map:
            continue
        image = unit.fields["image"] if unit.fields["image"] is not None else fields.get("init_image")
        if image is None:
            continue
        options = {key: unit.fields.get(key) for key in ("resize_mode", "processor_res", "pixel_perfect",
                                                         "threshold_a", "threshold_b")}
        try:
            maps.append(png_base64(detect(image, unit.fields["module"], width, height, max_pixels=max_pixels,
                                          what=f"{unit.label}.image", **options)))
        except InvalidRequestError:  # the job has its images; a map it could not make is left out
            continue
    return maps


class DetectRequest(A1111Body):
    """The body of POST /controlnet/detect (the extension's names; webuiapi sends controlnet_images)."""

    controlnet_module: str | None = Field("none", description="a module from /controlnet/module_list")
    controlnet_input_images: list[str] | None = Field(default_factory=list, description="base64 images")
    controlnet_images: list[str] | None = Field(None, description="the older name of controlnet_input_images")
    controlnet_processor_res: int | None = Field(-1, description="the short side the module works at; -1: its "
                                                 "default")
    controlnet_threshold_a: float | None = Field(-1, description="-1: the module's default")
    controlnet_threshold_b: float | None = Field(-1, description="-1: the module's default")
    controlnet_masks: list[str] | None = Field(default_factory=list, description="base64 masks, one per image")
    low_vram: bool | None = False


def create_router(service: JobService) -> APIRouter:
    """The extension's routes under /controlnet."""
    router = APIRouter(prefix="/controlnet", route_class=A1111Route)

    @router.get("/version")
    def version() -> dict[str, Any]:
        return {"version": API_VERSION}

    @router.get("/model_list")
    def model_list(update: bool = True) -> dict[str, Any]:
        """Control models as the extension names them, 'name [hash]' (the folders are read on every call, so
        `update` has nothing more to do)."""
        return {"model_list": [model_title(entry) for entry in control_catalog(pipeline_of(service))]}

    @router.get("/module_list")
    def module_list(alias_names: bool = False) -> dict[str, Any]:
        """The preprocessors (Dapple's names are the extension's, so alias_names changes nothing)."""
        from dapple.engine.control_maps import module_details

        details = module_details()
        return {"module_list": list(details), "module_detail": details}

    @router.get("/settings")
    def settings() -> dict[str, Any]:
        return {"control_net_unit_count": MAX_CONTROL_UNITS}

    def run_detect(body: dict[str, Any]) -> dict[str, Any]:
        images = body.get("controlnet_input_images") or body.get("controlnet_images") or []
        module = canonical_module(body.get("controlnet_module") or "none", "controlnet_module")
        if not images:
            raise A1111Error(422, "no image selected: controlnet_input_images holds no base64 image")
        if len(images) > MAX_DETECT_IMAGES:
            raise A1111Error(422, f"controlnet_input_images holds {len(images)} images; allowed: at most "
                                  f"{MAX_DETECT_IMAGES} per call")
        resolution = body.get("controlnet_processor_res")
        if resolution is None or resolution < 0:
            resolution = _default_resolution(module)
        elif not 64 <= resolution <= 2048:
            raise A1111Error(422, f"controlnet_processor_res={resolution} is out of range; allowed: 64..2048, "
                                  "or -1 for the module's default")
        thresholds = {name: None if body.get(f"controlnet_{name}") in (None, -1) else body[f"controlnet_{name}"]
                      for name in ("threshold_a", "threshold_b")}
        masks = body.get("controlnet_masks") or []
        limit = max_pixels_of(pipeline_of(service))
        try:
            maps = [png_base64(detect(image, module, processor_res=resolution, max_pixels=limit,
                                      mask=masks[index] if index < len(masks) else None,
                                      what=f"controlnet_input_images[{index}]", **thresholds))
                    for index, image in enumerate(images)]
        except InvalidRequestError as error:
            raise A1111Error(422, str(error)) from None
        return {"images": maps, "info": "Success"}

    @router.post("/detect")
    async def detect_route(body: DetectRequest) -> dict[str, Any]:
        """The detected maps of the images (the preprocessed images a control model sees), at the processor
        resolution (the short side), as the extension answers."""
        return await _in_thread(run_detect, body.model_dump())

    return router


def check_request_units(units: list[A1111Unit], fields: dict[str, Any], service: JobService,
                        mode: str) -> list[dict[str, Any]]:
    """controls.check_units for an A1111 body's units, its errors in A1111's statuses (unknown model 404)."""
    try:
        return check_units([unit.fields for unit in units], pipeline_of(service), has_init_image=mode == "img2img",
                           labels=[unit.label for unit in units])
    except UnknownModelError as error:
        raise A1111Error(404, str(error)) from None
    except ControlImageError as error:  # as for init_images: an unreadable or oversized image is a 400
        raise A1111Error(400, str(error)) from None
    except InvalidRequestError as error:
        raise A1111Error(422, str(error)) from None
