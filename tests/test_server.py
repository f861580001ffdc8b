"""The native HTTP API on the job service: submit, poll, events, gallery, and clear errors for bad input."""

from __future__ import annotations

import base64
import io
import json
import time

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from dapple.infotext import PNG_KEY
from dapple.interfaces.server import create_app
from dapple.service.jobs import JobService

FAST = {"prompt": "a red circle", "steps": 2, "seed": 3}


@pytest.fixture
def client(tmp_path, pipe):
    service = JobService(tmp_path / "data", lambda: pipe, queue_size=2)
    service.start()
    with TestClient(create_app(service, max_body=200_000)) as test_client:
        yield test_client
    service.stop()


def finished(client, job_id: str) -> dict:
    for _ in range(600):
        job = client.get(f"/api/v1/jobs/{job_id}").json()
        if job["status"] in ("finished", "failed", "cancelled"):
            return job
        time.sleep(0.05)
    raise AssertionError("job did not end")


def test_submit_poll_and_fetch_the_image(client) -> None:
    accepted = client.post("/api/v1/jobs", json={**FAST, "batch_size": 2})
    assert accepted.status_code == 202 and set(accepted.json()) == {"id", "status", "position"}
    job = finished(client, accepted.json()["id"])
    assert job["status"] == "finished" and len(job["image_ids"]) == 2
    png = client.get(f"/api/v1/images/{job['image_ids'][1]}")
    image = Image.open(io.BytesIO(png.content))
    assert png.headers["content-type"] == "image/png" and "Seed: 4" in image.info[PNG_KEY]
    thumb = Image.open(io.BytesIO(client.get(f"/api/v1/images/{job['image_ids'][0]}/thumbnail?size=32").content))
    assert thumb.size == (32, 32)
    gallery = client.get("/api/v1/images").json()
    assert [entry["id"] for entry in gallery] == job["image_ids"][::-1] and "file" not in gallery[0]
    assert client.delete(f"/api/v1/images/{job['image_ids'][0]}").status_code == 204
    assert len(client.get("/api/v1/images").json()) == 1


def test_img2img_with_a_base64_image(client) -> None:
    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), (200, 30, 30)).save(buffer, format="PNG")
    data = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
    job = finished(client, client.post("/api/v1/jobs", json={**FAST, "init_image": data, "strength": 0.5}).json()["id"])
    assert job["status"] == "finished" and job["request"]["init_image"] == "<image>"


def test_events_stream_until_the_job_ends(client) -> None:
    job_id = client.post("/api/v1/jobs", json=FAST).json()["id"]
    with client.stream("GET", f"/api/v1/jobs/{job_id}/events?previews=true") as stream:
        kinds = [line.split(": ", 1)[1] for line in stream.iter_lines() if line.startswith("event: ")]
    assert kinds[-1] == "finished"
    replay = client.get(f"/api/v1/jobs/{job_id}/events").text  # a finished job says how it ended
    assert replay.startswith("event: finished") and job_id in replay


@pytest.mark.parametrize("body, status, message", [
    ({**FAST, "steps": 500}, 422, "steps=500 is invalid (Input should be less than or equal to 150); allowed: in 1..150"),
    ({**FAST, "width": 100}, 422, "width=100 is invalid (Input should be a multiple of 8); allowed: multiples of 8 in "
                                  "64..2048"),
    ({**FAST, "guidance_scale": "x"}, 422, "allowed: in 0.0..30.0"),
    ({**FAST, "colour": "red"}, 422, "colour: Extra inputs are not permitted"),
    ({**FAST, "mask": "abc"}, 422, "mask needs init_image"),
    ({**FAST, "sampler": "Euler b"}, 404, "unknown sampler 'Euler b'"),
    ({**FAST, "init_image": "/etc/hostname"}, 422, "init_image"),  # a server path is never opened
    ({**FAST, "init_image": "bm90IGFuIGltYWdl"}, 422, "init_image is not a readable image"),
    ({**FAST, "init_image": 12}, 422, "must be a base64-encoded image"),
])
def test_bad_requests_get_clear_errors(client, body, status, message) -> None:
    response = client.post("/api/v1/jobs", json=body)
    assert response.status_code == status and message in response.json()["detail"]


def test_images_over_the_pixel_limit_are_refused_on_arrival(client) -> None:
    buffer = io.BytesIO()
    Image.new("L", (5000, 5000)).save(buffer, format="PNG")
    header_only = base64.b64encode(buffer.getvalue()[:200]).decode()  # decoding it would fail differently
    response = client.post("/api/v1/jobs", json={**FAST, "init_image": header_only})
    assert response.status_code == 422 and "5000x5000 = 25000000 pixels" in response.json()["detail"]
    assert client.get("/api/v1/jobs").json() == []  # nothing was queued


