"""The extension seam around the model call: run-wide patches are always undone (after success, an error and a
cancel), extensions run in their explicit order, names never collide silently, the seam forwards what an
extension adds to the UNet exactly, and plugins arrive through the `dapple.extensions` entry point."""

from __future__ import annotations

import sys
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch

from dapple.engine.extensions import (
    ORDER_USER,
    Extension,
    Extensions,
    ModelInputs,
    installed_extensions,
    requested_extensions,
)
from dapple.engine.hooks import CancelToken, StepHooks
from dapple.errors import GenerationCancelled, InvalidRequestError
from dapple.request import make_request
from sample_images import half_mask, smooth_image

FAST = {"steps": 3, "seed": 1, "sampler": "Euler", "guidance_scale": 5.0}


class WeightPatch(Extension):
    """Adds 1 to a UNet weight for the run (a temporary weight patch, restored from a copy), and records the steps it saw."""

    name = "weight patch"

    def __init__(self, unet: torch.nn.Module, fail_at_step: int | None = None) -> None:
        self.unet = unet
        self.fail_at_step = fail_at_step
        self.entered = self.exited = 0
        self.steps_seen: list[int] = []

    def patch(self, run):
        @contextmanager
        def patched():
            weight = self.unet.conv_in.weight
            saved = weight.detach().clone()
            self.entered += 1
            with torch.no_grad():
                weight += 1.0
            try:
                yield
            finally:
                with torch.no_grad():
                    weight.copy_(saved)
                self.exited += 1

        return patched()

    def before_model(self, step, inputs: ModelInputs) -> None:
        self.steps_seen.append(step.index)
        if self.fail_at_step is not None and step.index == self.fail_at_step:
            raise RuntimeError("extension failed on purpose")


def conv_in(pipe) -> torch.Tensor:
    return pipe.components.unet.conv_in.weight.detach().clone()


def test_patch_is_undone_after_a_successful_run(pipe) -> None:
    before = conv_in(pipe)
    patch = WeightPatch(pipe.components.unet)
    plain = pipe.run(make_request(prompt="a red circle", **FAST)).pixels
    patched = pipe.run(make_request(prompt="a red circle", **FAST), extensions=[patch]).pixels
    assert (patch.entered, patch.exited) == (1, 1)
    assert patch.steps_seen == [0, 1, 2]
    assert torch.equal(conv_in(pipe), before)
    assert not torch.equal(plain, patched)  # the patch was in force during the run


def test_patch_is_undone_after_a_run_that_raised(pipe) -> None:
    before = conv_in(pipe)
    patch = WeightPatch(pipe.components.unet, fail_at_step=1)
    with pytest.raises(RuntimeError, match="on purpose"):
        pipe.run(make_request(prompt="a red circle", **FAST), extensions=[patch])
    assert (patch.entered, patch.exited) == (1, 1)
    assert torch.equal(conv_in(pipe), before)


def test_patch_is_undone_after_a_cancelled_run(pipe) -> None:
    before = conv_in(pipe)
    patch = WeightPatch(pipe.components.unet)
    token = CancelToken()

    def cancel_after_first(context) -> None:
        if context.index == 0:
            token.cancel()

    with pytest.raises(GenerationCancelled):
        pipe.run(make_request(prompt="a red circle", **FAST), extensions=[patch], cancel=token,
                 callback=cancel_after_first)
    assert patch.steps_seen == [0]
    assert (patch.entered, patch.exited) == (1, 1)
    assert torch.equal(conv_in(pipe), before)


def test_patch_holds_through_the_hires_pass(pipe) -> None:
    patch = WeightPatch(pipe.components.unet)
    pipe.run(make_request(prompt="a red circle", hires_scale=1.5, hires_steps=2, **FAST), extensions=[patch])
    assert (patch.entered, patch.exited) == (1, 1)  # once per run, not once per pass
    assert patch.steps_seen == [0, 1, 2, 0, 1]


class Recorder(Extension):
    def __init__(self, name: str, log: list[str], order: int = ORDER_USER) -> None:
        self.name, self.order, self.log = name, order, log

    def patch(self, run):
        @contextmanager
        def patched():
            self.log.append(f"enter {self.name}")
            yield
            self.log.append(f"exit {self.name}")

        return patched()

    def before_model(self, step, inputs) -> None:
        if step.index == 0:
            self.log.append(f"model {self.name}")


def test_extensions_run_by_order_then_by_when_they_were_added(pipe) -> None:
    log: list[str] = []
    extensions = [Recorder("late", log, ORDER_USER + 20), Recorder("first", log, ORDER_USER),
                  Recorder("second", log, ORDER_USER)]
    pipe.run(make_request(prompt="a red circle", **FAST), extensions=extensions)
    assert log == ["enter first", "enter second", "enter late",
                   "model first", "model second", "model late",
                   "exit late", "exit second", "exit first"]


def test_a_name_used_twice_is_refused() -> None:
    with pytest.raises(ValueError, match="already in this run"):
        Extensions([Recorder("same", []), Recorder("same", [])])


