"""sd-webui-controlnet's API on a live server, as clients send it: units in alwayson_scripts.controlnet.args
(webuiapi's ControlNetUnit.to_dict and raw JSON), the /controlnet routes, and bad units refused with a 4xx that
names the unit and its field while the server keeps serving.

Oracles: a unit sent over HTTP must draw exactly the image the Python API draws for the ControlUnit the
extension's semantics describe (the engine itself is checked against diffusers in test_control_peer.py), and
/controlnet/detect's canny map must be OpenCV's cv2.Canny of the image."""

from __future__ import annotations

import base64
import io
import json
import socket
import threading
import time

import cv2
import numpy as np
import pytest
import requests
import uvicorn
import webuiapi
from control_fixtures import perturbed_controlnet, save
from PIL import Image, ImageDraw

import dapple
from dapple.interfaces.a1111_controlnet import controlnet_units
from dapple.interfaces.server import create_app
from dapple.request import ControlUnit, make_request
from dapple.service.jobs import JobService

SIZE = {"width": 64, "height": 64}
FAST = {"steps": 3, "seed": 11, "cfg_scale": 5, "sampler_name": "Euler", **SIZE}


def shapes(seed: int = 0) -> Image.Image:
    """A scene with a few filled shapes: canny finds their outlines."""
    rng = np.random.default_rng(seed)
    picture = Image.new("RGB", (64, 64), tuple(int(v) for v in rng.integers(0, 80, 3)))
    draw = ImageDraw.Draw(picture)
    for _ in range(3):
        x, y = (int(v) for v in rng.integers(4, 40, 2))
        draw.ellipse((x, y, x + 20, y + 20), fill=tuple(int(v) for v in rng.integers(120, 255, 3)))
    return picture


def b64(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def decode(text: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(text))).convert("RGB")


@pytest.fixture(scope="module")
def control_dir(tmp_path_factory, reference_pipe):
    folder = tmp_path_factory.mktemp("ControlNet")
    save(perturbed_controlnet(reference_pipe.unet, seed=1), folder / "tiny-cn")
    save(perturbed_controlnet(reference_pipe.unet, seed=2), folder / "tiny-cn-2")
    return folder


@pytest.fixture(scope="module")
def control_pipe(tiny_model_dir, control_dir):
    return dapple.load(tiny_model_dir, device="cpu", control_dirs=[control_dir])


@pytest.fixture(scope="module")
def live(tmp_path_factory, control_pipe, tiny_model_dir):
    service = JobService(tmp_path_factory.mktemp("data"), lambda: control_pipe)
    service.start()
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    app = create_app(service, model_name="tiny", model_path=tiny_model_dir)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    yield webuiapi.WebUIApi(host="127.0.0.1", port=port), service
    server.should_exit = True
    thread.join(10)
    service.stop()


def titles(api) -> dict[str, str]:
    return {title.split(" [")[0]: title for title in api.controlnet_model_list()}


def python_api(pipe, *controls: ControlUnit, **fields) -> Image.Image:
    """The same generation through the Python API: the oracle for what the HTTP layer sends the engine."""
    request = make_request(prompt=fields.pop("prompt", ""), steps=3, seed=11, guidance_scale=5.0, sampler="Euler",
                           width=64, height=64, controls=list(controls), **fields)
    return pipe.run(request).images[0].convert("RGB")


def post(api, route: str, body: dict) -> requests.Response:
    return requests.post(f"{api.baseurl}/{route}", json=body, timeout=120)


def detect(api, body: dict) -> requests.Response:
    return requests.post(api.get_endpoint("controlnet/detect", False), json=body, timeout=120)


def same(a: Image.Image, b: Image.Image) -> bool:
    return np.array_equal(np.asarray(a.convert("RGB")), np.asarray(b.convert("RGB")))