def test_limits_and_unknown_ids(client) -> None:
    assert client.post("/api/v1/jobs", content=b"x" * 300_000,
                       headers={"content-type": "application/json"}).status_code == 413
    assert client.get("/api/v1/jobs/nope").status_code == 404
    assert client.get("/api/v1/images/../../etc/passwd").status_code == 404
    assert client.get("/api/v1/jobs?status=lost").status_code == 422
    assert client.get("/api/v1/health").json()["status"] == "ok"
    assert "Euler a" in client.get("/api/v1/samplers").json()
    assert client.get("/api/v1/models").json() == [{
        "name": "model", "default": True, "loaded": True, "native_size": 64, "model_recommends": {},
        "recommended": {"sampler": "DPM++ 2M Karras", "steps": 20, "guidance_scale": 7.0, "guidance_min_timestep": 0}}]
    unknown = client.post("/api/v1/jobs", json={**FAST, "model": "nope"})
    assert unknown.status_code == 404 and unknown.json()["valid"] == ["model"]
    assert "/api/v1/jobs" in client.get("/openapi.json").json()["paths"]


def test_a_full_queue_answers_429(tmp_path, pipe) -> None:
    service = JobService(tmp_path / "data", lambda: pipe, queue_size=2)  # not started: jobs stay queued
    with TestClient(create_app(service)) as client:
        for _ in range(2):
            assert client.post("/api/v1/jobs", json=FAST).status_code == 202
        full = client.post("/api/v1/jobs", json=FAST)
        assert full.status_code == 429 and full.headers["retry-after"] == "5"
        job_id = client.get("/api/v1/jobs?status=queued").json()[0]["id"]
        assert client.delete(f"/api/v1/jobs/{job_id}").json()["status"] == "cancelled"


def test_basic_auth_guards_every_route_and_cors_is_off_by_default(tmp_path, pipe) -> None:
    service = JobService(tmp_path / "data", lambda: pipe)
    with TestClient(create_app(service, auth=("ann", "s3cret"))) as client:
        for path in ("/api/v1/health", "/sdapi/v1/options", "/docs"):
            denied = client.get(path)
            assert denied.status_code == 401 and denied.headers["www-authenticate"].startswith("Basic")
        assert client.get("/api/v1/health", auth=("ann", "wrong")).status_code == 401
        assert client.get("/api/v1/health", auth=("ann", "s3cret")).status_code == 200
    with TestClient(create_app(service)) as client:
        answer = client.get("/api/v1/health", headers={"origin": "https://example.com"})
        assert "access-control-allow-origin" not in answer.headers
    with TestClient(create_app(service, cors_origins=["https://example.com"])) as client:
        answer = client.get("/api/v1/health", headers={"origin": "https://example.com"})
        assert answer.headers["access-control-allow-origin"] == "https://example.com"


def test_studio_page_is_served_and_uses_only_the_native_api(client) -> None:
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    for element in ('id="prompt"', 'id="sampler"', 'id="mask"', 'id="gallery"', "Ctrl</kbd>+<kbd>Enter",
                    'href="/studio/studio.css"', 'src="/studio/studio.js"', 'rel="icon" href="/favicon.ico"'):
        assert element in page.text
    script = client.get("/studio/studio.js")
    style = client.get("/studio/studio.css")
    assert script.headers["content-type"].startswith("text/javascript") and "EventSource" in script.text
    assert style.headers["content-type"].startswith("text/css")
    for text in (page.text, script.text, style.text):  # no network: nothing from elsewhere, only the native API
        assert "/sdapi" not in text and "http://" not in text and "https://" not in text and "//cdn" not in text
    job = finished(client, client.post("/api/v1/jobs", json=FAST).json()["id"])
    entry = client.get("/api/v1/images").json()[0]
    assert entry["id"] == job["image_ids"][0] and entry["parameters"]["Seed"] == 3  # for "use these settings"


def test_studio_files_are_served_by_name_only_and_the_favicon_exists(client) -> None:
    favicon = client.get("/favicon.ico")
    assert favicon.status_code == 200 and favicon.headers["content-type"] == "image/x-icon"
    assert Image.open(io.BytesIO(favicon.content)).format == "ICO"
    for path in ("/studio/index.html", "/studio/nope.js", "/studio/..%2Fserver.py", "/studio/../server.py"):
        assert client.get(path).status_code == 404, path


def test_the_studio_offers_every_field_and_choice_of_the_job_api(client) -> None:
    """Each request field is sent by the studio (depth2img's depth map excepted: no depth tab yet; plugin
    extensions excepted: they have no form, only the API), and each choice the request accepts is an option of
    its select."""
    from dapple.request import HIRES_UPSCALERS, INPAINTING_FILLS, RESIZE_MODES, GenerationRequest

    page, script = client.get("/").text, client.get("/studio/studio.js").text
    missing = [name for name in GenerationRequest.model_fields if name not in ("depth_map", "extensions") and f"{name}" not in script]
    assert missing == []
    for choices in (HIRES_UPSCALERS, INPAINTING_FILLS, RESIZE_MODES):
        for choice in choices:
            assert f'value="{choice}"' in page or f"<option>{choice}</option>" in page or \
                f"<option selected>{choice}</option>" in page, choice


