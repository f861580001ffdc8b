"""Image modes: the promises each mode makes (strength 0 and 1, paste-back, sizes, steps run, infotext) and a
clear error for every bad input."""

from __future__ import annotations

import io
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

import dapple
from dapple.engine.images import MaskResizedWarning, fill_masked_area, resize_to
from dapple.engine.inpaint import extend_canvas
from dapple.errors import InvalidRequestError
from dapple.infotext import parse_infotext
from dapple.request import make_request
from sample_images import half_mask, pixels, smooth_image


def steps_run(pipe_method, *args, **kwargs) -> tuple[object, list[tuple[str, int]]]:
    calls: list[tuple[str, int]] = []
    result = pipe_method(*args, callback=lambda c: calls.append((c.phase, c.total)), **kwargs)
    return result, calls


# -- img2img ------------------------------------------------------------------------------------------------
def test_strength_zero_returns_the_vae_round_trip(pipe) -> None:
    image = smooth_image(1)
    result, calls = steps_run(pipe.img2img, image, "a red circle", strength=0.0, steps=10, seed=5)
    assert calls == []
    tensor = torch.from_numpy(np.asarray(image, np.float32) / 255).permute(2, 0, 1)[None] * 2 - 1
    with torch.inference_mode():
        latents = pipe.vae.encode(tensor).latent_dist.sample(generator=torch.Generator().manual_seed(5))
        expected = (pipe.vae.decode(latents).sample / 2 + 0.5).clamp(0, 1)
    assert torch.allclose(result.pixels, expected, atol=1e-5)


def test_strength_one_equals_txt2img_with_the_same_seed(pipe) -> None:
    for sampler in ("DPM++ 2M Karras", "Euler a"):
        img = pipe.img2img(smooth_image(2), "a red circle", strength=1.0, steps=6, seed=9, sampler=sampler)
        txt = pipe.generate("a red circle", steps=6, seed=9, sampler=sampler)
        assert torch.equal(img.pixels, txt.pixels)


@pytest.mark.parametrize("steps, strength, expected", [(10, 0.75, 7), (20, 0.5, 10), (8, 0.3, 2)])
def test_img2img_runs_int_steps_times_strength(pipe, steps: int, strength: float, expected: int) -> None:
    result, calls = steps_run(pipe.img2img, smooth_image(1), "x", strength=strength, steps=steps, seed=1,
                              sampler="Euler")
    assert len(calls) == expected and calls[0] == ("sampling", expected)
    assert parse_infotext(result.infotexts[0])["Denoising strength"] == strength


def test_img2img_batch_image_equals_single_run_with_next_seed(pipe) -> None:
    image = smooth_image(3)
    batch = pipe.img2img(image, "x", strength=0.6, steps=6, seed=20, batch_size=2, sampler="Euler a")
    single = pipe.img2img(image, "x", strength=0.6, steps=6, seed=21, sampler="Euler a")
    assert (batch.pixels[1] - single.pixels[0]).abs().max() < 1e-5  # batched matmuls round differently


def test_init_image_of_another_size_is_fitted_by_resize_mode(pipe) -> None:
    wide = Image.new("RGB", (128, 64), (200, 30, 30))
    for mode in ("just resize", "crop and resize", "resize and fill"):
        result = pipe.img2img(wide, "x", strength=0.5, steps=2, seed=1, width=64, height=64, resize_mode=mode)
        assert result.images[0].size == (64, 64)
    default = pipe.img2img(Image.new("RGB", (77, 70)), "x", strength=0.5, steps=2, seed=1)
    assert default.images[0].size == (72, 64)  # the image's size rounded down to multiples of 8


def test_resize_modes_place_the_picture_as_a1111_does() -> None:
    left_red = np.zeros((50, 100, 3), np.uint8)
    left_red[:, :50] = (255, 0, 0)
    left_red[:, 50:] = (0, 0, 255)
    image = Image.fromarray(left_red)
    crop = np.asarray(resize_to(image, 50, 50, "crop and resize"))  # the centre: half red, half blue
    assert crop[25, 5, 0] > 200 and crop[25, 45, 2] > 200
    fill = np.asarray(resize_to(image, 100, 100, "resize and fill"))  # letterboxed, edges stretched
    assert fill.shape == (100, 100, 3) and fill[2, 5, 0] > 200 and fill[97, 95, 2] > 200
    stretched = resize_to(image, 64, 64, "just resize")
    assert stretched.size == (64, 64)


def test_images_can_be_given_as_paths_bytes_and_arrays(pipe, tmp_path) -> None:
    image = smooth_image(5)
    path = tmp_path / "init.png"
    image.save(path)
    base = pipe.img2img(image, "x", strength=0.5, steps=2, seed=1).pixels
    for source in (path, str(path), path.read_bytes(), np.asarray(image)):
        assert torch.equal(pipe.img2img(source, "x", strength=0.5, steps=2, seed=1).pixels, base)