# -- the routes --------------------------------------------------------------------------------------------------
def test_the_controlnet_routes_answer_as_the_extension_does(live, control_pipe) -> None:
    api, _ = live
    assert api.controlnet_version() == 3
    listed = api.controlnet_model_list()
    expected = [f"{entry.name} [{entry.short_hash}]" for entry in control_pipe.control_models()]
    assert listed == expected and {"tiny-cn", "tiny-cn-2"} <= set(titles(api))
    assert all(len(title.split(" [")[1]) == 9 for title in listed)  # 8 hex digits and "]", the extension's hash
    assert requests.get(api.get_endpoint("controlnet/model_list?update=true", False)).json()["model_list"] == listed
    answer = api.custom_get("controlnet/module_list")
    assert "canny" in answer["module_list"] and "none" in answer["module_list"]
    assert set(answer["module_detail"]) == set(answer["module_list"])
    sliders = {slider["name"]: slider for slider in answer["module_detail"]["canny"]["sliders"]}
    assert sliders["Canny Low Threshold"]["value"] == 100 and sliders["Canny High Threshold"]["value"] == 200
    assert api.custom_get("controlnet/settings")["control_net_unit_count"] == 8
    assert "controlnet" in api.get_scripts()["txt2img"]  # webuiapi's has_controlnet-style probes see it


def test_detect_canny_is_opencvs_canny(live) -> None:
    api, _ = live
    picture = shapes(1)
    answer = api.controlnet_detect([picture], module="canny", processor_res=64, threshold_a=50, threshold_b=150)
    edges = cv2.Canny(np.asarray(picture), 50, 150)
    assert answer.info == "Success" and len(answer.images) == 1
    assert np.array_equal(np.asarray(answer.images[0].convert("RGB")), np.stack([edges] * 3, axis=-1))
    # The extension's own field name, raw base64 and its -1 defaults: canny 100/200 at 512 on the short side.
    raw = detect(api, {"controlnet_module": "canny", "controlnet_input_images": [b64(picture)],
                                                "controlnet_processor_res": -1, "controlnet_threshold_a": -1,
                                                "controlnet_threshold_b": -1})
    assert raw.status_code == 200, raw.text
    image = decode(raw.json()["images"][0])
    upscaled = np.asarray(picture.resize((512, 512), Image.LANCZOS))
    assert image.size == (512, 512) and np.array_equal(np.asarray(image)[..., 0], cv2.Canny(upscaled, 100, 200))


@pytest.mark.parametrize("body, status, words", [
    ({"controlnet_module": "cany", "controlnet_input_images": ["x"]}, 422, ["'cany'", "did you mean 'canny'"]),
    ({"controlnet_module": "canny", "controlnet_input_images": []}, 422, ["no image selected"]),
    ({"controlnet_module": "canny", "controlnet_input_images": ["not base64!"]}, 422,
     ["controlnet_input_images[0]", "base64"]),
    ({"controlnet_module": "canny", "controlnet_input_images": ["a"], "controlnet_processor_res": 9000}, 422,
     ["controlnet_processor_res=9000", "64..2048"]),
    ({"controlnet_module": "canny", "controlnet_input_images": "abc"}, 422, ["controlnet_input_images"]),
])
def test_detect_refuses_what_it_cannot_do_in_a1111s_error_shape(live, body, status, words) -> None:
    api, _ = live
    answer = detect(api, body)
    assert answer.status_code == status, answer.text
    assert set(answer.json()) == {"error", "detail", "body", "errors"}
    assert all(word in answer.json()["detail"] for word in words), answer.json()["detail"]


# -- units as clients send them ------------------------------------------------------------------------------------
def test_webuiapi_unit_with_a_base64_image_and_canny_draws_what_the_python_api_draws(live, control_pipe) -> None:
    api, _ = live
    picture = shapes(2)
    unit = webuiapi.ControlNetUnit(image=picture, module="canny", model=titles(api)["tiny-cn"], weight=0.9)
    result = api.txt2img(prompt="a red circle", controlnet_units=[unit], **FAST)
    # webuiapi's defaults are sent: Resize and Fill, processor_res 512, thresholds 64 and 64.
    expected = python_api(control_pipe, ControlUnit(model="tiny-cn", image=picture, module="canny", weight=0.9,
                                                    resize_mode="Resize and Fill", processor_res=512,
                                                    threshold_a=64, threshold_b=64), prompt="a red circle")
    assert same(result.images[0], expected)
    assert not same(expected, python_api(control_pipe, prompt="a red circle"))  # the unit does steer
    # The extension appends the unit's detected map after the images: canny at the processor resolution (512 on
    # the short side), then fitted to the output.
    edges = cv2.Canny(np.asarray(picture.resize((512, 512), Image.LANCZOS)), 64, 64)
    fitted = Image.fromarray(np.stack([edges] * 3, axis=-1)).resize((64, 64), Image.LANCZOS)
    assert len(result.images) == 2 and same(result.images[1], fitted)
    infotext = result.info["infotexts"][0]
    assert 'ControlNet 0: "Module: canny, Model: ' + titles(api)["tiny-cn"] + ", Weight: 0.9" in infotext
    assert result.info["extra_generation_params"]["ControlNet 0"].startswith("Module: canny")
    assert api.png_info(result.images[0]).json["parameters"]["ControlNet 0"].startswith("Module: canny")