def test_a_user_extension_cannot_replace_the_inpainting_channels(inpaint_model_dir) -> None:
    import dapple

    inpaint_pipe = dapple.load(inpaint_model_dir)
    impostor = Recorder("input channels", [])
    with pytest.raises(ValueError, match="'input channels' is already in this run"):
        inpaint_pipe.run(make_request(prompt="a red circle", init_image=smooth_image(1), mask=half_mask(),
                                      **FAST), extensions=[impostor])


def test_a_user_hook_cannot_replace_the_inpaint_blend_hook(pipe) -> None:
    hooks = StepHooks(after_step={"inpaint mask": lambda context: None})
    with pytest.raises(ValueError, match="inpaint mask"):
        pipe.run(make_request(prompt="a red circle", init_image=smooth_image(1), mask=half_mask(), **FAST),
                 hooks=hooks)


def test_the_seam_forwards_what_extensions_add(pipe) -> None:
    """Residuals added through ModelInputs reach the UNet: a constant mid-block residual (with zero down-block
    residuals, shaped by a ControlNet made from the UNet) changes the image; the same residual times zero gives
    the plain image bit for bit."""
    from diffusers import ControlNetModel

    unet = pipe.components.unet
    factor = pipe.components.vae_scale_factor  # the conditioning embedding downsamples pixels to latents
    controlnet = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(8,) * (factor.bit_length()))

    class MidResidual(Extension):
        name = "mid residual"

        def __init__(self, scale: float) -> None:
            self.scale = scale

        def before_model(self, step, inputs: ModelInputs) -> None:
            height, width = (side * pipe.components.vae_scale_factor for side in inputs.sample.shape[-2:])
            condition = torch.zeros((len(inputs.sample), 3, height, width))
            down, mid = controlnet(inputs.sample, inputs.timestep, inputs.encoder_hidden_states,
                                   controlnet_cond=condition, return_dict=False)
            inputs.add_residuals(down=[torch.zeros_like(d) for d in down], mid=torch.full_like(mid, 0.5 * self.scale))

    plain = pipe.run(make_request(prompt="a red circle", **FAST)).pixels
    zero = pipe.run(make_request(prompt="a red circle", **FAST), extensions=[MidResidual(0.0)]).pixels
    strong = pipe.run(make_request(prompt="a red circle", **FAST), extensions=[MidResidual(3.0)]).pixels
    assert torch.equal(plain, zero)
    assert (plain - strong).abs().max() > 1e-3


def test_after_guidance_sees_the_guided_prediction_of_each_step(pipe) -> None:
    class Watch(Extension):
        name = "watch"

        def __init__(self) -> None:
            self.guided: list[bool] = []

        def after_guidance(self, step, inputs, noise_pred):
            self.guided.append(inputs.guided)
            assert noise_pred.shape[0] == inputs.images
            return noise_pred

    watch = Watch()
    request = make_request(prompt="a red circle", guidance_min_timestep=500, **FAST)
    pipe.run(request, extensions=[watch])
    assert watch.guided[0] is True and watch.guided[-1] is False  # the interval's last steps are unguided


def test_plugins_must_run_after_dapples_own_and_unknown_names_list_the_installed(pipe) -> None:
    early = Recorder("early", [], order=ORDER_USER - 1)
    with pytest.raises(ValueError, match="plugins run at order"):
        requested_extensions({"early": {}}, pipe.components, factories={"early": lambda args, components: early})
    with pytest.raises(InvalidRequestError, match="'missing' is not installed.*installed extensions"):
        requested_extensions({"missing": {}}, pipe.components, factories={"other": lambda a, c: early})


PLUGIN_MODULE = '''
from dapple.engine.extensions import Extension


class Brighten(Extension):
    name = "brighten"

    def __init__(self, amount):
        self.amount = amount

    def after_step(self, step):
        if step.index == step.total - 1:
            step.latents = step.latents + self.amount


def make(args, components):
    return Brighten(float(args.get("amount", 0.0)))
'''


@pytest.fixture
def installed_plugin(tmp_path: Path):
    """A real installed distribution on sys.path with a `dapple.extensions` entry point (as pip would leave)."""
    (tmp_path / "dapple_brighten.py").write_text(PLUGIN_MODULE)
    info = tmp_path / "dapple_brighten-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: dapple-brighten\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[dapple.extensions]\nbrighten = dapple_brighten:make\n")
    sys.path.insert(0, str(tmp_path))
    try:
        yield
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop("dapple_brighten", None)


def test_a_package_adds_an_extension_through_the_entry_point(pipe, installed_plugin) -> None:
    assert "brighten" in installed_extensions()
    plain = pipe.run(make_request(prompt="a red circle", **FAST)).pixels
    off = pipe.run(make_request(prompt="a red circle", extensions={"brighten": {"amount": 0.0}}, **FAST)).pixels
    on = pipe.run(make_request(prompt="a red circle", extensions={"brighten": {"amount": 2.0}}, **FAST)).pixels
    assert torch.equal(plain, off)
    assert not np.allclose(plain.numpy(), on.numpy(), atol=1e-3)
