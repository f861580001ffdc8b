"""Control units on the native job API: `controls` in a job with base64 images, checked on arrival like init_image
(model, module, image, pixel limit) and carried in the durable queue across a restart; the control-model and
module listings and the detect route the studio's preview uses.

Oracles: a job's image equals the Python API's for the same units; the detected canny map is cv2.Canny's."""

from __future__ import annotations

import base64
import io
import time

import cv2
import numpy as np
import pytest
from control_fixtures import perturbed_controlnet, save
from fastapi.testclient import TestClient
from PIL import Image, ImageDraw

import dapple
from dapple.interfaces.server import create_app
from dapple.request import ControlUnit, make_request
from dapple.service.jobs import JobService

FAST = {"prompt": "a shape", "steps": 3, "seed": 5, "sampler": "Euler", "guidance_scale": 5.0, "width": 64,
        "height": 64}


def scene(seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    picture = Image.new("RGB", (64, 64), (20, 30, 60))
    x, y = (int(v) for v in rng.integers(4, 36, 2))
    ImageDraw.Draw(picture).rectangle((x, y, x + 24, y + 20), fill=(230, 40, 40))
    return picture


def data_url(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def picture_of(url: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))).convert("RGB")


@pytest.fixture(scope="module")
def control_pipe(tmp_path_factory, tiny_model_dir, reference_pipe):
    folder = tmp_path_factory.mktemp("ControlNet")
    save(perturbed_controlnet(reference_pipe.unet, seed=1), folder / "tiny-cn")
    return dapple.load(tiny_model_dir, device="cpu", control_dirs=[folder])


@pytest.fixture
def client(tmp_path, control_pipe):
    service = JobService(tmp_path / "data", lambda: control_pipe)
    service.start()
    with TestClient(create_app(service, model_name="tiny")) as test_client:
        yield test_client
    service.stop()


def finished(client, job_id: str) -> dict:
    for _ in range(600):
        job = client.get(f"/api/v1/jobs/{job_id}").json()
        if job["status"] in ("finished", "failed", "cancelled"):
            return job
        time.sleep(0.05)
    raise AssertionError("job did not end")


def expected(pipe, *units: ControlUnit) -> Image.Image:
    fields = {key: value for key, value in FAST.items()}
    return pipe.run(make_request(**fields, controls=list(units))).images[0].convert("RGB")


def image_of(client, image_id: str) -> Image.Image:
    return Image.open(io.BytesIO(client.get(f"/api/v1/images/{image_id}").content)).convert("RGB")


def test_a_job_with_a_control_unit_draws_what_the_python_api_draws(client, control_pipe) -> None:
    picture = scene(1)
    unit = {"model": "tiny-cn", "image": data_url(picture), "module": "canny", "weight": 1.2,
            "guidance_end": 0.7, "control_mode": "My prompt is more important"}
    accepted = client.post("/api/v1/jobs", json={**FAST, "controls": [unit]})
    assert accepted.status_code == 202, accepted.text
    job = finished(client, accepted.json()["id"])
    assert job["status"] == "finished", job["error"]
    assert job["request"]["controls"][0]["image"] == "<image>"  # echoed as a mark, as init_image is
    assert job["request"]["controls"][0]["module"] == "canny"
    oracle = expected(control_pipe, ControlUnit(model="tiny-cn", image=picture, module="canny", weight=1.2,
                                                guidance_end=0.7, control_mode="My prompt is more important"))
    assert np.array_equal(np.asarray(image_of(client, job["image_ids"][0])), np.asarray(oracle))
    assert not np.array_equal(np.asarray(oracle), np.asarray(expected(control_pipe)))


@pytest.mark.parametrize("unit, status, words", [
    ({"model": "nope"}, 404, ["controls[0].model", "'nope'", "available: ", "tiny-cn"]),
    ({"module": "cany"}, 422, ["controls[0].module", "did you mean 'canny'"]),
    ({"image": None}, 422, ["controls[0].image is missing"]),
    ({"image": "/etc/hostname"}, 422, ["controls[0].image", "base64"]),  # a server path is never opened
    ({"image": data_url(Image.new("L", (5000, 4000)))}, 422, ["controls[0].image", "20000000 pixels"]),
    ({"weight": -1}, 422, ["controls.0.weight=-1", "allowed: in 0.0..2.0"]),
    ({"guidance_start": 0.9, "guidance_end": 0.1}, 422, ["guidance_start (0.9) is after guidance_end (0.1)"]),
])
def test_bad_units_are_refused_before_queueing(client, control_pipe, unit, status, words) -> None:
    body = {**FAST, "controls": [{"model": "tiny-cn", "image": data_url(scene(2)), "module": "canny", **unit}]}
    answer = client.post("/api/v1/jobs", json=body)
    assert answer.status_code == status, answer.text
    assert all(word in answer.json()["detail"] for word in words), answer.json()["detail"]
    assert client.get("/api/v1/jobs").json() == []
    if status == 404:
        assert answer.json()["valid"] == [entry.name for entry in control_pipe.control_models()]
        assert "tiny-cn" in answer.json()["valid"]


