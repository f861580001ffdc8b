"""Drive the studio in headless Chromium: generate with Ctrl+Enter, watch progress reach 100%, see the image in
the gallery, reuse its settings, paint a mask over an uploaded image and inpaint. Saves screenshots.

    python scripts/studio_browser_check.py URL OUT_DIR      (URL of a running `dapple serve`)

Needs Debian's chromium (apt-get install chromium) and the playwright package (pip install playwright); the
browser download of `playwright install` is not used. Not part of the test suite yet: CI has no browser.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
from PIL import Image
from playwright.sync_api import sync_playwright


def main(url: str, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    init = out / "init.png"
    Image.fromarray((np.random.default_rng(0).random((64, 64, 3)) * 255).astype(np.uint8)).save(init)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path="/usr/bin/chromium", args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1100, "height": 800})
        errors: list[str] = []
        page.on("pageerror", lambda error: errors.append(str(error)))
        page.goto(url)
        page.wait_for_function("document.getElementById('sampler').options.length > 5")
        page.fill("#prompt", "a red circle on a blue background")
        page.fill("#steps", "8")
        page.fill("#seed", "4")
        page.keyboard.press("Control+Enter")
        page.wait_for_function("document.getElementById('progress').value >= 1", timeout=120_000)
        page.wait_for_selector(".card img")
        page.screenshot(path=str(out / "studio-generated.png"))
        page.fill("#seed", "-1")
        page.click(".card button")  # use these settings
        assert page.input_value("#seed") == "4" and page.input_value("#steps") == "8"
        page.set_input_files("#init", str(init))
        page.wait_for_selector("#canvas-wrap:not([hidden])")
        box = page.locator("#mask").bounding_box()
        page.mouse.move(box["x"] + box["width"] * 0.7, box["y"] + 5)
        page.mouse.down()
        page.mouse.move(box["x"] + box["width"] * 0.7, box["y"] + box["height"] - 5, steps=10)
        page.mouse.up()
        page.click("#generate")
        page.wait_for_function("document.querySelectorAll('.card').length >= 2", timeout=120_000)
        page.screenshot(path=str(out / "studio-inpainted.png"))
        assert not errors and not page.inner_text("#error"), (errors, page.inner_text("#error"))
        browser.close()
    print(f"studio check passed; screenshots in {out}")


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]))
