"""The studio in headless Chromium (Debian's package, driven by Playwright), on a live server with two tiny models
that recommend different settings: the recommendation pre-filled and followed across model switches, txt2img with
hires fix, img2img from a dropped image, inpaint with a painted mask, outpaint's sides, ControlNet units with their
detected maps, the final image replacing the live preview, Escape cancelling, gallery search, reuse and delete, the
favicon, and the layout on a phone.

Screenshots land in test-artifacts/studio/ (kept after the run, ignored by git) for a person to look at."""

from __future__ import annotations

import base64
import io
import shutil
import socket
import threading
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
import uvicorn
from control_fixtures import perturbed_controlnet, save
from diffusers import UNet2DConditionModel
from PIL import Image, ImageDraw

import dapple
from dapple.interfaces.server import create_app
from dapple.models.generation_defaults import write_generation_defaults
from dapple.models.library import ModelFolders
from dapple.models.tiny import save_tiny_model
from dapple.service.jobs import JobService
from dapple.service.models import ModelPool

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts" / "studio"
# Flags for a machine without network: no background connections, no sandbox as root, a fresh profile.
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]
# What the two models' folders recommend (generation_defaults.json); neither is GenerationRequest's default.
TINY_RECOMMENDS = {"sampler": "DPM++ 2M", "steps": 7, "guidance_scale": 5.0, "guidance_min_timestep": 600}
OTHER_RECOMMENDS = {"sampler": "Euler a", "steps": 5, "guidance_scale": 3.0}


class SlowWhenAsked:
    """A pipeline that sleeps 0.2 s after each step of a prompt starting with "slow": time to watch the live
    preview and press Escape. Everything else is the tiny pipeline's own."""

    def __init__(self, pipe: dapple.Pipeline) -> None:
        self._pipe = pipe

    def __getattr__(self, name: str):
        return getattr(self._pipe, name)

    def run(self, request, *, callback=None, cancel=None, **kwargs):
        if request.prompt.startswith("slow") and callback is not None:
            inner = callback

            def callback(context):
                inner(context)
                time.sleep(0.2)

        return self._pipe.run(request, callback=callback, cancel=cancel, **kwargs)


@pytest.fixture(scope="module")
def studio_url(tmp_path_factory):
    root = tmp_path_factory.mktemp("studio")
    write_generation_defaults(save_tiny_model(root / "tiny", seed=0), TINY_RECOMMENDS)
    write_generation_defaults(save_tiny_model(root / "webui" / "models" / "Stable-diffusion" / "other", seed=5),
                              OTHER_RECOMMENDS)
    controlnets = root / "ControlNet"  # one tiny ControlNet made from the tiny model's UNet
    save(perturbed_controlnet(UNet2DConditionModel.from_pretrained(root / "tiny" / "unet"), seed=1),
         controlnets / "tiny-cn")
    pipe = SlowWhenAsked(dapple.load(root / "tiny", device="cpu", control_dirs=[controlnets]))
    pool = ModelPool(lambda: pipe, "tiny", ModelFolders.from_root(root / "webui"),
                     lambda path: dapple.load(path, device="cpu"))
    service = JobService(root / "data", lambda: pipe, models=pool)
    service.start()
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(create_app(service, model_name="tiny"), host="127.0.0.1", port=port,
                                           log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}/"
    server.should_exit = True
    thread.join(10)
    service.stop()


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    assert Path(CHROMIUM).is_file(), "needs Debian's chromium: run scripts/ensure_chromium.sh (CI does)"
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