# -- inpainting ---------------------------------------------------------------------------------------------
def test_four_channel_inpainting_keeps_pixels_outside_the_mask(pipe) -> None:
    image = smooth_image(6)
    blur = 4
    result = pipe.inpaint(image, half_mask(), "a blue square", mask_blur=blur, steps=6, seed=2)
    out, original = np.asarray(result.images[0]), np.asarray(image)
    reach = 32 - 3 * blur - 1  # beyond the Gaussian's reach from the mask edge at x = 32
    assert np.array_equal(out[:, :reach], original[:, :reach])
    assert np.abs(out[:, 40:].astype(int) - original[:, 40:]).mean() > 5  # the masked half was repainted
    raw = (result.pixels[0].permute(1, 2, 0).numpy() * 255).round()
    assert np.abs(raw[:, :reach] - original[:, :reach]).max() > 0  # without paste-back the VAE would differ


def test_mask_variants_repaint_the_same_area(pipe) -> None:
    image = smooth_image(7)
    args = dict(steps=4, seed=3, sampler="Euler")
    reference = pixels(pipe.inpaint(image, half_mask(), "x", **args))
    inverted = Image.eval(half_mask(), lambda v: 255 - v)
    assert np.array_equal(pixels(pipe.inpaint(image, inverted, "x", invert_mask=True, **args)), reference)
    alpha = Image.new("RGBA", (64, 64), (0, 0, 0, 0))  # strokes painted on a transparent canvas
    alpha.paste((255, 255, 255, 255), (32, 0, 64, 64))
    assert np.array_equal(pixels(pipe.inpaint(image, alpha, "x", **args)), reference)
    assert np.array_equal(pixels(pipe.inpaint(image, half_mask().convert("RGB"), "x", **args)), reference)


def test_mask_of_another_size_is_resized_with_a_warning(pipe) -> None:
    small = half_mask(32)
    with pytest.warns(MaskResizedWarning, match="32x32 but the image is 64x64"):
        result = pipe.inpaint(smooth_image(1), small, "x", steps=2, seed=1)
    assert result.images[0].size == (64, 64)


def test_masked_content_options_change_the_start(pipe) -> None:
    image = smooth_image(8)
    outputs = {fill: pixels(pipe.inpaint(image, half_mask(), "x", strength=0.6, steps=5, seed=4, sampler="Euler",
                                         inpainting_fill=fill, paste_back=False))
               for fill in ("fill", "original", "latent noise", "latent nothing")}
    names = list(outputs)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            assert np.abs(outputs[a] - outputs[b]).max() > 1e-3, (a, b)


def test_fill_takes_the_colours_around_the_hole() -> None:
    image = np.zeros((64, 64, 3), np.uint8)
    image[:, :32] = (255, 0, 0)
    image[:, 32:] = (0, 0, 255)
    mask = np.zeros((64, 64), np.uint8)
    mask[16:48, 16:48] = 255
    filled = np.asarray(fill_masked_area(Image.fromarray(image), Image.fromarray(mask)))
    assert filled[32, 17, 0] > 200 and filled[32, 46, 2] > 200  # near each side: that side's colour
    assert np.array_equal(filled[mask == 0], image[mask == 0])


# -- outpainting --------------------------------------------------------------------------------------------
def test_outpaint_extends_the_canvas_and_keeps_the_image(pipe) -> None:
    image = smooth_image(9)
    result = pipe.outpaint(image, "x", left=16, bottom=8, steps=4, seed=6, mask_blur=2)
    assert result.images[0].size == (80, 72)
    out = np.asarray(result.images[0])
    kept = out[: 64 - 4 - 7, 16 + 4 + 7 :]  # beyond the overlap (2 x blur) and the blur's reach
    assert np.array_equal(kept, np.asarray(image)[: 64 - 11, 11:])
    info = parse_infotext(result.infotexts[0])
    assert info["Outpaint"] == "left=16 bottom=8" and info["Size"] == "80x72"


def test_extend_canvas_stretches_edges_and_masks_the_new_area() -> None:
    image = Image.new("RGB", (32, 32), (10, 200, 10))
    canvas, mask = extend_canvas(image, 8, 0, 0, 16, overlap=4, seed=1)
    assert canvas.size == (40, 48) and mask.size == (40, 48)
    m = np.asarray(mask)
    assert m[0, 0] == 255 and m[40, 20] == 255 and m[10, 10] == 255 and m[10, 13] == 0
    assert abs(int(np.asarray(canvas)[40, 4, 1]) - 200) < 100  # stretched green plus noise


# -- depth2img ----------------------------------------------------------------------------------------------
def test_depth_map_is_refused_by_a_standard_model(pipe) -> None:
    with pytest.raises(InvalidRequestError, match="depth_map needs a depth model"):
        pipe.depth2img(smooth_image(1), np.ones((64, 64)), "x", steps=2)


def test_depth_model_without_depth_map_says_what_it_needs(depth_model_dir) -> None:
    depth_pipe = dapple.load(depth_model_dir, device="cpu")
    with pytest.raises(InvalidRequestError, match="needs depth_map"):
        depth_pipe.img2img(smooth_image(1), "x", steps=2)
    depth_pipe.components.depth_estimator = lambda image: np.asarray(image.convert("L"), np.float32)
    try:
        assert depth_pipe.img2img(smooth_image(1), "x", steps=2, seed=1).images[0].size == (64, 64)
    finally:
        depth_pipe.components.depth_estimator = None


