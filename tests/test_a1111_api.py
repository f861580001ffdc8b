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
        self.components = pipe.components

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
    title = api.get_sd_models()[0]["title"]
    assert title.startswith("tiny [") and len(title) == len("tiny [0123456789]")
    assert api.get_options()["sd_model_checkpoint"] == title  # equal to a title, as clients compare them
    assert api.util_get_current_model() == title
    assert api.set_options({"sd_model_checkpoint": "tiny", "samples_format": "png"}) == {}
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
    result = outcome["result"]
    assert result.info["interrupted"] is True
    # A1111 returns what the interrupted run has drawn: one decoded image, with its infotext.
    assert [image.size for image in result.images] == [(64, 64)]
    step = result.info["interrupted_at_step"]
    assert 1 <= step < 20 and result.info["all_seeds"] == [1] and result.info["all_prompts"] == ["x"]
    assert (result.info["width"], result.info["height"], result.info["sd_model_name"]) == (64, 64, "tiny")
    assert "Seed: 1," in result.info["infotexts"][0] and f"Interrupted: at step {step} of 20" in \
        result.info["infotexts"][0]
    pixels = np.asarray(result.images[0].convert("RGB"), dtype=float)
    assert pixels.std() > 1  # a decoded picture, not a blank one
    assert api.png_info(result.images[0]).json["parameters"]["Seed"] == 1


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


def _post(api, route: str, body, **kwargs):
    import requests

    return requests.post(f"{api.baseurl}/{route}", json=body, timeout=120, **kwargs)


def test_every_a1111_schedule_type_with_euler_a_and_dpmpp_2m(live) -> None:
    """A1111 1.9+ sends sampler_name and scheduler apart, by label or API name; each runs and says so in the
    infotext, or is refused by name with what that sampler allows."""
    api, _ = live
    for sampler, scheduler, expected in (("Euler a", "Karras", "Karras"), ("Euler a", "karras", "Karras"),
                                         ("DPM++ 2M", "sgm_uniform", "SGM Uniform"), ("Euler", "Beta", "Beta"),
                                         ("Euler a", "exponential", "Exponential"), ("DDIM", "normal", "Normal"),
                                         ("PLMS", "simple", "Simple"), ("UniPC", "Automatic", None),
                                         ("DPM++ 2M", "KL Optimal", "KL Optimal"),
                                         ("Euler a", "align_your_steps", "Align Your Steps")):
        result = api.txt2img(prompt="x", steps=2, seed=2, width=64, height=64, sampler_name=sampler,
                             scheduler=scheduler)
        assert len(result.images) == 1, (sampler, scheduler)
        infotext = result.info["infotexts"][0]
        assert (f"Schedule type: {expected}," in infotext) if expected else ("Schedule type" not in infotext)
    answer = _post(api, "txt2img", {"sampler_name": "DDIM", "scheduler": "Karras", "steps": 2, "width": 64,
                                    "height": 64})
    assert answer.status_code == 404 and set(answer.json()) == {"error", "detail", "body", "errors"}
    assert "not available for DDIM" in answer.json()["detail"] and "valid: Automatic, Uniform, SGM Uniform" in \
        answer.json()["detail"]
    answer = _post(api, "txt2img", {"sampler_name": "Euler", "scheduler": "Karas", "steps": 2})
    assert answer.status_code == 404 and "valid schedule types: Automatic, Uniform, Karras" in answer.json()["detail"]


def test_a_schedule_type_in_the_sampler_name_wins_and_the_scheduler_field_is_named_as_ignored(live) -> None:
    api, _ = live
    result = api.txt2img(prompt="x", steps=2, seed=2, width=64, height=64, sampler_name="DPM++ 2M Karras",
                         scheduler="Exponential")
    assert "Schedule type: Karras," in result.info["infotexts"][0]
    assert any(entry.startswith("scheduler (") for entry in result.info["ignored"])


