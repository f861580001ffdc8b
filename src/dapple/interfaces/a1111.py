"""AUTOMATIC1111's HTTP API under /sdapi/v1 (docs/specs/a1111-api.md), on the same job service.

A1111 requests are translated into GenerationRequest fields; the synchronous endpoints (txt2img, img2img) submit
a job and wait for it, so these jobs are queued, persisted and shown in the gallery like any other. Fields Dapple
does not implement (styles, restore_faces, scripts, ...) are accepted and named under "ignored" in `info`.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import time
from pathlib import Path
from typing import Any

import anyio
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from PIL import Image

from dapple._version import __version__
from dapple.engine.images import check_encoded_image, encoded_image_text
from dapple.errors import DappleError, InvalidRequestError, UnknownSamplerError
from dapple.infotext import PNG_KEY, parse_infotext
from dapple.models.hashing import model_sha256
from dapple.request import HIRES_UPSCALERS, LATENT_UPSCALERS
from dapple.samplers import SAMPLERS, SCHEDULE_TYPES
from dapple.service.jobs import JobService

# A1111 fields Dapple accepts but does not act on; named in the response's info when a request sets them.
IGNORED_WHEN_SET = ("styles", "restore_faces", "tiling", "script_name", "alwayson_scripts", "hr_sampler_name",
                    "hr_prompt", "hr_negative_prompt", "hr_checkpoint_name", "hr_scheduler", "override_settings",
                    "inpaint_full_res", "inpaint_full_res_padding", "initial_noise_multiplier", "include_init_images",
                    "eta", "s_churn", "s_tmin", "s_tmax", "s_noise", "subseed_strength", "firstphase_width",
                    "firstphase_height", "refiner_checkpoint", "refiner_switch_at")


class A1111Error(DappleError):
    """An error answered in A1111's shape {error, detail, body, errors} with an HTTP status."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def _set(body: dict[str, Any], name: str) -> bool:
    """Whether a client really set a field (clients send every field, most as None, 0, "" or [])."""
    value = body.get(name)
    return value not in (None, "", [], {}, False, 0, -1) and not (name == "inpaint_full_res" and value is True)


def _image_field(value: Any, name: str) -> str:
    if not isinstance(value, str) or not value:
        raise A1111Error(400, f"{name} must be a base64-encoded image")
    return value


def sampler_name(body: dict[str, Any]) -> str:
    """A1111 sends the sampler as sampler_name (or the older sampler_index) and the schedule as scheduler."""
    name = body.get("sampler_name") or body.get("sampler_index") or "Euler"
    schedule = body.get("scheduler")
    if schedule and schedule.lower() not in ("automatic", "") and schedule.lower() not in name.lower():
        name = f"{name} {schedule}"
    return name