class Studio:
    """One page of the studio, with the page errors and failed responses it met."""

    def __init__(self, browser, url: str, viewport: dict | None = None, **options) -> None:
        self.url = url
        self.page = browser.new_page(viewport=viewport or {"width": 1280, "height": 900}, **options)
        self.errors: list[str] = []
        self.failed: list[str] = []
        self.page.on("pageerror", lambda error: self.errors.append(str(error)))
        self.page.on("response", lambda r: self.failed.append(f"{r.status} {r.url}") if r.status >= 400 else None)
        self.page.goto(url)
        self.page.wait_for_function("document.getElementById('sampler').options.length > 5 "
                                    "&& document.getElementById('model').options.length == 2")
        self.page.wait_for_function("document.getElementById('steps').value == '7'")  # the recommendation is in

    def field(self, label: str):
        return self.page.get_by_label(label, exact=True)

    def submit(self, key: str | None = "Control+Enter") -> dict:
        """Generate (by the shortcut, or a click on Generate) and return the job request the page sent."""
        with self.page.expect_request(lambda r: r.url.endswith("/api/v1/jobs") and r.method == "POST") as sent:
            if key:
                self.page.keyboard.press(key)
            else:
                self.page.get_by_role("button", name="Generate").click()
        return sent.value.post_data_json

    def wait_for_result(self, count_before: int) -> None:
        self.page.wait_for_function(f"document.querySelectorAll('.card').length > {count_before} && "
                                    "document.getElementById('stage').dataset.state == 'final'", timeout=60_000)
        self.page.wait_for_function("document.getElementById('result').complete")

    def cards(self) -> int:
        return self.page.locator(".card").count()

    def result_size(self) -> tuple[int, int]:
        return tuple(self.page.evaluate("[document.getElementById('result').naturalWidth, "
                                        "document.getElementById('result').naturalHeight]"))

    def screenshot(self, name: str) -> None:
        self.page.screenshot(path=str(ARTIFACTS / name), full_page=True)

    def check_clean(self) -> None:
        assert not self.errors and not self.failed, (self.errors, self.failed)
        assert self.page.inner_text("#error") == ""
        self.page.close()


def png(path: Path, colour: tuple[int, int, int] = (220, 40, 40)) -> Path:
    """A 64 x 64 source image a person can recognise in the screenshots: a disc on a blue background."""
    image = Image.new("RGB", (64, 64), (40, 70, 200))
    ImageDraw.Draw(image).ellipse((16, 16, 48, 48), fill=colour)
    image.save(path)
    return path


def test_the_model_recommendation_is_prefilled_and_followed_across_model_switches(browser, studio_url) -> None:
    studio = Studio(browser, studio_url)
    page = studio.page
    assert studio.field("Model").input_value() == "tiny"
    values = {label: studio.field(label).input_value()
              for label in ("Sampling method", "Sampling steps", "CFG Scale", "Guidance from timestep")}
    assert values == {"Sampling method": "DPM++ 2M", "Sampling steps": "7", "CFG Scale": "5",
                      "Guidance from timestep": "600"}
    assert "tiny recommends: DPM++ 2M, 7 steps, CFG 5, guidance at t ≥ 600" in page.inner_text("#model-note")
    studio.screenshot("1-recommended-defaults.png")

    studio.field("Sampling steps").fill("9")  # the user's own choice survives a model switch
    studio.field("Model").select_option("other")
    assert studio.field("Sampling method").input_value() == "Euler a"
    assert studio.field("CFG Scale").input_value() == "3"
    assert studio.field("Guidance from timestep").input_value() == "0"  # other recommends no interval
    assert studio.field("Sampling steps").input_value() == "9"
    studio.field("Model").select_option("tiny")
    assert studio.field("Sampling method").input_value() == "DPM++ 2M"
    assert studio.field("Guidance from timestep").input_value() == "600"
    assert studio.field("Sampling steps").input_value() == "9"
    page.get_by_role("button", name="Use recommended").click()
    assert studio.field("Sampling steps").input_value() == "7"

    # Every visible control has a label (or an aria-label) that names it.
    unlabelled = page.evaluate("""[...document.querySelectorAll('input, select, textarea')]
        .filter((el) => el.type !== 'range' && !el.labels.length && !el.getAttribute('aria-label')).map((el) => el.id)""")
    assert unlabelled == []
    # Tabs for every mode, and room for what is coming, marked as such.
    assert [tab.inner_text() for tab in page.get_by_role("tab").all()] == ["txt2img", "img2img", "Inpaint", "Outpaint"]
    assert "coming" in page.locator("summary", has_text="Image prompts").inner_text()
    assert "coming" not in page.locator("summary", has_text="ControlNet").inner_text()  # built
    assert page.locator("footer.shortcuts").inner_text().count("Esc") == 1
    favicon = page.request.get(studio_url + "favicon.ico")
    assert favicon.status == 200 and favicon.headers["content-type"] == "image/x-icon"
    assert Image.open(io.BytesIO(favicon.body())).size[0] >= 16
    studio.check_clean()