def test_schedulers_list_as_a1111_does(live) -> None:
    import requests

    listing = requests.get(f"{live[0].baseurl}/schedulers", timeout=10).json()
    assert all(set(entry) == {"name", "label", "aliases", "default_rho", "need_inner_model"} for entry in listing)
    assert [entry["name"] for entry in listing] == ["automatic", "uniform", "karras", "exponential", "polyexponential",
                                                    "sgm_uniform", "kl_optimal", "align_your_steps", "simple",
                                                    "normal", "ddim", "beta"]  # all of A1111's 12
    assert live[0].util_get_scheduler_names() == sorted(entry["name"] for entry in listing)
    by_name = {entry["name"]: entry for entry in listing}
    assert by_name["karras"] == {"name": "karras", "label": "Karras", "aliases": None, "default_rho": 7.0,
                                 "need_inner_model": False}
    assert by_name["sgm_uniform"]["aliases"] == ["SGMUniform"] and by_name["sgm_uniform"]["need_inner_model"]
    assert by_name["polyexponential"]["default_rho"] == 1.0 and by_name["automatic"]["default_rho"] == -1


def test_upscalers_start_with_none_as_in_a1111(live) -> None:
    names = [entry["name"] for entry in live[0].get_upscalers()]
    assert names == ["None", "Lanczos", "Nearest"]


def test_hires_with_the_none_upscaler_resizes_as_a1111_does(live) -> None:
    api, _ = live
    result = api.txt2img(prompt="x", steps=2, seed=2, width=64, height=64, enable_hr=True, hr_scale=1.5,
                         hr_upscaler="None", denoising_strength=0.5)
    assert result.images[0].size == (96, 96) and "Hires upscaler: Lanczos" in result.info["infotexts"][0]


A1111_STANDARD_OPTIONS = {  # what clients (webuiapi, SillyTavern, Open WebUI, Krita's plugin) read, with defaults
    "sd_vae": "Automatic", "CLIP_stop_at_last_layers": 1, "samples_format": "png", "samples_save": True,
    "outdir_samples": "", "save_to_dirs": True, "grid_save": True, "jpeg_quality": 80, "eta_ddim": 0.0,
    "eta_ancestral": 1.0, "s_churn": 0.0, "s_noise": 1.0, "s_tmin": 0.0, "show_progress_every_n_steps": 10,
    "live_previews_enable": True, "outdir_txt2img_samples": "outputs/txt2img-images", "grid_format": "png",
    "outdir_img2img_samples": "outputs/img2img-images", "sd_checkpoints_limit": 1, "enable_pnginfo": True,
    "img2img_color_correction": False, "initial_noise_multiplier": 1.0, "inpainting_mask_weight": 1.0,
    "live_previews_image_format": "png", "show_progress_type": "Approx NN", "sd_hypernetwork": "None",
    "sd_lora": "None", "quicksettings_list": ["sd_model_checkpoint"], "face_restoration_model": "CodeFormer",
    "code_former_weight": 0.5, "save_images_before_highres_fix": False, "export_for_4chan": True,
    "upscaler_for_img2img": None, "ESRGAN_tile": 192, "sd_unet": "Automatic", "randn_source": "GPU",
    "eta_noise_seed_delta": 0, "uni_pc_order": 3, "token_merging_ratio": 0.0, "add_model_hash_to_info": True,
    "add_model_name_to_info": True, "samples_filename_pattern": "", "directories_filename_pattern": "[date]",
}


def test_options_have_a1111s_standard_keys_with_their_defaults_and_are_writable(tmp_path_factory, pipe,
                                                                                tiny_model_dir) -> None:
    """On a fresh server (options are per server): every standard key with A1111's default; a client that POSTs
    the whole dict back with changes reads them back; sd_checkpoint_hash is the checkpoint's sha256."""
    import requests

    with serve(tmp_path_factory, pipe, tiny_model_dir) as base:
        options = requests.get(f"{base}/options", timeout=10).json()
        assert {key: options.get(key, "<missing>") for key in A1111_STANDARD_OPTIONS} == A1111_STANDARD_OPTIONS
        assert len(options) >= 150
        models = requests.get(f"{base}/sd-models", timeout=10).json()
        assert options["sd_model_checkpoint"] == models[0]["title"]
        assert options["sd_checkpoint_hash"] == models[0]["sha256"] and len(models[0]["sha256"]) == 64
        changed = {**options, "jpeg_quality": 95, "samples_format": "jpg", "eta_ancestral": 0.5,
                   "my_extension_setting": {"a": [1, 2, {"b": "c"}]}}
        assert requests.post(f"{base}/options", json=changed, timeout=10).json() == {}
        after = requests.get(f"{base}/options", timeout=10).json()
        assert (after["jpeg_quality"], after["samples_format"], after["eta_ancestral"]) == (95, "jpg", 0.5)
        assert after["my_extension_setting"] == {"a": [1, 2, {"b": "c"}]}  # unknown keys kept, as A1111 does
        assert after["sd_model_checkpoint"] == options["sd_model_checkpoint"]


