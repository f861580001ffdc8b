"""The studio in headless Chromium (Debian's package, driven by Playwright): generate with Ctrl+Enter, watch the
progress reach 100%, see the image in the gallery, reuse its settings, paint a mask and inpaint.

Screenshots land in test-artifacts/studio/ (kept after the run, ignored by git) for a person to look at."""

from __future__ import annotations

import shutil
import socket
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import uvicorn
from PIL import Image

from dapple.interfaces.server import create_app
from dapple.service.jobs import JobService

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts" / "studio"
# Flags for a machine without network: no background connections, no sandbox as root, a fresh profile.
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="module")
def studio_url(tmp_path_factory, pipe):
    service = JobService(tmp_path_factory.mktemp("studio-data"), lambda: pipe)
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


def test_the_studio_generates_reuses_settings_and_inpaints(studio_url, tmp_path) -> None:
    from playwright.sync_api import sync_playwright

    assert Path(CHROMIUM).is_file(), "needs Debian's chromium: run scripts/ensure_chromium.sh (CI does)"
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    init = tmp_path / "init.png"
    Image.fromarray((np.random.default_rng(0).random((64, 64, 3)) * 255).astype(np.uint8)).save(init)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1100, "height": 800})
        errors: list[str] = []
        page.on("pageerror", lambda error: errors.append(str(error)))
        page.goto(studio_url)
        page.wait_for_function("document.getElementById('sampler').options.length > 5")
        page.wait_for_function("document.getElementById('model').options.length == 1")
        assert page.input_value("#model") == "tiny"
        page.fill("#prompt", "a red circle on a blue background")
        page.fill("#steps", "6")
        page.fill("#seed", "4")
        page.keyboard.press("Control+Enter")  # the keyboard path
        page.wait_for_function("document.getElementById('progress').value >= 1", timeout=120_000)
        page.wait_for_selector(".card img")
        page.screenshot(path=str(ARTIFACTS / "1-generated.png"))
        assert page.locator(".card").count() == 1

        page.fill("#seed", "-1")
        page.fill("#steps", "20")
        page.click(".card button")  # "use these settings"
        assert page.input_value("#seed") == "4" and page.input_value("#steps") == "6"
        assert page.input_value("#prompt") == "a red circle on a blue background"

        page.set_input_files("#init", str(init))
        page.wait_for_selector("#canvas-wrap:not([hidden])")
        box = page.locator("#mask").bounding_box()
        page.mouse.move(box["x"] + box["width"] * 0.7, box["y"] + 5)
        page.mouse.down()
        page.mouse.move(box["x"] + box["width"] * 0.7, box["y"] + box["height"] - 5, steps=10)
        page.mouse.up()
        page.screenshot(path=str(ARTIFACTS / "2-mask-painted.png"))
        page.click("#generate")
        page.wait_for_function("document.querySelectorAll('.card').length >= 2", timeout=120_000)
        page.screenshot(path=str(ARTIFACTS / "3-inpainted.png"))
        newest = page.locator(".card").first.inner_text()
        assert "Denoising strength" in newest and "Mask blur" in newest  # the inpainting job's parameters
        assert not errors and not page.inner_text("#error"), (errors, page.inner_text("#error"))
        browser.close()