def test_txt2img_sends_hires_fields_and_the_final_image_replaces_the_preview(browser, studio_url) -> None:
    studio = Studio(browser, studio_url)
    page = studio.page
    before = studio.cards()
    studio.field("Prompt").fill("a red circle on a blue background")
    studio.field("Sampling steps").fill("4")
    studio.field("Seed").fill("4")
    studio.field("Width").fill("64")
    studio.field("Height").fill("64")
    page.locator("summary", has_text="Hires. fix").click()
    studio.field("Upscale by").fill("2")  # editing a hires field turns hires fix on
    assert studio.field("Enable hires fix (draw at the base size, upscale, refine)").is_checked()
    studio.field("Upscaler").select_option("Latent (bicubic)")
    studio.field("Hires steps").fill("3")
    studio.field("Hires denoising strength").fill("0.5")
    assert page.inner_text("#hires-note") == "Upscale from 64×64 to 128×128"
    # Record every state of the stage, to see the preview come and go.
    page.evaluate("""window.stages = []; new MutationObserver(() => window.stages.push(
        document.getElementById('stage').dataset.state)).observe(document.getElementById('stage'), {attributes: true})""")
    sent = studio.submit()
    assert {key: sent[key] for key in ("hires_scale", "hires_upscaler", "hires_steps", "hires_strength")} == {
        "hires_scale": 2, "hires_upscaler": "Latent (bicubic)", "hires_steps": 3, "hires_strength": 0.5}
    assert (sent["sampler"], sent["steps"], sent["guidance_scale"], sent["guidance_min_timestep"]) == (
        "DPM++ 2M", 4, 5, 600)
    assert "init_image" not in sent and sent["width"] == sent["height"] == 64
    studio.wait_for_result(before)
    stages = page.evaluate("window.stages")
    assert "preview" in stages and stages[-1] == "final", stages
    newest = page.locator(".card").first.get_attribute("data-id")
    assert page.get_attribute("#result", "src") == f"/api/v1/images/{newest}"  # not the latent preview
    assert studio.result_size() == (128, 128)
    info = page.inner_text("#result-info")
    assert "Hires upscale: 2" in info and "Hires upscaler: Latent (bicubic)" in info and "CFG min timestep: 600" in info
    assert page.inner_text("#status").startswith("Done in")
    studio.screenshot("2-hires-result.png")

    studio.field("Enable hires fix (draw at the base size, upscale, refine)").uncheck()
    studio.field("Upscale by").fill("3")
    studio.field("Width").fill("")
    page.click("#result-reuse")  # the shown image's settings come back
    assert studio.field("Enable hires fix (draw at the base size, upscale, refine)").is_checked()
    assert studio.field("Upscale by").input_value() == "2" and studio.field("Width").input_value() == "64"
    assert studio.field("Hires steps").input_value() == "3" and studio.field("Upscaler").input_value() == "Latent (bicubic)"
    studio.check_clean()


def test_img2img_from_an_image_dropped_on_the_page(browser, studio_url, tmp_path) -> None:
    studio = Studio(browser, studio_url)
    page = studio.page
    before = studio.cards()
    data = base64.b64encode(png(tmp_path / "init.png").read_bytes()).decode()
    transfer = page.evaluate_handle("""(data) => {
        const bytes = Uint8Array.from(atob(data), (c) => c.charCodeAt(0));
        const transfer = new DataTransfer();
        transfer.items.add(new File([bytes], 'init.png', {type: 'image/png'}));
        return transfer;
    }""", data)
    page.dispatch_event("main", "drop", {"dataTransfer": transfer})  # dropped on txt2img: starts img2img
    page.wait_for_selector("#canvas-wrap:not([hidden])")
    assert page.get_by_role("tab", name="img2img").get_attribute("aria-selected") == "true"
    assert page.inner_text("#source-size") == "64×64"
    studio.field("Denoising strength").fill("0.4")
    studio.field("Resize mode").select_option("crop and resize")
    studio.field("Sampling steps").fill("4")
    studio.screenshot("3-img2img-dropped.png")
    sent = studio.submit(key=None)
    assert sent["init_image"] == "data:image/png;base64," + data
    assert sent["strength"] == 0.4 and sent["resize_mode"] == "crop and resize"
    assert "mask" not in sent and "hires_scale" not in sent and "outpaint_left" not in sent
    studio.wait_for_result(before)
    assert "Denoising strength: 0.4" in page.inner_text("#result-info")
    studio.check_clean()


