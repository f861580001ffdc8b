"""The HTTP server: Dapple's native job API under /api/v1 and AUTOMATIC1111's under /sdapi/v1 (a1111.py), both on
the job service (FastAPI; OpenAPI at /docs).

POST /api/v1/jobs -> 202 {id, status, position}; GET /jobs/{id}; GET /jobs?status=; DELETE /jobs/{id} (cancel);
GET /jobs/{id}/events (server-sent events); GET /images (gallery, newest first); GET /images/{id} (PNG with
infotext); GET /images/{id}/thumbnail; DELETE /images/{id}; GET /samplers, /health; GET /models (each with the
settings the model recommends, which the studio pre-fills); GET /control/models, /control/modules and POST
/control/detect (a control unit's detected map, for the studio's preview; sd-webui-controlnet's /controlnet routes
are a1111_controlnet.py's). The studio is "/" (static files from studio/, and /favicon.ico).
Bad input never reaches the worker: 422 names the field and what is allowed, 404 lists valid names, 429 asks the
client to retry, 413 refuses oversized bodies. Files are served by id only.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import queue
from dataclasses import asdict
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from dapple.engine.images import check_encoded_image
from dapple.errors import InvalidRequestError, ModelLoadError, UnknownSamplerError
from dapple.infotext import parse_infotext
from dapple.interfaces import a1111, a1111_controlnet
from dapple.interfaces.controls import (
    canonical_module,
    check_units,
    control_catalog,
    detect,
    max_pixels_of,
    model_title,
    pipeline_of,
    png_base64,
)
from dapple.interfaces.guard import DEFAULT_MAX_BODY, DEFAULT_MAX_JSON_DEPTH, Guard, HostCheck
from dapple.models.generation_defaults import RECOMMENDABLE, read_generation_defaults
from dapple.request import ControlUnit, GenerationRequest, describe_errors, describe_validation_error
from dapple.samplers import sampler_names
from dapple.service.jobs import STATUSES, GalleryFileError, Job, JobNotFoundError, JobService, QueueFullError
from dapple.service.models import UnknownModelError

STUDIO_DIR = Path(__file__).with_name("studio")
STUDIO = STUDIO_DIR / "index.html"
# The studio's static files, served by these names only (never a client-supplied path).
STUDIO_FILES = {"studio.css": "text/css", "studio.js": "text/javascript"}


IMAGE_FIELDS = ("init_image", "mask", "depth_map")


def check_network_images(fields: dict[str, Any], pipeline: Any = None) -> None:
    """Images from clients must be base64 (never a server path) within the pixel limit, checked on arrival;
    control units' images too, with their model and module (controls.check_units, given the pipeline)."""
    for name in IMAGE_FIELDS:
        if fields.get(name) is not None:
            check_encoded_image(fields[name], what=name)
    if fields.get("controls"):
        fields["controls"] = check_units(fields["controls"], pipeline,
                                         has_init_image=fields.get("init_image") is not None)


class DetectBody(BaseModel):
    """POST /api/v1/control/detect: a control image and how a unit would preprocess it (ControlUnit's fields)."""

    model_config = ConfigDict(extra="forbid")

    image: str = Field(..., description="the control image: base64 or a data: URL")
    module: str = Field("canny", min_length=1, max_length=64, description="a preprocessor from /control/modules")
    width: int | None = Field(None, ge=64, le=2048, description="the output's width; None (with height): the "
                              "image's own size")
    height: int | None = Field(None, ge=64, le=2048)
    resize_mode: str | int = Field("Crop and Resize", description="as a unit's resize_mode")
    processor_res: int | None = Field(None, ge=64, le=2048, description="as a unit's processor_res")
    pixel_perfect: bool = False
    threshold_a: float | None = Field(None, ge=-1e6, le=1e6)
    threshold_b: float | None = Field(None, ge=-1e6, le=1e6)


class ErrorBody(BaseModel):
    """Every error answer of the native API: one readable line naming the field, its value and what is allowed."""

    detail: str


def _job_view(job: Job) -> dict[str, Any]:
    view = asdict(job)
    request = dict(view.pop("request"))
    for name in IMAGE_FIELDS:  # images are echoed as a mark, not megabytes of base64
        if request.get(name) is not None:
            request[name] = "<image>"
    if isinstance(request.get("controls"), list):
        request["controls"] = [{**unit, "image": "<image>"} if isinstance(unit, dict) and unit.get("image")
                               is not None else unit for unit in request["controls"]]
    view["request"] = request
    view["image_ids"] = list(job.image_ids)
    return view