def test_two_units_named_with_and_without_hash_and_a_disabled_one(live, control_pipe) -> None:
    api, _ = live
    first, second = shapes(3), shapes(4)
    args = [
        {"enabled": False, "model": "no-such-model", "image": "junk"},  # skipped, not checked
        {"image": b64(first), "module": "canny", "model": titles(api)["tiny-cn"], "weight": 0.8,
         "processor_res": -1, "threshold_a": -1, "threshold_b": -1, "low_vram": True, "enabled": True},
        {"input_image": "data:image/png;base64," + b64(second), "module": "none", "model": "tiny-cn-2",
         "guidance_start": 0.2, "guidance_end": 0.8, "control_mode": 2, "resize_mode": 0, "pixel_perfect": True},
        {"model": "None", "image": ""},  # a placeholder, as clients pad the unit count
    ]
    answer = post(api, "txt2img", {"prompt": "two units", **FAST, "alwayson_scripts": {"controlnet": {"args": args}}})
    assert answer.status_code == 200, answer.text
    body = answer.json()
    expected = python_api(
        control_pipe,
        ControlUnit(model="tiny-cn", image=first, module="canny", weight=0.8, processor_res=512),
        ControlUnit(model="tiny-cn-2", image=second, module="none", guidance_start=0.2, guidance_end=0.8,
                    control_mode="ControlNet is more important", resize_mode="Just Resize", pixel_perfect=True),
        prompt="two units")
    assert same(decode(body["images"][0]), expected)
    assert len(body["images"]) == 3  # the image and the two units' maps
    assert same(decode(body["images"][2]), second)  # module none: the map is the image
    info = json.loads(body["info"])
    assert set(info["extra_generation_params"]) == {"ControlNet 0", "ControlNet 1"}
    assert "Control Mode: ControlNet is more important" in info["extra_generation_params"]["ControlNet 1"]
    assert not any("args" in entry for entry in info["ignored"])  # every field sent was acted on


def test_img2img_unit_without_an_image_uses_the_init_image(live, control_pipe) -> None:
    api, _ = live
    picture = shapes(5)
    unit = webuiapi.ControlNetUnit(module="canny", model="tiny-cn", resize_mode="Crop and Resize", threshold_a=100,
                                   threshold_b=200, processor_res=64)
    result = api.img2img(images=[picture], prompt="keep the shapes", denoising_strength=0.6, controlnet_units=[unit],
                         **FAST)
    expected = python_api(control_pipe, ControlUnit(model="tiny-cn", module="canny", processor_res=64,
                                                    threshold_a=100, threshold_b=200),
                          prompt="keep the shapes", init_image=picture, strength=0.6)
    assert same(result.images[0], expected)
    edges = cv2.Canny(np.asarray(picture), 100, 200)
    assert np.array_equal(np.asarray(result.images[1])[..., 0], edges)  # the map of the init image


def test_detected_maps_are_left_out_when_the_unit_or_the_option_says_so(live) -> None:
    api, _ = live
    unit = {"image": b64(shapes(6)), "module": "canny", "model": "tiny-cn", "save_detected_map": False}
    body = {"prompt": "x", **FAST, "alwayson_scripts": {"ControlNet": {"args": [unit]}}}
    assert len(post(api, "txt2img", body).json()["images"]) == 1
    unit["save_detected_map"] = True
    assert api.set_options({"control_net_no_detectmap": True}) == {}
    try:
        assert len(post(api, "txt2img", body).json()["images"]) == 1
    finally:
        api.set_options({"control_net_no_detectmap": False})
    assert len(post(api, "txt2img", body).json()["images"]) == 2