def test_inpaint_with_a_brush_painted_mask(browser, studio_url, tmp_path) -> None:
    studio = Studio(browser, studio_url)
    page = studio.page
    before = studio.cards()
    page.get_by_role("tab", name="Inpaint").click()
    studio.page.set_input_files("#init", str(png(tmp_path / "init.png")))  # the file picker
    page.wait_for_selector("#canvas-wrap:not([hidden])")
    studio.page.get_by_role("button", name="Generate").click()
    assert "inpaint needs a mask" in page.inner_text("#error")  # nothing painted yet: nothing is sent

    box = page.locator("#mask").bounding_box()
    page.mouse.move(box["x"] + box["width"] * 0.7, box["y"] + 5)
    page.mouse.down()
    page.mouse.move(box["x"] + box["width"] * 0.7, box["y"] + box["height"] - 5, steps=10)
    page.mouse.up()
    studio.field("Mask blur").fill("2")
    studio.field("Masked content").select_option("latent noise")
    studio.field("Sampling steps").fill("4")
    assert page.get_by_label("Mask prompt coming").is_disabled()  # room for it, not faked
    studio.screenshot("4-mask-painted.png")
    sent = studio.submit()
    assert page.inner_text("#error") == ""
    mask = np.asarray(Image.open(io.BytesIO(base64.b64decode(sent["mask"].split(",", 1)[1]))))
    alpha = mask[..., 3]
    assert mask.shape[:2] == (64, 64)
    assert alpha[8:56, 45].min() == 255  # the stroke down the column at 70% of the width
    assert alpha[:, :32].max() == 0  # the left half untouched
    assert (mask[alpha > 0][:, :3] == 255).all()  # sent white, whatever colour the strokes show in
    assert (sent["mask_blur"], sent["inpainting_fill"], sent["invert_mask"], sent["paste_back"]) == (
        2, "latent noise", False, True)
    studio.wait_for_result(before)
    info = page.inner_text("#result-info")
    assert "Mask blur: 2" in info and "Masked content: latent noise" in info
    studio.screenshot("5-inpainted.png")
    studio.check_clean()


def test_outpaint_sends_its_sides_and_extends_the_image(browser, studio_url, tmp_path) -> None:
    studio = Studio(browser, studio_url)
    page = studio.page
    before = studio.cards()
    page.keyboard.press("Alt+4")  # the tab shortcut
    assert page.get_by_role("tab", name="Outpaint").get_attribute("aria-selected") == "true"
    page.set_input_files("#init", str(png(tmp_path / "init.png", colour=(240, 200, 40))))
    page.wait_for_selector("#canvas-wrap:not([hidden])")
    for side, value in (("Left", "16"), ("Top", "8"), ("Bottom", "24")):
        studio.field(side).fill(value)
    studio.field("Sampling steps").fill("4")
    studio.screenshot("6-outpaint-sides.png")
    sent = studio.submit()
    assert [sent[f"outpaint_{side}"] for side in ("left", "right", "top", "bottom")] == [16, 0, 8, 24]
    assert "mask" not in sent and sent["mask_blur"] == 4 and sent["inpainting_fill"] == "original"
    studio.wait_for_result(before)
    assert studio.result_size() == (80, 96)
    assert "Outpaint: left=16 top=8 bottom=24" in page.inner_text("#result-info")
    studio.screenshot("7-outpainted.png")
    studio.check_clean()