def translate(body: dict[str, Any], mode: str) -> tuple[dict[str, Any], list[str]]:
    """An A1111 txt2img/img2img body -> GenerationRequest fields, and the A1111 fields left unused."""
    batch = int(body.get("batch_size") or 1) * int(body.get("n_iter") or 1)
    fields: dict[str, Any] = {
        "prompt": body.get("prompt") or "", "negative_prompt": body.get("negative_prompt") or "",
        "seed": int(body.get("seed", -1) if body.get("seed") is not None else -1),
        "sampler": sampler_name(body), "steps": int(body.get("steps") or 50),
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
        fields.update(hires_scale=scale, hires_upscaler=body.get("hr_upscaler") or "Latent",
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
            fields.update(mask=_image_field(body["mask"], "mask"), mask_blur=int(body.get("mask_blur") or 0),
                          inpainting_fill=int(body.get("inpainting_fill") or 0),
                          invert_mask=bool(body.get("inpainting_mask_invert")))
    ignored = [name for name in IGNORED_WHEN_SET if _set(body, name)
               and not (name == "override_settings" and set(body[name]) == {"sd_model_checkpoint"})]
    if int(body.get("n_iter") or 1) > 1:
        ignored.append("n_iter (run as one batch of batch_size x n_iter)")
    return fields, ignored


def _png_base64(path: Path) -> str:
    return base64.b64encode(path.read_bytes()).decode()


def create_router(service: JobService, model_name: str, model_path: Path | None) -> APIRouter:
    router = APIRouter(prefix="/sdapi/v1")
    options: dict[str, Any] = {"sd_model_checkpoint": model_name, "sd_vae": "Automatic",
                               "samples_format": "png", "CLIP_stop_at_last_layers": 1}
    model_hash: dict[str, str] = {}

    def short_hash() -> str:
        """A1111's short hash (first 10 hex of sha256) of the checkpoint (dapple.models.hashing), computed once."""
        if "sha256" not in model_hash:
            model_hash["sha256"] = model_sha256(model_path) if model_path else hashlib.sha256().hexdigest()
        return model_hash["sha256"][:10]

    def checkpoint(title: str) -> str:
        """A1111 names checkpoints "name [hash]" in its lists; the name is what matters."""
        name = title.rsplit(" [", 1)[0] if title.endswith("]") else title
        if name not in service.models.names():
            raise A1111Error(404, f"unknown checkpoint {title!r}; available: {', '.join(service.models.names())}")
        return name

    def checkpoint_hash(name: str) -> str:
        path = service.models.path(name)
        return short_hash() if path is None else model_sha256(path)[:10]

    def generate(body: dict[str, Any], mode: str) -> dict[str, Any]:
        fields, ignored = translate(body, mode)
        override = (body.get("override_settings") or {}).get("sd_model_checkpoint")
        chosen = checkpoint(override) if override else options["sd_model_checkpoint"]
        fields["model"] = None if chosen == model_name else chosen
        for name in ("init_image", "mask"):
            if fields.get(name) is not None:
                try:
                    check_encoded_image(fields[name], what=name)
                except InvalidRequestError as error:
                    raise A1111Error(400, str(error)) from None
        job = service.run_and_wait(fields)
        if job.status == "failed":
            raise A1111Error(400 if "image" in (job.error or "") else 500, job.error or "generation failed")
        if job.status == "cancelled" and not job.image_ids:
            return {"images": [], "parameters": body, "info": json.dumps({"interrupted": True})}
        entries = {entry["id"]: entry for entry in service.images(0, 10_000) if entry["job_id"] == job.id}
        ordered = [entries[image_id] for image_id in job.image_ids]
        images = [_png_base64(service.image_path(image_id)) for image_id in job.image_ids]
        infotexts = [entry["infotext"] for entry in ordered]
        seeds = [entry["seed"] for entry in ordered]
        first = ordered[0] if ordered else {"width": fields.get("width"), "height": fields.get("height")}
        info = {
            "prompt": fields["prompt"], "all_prompts": [fields["prompt"]] * len(seeds),
            "negative_prompt": fields["negative_prompt"], "all_negative_prompts": [fields["negative_prompt"]] *
            len(seeds), "seed": seeds[0] if seeds else -1, "all_seeds": seeds, "subseed": -1,
            "all_subseeds": [-1] * len(seeds), "subseed_strength": 0, "width": first["width"],
            "height": first["height"], "sampler_name": fields["sampler"], "cfg_scale": fields["guidance_scale"],
            "steps": fields["steps"], "batch_size": len(seeds), "sd_model_name": chosen,
            "sd_model_hash": checkpoint_hash(chosen), "denoising_strength": fields.get("strength",
                                                                            fields.get("hires_strength", 0)),
            "infotexts": infotexts, "job_timestamp": time.strftime("%Y%m%d%H%M%S"),
            "version": f"dapple {__version__}", "ignored": ignored, "dapple_job_id": job.id,
        }
        return {"images": images if body.get("send_images", True) else [], "parameters": body,
                "info": json.dumps(info)}

    @router.post("/txt2img")
    async def txt2img(request: Request) -> dict[str, Any]:
        body = await _json(request)
        return await _in_thread(generate, body, "txt2img")

    @router.post("/img2img")
    async def img2img(request: Request) -> dict[str, Any]:
        body = await _json(request)
        return await _in_thread(generate, body, "img2img")

    @router.get("/progress")
    def progress(skip_current_image: bool = False) -> dict[str, Any]:
        current = service.current
        queued = len(service.list("queued", limit=10_000))
        state = {"skipped": False, "interrupted": False, "job": "", "job_count": queued + (1 if current else 0),
                 "job_timestamp": "0", "job_no": 0, "sampling_step": 0, "sampling_steps": 0}
        if current is None:
            return {"progress": 0.0, "eta_relative": 0.0, "state": state, "current_image": None, "textinfo": None}
        fraction = current["step"] / max(1, current["steps"])
        elapsed = time.time() - (current.get("started") or time.time())
        state.update(job=current["id"], sampling_step=current["step"], sampling_steps=current["steps"])
        image = None
        if not skip_current_image:
            buffer = io.BytesIO()
            current["context"].preview("cheap")[0].save(buffer, format="PNG")
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
        return options

    @router.post("/options")
    async def set_options(request: Request) -> dict[str, Any]:
        body = await _json(request)
        wanted = body.get("sd_model_checkpoint")
        if wanted is not None:  # A1111 switches models this way; here the next jobs name it
            options["sd_model_checkpoint"] = checkpoint(str(wanted))
        options.update({key: value for key, value in body.items() if key != "sd_model_checkpoint"})
        return {}

    @router.get("/sd-models")
    def sd_models() -> list[dict[str, Any]]:
        listing = []
        for name in service.models.names():
            path = service.models.path(name) or model_path
            digest = model_sha256(path) if path is not None else hashlib.sha256().hexdigest()
            listing.append({"title": f"{name} [{digest[:10]}]", "model_name": name, "hash": digest[:10],
                            "sha256": digest, "filename": str(path or name), "config": None})
        return listing

    @router.get("/samplers")
    def samplers() -> list[dict[str, Any]]:
        return [{"name": spec.name, "aliases": list(spec.aliases), "options": {}} for spec in SAMPLERS]

    @router.get("/schedulers")
    def schedulers() -> list[dict[str, Any]]:
        return [{"name": name.lower(), "label": name, "aliases": None, "default_rho": -1,
                 "need_inner_model": False} for name in SCHEDULE_TYPES]

    @router.get("/upscalers")
    def upscalers() -> list[dict[str, Any]]:
        return [{"name": name, "model_name": None, "model_path": None, "model_url": None, "scale": 4}
                for name in HIRES_UPSCALERS if name not in LATENT_UPSCALERS]

    @router.get("/latent-upscale-modes")
    def latent_upscale_modes() -> list[dict[str, Any]]:
        return [{"name": name} for name in LATENT_UPSCALERS]

    for path, answer in (("/sd-vae", []), ("/loras", []), ("/hypernetworks", []), ("/face-restorers", []),
                         ("/prompt-styles", []), ("/embeddings", {"loaded": {}, "skipped": {}}),
                         ("/scripts", {"txt2img": [], "img2img": []}), ("/cmd-flags", {})):
        router.add_api_route(path, (lambda value=answer: value), methods=["GET"])

    @router.post("/refresh-checkpoints")
    def refresh_checkpoints() -> dict[str, Any]:
        return {}

    @router.post("/png-info")
    async def png_info(request: Request) -> dict[str, Any]:
        body = await _json(request)
        data = _image_field(body.get("image"), "image")
        try:  # the one checked decoder: base64, pixel count from the header, bounded text chunks
            text = encoded_image_text(data, what="image").get(PNG_KEY)
        except InvalidRequestError as error:
            raise A1111Error(400, str(error)) from None
        if text is None:
            return {"info": "", "items": {}, "parameters": {}}
        return {"info": text, "items": {"parameters": text}, "parameters": parse_infotext(text)}

    return router


async def _json(request: Request) -> dict[str, Any]:
    try:
        body = await request.json()
    except ValueError:
        raise A1111Error(422, "the request body is not JSON") from None
    if not isinstance(body, dict):
        raise A1111Error(422, "the request body must be a JSON object")
    return body


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