# -- hires fix ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("upscaler", ["Latent", "Latent (nearest-exact)", "Lanczos"])
def test_hires_fix_upscales_and_redraws(pipe, upscaler: str) -> None:
    result, calls = steps_run(pipe.generate, "x", steps=6, seed=2, sampler="Euler",
                              hires=dapple.Hires(scale=1.5, upscaler=upscaler, steps=4, strength=0.5))
    assert result.images[0].size == (96, 96)
    assert [phase for phase, _ in calls] == ["sampling"] * 6 + ["hires"] * 4
    info = parse_infotext(result.infotexts[0])
    assert (info["Size"], info["Hires upscale"], info["Hires steps"], info["Hires upscaler"]) == \
        ("64x64", 1.5, 4, upscaler)
    assert info["Denoising strength"] == 0.5


def test_hires_second_pass_steps_default_to_steps(pipe) -> None:
    _, calls = steps_run(pipe.generate, "x", steps=5, seed=2, hires=2.0)
    assert [phase for phase, _ in calls].count("hires") == 5


# -- validation ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("call, message", [
    (lambda p: p.img2img(smooth_image(1), "x", strength=1.5), "strength=1.5 is invalid"),
    (lambda p: p.img2img(smooth_image(1), "x", resize_mode="zoom"), "resize_mode must be one of"),
    (lambda p: p.inpaint(smooth_image(1), Image.new("L", (64, 64), 0), "x"), "nothing to inpaint"),
    (lambda p: p.inpaint(smooth_image(1), Image.new("L", (64, 64), 255), "x", invert_mask=True), "nothing to inpaint"),
    (lambda p: p.inpaint(smooth_image(1), half_mask(), "x", inpainting_fill="blue"), "inpainting_fill must be"),
    (lambda p: p.outpaint(smooth_image(1), "x", left=12), "multiple of 8"),
    (lambda p: p.outpaint(smooth_image(1), "x", left=2048), r"in 0\.\.1024"),
    (lambda p: p.run(make_request(prompt="x", mask=half_mask())), "mask needs init_image"),
    (lambda p: p.run(make_request(prompt="x", outpaint_top=8)), "outpainting needs init_image"),
    (lambda p: p.inpaint(smooth_image(1), half_mask(), "x", outpaint_left=8), "either a mask"),
    (lambda p: p.generate("x", hires={"scale": 9}), "hires_scale=9"),
    (lambda p: p.generate("x", hires={"size": 2}), "unknown keys"),
    (lambda p: p.generate("x", hires={"upscaler": "ESRGAN"}), "hires_upscaler must be one of"),
    (lambda p: p.img2img(smooth_image(1), "x", hires_scale=2), "hires fix .* is for text-to-image"),
    (lambda p: p.img2img(b"not an image", "x"), "could not be read as an image"),
    (lambda p: p.img2img("/no/such/file.png", "x"), "does not exist"),
    (lambda p: p.img2img(np.zeros((4, 4, 2)), "x"), r"allowed: \(H, W\)"),
    (lambda p: p.img2img(12, "x"), "has type int"),
    (lambda p: p.img2img(smooth_image(1), "x", colour="red"), "colour"),
])
def test_bad_image_mode_input_is_refused_clearly(pipe, call, message: str) -> None:
    with pytest.raises(InvalidRequestError, match=message):
        call(pipe)


def test_oversized_images_are_refused_before_decoding(tiny_model_dir) -> None:
    strict = dapple.load(tiny_model_dir, device="cpu", limits=dapple.Limits(max_image_pixels=100 * 100))
    buffer = io.BytesIO()
    Image.new("RGB", (3000, 3000)).save(buffer, format="PNG")
    header_only = buffer.getvalue()[:200]  # a truncated file: decoding it would fail differently
    with pytest.raises(InvalidRequestError, match="3000x3000 = 9000000 pixels; allowed: at most 10000"):
        strict.img2img(header_only, "x")
    with pytest.raises(InvalidRequestError, match="mask is 3000x3000"):
        strict.inpaint(smooth_image(1), header_only, "x")


def test_outpainted_canvas_beyond_the_size_limit_is_refused(tiny_model_dir) -> None:
    strict = dapple.load(tiny_model_dir, device="cpu", limits=dapple.Limits(max_width=128))
    with pytest.raises(InvalidRequestError, match="136x64 exceeds"):
        strict.outpaint(smooth_image(1), "x", left=72)
    with pytest.raises(InvalidRequestError, match="hires fix target size 192x192"):
        strict.generate("x", hires=3.0)


def test_image_fields_do_not_leak_into_txt2img_warnings(pipe) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error", MaskResizedWarning)
        pipe.inpaint(smooth_image(1), half_mask(), "x", steps=1, seed=1)