def test_escape_cancels_and_the_preview_does_not_stay(browser, studio_url) -> None:
    studio = Studio(browser, studio_url)
    page = studio.page
    studio.field("Prompt").fill("slow: a green square")
    studio.field("Sampling steps").fill("40")
    studio.submit()
    page.wait_for_function("document.getElementById('stage').dataset.state == 'preview'", timeout=30_000)
    assert page.inner_text("#status").startswith("Step ")
    studio.screenshot("8-live-preview.png")
    page.keyboard.press("Escape")
    page.wait_for_function("document.getElementById('status').textContent == 'Cancelled'", timeout=10_000)
    assert page.get_attribute("#stage", "data-state") == "empty"  # no dark preview left behind
    assert page.get_by_role("button", name="Cancel", exact=True).is_disabled()
    studio.check_clean()


def test_gallery_search_reuse_and_delete(browser, studio_url) -> None:
    studio = Studio(browser, studio_url)
    page = studio.page
    for prompt, seed, batch in (("zebra stripes in a field", "11", "1"), ("a yellow square", "12", "2")):
        before = studio.cards()
        studio.field("Prompt").fill(prompt)
        studio.field("Sampling steps").fill("3")
        studio.field("Seed").fill(seed)
        studio.field("Batch size").fill(batch)
        studio.submit()
        studio.wait_for_result(before + int(batch) - 1)
    total = studio.cards()
    # A batch: both images in the strip, the first on the stage, the second a click away.
    strip = page.locator("#result-strip img")
    assert strip.count() == 2 and [strip.nth(i).get_attribute("alt") for i in (0, 1)] == ["seed 12", "seed 13"]
    strip.nth(1).click()
    assert "Seed: 13" in page.inner_text("#result-info")
    assert page.get_attribute("#result", "src") == f"/api/v1/images/{strip.nth(1).get_attribute('data-id')}"
    page.locator("h2", has_text="Gallery").click()  # out of the seed field: "/" there is a character
    page.keyboard.press("/")  # focuses the search
    page.keyboard.type("ZEBRA seed: 11")  # words in any case, anywhere in the infotext
    assert page.evaluate("document.activeElement.id") == "search"
    assert studio.cards() == 1 and "zebra stripes" in page.locator(".card").inner_text()
    assert page.inner_text("#gallery-count") == f"1 of {total}"
    studio.screenshot("9-gallery-search.png")

    studio.field("Prompt").fill("something else")
    studio.field("Seed").fill("-1")
    page.locator(".card").get_by_role("button", name="Reuse settings").click()
    assert studio.field("Prompt").input_value() == "zebra stripes in a field"
    assert studio.field("Seed").input_value() == "11" and studio.field("Sampling steps").input_value() == "3"

    page.locator(".card").get_by_role("button", name="To img2img").click()  # the image becomes the source
    page.wait_for_selector("#canvas-wrap:not([hidden])")
    assert page.get_by_role("tab", name="img2img").get_attribute("aria-selected") == "true"
    assert page.inner_text("#source-size") == "64×64"

    image_id = page.locator(".card").get_attribute("data-id")
    delete = page.locator(".card").get_by_role("button", name=f"Delete image {image_id}")
    delete.click()
    assert delete.inner_text() == "Delete?" and studio.cards() == 1  # the first click only asks
    delete.click()
    page.wait_for_function("document.querySelectorAll('.card').length == 0")
    assert page.request.get(studio_url + f"api/v1/images/{image_id}").status == 404
    page.fill("#search", "")
    page.wait_for_function(f"document.querySelectorAll('.card').length == {total - 1}")
    studio.failed.clear()  # the 404 above was asked for
    studio.check_clean()


def test_the_layout_on_a_phone_and_in_dark_mode(browser, studio_url) -> None:
    studio = Studio(browser, studio_url, viewport={"width": 390, "height": 844}, color_scheme="dark")
    page = studio.page
    assert page.evaluate("document.documentElement.scrollWidth") <= 390  # nothing wider than the phone
    settings = page.locator(".settings").bounding_box()
    output = page.locator(".output").bounding_box()
    assert output["y"] >= settings["y"] + settings["height"]  # one column: the output below the settings
    assert page.evaluate("getComputedStyle(document.body).backgroundColor") != "rgb(244, 243, 248)"  # dark, not light
    studio.screenshot("10-phone-dark.png")
    studio.check_clean()


