"""AUTOMATIC1111's HTTP API under /sdapi/v1 (docs/specs/a1111-api.md), on the same job service.

A1111 requests are translated into GenerationRequest fields; the synchronous endpoints (txt2img, img2img) submit
a job and wait for it, so these jobs are queued, persisted and shown in the gallery like any other. Fields Dapple
does not implement (styles, restore_faces, scripts, ...) are accepted and named under "ignored" in `info`.
sd-webui-controlnet's units (alwayson_scripts.controlnet.args) and its /controlnet routes: a1111_controlnet.py.

Bodies are typed pydantic models (every A1111 field optional, unknown fields allowed, as A1111's own API models
are), so /openapi.json documents them and a wrong type is a 422 in A1111's error shape, never a 500. Any JSON a
client sends is bounded in depth and size, and its text must be valid Unicode, so nothing stored (options) or
echoed (parameters) can break a later response.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
from fastapi import APIRouter, Body, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from PIL import Image, PngImagePlugin
from pydantic import BaseModel, ConfigDict, Field, model_validator

from dapple._version import __version__
from dapple.engine.images import check_encoded_image, encoded_image_text
from dapple.errors import DappleError, InvalidRequestError, UnknownSamplerError
from dapple.infotext import PNG_KEY, parse_infotext
from dapple.models.hashing import model_sha256
from dapple.request import HIRES_UPSCALERS, LATENT_UPSCALERS, MAX_SEED
from dapple.samplers import (
    SAMPLERS,
    SCHEDULE_TYPE_LIST,
    create_scheduler,
    find_schedule_type,
    resolve_sampler,
    set_timesteps,
)
from dapple.service.jobs import GalleryFileError, JobService

# A1111 fields Dapple accepts but does not act on; named in the response's info when a request sets them.
IGNORED_WHEN_SET = ("styles", "restore_faces", "tiling", "script_name", "alwayson_scripts", "hr_sampler_name",
                    "hr_prompt", "hr_negative_prompt", "hr_checkpoint_name", "hr_scheduler", "override_settings",
                    "inpaint_full_res", "inpaint_full_res_padding", "initial_noise_multiplier", "include_init_images",
                    "eta", "s_churn", "s_tmin", "s_tmax", "s_noise", "subseed_strength", "firstphase_width",
                    "firstphase_height", "refiner_checkpoint", "refiner_switch_at")

# Bounds on the JSON a client may send to /sdapi (A1111's deepest real bodies, ControlNet units inside
# alwayson_scripts, nest about 6 levels) and on what POST /options may store.
MAX_JSON_DEPTH = 32
MAX_OPTION_VALUE_BYTES = 64 * 1024
MAX_OPTIONS_BYTES = 1024 * 1024
MAX_OPTIONS = 2000
MAX_OPTION_KEY_LENGTH = 200


class A1111Error(DappleError):
    """An error answered in A1111's shape {error, detail, body, errors} with an HTTP status."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def check_json(value: Any, what: str = "body", max_depth: int = MAX_JSON_DEPTH) -> None:
    """Refuse (ValueError) JSON nested deeper than max_depth, holding text that is not valid Unicode (a lone
    surrogate such as "\\ud800" cannot be encoded in a response) or a number that is not finite (Python's JSON
    reader takes NaN and Infinity, which no JSON response may hold). Iterative, so any depth is safe to check."""
    stack: list[tuple[Any, int, str]] = [(value, 1, what)]
    while stack:
        item, depth, where = stack.pop()
        if isinstance(item, (dict, list)):
            if depth > max_depth:
                raise ValueError(f"{what} is nested more than {max_depth} levels deep; allowed: at most "
                                 f"{max_depth}")
            pairs = item.items() if isinstance(item, dict) else enumerate(item)
            for key, child in pairs:
                if isinstance(key, str):
                    _check_text(key, f"a key in {where}")
                path = f"{where}.{key}" if isinstance(item, dict) else f"{where}[{key}]"
                stack.append((child, depth + 1, path if len(path) <= 100 else where))
        elif isinstance(item, str):
            _check_text(item, where)
        elif isinstance(item, float) and not math.isfinite(item):
            raise ValueError(f"{where} is {item!r}; allowed: finite numbers")


