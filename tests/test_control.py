"""Closed-form checks of the control units and their errors: weight 0 and an empty window are the same as no unit,
bit for bit; residuals arrive exactly on the steps inside the window (of each pass); the hires pass gets a map at
its own size; the control modes scale the residuals by logspace(-1, 0) (sd-webui-controlnet's 0.825 ** (12 - i))
and guess mode leaves the unconditional half alone; units sum; requests that cannot work fail before any step
with a message that says what was wrong."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import dapple
from control_fixtures import edge_map, load_sd1_adapter_pipe, perturbed_controlnet, save
from dapple.engine.extensions import ORDER_USER, Extension
from dapple.errors import InvalidRequestError
from dapple.models.tiny import build_tiny_xl_pipeline
from dapple.request import ControlUnit, Limits, make_request
from sample_images import half_mask, smooth_image

FAST = {"steps": 4, "seed": 3, "sampler": "Euler", "guidance_scale": 5.0}


@pytest.fixture(scope="module")
def control_dir(tmp_path_factory, reference_pipe):
    folder = tmp_path_factory.mktemp("ControlNet")
    save(perturbed_controlnet(reference_pipe.unet, seed=1), folder / "tiny-cn")
    save(perturbed_controlnet(reference_pipe.unet, seed=2), folder / "tiny-cn-2")
    save(perturbed_controlnet(build_tiny_xl_pipeline(seed=2).unet, seed=4), folder / "xl-cn")
    return folder


@pytest.fixture(scope="module")
def control_pipe(tiny_model_dir, control_dir):
    return dapple.load(tiny_model_dir, device="cpu", control_dirs=[control_dir])


class Spy(Extension):
    """Records, per UNet call, the pass, the step and the ControlNet residuals it sees (after every unit)."""

    name = "spy"
    order = ORDER_USER

    def __init__(self) -> None:
        self.calls: list[tuple[str, int, list[torch.Tensor] | None]] = []

    def before_model(self, step, inputs) -> None:
        residuals = inputs.down_block_additional_residuals
        if residuals is not None:
            residuals = [*residuals, inputs.mid_block_additional_residual]
        elif inputs.down_intrablock_additional_residuals is not None:
            residuals = list(inputs.down_intrablock_additional_residuals)
        self.calls.append((step.phase, step.index, [r.clone() for r in residuals] if residuals else None))

    def steps_with_residuals(self, phase: str = "sampling") -> list[int]:
        return [index for seen_phase, index, residuals in self.calls if seen_phase == phase and residuals]


def run(pipe, units, extensions=(), **fields):
    request = make_request(prompt="a red circle", negative_prompt="blurry", controls=units, **{**FAST, **fields})
    return pipe.run(request, extensions=list(extensions))


def unet_calls(pipe):
    calls = []
    handle = pipe.unet.register_forward_pre_hook(lambda module, args: calls.append(1))
    return calls, handle


@pytest.mark.parametrize("change", [{"weight": 0.0}, {"guidance_start": 0.0, "guidance_end": 0.0},
                                    {"guidance_start": 1.0, "guidance_end": 1.0}])
def test_an_idle_unit_is_the_same_as_none_bit_for_bit(control_pipe, change) -> None:
    plain = run(control_pipe, [])
    spy = Spy()
    idle = run(control_pipe, [ControlUnit(model="tiny-cn", image=edge_map(1), **change)], [spy])
    assert torch.equal(plain.pixels, idle.pixels)
    assert spy.steps_with_residuals() == []
    active = run(control_pipe, [ControlUnit(model="tiny-cn", image=edge_map(1))])
    assert (plain.pixels - active.pixels).abs().max() > 0.02  # the same unit, switched on, does change the image


@pytest.mark.parametrize("steps, start, end, mode", [(10, 0.2, 0.7, "txt2img"), (7, 0.0, 0.5, "txt2img"),
                                                     (10, 0.3, 1.0, "img2img")])
def test_residuals_only_on_the_steps_inside_the_window(control_pipe, steps, start, end, mode) -> None:
    spy = Spy()
    unit = ControlUnit(model="tiny-cn", image=edge_map(2), guidance_start=start, guidance_end=end)
    extra = {"init_image": smooth_image(2), "strength": 0.5} if mode == "img2img" else {}
    run(control_pipe, [unit], [spy], steps=steps, **extra)
    total = len(spy.calls)  # the pass's steps (img2img: int(steps * strength) of them)
    assert total == (steps if mode == "txt2img" else int(steps * 0.5))
    expected = [i for i in range(total) if i / total >= start and (i + 1) / total <= end]
    assert spy.steps_with_residuals() == expected and expected


def test_the_hires_pass_gets_a_map_at_its_size(control_pipe, control_dir) -> None:
    entry, model = control_pipe._control_model("tiny-cn")
    sizes = []
    handle = model.register_forward_pre_hook(lambda module, args, kwargs: sizes.append(
        tuple(kwargs["controlnet_cond"].shape[-2:])), with_kwargs=True)
    spy = Spy()
    try:
        run(control_pipe, [ControlUnit(model="tiny-cn", image=edge_map(3), guidance_end=0.5)], [spy], width=64,
            height=64, hires_scale=2.0, hires_steps=4, hires_strength=0.6)
    finally:
        handle.remove()
    assert sizes == [(64, 64)] * 2 + [(128, 128)] * 2  # half of each pass's 4 steps, each at its own size
    assert spy.steps_with_residuals("hires") == [0, 1]


def first_step_residuals(pipe, mode: str, **fields) -> list[torch.Tensor]:
    spy = Spy()
    run(pipe, [ControlUnit(model="tiny-cn", image=edge_map(4), control_mode=mode, weight=0.8)], [spy], steps=1,
        **fields)
    return spy.calls[0][2]


def test_control_modes_are_soft_weights_and_guess_mode(control_pipe) -> None:
    balanced = first_step_residuals(control_pipe, "Balanced")
    prompt = first_step_residuals(control_pipe, "My prompt is more important")
    guess = first_step_residuals(control_pipe, "ControlNet is more important")
    scales = torch.logspace(-1, 0, len(balanced))  # diffusers' guess-mode scales, deepest residual last
    for plain, soft, scale in zip(balanced, prompt, scales):
        torch.testing.assert_close(soft, plain * scale, rtol=1e-5, atol=1e-6)
    for soft, guessed in zip(prompt, guess):
        uncond, cond = guessed.chunk(2)
        assert torch.count_nonzero(uncond) == 0  # cfg injection: nothing for the unconditional half
        torch.testing.assert_close(cond, soft.chunk(2)[1], rtol=1e-4, atol=1e-5)
    assert torch.count_nonzero(balanced[0].chunk(2)[0]) > 0
    # sd-webui-controlnet writes the same weights as 0.825 ** (12 - i) for SD's 13 residuals
    assert np.allclose(torch.logspace(-1, 0, 13).numpy(), [0.825 ** (12 - i) for i in range(13)], rtol=1e-2)  # 0.825 is 10 ** (-1/12) rounded


def test_without_guidance_the_modes_scale_the_prompt_batch(control_pipe) -> None:
    prompt = first_step_residuals(control_pipe, "My prompt is more important", guidance_scale=1.0)
    guess = first_step_residuals(control_pipe, "ControlNet is more important", guidance_scale=1.0)
    assert len(prompt[0]) == 1  # the batch holds the prompt half only
    for soft, guessed in zip(prompt, guess):
        torch.testing.assert_close(soft, guessed, rtol=1e-5, atol=1e-6)


def test_units_sum(control_pipe) -> None:
    maps = [edge_map(5), smooth_image(5)]
    units = [ControlUnit(model="tiny-cn", image=maps[0], weight=0.7), ControlUnit(model="tiny-cn-2", image=maps[1])]
    both, first, second = Spy(), Spy(), Spy()
    run(control_pipe, units, [both], steps=1)
    run(control_pipe, units[:1], [first], steps=1)
    run(control_pipe, units[1:], [second], steps=1)
    for total, a, b in zip(both.calls[0][2], first.calls[0][2], second.calls[0][2]):
        torch.testing.assert_close(total, a + b, rtol=1e-5, atol=1e-6)


def test_a_unit_without_image_uses_the_init_image(control_pipe) -> None:
    image = smooth_image(6)
    fields = {"init_image": image, "strength": 0.7}
    implicit = run(control_pipe, [ControlUnit(model="tiny-cn")], **fields)
    explicit = run(control_pipe, [ControlUnit(model="tiny-cn", image=image)], **fields)
    assert torch.equal(implicit.pixels, explicit.pixels)


@pytest.fixture(scope="module")
def adapter_pipe(tmp_path_factory):
    """The SD 1.x-style tiny model (cross-attention in its first block, as SD 1.5) with an adapter that fits it."""
    return load_sd1_adapter_pipe(tmp_path_factory)


def test_adapter_units_follow_the_window_and_weight(adapter_pipe) -> None:
    spy = Spy()
    run(adapter_pipe, [ControlUnit(model="tiny-adapter", image=edge_map(7), guidance_start=0.25, guidance_end=0.75)],
        [spy], steps=4)
    assert spy.steps_with_residuals() == [1, 2]
    half, full = Spy(), Spy()
    run(adapter_pipe, [ControlUnit(model="tiny-adapter", image=edge_map(7), weight=0.5)], [half], steps=1)
    run(adapter_pipe, [ControlUnit(model="tiny-adapter", image=edge_map(7))], [full], steps=1)
    for a, b in zip(half.calls[0][2], full.calls[0][2]):
        torch.testing.assert_close(a * 2, b)
    with pytest.raises(InvalidRequestError, match=r"controls\[0\]: a T2I-Adapter has no control modes"):
        run(adapter_pipe, [ControlUnit(model="tiny-adapter", image=edge_map(7), control_mode=1)])


def test_infotext_records_each_unit(control_pipe) -> None:
    entry = next(e for e in control_pipe.control_models() if e.name == "tiny-cn")
    result = run(control_pipe, [ControlUnit(model="TINY-CN", image=edge_map(8), weight=0.5, guidance_end=0.8),
                                ControlUnit(model="tiny-cn-2", image=edge_map(9))])
    text = result.infotexts[0]
    assert f'ControlNet 0: "Module: none, Model: tiny-cn [{entry.short_hash}], Weight: 0.5' in text
    assert "Guidance End: 0.8" in text and 'ControlNet 1: "Module: none, Model: tiny-cn-2 [' in text


def test_loaded_models_are_cached_per_file_version(control_pipe, control_dir) -> None:
    _, first = control_pipe._control_model("tiny-cn")
    _, again = control_pipe._control_model("tiny-cn [whatever]")
    assert first is again and first.device == control_pipe.device and first.dtype == control_pipe.dtype


@pytest.mark.parametrize("units, fields, message", [
    ([{"model": "no-such-net", "image": "edge"}], {}, r"no control model named 'no-such-net'.*tiny-cn"),
    ([{"model": "tiny-cm", "image": "edge"}], {}, r"did you mean 'tiny-cn'\?"),
    ([{"model": "tiny-cn"}], {}, r"controls\[0\] has no image"),
    ([{"model": "tiny-cn", "image": "edge"}, {"model": "xl-cn", "image": "edge"}], {},
     r"'xl-cn' is a ControlNet for SDXL.*this model is cross-attention 32"),
    ([{"model": "tiny-cn", "image": "edge", "module": "inpaint_only"}], {"init_image": "image"},
     r"needs the inpainting mask"),
    ([{"model": "tiny-cn", "image": "edge", "module": "cany"}], {},
     r"controls\[0\]\.module 'cany' is unknown; did you mean 'canny'\?; allowed: none, canny"),
])
def test_bad_units_fail_before_any_step(control_pipe, units, fields, message) -> None:
    images = {"edge": edge_map(1), "image": smooth_image(1)}
    units = [ControlUnit(**{k: images.get(v, v) if k == "image" else v for k, v in unit.items()}) for unit in units]
    fields = {k: images[v] for k, v in fields.items()}
    calls, handle = unet_calls(control_pipe)
    try:
        with pytest.raises(InvalidRequestError, match=message):
            run(control_pipe, units, **fields)
    finally:
        handle.remove()
    assert calls == []


def test_a_control_image_over_the_pixel_limit_is_refused(tiny_model_dir, control_dir) -> None:
    pipe = dapple.load(tiny_model_dir, device="cpu", control_dirs=[control_dir],
                       limits=Limits(max_image_pixels=64 * 64 - 1))
    with pytest.raises(InvalidRequestError, match=r"controls\[0\]\.image is 64x64 = 4096 pixels; allowed: at most"):
        run(pipe, [ControlUnit(model="tiny-cn", image=edge_map(1))])


def test_inpainting_with_the_inpaint_module_marks_the_mask(control_pipe) -> None:
    """module inpaint_only gives the ControlNet the image with the masked pixels at -1."""
    entry, model = control_pipe._control_model("tiny-cn")
    seen = []
    handle = model.register_forward_pre_hook(lambda module, args, kwargs: seen.append(kwargs["controlnet_cond"]),
                                             with_kwargs=True)
    try:
        control_pipe.inpaint(smooth_image(2), half_mask(), "a red circle", steps=2, seed=1, sampler="Euler",
                             controls=[ControlUnit(model="tiny-cn", module="inpaint_only")])
    finally:
        handle.remove()
    cond = seen[0][0]
    assert torch.all(cond[:, :, 32:] == -1) and cond[:, :, :32].min() >= 0


def test_the_unit_module_and_thresholds_make_the_map(control_pipe) -> None:
    """module canny with threshold_a/b: the ControlNet sees cv2.Canny's edges at those thresholds."""
    from dapple.engine.control import map_tensor
    from dapple.engine.preprocessors import canny

    entry, model = control_pipe._control_model("tiny-cn")
    seen = []
    handle = model.register_forward_pre_hook(lambda module, args, kwargs: seen.append(kwargs["controlnet_cond"]),
                                             with_kwargs=True)
    image = smooth_image(9)
    try:
        run(control_pipe, [ControlUnit(model="tiny-cn", image=image, module="canny", threshold_a=20,
                                       threshold_b=60)], steps=1)
    finally:
        handle.remove()
    expected = map_tensor(canny(image, 20, 60))
    assert expected.sum() > 0 and torch.equal(seen[0][:1], expected)
    assert not torch.equal(expected, map_tensor(canny(image)))  # the thresholds matter for this image