def test_control_units_show_their_detected_maps_and_steer_the_job(browser, studio_url, tmp_path) -> None:
    studio = Studio(browser, studio_url)
    page = studio.page
    before = studio.cards()
    page.locator("summary", has_text="ControlNet").click()
    page.get_by_role("button", name="Add control unit").click()
    page.get_by_role("button", name="Add control unit").click()
    assert page.inner_text("#control-badge") == "2 units"
    page.wait_for_function("document.getElementById('control-1-model').options.length > 0")
    models = page.eval_on_selector("#control-1-model", "(s) => [...s.options].map((o) => o.value)")
    assert "tiny-cn" in models  # (and the built-in ControlNet, where it ships)
    studio.field("Unit 1: Control model").select_option("tiny-cn")
    assert studio.field("Unit 1: Preprocessor").input_value() == "canny"  # the default preprocessor
    modules = page.eval_on_selector("#control-1-module", "(s) => [...s.options].map((o) => o.value)")
    assert {"none", "canny", "scribble", "invert"} <= set(modules)
    studio.field("Width").fill("64")
    studio.field("Height").fill("64")

    # Unit 1: a picture, preprocessed by canny; the detected map appears beside it.
    studio.field("Unit 1: Threshold A").fill("50")
    studio.field("Unit 1: Threshold B").fill("150")
    picture = png(tmp_path / "scene.png", colour=(240, 200, 40))
    with page.expect_response(lambda r: r.url.endswith("/api/v1/control/detect")):
        page.set_input_files("#control-1-image", str(picture))
    page.wait_for_function("document.getElementById('control-units').querySelector('[data-part=map]').complete "
                           "&& document.getElementById('control-units').querySelector('[data-part=map]').naturalWidth")
    shown = page.eval_on_selector("#control-units fieldset:nth-child(1) [data-part=map]", "(img) => img.src")
    detected = np.asarray(Image.open(io.BytesIO(base64.b64decode(shown.split(",", 1)[1]))).convert("RGB"))
    edges = cv2.Canny(np.asarray(Image.open(picture).convert("RGB")), 50, 150)  # 64x64 at 64x64: pixel perfect
    assert np.array_equal(detected, np.stack([edges] * 3, axis=-1))
    assert "canny · 64×64" in page.inner_text("#control-units fieldset:nth-child(1)")

    # Unit 2 without an image cannot run in txt2img: the page says so and sends nothing.
    page.get_by_role("button", name="Generate").click()
    assert "ControlNet unit 2 needs a control image" in page.inner_text("#error")
    page.get_by_role("button", name="Remove unit 2").click()
    assert page.inner_text("#control-badge") == "1 unit"

    studio.field("Unit 1: Control weight").fill("0.8")
    studio.field("Unit 1: Ending step").fill("0.75")
    studio.field("Unit 1: Control mode").select_option("ControlNet is more important")
    studio.field("Sampling steps").fill("4")
    studio.screenshot("11-control-unit.png")
    sent = studio.submit()
    (unit,) = sent["controls"]
    assert unit["image"].startswith("data:image/png;base64,")
    assert {key: unit[key] for key in ("model", "module", "weight", "guidance_start", "guidance_end", "control_mode",
                                       "resize_mode", "threshold_a", "threshold_b")} == {
        "model": "tiny-cn", "module": "canny", "weight": 0.8, "guidance_start": 0, "guidance_end": 0.75,
        "control_mode": "ControlNet is more important", "resize_mode": "Crop and Resize", "threshold_a": 50,
        "threshold_b": 150}
    studio.wait_for_result(before)
    info = page.inner_text("#result-info")
    assert "ControlNet 0: " in info and "Module: canny" in info and "Weight: 0.8" in info
    studio.screenshot("12-control-result.png")
    studio.check_clean()