def _check_text(text: str, where: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as error:
        raise ValueError(f"{where} is not valid Unicode text (a lone surrogate at character {error.start})") from None


class A1111Body(BaseModel):
    """Common to A1111's request bodies: unknown fields are kept (clients send many), JSON is bounded."""

    model_config = ConfigDict(extra="allow")

    @model_validator(mode="before")
    @classmethod
    def _bounded(cls, data: Any) -> Any:
        check_json(data)
        return data


class Txt2ImgRequest(A1111Body):
    """A1111's StableDiffusionTxt2ImgProcessingAPI: every field optional; the defaults are A1111's."""

    prompt: str | None = ""
    negative_prompt: str | None = ""
    styles: list[str] | None = None
    seed: int | None = -1
    subseed: int | None = -1
    subseed_strength: float | None = 0
    seed_resize_from_h: int | None = -1
    seed_resize_from_w: int | None = -1
    sampler_name: str | None = Field(None, description="e.g. 'Euler a', 'DPM++ 2M' (or 'DPM++ 2M Karras')")
    scheduler: str | None = Field(None, description="schedule type: a label or name from GET /sdapi/v1/schedulers")
    sampler_index: str | None = Field("Euler", description="the old name of sampler_name")
    batch_size: int | None = 1
    n_iter: int | None = 1
    steps: int | None = 50
    cfg_scale: float | None = 7.0
    width: int | None = Field(512, description="left out with height: the model's native size")
    height: int | None = Field(512, description="left out with width: the model's native size")
    restore_faces: bool | None = None
    tiling: bool | None = None
    do_not_save_samples: bool | None = False
    do_not_save_grid: bool | None = False
    eta: float | None = None
    denoising_strength: float | None = None
    s_min_uncond: float | None = None
    s_churn: float | None = None
    s_tmax: float | None = None
    s_tmin: float | None = None
    s_noise: float | None = None
    override_settings: dict[str, Any] | None = None
    override_settings_restore_afterwards: bool | None = True
    refiner_checkpoint: str | None = None
    refiner_switch_at: float | None = None
    disable_extra_networks: bool | None = False
    firstpass_image: str | None = None
    comments: dict[str, Any] | None = None
    enable_hr: bool | None = False
    firstphase_width: int | None = 0
    firstphase_height: int | None = 0
    hr_scale: float | None = 2.0
    hr_upscaler: str | None = None
    hr_second_pass_steps: int | None = 0
    hr_resize_x: int | None = 0
    hr_resize_y: int | None = 0
    hr_checkpoint_name: str | None = None
    hr_sampler_name: str | None = None
    hr_scheduler: str | None = None
    hr_prompt: str | None = ""
    hr_negative_prompt: str | None = ""
    force_task_id: str | None = None
    script_name: str | None = None
    script_args: list[Any] | None = Field(default_factory=list)
    send_images: bool | None = True
    save_images: bool | None = False
    alwayson_scripts: dict[str, Any] | None = Field(default_factory=dict)
    infotext: str | None = None
    deep_cache_interval: int | None = Field(None, description="Dapple's own: DeepCache interval 1..10 (1: off); "
                                            "token merging is A1111's override_settings.token_merging_ratio")


class Img2ImgRequest(Txt2ImgRequest):
    """A1111's StableDiffusionImg2ImgProcessingAPI: txt2img's fields and the init image, mask and inpaint ones."""

    init_images: list[str] | None = Field(None, description="base64 images (a data: prefix is allowed)")
    resize_mode: int | None = 0
    image_cfg_scale: float | None = None
    mask: str | None = Field(None, description="base64 mask: white is repainted")
    mask_blur_x: int | None = 4
    mask_blur_y: int | None = 4
    mask_blur: int | None = None
    mask_round: bool | None = True
    inpainting_fill: int | None = 0
    inpaint_full_res: bool | None = True
    inpaint_full_res_padding: int | None = 0
    inpainting_mask_invert: int | None = 0
    initial_noise_multiplier: float | None = None
    latent_mask: str | None = None
    include_init_images: bool | None = False
    denoising_strength: float | None = 0.75


class PngInfoRequest(A1111Body):
    image: str | None = Field(None, description="a base64 PNG (a data: prefix is allowed)")


class A1111Route(APIRoute):
    """Routes whose validation errors (wrong types, JSON that does not parse or nests without end) are answered
    in A1111's error shape with 422, whatever the app's own handlers do for the native API."""

    def get_route_handler(self) -> Callable:
        handler = super().get_route_handler()

        async def route(request: Request):
            try:
                return await handler(request)
            except RequestValidationError as error:
                return error_response(request, A1111Error(422, describe_validation(error)))
            except RecursionError:
                return error_response(request, A1111Error(
                    422, f"the JSON body is nested too deeply; allowed: at most {MAX_JSON_DEPTH} levels"))
            except (A1111Error, UnknownSamplerError, InvalidRequestError) as error:
                return error_response(request, error)

        return route


def describe_validation(error: RequestValidationError) -> str:
    """pydantic's errors in words: the field, what was wrong, and the value sent."""
    lines = []
    for item in error.errors():
        location = ".".join(str(part) for part in item.get("loc", ()) if part != "body") or "body"
        message = str(item.get("msg", "invalid")).removeprefix("Value error, ")
        if item.get("type") == "json_invalid":
            lines.append(f"the request body is not valid JSON: {message}")
            continue
        if item.get("type") == "value_error" or "input" not in item:
            lines.append(f"{location}: {message}")
            continue
        value = repr(item["input"])
        value = value if len(value) <= 60 else value[:57] + "..."
        lines.append(f"{location}: {message} (got {value})")
    return "; ".join(lines)


# A1111's standard settings (modules/shared_options.py) with its defaults: what GET /options answers before a
# client changes them. Clients read and POST the whole dict back; only sd_model_checkpoint changes what Dapple
# does (the model of later jobs); sd_checkpoint_hash follows it. The others are kept as set, so clients that
# read their own settings back see them.
A1111_OPTIONS: dict[str, Any] = {
    # saving images and grids
    "samples_save": True, "samples_format": "png", "samples_filename_pattern": "", "save_images_add_number": True,
    "save_images_replace_action": "Replace", "grid_save": True, "grid_format": "png", "grid_extended_filename": False,
    "grid_only_if_multiple": True, "grid_prevent_empty_spots": False, "grid_zip_filename_pattern": "", "n_rows": -1,
    "font": "", "grid_text_active_color": "#000000", "grid_text_inactive_color": "#999999",
    "grid_background_color": "#ffffff", "save_images_before_face_restoration": False,
    "save_images_before_highres_fix": False, "save_images_before_color_correction": False, "save_mask": False,
    "save_mask_composite": False, "jpeg_quality": 80, "webp_lossless": False, "export_for_4chan": True,
    "img_downscale_threshold": 4.0, "target_side_length": 4000.0, "img_max_size_mp": 200.0,
    "use_original_name_batch": True, "use_upscaler_name_as_suffix": False, "save_selected_only": True,
    "save_init_img": False, "temp_dir": "", "clean_temp_dir_at_start": False, "save_incomplete_images": False,
    "notification_audio": True, "notification_volume": 100,
    # paths
    "outdir_samples": "", "outdir_txt2img_samples": "outputs/txt2img-images",
    "outdir_img2img_samples": "outputs/img2img-images", "outdir_extras_samples": "outputs/extras-images",
    "outdir_grids": "", "outdir_txt2img_grids": "outputs/txt2img-grids", "outdir_img2img_grids": "outputs/img2img-grids",
    "outdir_save": "log/images", "outdir_init_images": "outputs/init-images", "save_to_dirs": True,
    "grid_save_to_dirs": True, "use_save_to_dirs_for_ui": False, "directories_filename_pattern": "[date]",
    "directories_max_prompt_words": 8,
    # upscaling and face restoration
    "ESRGAN_tile": 192, "ESRGAN_tile_overlap": 8, "realesrgan_enabled_models": ["R-ESRGAN 4x+", "R-ESRGAN 4x+ Anime6B"],
    "upscaler_for_img2img": None, "face_restoration": False, "face_restoration_model": "CodeFormer",
    "code_former_weight": 0.5, "face_restoration_unload": False,
    # system
    "auto_launch_browser": "Local", "show_warnings": False, "show_gradio_deprecation_warnings": True,
    "memmon_poll_rate": 8, "samples_log_stdout": False, "multiple_tqdm": True, "print_hypernet_extra": False,
    "list_hidden_files": True, "disable_mmap_load_safetensors": False, "hide_ldm_prints": True,
    "api_enable_requests": True, "api_forbid_local_requests": True, "api_useragent": "",
    # stable diffusion
    "sd_model_checkpoint": None, "sd_checkpoints_limit": 1, "sd_checkpoints_keep_in_cpu": True,
    "sd_checkpoint_cache": 0, "sd_unet": "Automatic", "enable_quantization": False, "emphasis": "Original",
    "enable_batch_seeds": True, "comma_padding_backtrack": 20, "CLIP_stop_at_last_layers": 1, "upcast_attn": False,
    "randn_source": "GPU", "tiling": False, "hires_fix_refiner_pass": "second pass", "sd_checkpoint_hash": "",
    "sdxl_crop_top": 0, "sdxl_crop_left": 0, "sdxl_refiner_low_aesthetic_score": 2.5,
    "sdxl_refiner_high_aesthetic_score": 6.0,
    # VAE
    "sd_vae_checkpoint_cache": 0, "sd_vae": "Automatic", "sd_vae_overrides_per_model_preferences": True,
    "auto_vae_precision": True, "sd_vae_encode_method": "Full", "sd_vae_decode_method": "Full",
    # img2img
    "inpainting_mask_weight": 1.0, "initial_noise_multiplier": 1.0, "img2img_extra_noise": 0.0,
    "img2img_color_correction": False, "img2img_fix_steps": False, "img2img_background_color": "#ffffff",
    "img2img_editor_height": 720, "img2img_sketch_default_brush_color": "#ffffff",
    "img2img_inpaint_mask_brush_color": "#ffffff", "img2img_inpaint_sketch_default_brush_color": "#ffffff",
    "return_mask": False, "return_mask_composite": False, "img2img_batch_show_results_limit": 32,
    "overlay_inpaint": True,
    # optimizations and compatibility
    "cross_attention_optimization": "Automatic", "s_min_uncond": 0.0, "token_merging_ratio": 0.0,
    "token_merging_ratio_img2img": 0.0, "token_merging_ratio_hr": 0.0, "pad_cond_uncond": False,
    "pad_cond_uncond_v0": False, "persistent_cond_cache": True, "batch_cond_uncond": True, "fp8_storage": "Disable",
    "cache_fp16_weight": False, "auto_backcompat": True, "use_old_emphasis_implementation": False,
    "use_old_karras_scheduler_sigmas": False, "no_dpmpp_sde_batch_determinism": False,
    "use_old_hires_fix_width_height": False, "dont_fix_second_order_samplers_schedule": False,
    "hires_fix_use_firstpass_conds": False, "use_old_scheduling": False, "use_downcasted_alpha_bar": False,
    "refiner_switch_by_sample_steps": False,
    # extra networks
    "extra_networks_show_hidden_directories": True, "extra_networks_hidden_models": "When searched",
    "extra_networks_default_multiplier": 1.0, "extra_networks_card_width": 0, "extra_networks_card_height": 0,
    "extra_networks_card_text_scale": 1.0, "extra_networks_card_show_desc": True,
    "extra_networks_add_text_separator": " ", "textual_inversion_print_at_load": False,
    "textual_inversion_add_hashes_to_infotext": True, "sd_hypernetwork": "None", "sd_lora": "None",
    "lora_preferred_name": "Alias from file", "lora_add_hashes_to_infotext": True,
    # user interface and infotext
    "localization": "None", "quicksettings_list": ["sd_model_checkpoint"], "ui_tab_order": [],
    "hidden_tabs": [], "ui_reorder_list": [], "gradio_theme": "Default", "return_grid": True,
    "do_not_show_images": False, "js_modal_lightbox": True, "js_modal_lightbox_initially_zoomed": True,
    "show_progress_in_title": True, "samplers_in_dropdown": True, "dimensions_and_batch_together": True,
    "sd_checkpoint_dropdown_use_short": False, "hires_fix_show_sampler": False, "hires_fix_show_prompts": False,
    "add_model_hash_to_info": True, "add_model_name_to_info": True, "add_user_name_to_info": False,
    "add_version_to_infotext": True, "disable_weights_auto_swap": True, "infotext_skip_pasting": [],
    "infotext_styles": "Apply if any", "enable_pnginfo": True, "save_txt": False, "interrupt_after_current": True,
    "enable_console_prompts": False, "keyedit_precision_attention": 0.1, "keyedit_precision_extra": 0.05,
    # live previews
    "show_progressbar": True, "live_previews_enable": True, "live_previews_image_format": "png",
    "show_progress_grid": True, "show_progress_every_n_steps": 10, "show_progress_type": "Approx NN",
    "live_preview_allow_lowvram_full": False, "live_preview_content": "Prompt", "live_preview_refresh_period": 1000.0,
    "live_preview_fast_interrupt": False,
    # sampler parameters
    "hide_samplers": [], "eta_ddim": 0.0, "eta_ancestral": 1.0, "ddim_discretize": "uniform", "s_churn": 0.0,
    "s_tmin": 0.0, "s_tmax": 0.0, "s_noise": 1.0, "k_sched_type": "Automatic", "sigma_min": 0.0, "sigma_max": 0.0,
    "rho": 0.0, "eta_noise_seed_delta": 0, "always_discard_next_to_last_sigma": False,
    "sgm_noise_multiplier": False, "uni_pc_variant": "bh1", "uni_pc_skip_type": "time_uniform", "uni_pc_order": 3,
    "uni_pc_lower_order_final": True, "sd_noise_schedule": "Default", "skip_early_cond": 0.0,
    "beta_dist_alpha": 0.6, "beta_dist_beta": 0.6,
    # postprocessing and extensions
    "postprocessing_enable_in_main_ui": [], "postprocessing_operation_order": [], "upscaling_max_images_in_cache": 5,
    "postprocessing_existing_caption_action": "Ignore", "disabled_extensions": [], "disable_all_extensions": "none",
    "restore_config_state_file": "",
}
# Options whose value Dapple derives and answers itself.
DERIVED_OPTIONS = ("sd_model_checkpoint", "sd_checkpoint_hash")


def _json_kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    return {str: "string", list: "array", dict: "object"}.get(type(value), type(value).__name__)


def check_option(key: str, value: Any) -> None:
    """Refuse (A1111Error) an option a later GET /options could not answer, or that is too big to keep: keys
    of valid text and bounded length, values bounded in depth and size, a known key of the same JSON kind as
    its default (numbers interchangeable; null is allowed, as A1111 stores it)."""
    if not isinstance(key, str) or not key or len(key) > MAX_OPTION_KEY_LENGTH:
        raise A1111Error(422, f"option names must be 1..{MAX_OPTION_KEY_LENGTH} characters long; got "
                              f"{len(key)} characters")
    try:
        check_json(value, f"option {key[:60]!r}")
    except ValueError as error:
        raise A1111Error(422, str(error)) from None
    size = len(json.dumps(value, ensure_ascii=False).encode())
    if size > MAX_OPTION_VALUE_BYTES:
        raise A1111Error(413, f"option {key[:60]!r} is {size} bytes of JSON; allowed: at most "
                              f"{MAX_OPTION_VALUE_BYTES} bytes per option")
    default = A1111_OPTIONS.get(key)
    if default is not None and value is not None and _json_kind(value) != _json_kind(default):
        raise A1111Error(422, f"option {key!r} must be a {_json_kind(default)} (default {default!r}); got "
                              f"{_json_kind(value)} {repr(value)[:60]}")


def _set(body: dict[str, Any], name: str) -> bool:
    """Whether a client really set a field (clients send every field, most as None, 0, "" or [])."""
    value = body.get(name)
    return value not in (None, "", [], {}, False, 0, -1) and not (name == "inpaint_full_res" and value is True)


def _image_field(value: Any, name: str) -> str:
    if not isinstance(value, str) or not value:
        raise A1111Error(400, f"{name} must be a base64-encoded image")
    return value


def sampler_name(body: dict[str, Any], ignored: list[str] | None = None) -> str:
    """A1111 sends the sampler as sampler_name (or the older sampler_index) and the schedule type as scheduler:
    a label ("SGM Uniform") or an API name ("sgm_uniform"). As in A1111, a schedule type in the sampler's name
    ("DPM++ 2M Karras") wins over the scheduler field (which is then named in `ignored`). Returns the combined
    name the engine takes ("Euler a Karras"); an unknown name or a combination the sampler cannot follow raises
    UnknownSamplerError naming what is allowed."""
    name = str(body.get("sampler_name") or body.get("sampler_index") or "Euler")
    schedule = body.get("scheduler")
    named = resolve_sampler(name)
    if named.schedule_type != "Automatic" or not schedule:
        kind = find_schedule_type(str(schedule)) if schedule else None
        if kind is not None and kind.label not in ("Automatic", named.schedule_type) and ignored is not None:
            ignored.append(f"scheduler ({name!r} names its schedule type, {named.schedule_type})")
        return named.label
    return resolve_sampler(named.spec.name, str(schedule)).label


# override_settings keys a request acts on (the rest are named in `ignored`): the checkpoint, and A1111's
# token merging settings (modules/shared_options.py; the _img2img and _hr ratios apply only where non-zero).
USED_OVERRIDE_SETTINGS = ("sd_model_checkpoint", "token_merging_ratio", "token_merging_ratio_img2img",
                          "token_merging_ratio_hr")


def _number_option(settings: dict[str, Any], key: str) -> float:
    value = settings.get(key)
    if value is None:
        return 0.0
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise A1111Error(422, f"override_settings.{key} must be a number from 0 (off) to 0.9; got {value!r}")
    return float(value)


def speed_fields(body: dict[str, Any], mode: str, options: dict[str, Any] | None = None) -> dict[str, Any]:
    """Token merging from A1111's settings (the stored options, then the request's override_settings, as A1111
    applies them: the _img2img ratio for img2img and the _hr ratio for the hires pass where they are non-zero),
    and Dapple's deep_cache_interval from the body (A1111 has no such field)."""
    overrides = body.get("override_settings") if isinstance(body.get("override_settings"), dict) else {}
    settings = {**(options or {}), **overrides}
    ratio = _number_option(settings, "token_merging_ratio")
    if mode == "img2img":
        ratio = _number_option(settings, "token_merging_ratio_img2img") or ratio
    fields: dict[str, Any] = {"token_merging_ratio": ratio,
                              "token_merging_ratio_hr": _number_option(settings, "token_merging_ratio_hr")}
    if body.get("deep_cache_interval") is not None:
        fields["deep_cache_interval"] = body["deep_cache_interval"]  # the request's bounds check it (422)
    return fields


def translate(body: dict[str, Any], mode: str, options: dict[str, Any] | None = None
              ) -> tuple[dict[str, Any], list[str]]:
    """An A1111 txt2img/img2img body -> GenerationRequest fields, and the A1111 fields left unused. `options`:
    the server's stored settings (POST /options), which override_settings overrides for one request."""
    batch = int(body.get("batch_size") or 1) * int(body.get("n_iter") or 1)
    ignored: list[str] = []
    fields: dict[str, Any] = {
        "prompt": body.get("prompt") or "", "negative_prompt": body.get("negative_prompt") or "",
        "seed": int(body.get("seed", -1) if body.get("seed") is not None else -1),
        "sampler": sampler_name(body, ignored), "steps": int(body.get("steps") or 50),
        "guidance_scale": float(body.get("cfg_scale") if body.get("cfg_scale") is not None else 7.0),
        "guidance_min_timestep": 0,  # A1111 guides every step, whatever the model folder recommends
        "batch_size": batch,
    }
    # A1111 fills 512x512 for a size left out. A client that sends one of width/height gets A1111's 512 for the
    # other; one that sends neither gets the model's native size (txt2img: 64 for the built-in model, 1024 for
    # SDXL) or the init image's (img2img), as Dapple's other interfaces do, instead of 512 for every model.
    resize_to = _set(body, "hr_resize_x") or _set(body, "hr_resize_y")
    if _set(body, "width") or _set(body, "height") or (mode == "txt2img" and body.get("enable_hr") and resize_to):
        fields.update(width=int(body.get("width") or 512), height=int(body.get("height") or 512))
    if mode == "txt2img" and body.get("enable_hr"):
        scale = float(body.get("hr_scale") or 2.0)
        if resize_to:  # a target size instead of a scale
            scale = max(int(body.get("hr_resize_x") or 0) / fields["width"],
                        int(body.get("hr_resize_y") or 0) / fields["height"])
        upscaler = body.get("hr_upscaler") or "Latent"
        # A1111's "None" upscaler resizes the first pass's image with Lanczos (modules/images.resize_image).
        fields.update(hires_scale=scale, hires_upscaler="Lanczos" if upscaler == "None" else upscaler,
                      hires_steps=int(body.get("hr_second_pass_steps") or 0),
                      hires_strength=float(body.get("denoising_strength") if body.get("denoising_strength")
                                           is not None else 0.7))
    if mode == "img2img":
        images = body.get("init_images") or []
        if not images:
            raise A1111Error(422, "init_images must hold one base64 image")
        fields["init_image"] = _image_field(images[0], "init_images[0]")
        fields["strength"] = float(body.get("denoising_strength") if body.get("denoising_strength") is not None
                                   else 0.75)
        fields["resize_mode"] = int(body.get("resize_mode") or 0) if int(body.get("resize_mode") or 0) < 3 else 0
        if body.get("mask"):
            blur = body.get("mask_blur")  # left out: A1111 blurs by mask_blur_x (default 4)
            blur = body.get("mask_blur_x", 4) if blur is None else blur
            fields.update(mask=_image_field(body["mask"], "mask"), mask_blur=int(blur or 0),
                          inpainting_fill=int(body.get("inpainting_fill") or 0),
                          invert_mask=bool(body.get("inpainting_mask_invert")))
    from dapple.interfaces.a1111_controlnet import controlnet_units, other_scripts

    units = controlnet_units(body, mode, ignored)  # sd-webui-controlnet's units: alwayson_scripts.controlnet
    if units:
        fields["controls"] = [unit.fields for unit in units]
    fields.update(speed_fields(body, mode, options))
    ignored += [name for name in IGNORED_WHEN_SET if _set(body, name) and name != "alwayson_scripts"
                and not (name == "override_settings" and set(body[name]) <= set(USED_OVERRIDE_SETTINGS))]
    ignored += other_scripts(body)
    if int(body.get("n_iter") or 1) > 1:
        ignored.append("n_iter (run as one batch of batch_size x n_iter)")
    return fields, ignored


def _encode_png(image: Image.Image, infotext: str) -> str:
    info = PngImagePlugin.PngInfo()
    info.add_text(PNG_KEY, infotext)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=info)
    return base64.b64encode(buffer.getvalue()).decode()