def test_hostile_option_values_are_refused_and_later_gets_still_answer(tmp_path_factory, pipe,
                                                                       tiny_model_dir) -> None:
    import requests

    with serve(tmp_path_factory, pipe, tiny_model_dir) as base:
        before = requests.get(f"{base}/options", timeout=10).json()
        deep: object = "x"
        for _ in range(500):
            deep = [deep]
        nested_dict: object = 1
        for _ in range(40):  # within the server's JSON depth limit (64), beyond what an option may hold (32)
            nested_dict = {"k": nested_dict}
        cases = [
            ({"deep": deep}, 422, "nest"),  # the server's guard or the options' own bound refuses it
            ({"deep": nested_dict}, 422, "option 'deep' is nested more than 32 levels deep"),
            ({"big": "x" * (10 * 1024 * 1024)}, 413, "allowed: at most 65536 bytes"),
            ({"jpeg_quality": "high"}, 422, "must be a number"),
            ({"samples_save": 1}, 422, "must be a boolean"),
            ({"k" * 300: 1}, 422, "option names must be 1..200 characters"),
            ({"sd_model_checkpoint": "nope.safetensors"}, 404, "unknown checkpoint"),
            ({"fine": 1, "bad": nested_dict}, 422, "nested"),  # nothing of a refused body is kept
        ]
        for body, status, words in cases:
            answer = requests.post(f"{base}/options", json=body, timeout=60)
            assert answer.status_code == status, (status, answer.text[:200])
            assert words in answer.json()["detail"] and set(answer.json()) == {"error", "detail", "body", "errors"}
        # a lone surrogate cannot be sent through requests' json=; send the raw JSON escape
        answer = requests.post(f"{base}/options", data=b'{"name": "\\ud800"}', timeout=10,
                               headers={"content-type": "application/json"})
        assert answer.status_code == 422 and "valid Unicode" in answer.json()["detail"]  # the guard's or ours
        for _ in range(3):
            too_many = {f"key{index}-{_}": "v" * 1000 for index in range(700)}
            requests.post(f"{base}/options", json=too_many, timeout=10)
        answer = requests.get(f"{base}/options", timeout=10)
        assert answer.status_code == 200
        kept = answer.json()
        assert len(json.dumps(kept)) <= 1024 * 1024 + 1000  # bounded in all
        assert "fine" not in kept and "deep" not in kept and "big" not in kept and "name" not in kept
        assert {key: kept[key] for key in before} == before


def test_the_checkpoint_is_set_by_title_or_by_bare_name(live) -> None:
    import requests

    api, _ = live
    title = api.get_sd_models()[0]["title"]
    for value in (title, "tiny", " tiny "):
        answer = requests.post(f"{api.baseurl}/options", json={"sd_model_checkpoint": value}, timeout=10)
        assert answer.status_code == 200 and api.get_options()["sd_model_checkpoint"] == title
    api.util_set_model("tiny")  # webuiapi: the closest title, POSTed back
    assert api.util_get_current_model() in api.util_get_model_names()
    answer = requests.post(f"{api.baseurl}/options", json={"sd_model_checkpoint": "tiny [0000000000]"}, timeout=10)
    assert answer.status_code == 200  # A1111 matches the name when the hash is stale
    answer = _post(api, "txt2img", {"prompt": "x", "steps": 2, "width": 64, "height": 64,
                                    "override_settings": {"sd_model_checkpoint": title}})
    assert answer.status_code == 200 and json.loads(answer.json()["info"])["sd_model_name"] == "tiny"


