"""The A1111 API, exercised by an unchanged third-party client (the `webuiapi` package) against a live server."""

from __future__ import annotations

import base64
import io
import json
import socket
import threading
import time

import numpy as np
import pytest
import uvicorn
import webuiapi
from PIL import Image

from dapple.interfaces.a1111 import translate
from dapple.interfaces.server import create_app
from dapple.service.jobs import JobService


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class SlowPipe:
    """The tiny pipeline, with a pause per step when `slow` is set (to catch a job while it runs)."""

    def __init__(self, pipe) -> None:
        self.pipe, self.slow = pipe, False

    def run(self, request, callback=None, cancel=None):
        def step(context):
            if self.slow:
                time.sleep(0.3)
            callback(context)
        return self.pipe.run(request, callback=step, cancel=cancel)


@pytest.fixture(scope="module")
def live(tmp_path_factory, pipe, tiny_model_dir):
    slow = SlowPipe(pipe)
    service = JobService(tmp_path_factory.mktemp("data"), lambda: slow)
    service.start()
    port = free_port()
    app = create_app(service, model_name="tiny", model_path=tiny_model_dir)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    yield webuiapi.WebUIApi(host="127.0.0.1", port=port), slow
    server.should_exit = True
    thread.join(10)
    service.stop()


def test_txt2img(live) -> None:
    api, _ = live
    result = api.txt2img(prompt="a red circle", negative_prompt="blurry", seed=5, steps=3, width=64, height=64,
                         sampler_name="DPM++ 2M", scheduler="Karras", batch_size=2, cfg_scale=6)
    assert [image.size for image in result.images] == [(64, 64), (64, 64)]
    assert result.info["all_seeds"] == [5, 6] and result.info["sd_model_name"] == "tiny"
    assert "Sampler: DPM++ 2M, Schedule type: Karras" in result.info["infotexts"][0]
    assert len(result.info["sd_model_hash"]) == 10


def test_img2img_with_a_mask_keeps_the_unmasked_half(live) -> None:
    api, _ = live
    picture = Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (32, 0, 64, 64))
    result = api.img2img(images=[picture], mask_image=mask, prompt="a blue square", denoising_strength=0.8,
                         mask_blur=2, inpainting_fill=1, steps=4, seed=3, width=64, height=64)
    out = np.asarray(result.images[0].convert("RGB"))
    assert np.array_equal(out[:, :20], np.asarray(picture)[:, :20])
    assert "Denoising strength: 0.8" in result.info["infotexts"][0] and "Mask blur: 2" in result.info["infotexts"][0]


def test_options_models_samplers_and_png_info(live) -> None:
    api, _ = live
    assert api.get_options()["sd_model_checkpoint"] == "tiny"
    assert api.util_get_current_model() == "tiny"
    assert api.set_options({"sd_model_checkpoint": "tiny", "samples_format": "png"}) == {}
    assert api.get_sd_models()[0]["title"].startswith("tiny [")
    assert "Euler a" in [sampler["name"] for sampler in api.get_samplers()]
    assert api.get_latent_upscale_modes()[0]["name"] == "Latent"
    image = api.txt2img(prompt="a cat", steps=2, seed=9, width=64, height=64).image
    info = api.png_info(image)
    assert info.json["parameters"]["Seed"] == 9 and info.json["parameters"]["Prompt"] == "a cat"


def test_unknown_checkpoint_and_sampler_are_errors_in_a1111_shape(live) -> None:
    api, _ = live
    import requests

    answer = requests.post(f"{api.baseurl}/options", json={"sd_model_checkpoint": "sdxl.safetensors"})
    assert answer.status_code == 404 and set(answer.json()) == {"error", "detail", "body", "errors"}
    answer = requests.post(f"{api.baseurl}/txt2img", json={"sampler_name": "Euler b", "width": 64, "height": 64})
    assert answer.status_code == 404 and "unknown sampler" in answer.json()["detail"]
    answer = requests.post(f"{api.baseurl}/txt2img", json={"steps": 500, "width": 64, "height": 64})
    assert answer.status_code == 422 and "steps=500" in answer.json()["detail"]
    answer = requests.post(f"{api.baseurl}/img2img", json={"init_images": ["not base64!"], "width": 64,
                                                              "height": 64, "steps": 2})
    assert answer.status_code == 400 and "base64" in answer.json()["detail"]


def test_progress_and_interrupt(live) -> None:
    api, slow = live
    assert api.get_progress()["state"]["job_count"] == 0
    slow.slow = True
    outcome = {}
    worker = threading.Thread(target=lambda: outcome.setdefault("result", api.txt2img(
        prompt="x", steps=20, seed=1, width=64, height=64)))
    worker.start()
    try:
        for _ in range(200):
            progress = api.get_progress()
            if progress["progress"] > 0:
                break
            time.sleep(0.05)
        assert 0 < progress["progress"] < 1 and progress["state"]["sampling_steps"] == 20
        assert progress["current_image"]  # a preview of the running job
        assert api.interrupt() == {}
        worker.join(30)
    finally:
        slow.slow = False
    assert outcome["result"].images == [] and outcome["result"].info["interrupted"] is True


def test_translate_names_what_it_ignores() -> None:
    fields, ignored = translate({"prompt": "x", "styles": ["s"], "restore_faces": True, "sampler_index": "Euler a",
                                 "enable_hr": True, "hr_scale": 1.5, "denoising_strength": 0.4, "n_iter": 2,
                                 "batch_size": 2, "eta": None, "inpaint_full_res": True}, "txt2img")
    assert fields["sampler"] == "Euler a" and fields["batch_size"] == 4
    assert (fields["hires_scale"], fields["hires_strength"]) == (1.5, 0.4)
    assert "styles" in ignored and "restore_faces" in ignored and "inpaint_full_res" not in ignored


def test_translate_sets_every_sampling_field_as_a1111_does() -> None:
    """A1111 has no model-recommended settings: its defaults fill the request, so a model folder's
    generation_defaults.json (which only fills unset fields) does not change an A1111 client's images."""
    fields, _ = translate({"prompt": "x"}, "txt2img")
    assert {key: fields[key] for key in ("sampler", "steps", "guidance_scale", "guidance_min_timestep")} == {
        "sampler": "Euler", "steps": 50, "guidance_scale": 7.0, "guidance_min_timestep": 0}


def test_a_size_left_out_entirely_is_the_models_native_size_and_half_a_size_is_a1111s_512() -> None:
    fields, _ = translate({"prompt": "x"}, "txt2img")
    assert "width" not in fields and "height" not in fields  # the engine picks the model's native size
    fields, _ = translate({"prompt": "x", "width": 64}, "txt2img")
    assert (fields["width"], fields["height"]) == (64, 512)
    fields, _ = translate({"prompt": "x", "width": None, "height": 0, "enable_hr": True, "hr_resize_x": 1024},
                          "txt2img")  # a hires target size is relative to A1111's 512 base
    assert (fields["width"], fields["height"], fields["hires_scale"]) == (512, 512, 2.0)


def test_a_txt2img_body_without_a_size_draws_at_the_native_size(live) -> None:
    import requests

    api = live[0]
    answer = requests.post(f"{api.baseurl}/txt2img", json={"prompt": "a red circle", "steps": 2, "seed": 4})
    assert answer.status_code == 200, answer.text
    info = json.loads(answer.json()["info"])
    image = Image.open(io.BytesIO(base64.b64decode(answer.json()["images"][0])))
    assert image.size == (info["width"], info["height"]) == (64, 64)  # the tiny test model's native size