def test_control_models_modules_and_the_detected_map(client, control_pipe) -> None:
    (entry,) = control_pipe.control_models()[-1:]
    models = client.get("/api/v1/control/models").json()
    assert {"name": entry.name, "kind": "controlnet", "short_hash": entry.short_hash,
            "title": f"{entry.name} [{entry.short_hash}]"} in models
    modules = client.get("/api/v1/control/modules").json()
    assert "canny" in modules and "none" in modules
    picture = scene(3)
    answer = client.post("/api/v1/control/detect", json={"image": data_url(picture), "module": "canny",
                                                          "threshold_a": 40, "threshold_b": 120})
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert (body["width"], body["height"], body["module"]) == (64, 64, "canny")
    edges = cv2.Canny(np.asarray(picture), 40, 120)  # no size given: the image's own, pixel perfect
    assert np.array_equal(np.asarray(picture_of(body["image"])), np.stack([edges] * 3, axis=-1))
    # At an output size of another shape: crop and resize (the default) keeps the centre, at 128x64.
    wide = client.post("/api/v1/control/detect", json={"image": data_url(picture), "module": "none", "width": 128,
                                                        "height": 64}).json()
    assert (wide["width"], wide["height"]) == (128, 64)
    crop = picture.resize((128, 128), Image.LANCZOS).crop((0, 32, 128, 96))
    assert np.array_equal(np.asarray(picture_of(wide["image"])), np.asarray(crop))


@pytest.mark.parametrize("body, words", [
    ({"module": "cany"}, ["module", "did you mean 'canny'"]),
    ({"width": 128}, ["both width and height"]),
    ({"image": "/etc/hostname"}, ["base64"]),
    ({"resize_mode": "Stretch"}, ["resize_mode", "'Just Resize'"]),
    ({"processor_res": 9}, ["processor_res", "greater than or equal to 64"]),
    ({"module": "inpaint_only"}, ["mask"]),
])
def test_detect_refuses_bad_input_with_a_422(client, body, words) -> None:
    answer = client.post("/api/v1/control/detect", json={"image": data_url(scene(4)), "module": "canny", **body})
    assert answer.status_code == 422, answer.text
    assert all(word in answer.json()["detail"] for word in words), answer.json()["detail"]


def test_control_images_travel_in_the_durable_queue_across_a_restart(tmp_path, control_pipe) -> None:
    """A job accepted while no worker runs keeps its control image in the job database; a new service on the
    same folder (a restarted server) runs it with that image."""
    picture = scene(5)
    first = JobService(tmp_path / "data", lambda: control_pipe)
    with TestClient(create_app(first, model_name="tiny")) as client:  # never started: the job stays queued
        accepted = client.post("/api/v1/jobs", json={**FAST, "controls": [
            {"model": "tiny-cn", "image": data_url(picture), "module": "canny"}]})
        assert accepted.status_code == 202, accepted.text
    job_id = accepted.json()["id"]
    second = JobService(tmp_path / "data", lambda: control_pipe)
    second.start()
    try:
        with TestClient(create_app(second, model_name="tiny")) as client:
            job = finished(client, job_id)
            assert job["status"] == "finished", job["error"]
            oracle = expected(control_pipe, ControlUnit(model="tiny-cn", image=picture, module="canny"))
            assert np.array_equal(np.asarray(image_of(client, job["image_ids"][0])), np.asarray(oracle))
    finally:
        second.stop()


def test_the_gallery_reads_an_images_units_back_for_reuse(client) -> None:
    import dapple.infotext

    if not hasattr(dapple.infotext, "parse_control_units"):
        pytest.skip("dapple.infotext.parse_control_units is not in this build yet")
    job_id = client.post("/api/v1/jobs", json={**FAST, "controls": [
        {"model": "tiny-cn", "image": data_url(scene(6)), "module": "canny", "weight": 0.5, "guidance_start": 0.25}
    ]}).json()["id"]
    assert finished(client, job_id)["status"] == "finished"
    (entry,) = client.get("/api/v1/images").json()
    (unit,) = entry["controls"]
    assert unit["module"] == "canny" and unit["weight"] == 0.5 and unit["guidance_start"] == 0.25
    assert unit["model"].split(" [")[0] == "tiny-cn"