def test_models_say_what_they_recommend_without_loading(tmp_path, pipe) -> None:
    """Each entry of /models carries the settings a job that leaves them unset runs with: a folder model's
    generation_defaults.json over the request defaults, read without loading the model; a bad file is named."""
    from dapple.models.generation_defaults import write_generation_defaults
    from dapple.models.library import ModelFolders
    from dapple.models.tiny import save_tiny_model
    from dapple.service.models import ModelPool

    checkpoints = tmp_path / "webui" / "models" / "Stable-diffusion"
    write_generation_defaults(save_tiny_model(checkpoints / "other", seed=5), {"sampler": "Euler a", "steps": 9})
    (save_tiny_model(checkpoints / "broken", seed=6) / "generation_defaults.json").write_text('{"prompt": "x"}')
    loads = []
    pool = ModelPool(lambda: pipe, "tiny", ModelFolders.from_root(tmp_path / "webui"),
                     lambda path: loads.append(path) or pipe)
    service = JobService(tmp_path / "data", lambda: pipe, models=pool)
    with TestClient(create_app(service, model_name="tiny")) as client:
        entries = {entry["name"]: entry for entry in client.get("/api/v1/models").json()}
    assert set(entries) == {"tiny", "other", "broken"} and loads == []
    assert entries["other"]["model_recommends"] == {"sampler": "Euler a", "steps": 9}
    assert entries["other"]["recommended"] == {"sampler": "Euler a", "steps": 9, "guidance_scale": 7.0,
                                               "guidance_min_timestep": 0}
    assert entries["other"]["loaded"] is False and entries["other"]["native_size"] is None
    assert entries["tiny"]["recommended"]["sampler"] == "DPM++ 2M Karras" and entries["tiny"]["native_size"] == 64
    assert "cannot recommend prompt" in entries["broken"]["error"] and entries["broken"]["model_recommends"] == {}


def test_the_built_in_model_recommends_its_cards_settings(tmp_path) -> None:
    """The studio pre-fills what /models says: for the built-in model, its card's DPM++ 2M, CFG 5 and guidance at
    t >= 600, not the request defaults (DPM++ 2M Karras, CFG 7, every step)."""
    import dapple
    from dapple.api import BUILTIN_MODEL_DIR

    builtin = dapple.load(BUILTIN_MODEL_DIR, device="cpu")
    service = JobService(tmp_path / "data", lambda: builtin)
    with TestClient(create_app(service, model_name=builtin.components.name)) as client:
        [entry] = client.get("/api/v1/models").json()
    assert entry["recommended"] == {"sampler": "DPM++ 2M", "steps": 20, "guidance_scale": 5.0,
                                    "guidance_min_timestep": 600}
    assert entry["native_size"] == builtin.components.native_size


def test_jobs_name_models_from_the_models_folder(tmp_path, pipe) -> None:
    """A server with a models folder: jobs pick a checkpoint by name, the A1111 options switch the default."""
    from dapple.models.library import ModelFolders
    from dapple.models.tiny import save_tiny_model
    from dapple.service.models import ModelPool

    checkpoints = tmp_path / "webui" / "models" / "Stable-diffusion"
    save_tiny_model(checkpoints / "other", seed=5)
    loads = []

    def load(path):
        loads.append(path.name)
        import dapple
        return dapple.load(path, device="cpu")

    pool = ModelPool(lambda: pipe, "tiny", ModelFolders.from_root(tmp_path / "webui"), load)
    service = JobService(tmp_path / "data", lambda: pipe, models=pool)
    service.start()
    try:
        with TestClient(create_app(service, model_name="tiny")) as client:
            assert [m["name"] for m in client.get("/api/v1/models").json()] == ["tiny", "other"]
            default = finished(client, client.post("/api/v1/jobs", json=FAST).json()["id"])
            other = finished(client, client.post("/api/v1/jobs", json={**FAST, "model": "other"}).json()["id"])
            assert default["status"] == other["status"] == "finished" and loads == ["other"]
            infotexts = [client.get("/api/v1/images").json()[i]["infotext"] for i in (0, 1)]
            assert "Model: other" in infotexts[0] and "Model: tiny" in infotexts[1]
            assert {m["name"]: m["loaded"] for m in client.get("/api/v1/models").json()} == {"tiny": True,
                                                                                            "other": True}
            titles = [entry["title"] for entry in client.get("/sdapi/v1/sd-models").json()]
            assert [title.split(" [")[0] for title in titles] == ["tiny", "other"]
            assert client.post("/sdapi/v1/options", json={"sd_model_checkpoint": titles[1]}).status_code == 200
            answer = client.post("/sdapi/v1/txt2img", json={"prompt": "x", "steps": 2, "width": 64, "height": 64})
            assert json.loads(answer.json()["info"])["sd_model_name"] == "other"
            missing = client.post("/sdapi/v1/options", json={"sd_model_checkpoint": "nope"})
            assert missing.status_code == 404 and "available: tiny, other" in missing.json()["detail"]
    finally:
        service.stop()