@pytest.mark.parametrize(("route", "body", "field"), [
    ("txt2img", {"width": "abc"}, "width"),
    ("txt2img", {"steps": [3]}, "steps"),
    ("txt2img", {"prompt": {"a": 1}}, "prompt"),
    ("txt2img", {"cfg_scale": "lots"}, "cfg_scale"),
    ("txt2img", {"enable_hr": "maybe"}, "enable_hr"),
    ("txt2img", {"override_settings": [1]}, "override_settings"),
    ("img2img", {"init_images": "abc"}, "init_images"),
    ("img2img", {"denoising_strength": "strong", "init_images": ["x"]}, "denoising_strength"),
    ("img2img", {"mask_blur": [4], "init_images": ["x"]}, "mask_blur"),
    ("png-info", {"image": 5}, "image"),
])
def test_wrong_types_are_a_422_naming_the_field(live, route, body, field) -> None:
    answer = _post(live[0], route, body)
    assert answer.status_code == 422, answer.text
    detail = answer.json()["detail"]
    assert set(answer.json()) == {"error", "detail", "body", "errors"} and detail.startswith(f"{field}: ")
    assert "(got " in detail


@pytest.mark.parametrize("route", ["txt2img", "img2img", "png-info", "options"])
def test_bodies_that_are_not_objects_or_not_json_or_nested_without_end_are_422(live, route) -> None:
    import requests

    base = live[0].baseurl
    for data in (b"[1, 2]", b"{not json", b"[" * 100_000 + b"]" * 100_000, b'{"a": ' + b"[" * 600 + b"]" * 600 + b"}"):
        answer = requests.post(f"{base}/{route}", data=data, headers={"content-type": "application/json"},
                               timeout=30)
        assert answer.status_code == 422, (route, data[:20], answer.status_code, answer.text[:200])
    assert requests.get(f"{base}/options", timeout=10).status_code == 200


def test_the_openapi_documents_the_a1111_bodies(live) -> None:
    import requests

    schema = requests.get(live[0].baseurl.replace("/sdapi/v1", "") + "/openapi.json", timeout=10).json()
    components = schema["components"]["schemas"]

    def body_schema(path: str) -> dict:
        reference = schema["paths"][path]["post"]["requestBody"]["content"]["application/json"]["schema"]
        return components[reference["$ref"].rsplit("/", 1)[1]] if "$ref" in reference else reference

    txt2img = body_schema("/sdapi/v1/txt2img")
    assert {"prompt", "sampler_name", "scheduler", "steps", "width", "enable_hr", "alwayson_scripts"} <= \
        set(txt2img["properties"])
    assert txt2img["properties"]["steps"]["default"] == 50 and txt2img.get("additionalProperties", True) is True
    assert {"integer", "null"} == {entry["type"] for entry in txt2img["properties"]["width"]["anyOf"]}
    img2img = body_schema("/sdapi/v1/img2img")
    assert {"init_images", "mask", "inpainting_fill", "denoising_strength"} <= set(img2img["properties"])
    assert "image" in body_schema("/sdapi/v1/png-info")["properties"]
    assert body_schema("/sdapi/v1/options")["type"] == "object"
    assert "422" in schema["paths"]["/sdapi/v1/txt2img"]["post"]["responses"]


def test_preflight_refuses_a_step_count_the_sampler_cannot_take_on_the_models_schedule(live) -> None:
    """On a zero-terminal-SNR schedule, DPM2 a with Normal spacing cannot take 2 steps: a 422 before queueing."""
    import copy
    from pathlib import Path

    import dapple

    api, slow = live
    config = Path(dapple.__file__).parent / "models" / "assets" / "builtin" / "scheduler" / "scheduler_config.json"
    saved = copy.deepcopy(slow.components.scheduler_config)
    slow.components.scheduler_config = json.loads(config.read_text())
    try:
        jobs_before = len(live_service(api))
        answer = _post(api, "txt2img", {"sampler_name": "DPM2 a", "scheduler": "normal", "steps": 2, "width": 64,
                                        "height": 64})
        assert answer.status_code == 422 and "steps=2 is not possible" in answer.json()["detail"]
        assert len(live_service(api)) == jobs_before  # nothing was queued
        result = api.txt2img(prompt="x", steps=2, sampler_name="PLMS", width=64, height=64, seed=1)
        assert len(result.images) == 1  # PLMS below 4 steps on this schedule: an image, not a 500
    finally:
        slow.components.scheduler_config = saved