def test_fields_the_extension_has_and_dapple_does_not_act_on_are_named_as_ignored(live) -> None:
    api, _ = live
    unit = {"image": {"image": b64(shapes(7)), "mask": b64(shapes(8))}, "module": "canny", "model": "tiny-cn",
            "hr_option": "Low res only", "advanced_weighting": [0.5] * 13, "colour": "red"}
    body = {"prompt": "x", **FAST, "alwayson_scripts": {"ControlNet": {"args": [unit]}, "ADetailer": {"args": []}}}
    answer = post(api, "txt2img", body)
    assert answer.status_code == 200, answer.text
    ignored = json.loads(answer.json()["info"])["ignored"]
    label = "alwayson_scripts.ControlNet.args[0]"
    assert {f"{label}.hr_option", f"{label}.advanced_weighting", f"{label}.colour",
            "alwayson_scripts.ADetailer"} <= set(ignored)
    assert any(entry.startswith(f"{label}.mask") for entry in ignored)


# -- bad units -----------------------------------------------------------------------------------------------------
GOOD = {"module": "canny", "model": "tiny-cn"}


def bad_cases() -> list:
    huge = Image.new("L", (5000, 4000))  # 20 M pixels, a few kB as PNG: over the 16.7 M pixel limit
    return [
        ([{**GOOD, "model": "nope"}], 404, ["args[0].model", "'nope'", "available: ", "tiny-cn, tiny-cn-2"]),
        ([{**GOOD, "module": "cany"}], 422, ["args[0].module", "did you mean 'canny'", "allowed: none, canny"]),
        ([{**GOOD, "image": ""}], 422, ["args[0].image is missing"]),
        ([{**GOOD}, {**GOOD, "weight": 3}], 422, ["args[1].weight=3", "allowed: in 0.0..2.0"]),
        ([{**GOOD, "guidance_start": 0.8, "guidance_end": 0.2}], 422, ["args[0]", "guidance_start (0.8) is after "
                                                                      "guidance_end (0.2)"]),
        ([{**GOOD, "image": b64(huge)}], 400, ["args[0].image", "20000000 pixels", "at most 16777216"]),
        ([{**GOOD, "image": "not base64!"}], 400, ["args[0].image", "base64"]),
        ([{**GOOD, "model": "None", "enabled": True}], 404, ["args[0].model", "'None'"]),
        ([{**GOOD, "control_mode": 7}], 422, ["args[0].control_mode", "'Balanced'"]),
        ([{**GOOD, "resize_mode": "Stretch"}], 422, ["args[0].resize_mode", "'Just Resize'"]),
        ([{**GOOD, "image": [{"image": "a"}, {"image": "b"}]}], 422, ["args[0].image holds 2 images"]),
        (["a unit"], 422, ["args[0] must be an object"]),
        ({"not": "a list"}, 422, ["args must be a list"]),
        ([GOOD] * 9, 422, ["9 enabled ControlNet units", "at most 8"]),
    ]


@pytest.mark.parametrize("args, status, words", bad_cases())
def test_bad_units_are_a_clear_4xx_and_nothing_is_queued(live, args, status, words) -> None:
    api, service = live
    units = [{"image": b64(shapes(9)), **unit} if isinstance(unit, dict) and "image" not in unit else unit
             for unit in args] if isinstance(args, list) else args
    jobs = len(service.list(limit=10_000))
    answer = post(api, "txt2img", {"prompt": "x", **FAST, "alwayson_scripts": {"controlnet": {"args": units}}})
    assert answer.status_code == status, answer.text
    assert set(answer.json()) == {"error", "detail", "body", "errors"}
    detail = answer.json()["detail"]
    assert all(word in detail for word in words), detail
    assert len(service.list(limit=10_000)) == jobs  # refused before a job was queued


def test_a_unit_that_fails_while_running_is_a_422_and_the_server_keeps_serving(live) -> None:
    """inpaint_only needs the inpainting mask: a txt2img job with it fails in the engine, on what it asked."""
    api, service = live
    gallery = len(service.images(0, 10_000))
    unit = {"image": b64(shapes(10)), "module": "inpaint_only", "model": "tiny-cn"}
    answer = post(api, "txt2img", {"prompt": "x", **FAST, "alwayson_scripts": {"controlnet": {"args": [unit]}}})
    assert answer.status_code == 422 and "mask" in answer.json()["detail"], answer.text
    assert len(service.images(0, 10_000)) == gallery
    result = api.txt2img(prompt="still serving", controlnet_units=[webuiapi.ControlNetUnit(
        image=shapes(10), module="canny", model="tiny-cn")], **FAST)
    assert len(result.images) == 2 and service.health()["ok"]
    assert len(service.images(0, 10_000)) == gallery + 1