def create_router(service: JobService, model_name: str, model_path: Path | None) -> APIRouter:
    from dapple.interfaces.a1111_controlnet import check_request_units, controlnet_units, detected_maps
    from dapple.interfaces.controls import max_pixels_of, pipeline_of

    router = APIRouter(prefix="/sdapi/v1", route_class=A1111Route)
    options: dict[str, Any] = {**A1111_OPTIONS}
    current = {"model": model_name}  # the checkpoint later jobs run (sd_model_checkpoint names it by its title)
    model_hash: dict[str, str] = {}

    def sha256_of(name: str) -> str:
        """The checkpoint's sha256 (dapple.models.hashing caches it), computed once per name here."""
        if name not in model_hash:
            path = service.models.path(name) or (model_path if name == service.models.default_name else None)
            model_hash[name] = model_sha256(path) if path is not None else hashlib.sha256().hexdigest()
        return model_hash[name]

    def checkpoint_hash(name: str) -> str:
        """A1111's short hash: the first 10 hex digits of the sha256."""
        return sha256_of(name)[:10]

    def file_name(name: str) -> str:
        """A1111 names checkpoints by file name with extension ("v1-5.safetensors"); a folder model by its name."""
        path = service.models.path(name)
        return path.name if path is not None and path.is_file() else name

    def title(name: str) -> str:
        return f"{file_name(name)} [{checkpoint_hash(name)}]"

    def checkpoint(wanted: str) -> str:
        """A checkpoint by its sd-models title ("name.safetensors [hash]"), its file name or its bare name."""
        # A title is "<file name> [<short hash>]": its file name finds it, as in A1111 (a stale hash too).
        stripped = wanted.strip()
        for candidate in (stripped, stripped.rsplit(" [", 1)[0] if stripped.endswith("]") else stripped):
            for name in service.models.names():
                if candidate in (name, file_name(name)):
                    return name
        names = service.models.names()
        raise A1111Error(404, f"unknown checkpoint {wanted!r}; available: {', '.join(names)} (by name or by "
                              f"title: {', '.join(title(name) for name in names)})")

    def current_options() -> dict[str, Any]:
        return {**options, "sd_model_checkpoint": title(current["model"]),
                "sd_checkpoint_hash": sha256_of(current["model"])}

    def partial_images(context: Any, fields: dict[str, Any], chosen: str) -> tuple[list[Image.Image], list[str],
                                                                                  list[int]]:
        """A1111 returns what an interrupted run has drawn: the VAE decode of the last step's prediction of the
        clean image, with its infotext (the seeds are the request's, resolved before the job ran)."""
        import torch

        from dapple.engine.generation import build_infotexts
        from dapple.request import make_request

        with torch.inference_mode():
            images = context.preview("full")
        request = make_request(**{key: value for key, value in fields.items() if key != "model"})
        seeds = [fields["seed"] + index for index in range(len(images))]
        infotexts = build_infotexts(request, resolve_sampler(request.sampler), seeds, images[0].width,
                                    images[0].height, chosen, {"Interrupted": f"at step {context.step} of "
                                                                              f"{context.total}"},
                                    model_hash=checkpoint_hash(chosen))
        return images, infotexts, seeds

    def preflight(fields: dict[str, Any], chosen: str) -> None:
        """Refuse (422) a step count the sampler cannot take on the default model's schedule before the job is
        queued, rather than answer the failed job with a 500 (another model is not loaded here to find out; its
        job fails with the same message)."""
        if fields["model"] is not None or chosen not in service.models.loaded():
            return
        if not isinstance(fields.get("steps"), int):
            return
        components = getattr(service.models.get(fields["model"]), "components", None)
        config = getattr(components, "scheduler_config", None)
        if not isinstance(config, dict) or not 1 <= fields["steps"] <= 1000:
            return  # the request's own bounds answer an out-of-range step count
        choice = resolve_sampler(fields["sampler"])
        try:
            family = "sdxl" if getattr(components, "is_xl", False) else "sd"
            set_timesteps(create_scheduler(choice, config, seeds=[0], family=family), choice, fields["steps"])
        except InvalidRequestError as error:
            raise A1111Error(422, str(error)) from None

    def generate(body: dict[str, Any], mode: str) -> dict[str, Any]:
        fields, ignored = translate(body, mode, options)
        override = (body.get("override_settings") or {}).get("sd_model_checkpoint")
        chosen = checkpoint(str(override)) if override else current["model"]
        fields["model"] = None if chosen == service.models.default_name else chosen
        if fields["seed"] == -1:  # A1111 draws the seed before the run, so that even a partial image has it
            import random
            fields["seed"] = random.randrange(0, MAX_SEED - min(max(fields["batch_size"], 1), MAX_SEED) + 2)
        for name in ("init_image", "mask"):
            if fields.get(name) is not None:
                try:
                    check_encoded_image(fields[name], what=name)
                except InvalidRequestError as error:
                    raise A1111Error(400, str(error)) from None
        units = controlnet_units(body, mode, [])
        if units:  # the control model, module and image, checked before the job is queued
            fields["controls"] = check_request_units(units, fields, service, mode)
        preflight(fields, chosen)
        # The last step of each running job, kept while this request waits: an interrupted run's partial image.
        # Entries of jobs that ended otherwise are dropped, so at most the running job's and this one's are held.
        last_steps: dict[str, Any] = {}

        def listen(job_id: str, event: dict[str, Any]) -> None:
            if event.get("event") == "progress":
                last_steps[job_id] = event.get("context")
            elif event.get("event") in ("finished", "failed"):
                last_steps.pop(job_id, None)

        unsubscribe = service.subscribe(listen)
        try:
            job = service.run_and_wait(fields)
        finally:
            unsubscribe()
        box = {"context": last_steps.get(job.id)}
        if job.status == "failed":
            # what the request asked cannot be done (an unreadable image, an unknown LoRA ...): the client's 4xx
            raise A1111Error(422 if job.error_kind == "request" else 500, job.error or "generation failed")
        if job.status == "cancelled" and not job.image_ids:
            # A1111 answers an interrupted run with what it has drawn: the last step's prediction, decoded.
            extra: dict[str, Any] = {"interrupted": True}
            images: list[str] = []
            seeds: list[int] = []
            infotexts: list[str] = []
            size = {"width": fields.get("width"), "height": fields.get("height")}
            if box.get("context") is not None:
                try:
                    pictures, infotexts, seeds = partial_images(box["context"], fields, chosen)
                except (RuntimeError, ValueError) as error:  # the model went away meanwhile: say so
                    extra["partial_image_error"] = f"{type(error).__name__}: {error}"
                    infotexts = []
                else:
                    images = [_encode_png(picture, text) for picture, text in zip(pictures, infotexts)]
                    size = {"width": pictures[0].width, "height": pictures[0].height}
                    extra["interrupted_at_step"] = box["context"].step
            info = describe(fields, chosen, seeds, infotexts, size, ignored, job.id) | extra
            return {"images": images if body.get("send_images", True) else [], "parameters": body,
                    "info": json.dumps(info)}
        if job.status in ("queued", "running"):  # the server is stopping: the job runs at the next start
            raise A1111Error(503, f"the server is shutting down; job {job.id} stays queued and runs when it is "
                                  "back")
        entries = {entry["id"]: entry for entry in service.images(0, 10_000) if entry["job_id"] == job.id}
        ordered = [entries[image_id] for image_id in job.image_ids if image_id in entries]
        try:  # the same checks as the gallery's own route
            images = [base64.b64encode(service.image_bytes(entry["id"])).decode() for entry in ordered]
        except GalleryFileError as error:
            raise A1111Error(error.status, str(error)) from None
        first = ordered[0] if ordered else {"width": fields.get("width"), "height": fields.get("height")}
        if units and ordered and not options.get("control_net_no_detectmap"):  # the extension appends them
            images += detected_maps(units, fields, first["width"], first["height"],
                                    max_pixels_of(pipeline_of(service)))
        info = describe(fields, chosen, [entry["seed"] for entry in ordered], [entry["infotext"] for entry in ordered],
                        first, ignored, job.id)
        return {"images": images if body.get("send_images", True) else [], "parameters": body,
                "info": json.dumps(info)}

    def describe(fields: dict[str, Any], chosen: str, seeds: list[int], infotexts: list[str],
                 size: dict[str, Any], ignored: list[str], job_id: str) -> dict[str, Any]:
        """A1111's `info` of a generation response."""
        return {
            "prompt": fields["prompt"], "all_prompts": [fields["prompt"]] * len(seeds),
            "negative_prompt": fields["negative_prompt"], "all_negative_prompts": [fields["negative_prompt"]] *
            len(seeds), "seed": seeds[0] if seeds else fields["seed"], "all_seeds": seeds, "subseed": -1,
            "all_subseeds": [-1] * len(seeds), "subseed_strength": 0, "width": size["width"],
            "height": size["height"], "sampler_name": fields["sampler"], "cfg_scale": fields["guidance_scale"],
            "steps": fields["steps"], "batch_size": len(seeds), "sd_model_name": chosen,
            "sd_model_hash": checkpoint_hash(chosen), "denoising_strength": fields.get("strength",
                                                                            fields.get("hires_strength", 0)),
            "infotexts": infotexts, "job_timestamp": time.strftime("%Y%m%d%H%M%S"),
            "extra_generation_params": {key: value for key, value in (parse_infotext(infotexts[0]) if infotexts
                                                                      else {}).items()
                                        if key.startswith(("ControlNet ", "Token merging ratio",
                                                           "DeepCache interval"))},
            "version": f"dapple {__version__}", "ignored": ignored, "dapple_job_id": job_id,
        }

    @router.post("/txt2img")
    async def txt2img(body: Txt2ImgRequest) -> dict[str, Any]:
        return await _in_thread(generate, body.model_dump(exclude_unset=True), "txt2img")

    @router.post("/img2img")
    async def img2img(body: Img2ImgRequest) -> dict[str, Any]:
        return await _in_thread(generate, body.model_dump(exclude_unset=True), "img2img")

    @router.get("/progress")
    def progress(skip_current_image: bool = False) -> dict[str, Any]:
        current_job = service.current
        queued = len(service.list("queued", limit=10_000))
        state = {"skipped": False, "interrupted": False, "job": "", "job_count": queued + (1 if current_job else 0),
                 "job_timestamp": "0", "job_no": 0, "sampling_step": 0, "sampling_steps": 0}
        if current_job is None:
            return {"progress": 0.0, "eta_relative": 0.0, "state": state, "current_image": None, "textinfo": None}
        fraction = current_job["step"] / max(1, current_job["steps"])
        elapsed = time.time() - (current_job.get("started") or time.time())
        state.update(job=current_job["id"], sampling_step=current_job["step"], sampling_steps=current_job["steps"])
        image = None
        if not skip_current_image:
            buffer = io.BytesIO()
            current_job["context"].preview("cheap")[0].save(buffer, format="PNG")
            image = base64.b64encode(buffer.getvalue()).decode()
        return {"progress": fraction, "eta_relative": elapsed / fraction - elapsed if fraction else 0.0,
                "state": state, "current_image": image, "textinfo": None}

    @router.post("/interrupt")
    def interrupt() -> dict[str, Any]:
        job_id = service.running_job_id()
        if job_id is not None:
            service.cancel(job_id)
        return {}

    router.add_api_route("/skip", interrupt, methods=["POST"])

    @router.get("/options")
    def get_options() -> dict[str, Any]:
        """A1111's settings with their defaults (and what clients set); sd_model_checkpoint is the current
        checkpoint's sd-models title."""
        return current_options()

    @router.post("/options")
    def set_options(body: dict[str, Any] = Body(..., examples=[{"sd_model_checkpoint": "model.safetensors"}])
                    ) -> dict[str, Any]:
        """Set options (clients POST the whole dict back). sd_model_checkpoint, by title or name, picks the model
        of later jobs; unknown keys are kept as A1111 keeps them, within bounds of size and depth. Nothing is
        changed unless every key is acceptable."""
        changes = {key: value for key, value in body.items() if key not in DERIVED_OPTIONS}
        for key, value in changes.items():
            check_option(key, value)
        merged = {**options, **changes}
        if len(merged) > MAX_OPTIONS:
            raise A1111Error(413, f"{len(merged)} options; allowed: at most {MAX_OPTIONS}")
        total = len(json.dumps(merged, ensure_ascii=False).encode())
        if total > MAX_OPTIONS_BYTES:
            raise A1111Error(413, f"the options would be {total} bytes of JSON; allowed: at most "
                                  f"{MAX_OPTIONS_BYTES} bytes in all")
        wanted = body.get("sd_model_checkpoint")
        chosen = checkpoint(str(wanted)) if wanted is not None else current["model"]
        options.clear()
        options.update(merged)
        current["model"] = chosen  # A1111 switches models this way; here the next jobs name it
        return {}

    @router.get("/sd-models")
    def sd_models() -> list[dict[str, Any]]:
        listing = []
        for name in service.models.names():
            path = service.models.path(name) or model_path
            digest = sha256_of(name)
            listing.append({"title": title(name), "model_name": name, "hash": digest[:10],
                            "sha256": digest, "filename": str(path or name), "config": None})
        return listing

    @router.get("/samplers")
    def samplers() -> list[dict[str, Any]]:
        return [{"name": spec.name, "aliases": list(spec.aliases), "options": {}} for spec in SAMPLERS]

    @router.get("/schedulers")
    def schedulers() -> list[dict[str, Any]]:
        """A1111's schedule types that at least one sampler here follows (spec.schedule_types says which)."""
        offered = {kind for spec in SAMPLERS for kind in spec.schedule_types}
        return [{"name": kind.name, "label": kind.label, "aliases": list(kind.aliases) or None,
                 "default_rho": kind.default_rho, "need_inner_model": kind.need_inner_model}
                for kind in SCHEDULE_TYPE_LIST if kind.label in offered]

    @router.get("/upscalers")
    def upscalers() -> list[dict[str, Any]]:
        """A1111's order: "None" first, then Lanczos and Nearest (its built-in ones), then any others by name."""
        builtin = ("None", "Lanczos", "Nearest")
        others = sorted((name for name in HIRES_UPSCALERS if name not in LATENT_UPSCALERS and name not in builtin),
                        key=str.lower)
        names = [name for name in builtin if name == "None" or name in HIRES_UPSCALERS] + others
        return [{"name": name, "model_name": None, "model_path": None, "model_url": None, "scale": 4}
                for name in names]

    @router.get("/latent-upscale-modes")
    def latent_upscale_modes() -> list[dict[str, Any]]:
        return [{"name": name} for name in LATENT_UPSCALERS]

    for path, answer in (("/sd-vae", []), ("/loras", []), ("/hypernetworks", []), ("/face-restorers", []),
                         ("/prompt-styles", []), ("/embeddings", {"loaded": {}, "skipped": {}}),
                         ("/scripts", {"txt2img": ["controlnet"], "img2img": ["controlnet"]}),
                         ("/cmd-flags", {})):
        router.add_api_route(path, (lambda value=answer: value), methods=["GET"])

    @router.post("/refresh-checkpoints")
    def refresh_checkpoints() -> dict[str, Any]:
        model_hash.clear()
        return {}

    @router.post("/png-info")
    def png_info(body: PngInfoRequest) -> dict[str, Any]:
        data = _image_field(body.image, "image")
        try:  # the one checked decoder: base64, pixel count from the header, bounded text chunks
            text = encoded_image_text(data, what="image").get(PNG_KEY)
        except InvalidRequestError as error:
            raise A1111Error(400, str(error)) from None
        if text is None:
            return {"info": "", "items": {}, "parameters": {}}
        return {"info": text, "items": {"parameters": text}, "parameters": parse_infotext(text)}

    return router


async def _in_thread(function, *args):
    """Run a blocking call (waiting for a job) off the event loop."""
    return await anyio.to_thread.run_sync(function, *args)


def error_response(request: Request, error: Exception) -> JSONResponse:
    """A1111's error shape for failures on /sdapi routes."""
    if isinstance(error, A1111Error):
        status = error.status
    elif isinstance(error, UnknownSamplerError):
        status = 404
    elif isinstance(error, InvalidRequestError):
        status = 422
    else:
        status = 500
    name = "HTTPException" if status < 500 else type(error).__name__
    return JSONResponse({"error": name, "detail": str(error), "body": "", "errors": str(error)}, status_code=status)