def live_service(api) -> list:
    import requests

    return requests.get(api.baseurl.replace("/sdapi/v1", "") + "/api/v1/jobs?limit=1000", timeout=10).json()


class serve:
    """A fresh live server (its own options and data folder) for tests that change server-wide state."""

    def __init__(self, tmp_path_factory, pipe, tiny_model_dir) -> None:
        self.service = JobService(tmp_path_factory.mktemp("data"), lambda: pipe)
        self.app = create_app(self.service, model_name="tiny", model_path=tiny_model_dir)

    def __enter__(self) -> str:
        self.service.start()
        port = free_port()
        self.server = uvicorn.Server(uvicorn.Config(self.app, host="127.0.0.1", port=port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        while not self.server.started:
            time.sleep(0.05)
        return f"http://127.0.0.1:{port}/sdapi/v1"

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(10)
        self.service.stop()


def test_check_json_bounds_depth_and_refuses_lone_surrogates_at_any_depth() -> None:
    """The bound every /sdapi body and option value passes, whatever the server's own guard lets through."""
    from dapple.interfaces.a1111 import check_json

    check_json({"a": [[[{"b": "fine"}]]]})
    deep: object = 0
    for _ in range(10_000):  # iterative: no recursion limit to hit
        deep = {"k": deep}
    with pytest.raises(ValueError, match="body is nested more than 32 levels deep"):
        check_json(deep)
    with pytest.raises(ValueError, match=r"body.a\[0\].b is not valid Unicode text \(a lone surrogate"):
        check_json({"a": [{"b": "ok\ud800"}]})
    with pytest.raises(ValueError, match="a key in body.a is not valid Unicode"):
        check_json({"a": {"\udfff": 1}})
    check_json({"a": "x" * 33}, max_depth=1)
    with pytest.raises(ValueError, match="nested more than 1 levels"):
        check_json({"a": []}, max_depth=1)


def test_a_mask_blur_left_out_is_a1111s_mask_blur_x() -> None:
    body = {"init_images": ["x"], "mask": "m"}
    assert translate(body, "img2img")[0]["mask_blur"] == 4
    assert translate({**body, "mask_blur_x": 6}, "img2img")[0]["mask_blur"] == 6
    assert translate({**body, "mask_blur": 0, "mask_blur_x": 6}, "img2img")[0]["mask_blur"] == 0


@pytest.mark.parametrize("body", [{"batch_size": 10**12}, {"batch_size": -3}, {"n_iter": 10**10, "batch_size": 10**10},
                                  {"steps": -1}, {"width": -64}, {"hr_scale": -1, "enable_hr": True},
                                  {"enable_hr": True, "hr_resize_x": 10**9}, {"seed": 2**70}, {"cfg_scale": 1e308},
                                  {"sampler_name": ""}, {"scheduler": ""}, {"resize_mode": 99}])
def test_out_of_range_values_are_4xx_not_500(live, body) -> None:
    answer = _post(live[0], "txt2img", {"steps": 2, "width": 64, "height": 64, **body})
    assert answer.status_code != 500 and (answer.status_code < 300 or 400 <= answer.status_code < 500), answer.text
    assert answer.status_code < 300 or set(answer.json()) == {"error", "detail", "body", "errors"}


def test_an_interrupted_batch_with_a_random_seed_returns_each_partial_image_with_its_seed(live) -> None:
    api, slow = live
    slow.slow = True
    outcome = {}
    worker = threading.Thread(target=lambda: outcome.setdefault("result", api.txt2img(
        prompt="y", steps=20, seed=-1, width=64, height=64, batch_size=2)))
    worker.start()
    try:
        for _ in range(200):
            if api.get_progress()["progress"] > 0:
                break
            time.sleep(0.05)
        api.interrupt()
        worker.join(30)
    finally:
        slow.slow = False
    result = outcome["result"]
    seeds = result.info["all_seeds"]
    assert len(result.images) == 2 and len(seeds) == 2 and seeds[1] == seeds[0] + 1 and seeds[0] >= 0
    for image, seed, infotext in zip(result.images, seeds, result.info["infotexts"]):
        assert f"Seed: {seed}," in infotext and image.size == (64, 64)
    assert not np.array_equal(np.asarray(result.images[0]), np.asarray(result.images[1]))
    assert api.get_progress()["state"]["job_count"] == 0  # the interrupted job is over


def test_a_checkpoint_file_is_titled_by_its_file_name_and_found_by_title_file_name_or_name(tmp_path) -> None:
    """A1111 titles checkpoints "v1-5.safetensors [shorthash]"; Dapple names them without the extension."""
    import hashlib

    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from dapple.interfaces.a1111 import create_router

    checkpoint = tmp_path / "v1-5.safetensors"
    checkpoint.write_bytes(b"not really weights")
    digest = hashlib.sha256(checkpoint.read_bytes()).hexdigest()

    class Models:
        default_name = "base"

        def names(self):
            return ["base", "v1-5"]

        def path(self, name):
            return None if name == "base" else checkpoint

        def loaded(self):
            return ["base"]

    class Service:
        models = Models()

    app = FastAPI()
    app.include_router(create_router(Service(), "base", None))
    with TestClient(app) as client:
        titles = [entry["title"] for entry in client.get("/sdapi/v1/sd-models").json()]
        assert titles[1] == f"v1-5.safetensors [{digest[:10]}]" and titles[0].startswith("base [")
        for value in (titles[1], "v1-5.safetensors", "v1-5"):
            assert client.post("/sdapi/v1/options", json={"sd_model_checkpoint": titles[0]}).status_code == 200
            assert client.post("/sdapi/v1/options", json={"sd_model_checkpoint": value}).status_code == 200
            options = client.get("/sdapi/v1/options").json()
            assert options["sd_model_checkpoint"] == titles[1] and options["sd_checkpoint_hash"] == digest
        missing = client.post("/sdapi/v1/options", json={"sd_model_checkpoint": "v1-6.safetensors"})
        assert missing.status_code == 404 and titles[1] in missing.json()["detail"]


@pytest.mark.parametrize("literal", [b"NaN", b"Infinity", b"-Infinity"])
def test_non_finite_numbers_are_refused_so_no_response_or_later_get_breaks(live, literal) -> None:
    """Python's JSON reader takes NaN and Infinity; an echoed or stored one would make the response unencodable."""
    import requests

    base = live[0].baseurl
    before = requests.get(f"{base}/options", timeout=10).json()
    for route, data in (("txt2img", b'{"steps": 2, "width": 64, "height": 64, "s_churn": %s}' % literal),
                        ("txt2img", b'{"steps": 2, "width": 64, "height": 64, "my_extra": [%s]}' % literal),
                        ("options", b'{"eta_ddim": %s}' % literal), ("options", b'{"my_option": {"a": %s}}' % literal)):
        answer = requests.post(f"{base}/{route}", data=data, headers={"content-type": "application/json"}, timeout=60)
        assert answer.status_code == 422 and "allowed: finite numbers" in answer.json()["detail"], answer.text
    assert requests.get(f"{base}/options", timeout=10).json() == before


def test_a_job_that_fails_on_what_it_asked_is_a_422_not_a_500(live) -> None:
    """Caught at run time, not at validation: a LoRA the server does not have. The job fails with kind "request"."""
    import requests

    api = live[0]
    answer = requests.post(f"{api.baseurl}/txt2img", json={"prompt": "a cat <lora:not-here:1>", "steps": 2,
                                                           "width": 64, "height": 64})
    assert answer.status_code == 422, answer.text
    assert "not-here" in answer.json()["detail"]