def _control_units(parameters: dict[str, Any]) -> list[dict[str, Any]]:
    """The control units an infotext records ("ControlNet 0: ..."), as ControlUnit fields without images."""
    if not any(key.startswith("ControlNet ") for key in parameters):
        return []
    try:
        from dapple.infotext import parse_control_units

        return parse_control_units(parameters)
    except ImportError:  # the reader is not in this build yet
        return []
    except (ValueError, KeyError, TypeError):  # an infotext written elsewhere that does not parse: no units
        return []


def recommended_settings(recommendation: dict[str, Any]) -> dict[str, Any]:
    """What a job that leaves the recommendable fields unset runs with: the model's recommendation where it has
    one, else GenerationRequest's defaults (sampler, steps, guidance_scale, guidance_min_timestep)."""
    fields = GenerationRequest.model_fields
    return {name: recommendation.get(name, fields[name].default) for name in RECOMMENDABLE}


def _error(status: int, message: str, **extra: Any) -> JSONResponse:
    return JSONResponse({"detail": message, **extra}, status_code=status)


def create_app(service: JobService, *, max_body: int = DEFAULT_MAX_BODY, model_name: str = "model",
               model_path: Path | None = None, auth: tuple[str, str] | None = None,
               cors_origins: list[str] | None = None, allowed_hosts: list[str] | None = None,
               max_json_depth: int = DEFAULT_MAX_JSON_DEPTH) -> FastAPI:
    """The FastAPI app over a job service (the caller starts and stops the service): the native API under
    /api/v1 and AUTOMATIC1111's under /sdapi/v1. auth: HTTP Basic credentials required on every route.
    cors_origins: origins allowed to call from a browser (none by default). allowed_hosts: the Host names
    answered (None: any; `dapple serve` passes guard.default_allowed_hosts). Every request passes guard.py first."""
    app = FastAPI(title="Dapple", version="1", docs_url="/docs",
                  responses={422: {"model": ErrorBody, "description": "invalid request: what was wrong and what "
                                                                     "is allowed"},
                             "4XX": {"model": ErrorBody, "description": "refused: unknown name (404), gone (410), "
                                     "body too large (413), not JSON (415), foreign Host (421), busy (429), "
                                     "not authenticated (401) or cross-site (403)"}})
    service.models.default_name = model_name  # what jobs, A1111 options and /models call the default model
    app.include_router(a1111.create_router(service, model_name, model_path))
    app.include_router(a1111_controlnet.create_router(service))
    # Outermost first on the way in: Host check, CORS (preflights answered before auth), then the guard.
    cors_origins = [origin.rstrip("/").lower() for origin in cors_origins or ()]  # as browsers send Origin
    app.add_middleware(Guard, max_body=max_body, max_json_depth=max_json_depth, auth=auth,
                       allowed_origins=cors_origins)
    if cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=cors_origins, allow_methods=["*"], allow_headers=["*"],
                           allow_credentials=auth is not None)
    app.add_middleware(HostCheck, allowed_hosts=allowed_hosts)

    def a1111_route(request: Request) -> bool:
        return request.url.path.startswith("/sdapi/")

    @app.exception_handler(a1111.A1111Error)
    async def a1111_error(request: Request, error: a1111.A1111Error):
        return a1111.error_response(request, error)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, error: RequestValidationError):
        lines = []
        for item in error.errors():
            if len(item["loc"]) > 1 and item["loc"][0] == "body" and item["loc"][1] in GenerationRequest.model_fields:
                lines.append(describe_errors([item], skip=("body",)))  # the field, its value, what is allowed
                continue
            location = ".".join(str(part) for part in item["loc"] if part != "body")
            lines.append(f"{location or 'body'}: {item['msg']}")
        return _error(422, "; ".join(lines))

    @app.exception_handler(InvalidRequestError)
    async def invalid(request: Request, error: InvalidRequestError):
        return a1111.error_response(request, error) if a1111_route(request) else _error(422, str(error))

    @app.exception_handler(UnknownSamplerError)
    async def unknown_sampler(request: Request, error: UnknownSamplerError):
        if a1111_route(request):
            return a1111.error_response(request, error)
        return _error(404, str(error), valid=sampler_names())

    @app.exception_handler(UnknownModelError)
    async def unknown_model(request: Request, error: UnknownModelError):
        if a1111_route(request):
            return a1111.error_response(request, a1111.A1111Error(404, str(error)))
        return _error(404, str(error), valid=error.valid)

    @app.exception_handler(JobNotFoundError)
    async def not_found(request: Request, error: JobNotFoundError):
        return _error(404, str(error))

    @app.exception_handler(QueueFullError)
    async def queue_full(request: Request, error: QueueFullError):
        return JSONResponse({"detail": str(error)}, status_code=429, headers={"Retry-After": "5"})

    @app.get("/", include_in_schema=False)
    def studio() -> FileResponse:
        """The web studio: static files on the native API (no build step, no network)."""
        return FileResponse(STUDIO, media_type="text/html")

    @app.get("/studio/{name}", include_in_schema=False)
    def studio_file(name: str) -> FileResponse:
        if name not in STUDIO_FILES:
            raise JobNotFoundError(f"no studio file {name!r}")
        return FileResponse(STUDIO_DIR / name, media_type=STUDIO_FILES[name])

    @app.get("/favicon.ico", include_in_schema=False)
    def favicon() -> FileResponse:
        return FileResponse(STUDIO_DIR / "favicon.ico", media_type="image/x-icon")

    @app.get("/api/v1/health", responses={503: {"description": "unhealthy: the reason says why"}})
    def health() -> JSONResponse:
        """200 {"status": "ok", ...} while the worker is alive and making progress and the store can be used;
        503 {"status": "unhealthy", "reason": ...} for a dead or stuck worker, a full disk or a locked database.
        Also: worker (idle, running, stopping, ...), running (a job id), queued, seconds_since_heartbeat."""
        state = service.health()
        ok = state.pop("ok")
        return JSONResponse({"status": "ok" if ok else "unhealthy", **state}, status_code=200 if ok else 503)

    recommendations: dict[str, dict[str, Any]] = {}  # model name -> its folder's recommendation, read once

    def recommendation(name: str, default_components: Any) -> dict[str, Any]:
        """The settings a model recommends (generation_defaults.json): the default model's as it was loaded,
        a folder model's read from its folder without loading it (a single file recommends nothing)."""
        if name not in recommendations:
            if name == service.models.default_name:
                recommendations[name] = dict(getattr(default_components, "generation_defaults", {}))
            else:
                path = service.models.path(name)
                recommendations[name] = read_generation_defaults(path) if path is not None and path.is_dir() else {}
        return recommendations[name]

    @app.get("/api/v1/models")
    def models() -> list[dict[str, Any]]:
        """The models a job may name (`model`): the server's default first, then its models folder's
        checkpoints; `loaded` ones start without a load. `recommended`: the sampler, steps, guidance_scale and
        guidance_min_timestep a job that leaves them unset runs with (the model folder's own recommendation,
        `model_recommends`, over the request's defaults). `native_size`: the size of a job that leaves width and
        height unset (the default model's; null for a folder model, which is not loaded to find out)."""
        default_components = getattr(service.models.get(None), "components", None)  # loaded at start
        loaded = set(service.models.loaded())
        entries = []
        for index, name in enumerate(service.models.names()):
            entry: dict[str, Any] = {"name": name, "default": index == 0, "loaded": name in loaded}
            try:
                own = recommendation(name, default_components)
            except ModelLoadError as error:  # a bad generation_defaults.json: say so, the others still list
                own, entry["error"] = {}, str(error)
            native = getattr(default_components, "native_size", None) if index == 0 else None
            entry.update(recommended=recommended_settings(own), model_recommends=own,
                         native_size=native if isinstance(native, int) else None)
            entries.append(entry)
        return entries

    @app.get("/api/v1/samplers")
    def samplers() -> list[str]:
        return sampler_names()

    @app.get("/api/v1/control/models")
    def control_models() -> list[dict[str, Any]]:
        """The control models a unit may name (`controls[i].model`): ControlNets and T2I-Adapters of the
        control-model folders (`dapple serve --control-dir`) and the built-in ones; `title` is the name as
        sd-webui-controlnet lists it ('name [hash]'), which a unit may use too."""
        return [{"name": entry.name, "kind": entry.kind, "short_hash": entry.short_hash, "title": model_title(entry)}
                for entry in control_catalog(pipeline_of(service))]

    @app.get("/api/v1/control/modules")
    def control_modules() -> dict[str, Any]:
        """The preprocessors a unit may name (`controls[i].module`), each with its parameters."""
        from dapple.engine.control_maps import module_details

        return module_details()

    @app.post("/api/v1/control/detect")
    def control_detect(body: DetectBody) -> dict[str, Any]:
        """A unit's detected map: what the control model would see for this image, module and output size (no
        size: the image's own, its short side at processor_res when given). {image: data URL, width, height}."""
        pipeline = pipeline_of(service)
        fields = body.model_dump()
        try:
            unit = ControlUnit(model="detect", **{key: fields[key] for key in (
                "module", "resize_mode", "processor_res", "pixel_perfect", "threshold_a", "threshold_b")})
        except ValidationError as error:
            raise InvalidRequestError(describe_validation_error(error)) from None
        if (body.width is None) != (body.height is None):
            raise InvalidRequestError("give both width and height (the output's size), or neither")
        module = canonical_module(unit.module, "module")
        picture = detect(body.image, module, body.width, body.height, resize_mode=unit.resize_mode,
                         processor_res=unit.processor_res, pixel_perfect=unit.pixel_perfect,
                         threshold_a=unit.threshold_a, threshold_b=unit.threshold_b,
                         max_pixels=max_pixels_of(pipeline))
        return {"image": "data:image/png;base64," + png_base64(picture), "width": picture.width,
                "height": picture.height, "module": module}

    @app.post("/api/v1/jobs", status_code=202)
    def submit(request: GenerationRequest) -> dict[str, Any]:
        fields = request.model_dump(exclude_unset=True)
        check_network_images(fields, pipeline_of(service) if fields.get("controls") else None)
        job = service.submit(fields)
        return {"id": job.id, "status": job.status, "position": job.position}

    @app.get("/api/v1/jobs")
    def list_jobs(status: str | None = None, limit: int = 100) -> list[dict[str, Any]]:
        if status is not None and status not in STATUSES:
            raise InvalidRequestError(f"status={status!r} is invalid; allowed: {', '.join(STATUSES)}")
        return [_job_view(job) for job in service.list(status, limit=max(1, min(limit, 1000)))]

    @app.get("/api/v1/jobs/{job_id}")
    def get_job(job_id: str) -> dict[str, Any]:
        return _job_view(service.get(job_id))

    @app.delete("/api/v1/jobs/{job_id}")
    def cancel_job(job_id: str) -> dict[str, Any]:
        return _job_view(service.cancel(job_id))

    @app.get("/api/v1/jobs/{job_id}/events")
    async def job_events(job_id: str, previews: bool = False) -> StreamingResponse:
        """Server-sent events until the job ends: queued, started, progress (with a preview PNG as base64 when
        previews=true), finished {images}, failed {error}, cancelled."""
        service.get(job_id)  # 404 for an unknown id before the stream starts
        events: queue.Queue = queue.Queue()
        unsubscribe = service.subscribe(lambda jid, event: events.put(event) if jid == job_id else None)

        def encode(event: dict[str, Any]) -> str:
            event = dict(event)
            context = event.pop("context", None)
            if previews and context is not None:
                buffer = io.BytesIO()
                context.preview("cheap")[0].save(buffer, format="PNG")
                event["preview"] = base64.b64encode(buffer.getvalue()).decode()
            return f"event: {event['event']}\ndata: {json.dumps(event)}\n\n"

        async def stream():
            try:
                current = service.get(job_id)
                if current.status in ("finished", "failed", "cancelled"):  # already over: say how it ended
                    yield encode({"event": current.status, "images": list(current.image_ids),
                                  "error": current.error})
                    return
                yield encode({"event": current.status, "position": current.position})
                while True:
                    try:
                        event = events.get_nowait()
                    except queue.Empty:
                        await asyncio.sleep(0.05)
                        continue
                    yield encode(event)
                    if event["event"] in ("finished", "failed", "cancelled"):
                        return
            finally:
                unsubscribe()

        return StreamingResponse(stream(), media_type="text/event-stream")

    @app.exception_handler(GalleryFileError)
    async def gallery_file_error(request: Request, error: GalleryFileError):
        return _error(error.status, str(error))

    @app.get("/api/v1/images")
    def gallery(offset: int = Query(0, ge=0, le=2**62), limit: int = Query(50, ge=1, le=500)) -> list[dict[str, Any]]:
        entries = service.images(offset, limit)
        for entry in entries:
            entry.pop("file")
            entry["parameters"] = parse_infotext(entry["infotext"])  # for "use these settings"
            entry["controls"] = _control_units(entry["parameters"])
        return entries

    @app.get("/api/v1/images/{image_id}")
    def image(image_id: str) -> Response:
        return Response(service.image_bytes(image_id), media_type="image/png")

    @app.get("/api/v1/images/{image_id}/thumbnail")
    def thumbnail(image_id: str, size: int = 128) -> Response:
        try:
            with Image.open(io.BytesIO(service.image_bytes(image_id))) as picture:
                picture.thumbnail((max(16, min(size, 512)),) * 2)
                buffer = io.BytesIO()
                picture.convert("RGB").save(buffer, format="PNG")
        except (OSError, ValueError, Image.DecompressionBombError) as error:  # damaged on disk since it was written
            raise GalleryFileError(410, f"image {image_id!r}: its file can no longer be read ({error})") from None
        return Response(buffer.getvalue(), media_type="image/png")

    @app.delete("/api/v1/images/{image_id}", status_code=204)
    def delete_image(image_id: str) -> Response:
        service.delete_image(image_id)
        return Response(status_code=204)

    return app