# -- the translation alone -------------------------------------------------------------------------------------------
def test_webuiapi_units_translate_to_control_unit_fields() -> None:
    unit = webuiapi.ControlNetUnit(image=shapes(0), module="canny", model="tiny-cn [0123abcd]", weight=1.5,
                                   resize_mode="Inner Fit (Scale to Fit)", guidance_start=0.1, guidance_end=0.9,
                                   control_mode=1, pixel_perfect=False, processor_res=256, threshold_a=30,
                                   threshold_b=90).to_dict()
    ignored: list[str] = []
    (found,) = controlnet_units({"alwayson_scripts": {"ControlNet": {"args": [unit]}}}, "txt2img", ignored)
    assert found.label == "alwayson_scripts.ControlNet.args[0]" and found.save_detected_map and ignored == []
    fields = {key: value for key, value in found.fields.items() if key != "image"}
    assert fields == {"model": "tiny-cn [0123abcd]", "module": "canny", "weight": 1.5, "guidance_start": 0.1,
                      "guidance_end": 0.9, "control_mode": "My prompt is more important",
                      "resize_mode": "Crop and Resize", "processor_res": 256, "pixel_perfect": False,
                      "threshold_a": 30.0, "threshold_b": 90.0}
    assert found.fields["image"] == unit["image"]
    legacy = {"input_image": unit["image"], "module": "canny", "model": "tiny-cn", "guidance": 0.5,
              "resize_mode": 3, "lowvram": True}
    (old,) = controlnet_units({"alwayson_scripts": {"controlnet": {"args": [legacy]}}}, "txt2img", [])
    assert (old.fields["guidance_end"], old.fields["resize_mode"]) == (0.5, "Just Resize")
    assert controlnet_units({"alwayson_scripts": {"controlnet": {"args": []}}}, "txt2img", []) == []
    assert controlnet_units({}, "txt2img", []) == []


# -- the built-in ControlNet ------------------------------------------------------------------------------------------
def test_the_builtin_canny_controlnet_over_the_a1111_api(tmp_path) -> None:
    """The built-in model with the built-in ControlNet, as a fresh install serves them: listed first, and a canny
    unit sent by webuiapi draws the Python API's image (and not the uncontrolled one)."""
    from dapple.models.control_models import BUILTIN_CONTROLNET_DIR

    if not (BUILTIN_CONTROLNET_DIR / "config.json").is_file():
        pytest.skip("the built-in ControlNet is not shipped in this checkout")
    builtin = dapple.load(device="cpu")
    service = JobService(tmp_path / "data", lambda: builtin)
    service.start()
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(create_app(service, model_name=builtin.components.name), host="127.0.0.1",
                                           port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    try:
        api = webuiapi.WebUIApi(host="127.0.0.1", port=port)
        (title,) = [name for name in api.controlnet_model_list() if name.startswith("builtin-canny [")]
        assert api.controlnet_model_list()[0] == title
        scene = Image.new("RGB", (64, 64), (40, 60, 200))
        ImageDraw.Draw(scene).rectangle((8, 30, 30, 54), fill=(220, 30, 30))
        unit = webuiapi.ControlNetUnit(image=scene, module="canny", model=title, resize_mode="Just Resize",
                                       processor_res=64, threshold_a=100, threshold_b=200)
        prompt = "a red square on a blue background"
        result = api.txt2img(prompt=prompt, controlnet_units=[unit], steps=10, seed=3, sampler_name="Euler",
                             cfg_scale=5, width=64, height=64)
        request = dict(prompt=prompt, steps=10, seed=3, sampler="Euler", guidance_scale=5.0, width=64, height=64,
                       guidance_min_timestep=0)  # A1111 guides every step, whatever the model recommends
        oracle = builtin.run(make_request(**request, controls=[ControlUnit(
            model="builtin-canny", image=scene, module="canny", resize_mode="Just Resize", processor_res=64,
            threshold_a=100, threshold_b=200)])).images[0]
        assert same(result.images[0], oracle)
        assert not same(oracle, builtin.run(make_request(**request)).images[0])
        assert np.array_equal(np.asarray(result.images[1])[..., 0], cv2.Canny(np.asarray(scene), 100, 200))
    finally:
        server.should_exit = True
        thread.join(10)
        service.stop()
