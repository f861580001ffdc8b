"""DeepCache (engine/feature_cache.py): off is the loop bit for bit; interval N runs the deep blocks on exactly
the expected steps (every N-th, and whenever the batch layout changes: the guidance interval's switch, the hires
pass); a cached step is, in closed form, the shallow branch applied to the cached deep feature; ControlNet,
T2I-Adapter and inpainting channels keep working; bad values are refused with a clear error (422 over HTTP); the
run-wide patch is undone after a run, an error and a cancel."""

from __future__ import annotations

import pytest
import torch

import dapple
from control_fixtures import edge_map, load_sd1_adapter_pipe, perturbed_controlnet, save
from dapple.engine.extensions import ORDER_USER, Extension, ModelInputs
from dapple.engine.feature_cache import DeepCache, deep_modules
from dapple.engine.hooks import CancelToken, StepContext
from dapple.engine.pipeline import speed_extensions
from dapple.errors import GenerationCancelled, InvalidRequestError
from dapple.request import ControlUnit, make_request
from extension_fixtures import FailAt
from sample_images import half_mask, smooth_image

FAST = {"prompt": "a red circle", "negative_prompt": "blurry", "seed": 5, "sampler": "Euler",
        "guidance_scale": 5.0}


def deep_calls(unet) -> tuple[list[int], list[int], list]:
    """Counters of real computation in a deep block (up_blocks[-2]'s first resnet) and a shallow one (the last up
    block's first resnet): a cached step calls the first wrapped block but never its submodules."""
    deep, shallow = [], []
    handles = [unet.up_blocks[-2].resnets[0].register_forward_pre_hook(lambda *_: deep.append(1)),
               unet.up_blocks[-1].resnets[0].register_forward_pre_hook(lambda *_: shallow.append(1))]
    return deep, shallow, handles


def no_patch_left(unet) -> bool:
    return all("forward" not in module.__dict__ for _, module in deep_modules(unet))


class Layout(Extension):
    """Records each UNet call's pass, step and whether it ran the guided batch."""

    name = "layout spy"
    order = ORDER_USER

    def __init__(self) -> None:
        self.calls: list[tuple[str, int, bool]] = []

    def before_model(self, step, inputs) -> None:
        self.calls.append((step.phase, step.index, inputs.guided))


def test_interval_1_is_the_loop_bit_for_bit_and_adds_nothing(pipe) -> None:
    assert speed_extensions(make_request(**FAST)) == []
    assert speed_extensions(make_request(**FAST, deep_cache_interval=1)) == []
    plain = pipe.run(make_request(**FAST, steps=4))
    off = pipe.run(make_request(**FAST, steps=4, deep_cache_interval=1))
    assert torch.equal(plain.pixels, off.pixels)
    assert "DeepCache" not in off.infotexts[0]


@pytest.mark.parametrize(("steps", "interval", "full"), [(7, 3, [0, 3, 6]), (6, 2, [0, 2, 4]), (5, 10, [0]),
                                                         (4, 4, [0])])
def test_the_deep_blocks_run_on_exactly_every_nth_step(pipe, steps, interval, full) -> None:
    cache = DeepCache(interval)
    deep, shallow, handles = deep_calls(pipe.unet)
    try:
        result = pipe.run(make_request(**FAST, steps=steps), extensions=[cache])
    finally:
        for handle in handles:
            handle.remove()
    assert [index for _, index in cache.full_steps] == full
    assert len(deep) == len(full) and len(shallow) == steps  # the shallow branch runs on every step
    assert sorted(index for _, index in cache.full_steps + cache.cached_steps) == list(range(steps))
    assert "DeepCache interval: %d" % interval in result.infotexts[0]
    assert no_patch_left(pipe.unet)


def test_the_request_field_turns_it_on_and_the_image_changes_but_stays_close(pipe) -> None:
    plain = pipe.run(make_request(**FAST, steps=6)).pixels
    cached = pipe.run(make_request(**FAST, steps=6, deep_cache_interval=2))
    assert "DeepCache interval: 2" in cached.infotexts[0]
    difference = (cached.pixels - plain).abs()
    assert 0 < difference.max() and difference.mean() < 0.1
    again = pipe.generate(**FAST, steps=6, deep_cache_interval=2)  # the Python API's keyword
    assert torch.equal(again.pixels, cached.pixels)  # a seed still reproduces its image


def _call(cache: DeepCache, unet, index: int, sample, t, states):
    context = StepContext(index, 2, t, sample)
    inputs = ModelInputs(sample, t, states, guided=False)
    cache.before_model(context, inputs)
    output = inputs.call(unet)
    cache.after_guidance(context, inputs, output)
    return output


def test_a_cached_step_is_the_shallow_branch_on_the_cached_feature(pipe) -> None:
    """Closed form: with the deep feature unchanged (the same input twice) the cached step equals the full one;
    with a new input it equals conv_in -> down_blocks[0] -> up_blocks[-1](cached feature) -> conv_out by hand."""
    unet = pipe.unet
    generator = torch.Generator().manual_seed(0)
    x1, x2 = (torch.randn((1, 4, 32, 32), generator=generator) for _ in range(2))
    states = torch.randn((1, 77, unet.config.cross_attention_dim), generator=generator)
    t1, t2 = torch.tensor(700.0), torch.tensor(500.0)
    cache = DeepCache(2)
    with torch.inference_mode(), cache.patched(unet):
        full = _call(cache, unet, 0, x1, t1, states)
        feature = cache._outputs[f"up_blocks.{len(unet.up_blocks) - 2}"]
        repeated = _call(cache, unet, 1, x1, t1, states)
        assert cache.full_steps == [("sampling", 0)] and cache.cached_steps == [("sampling", 1)]
        cache._since_full = 0  # allow one more cached step on the same feature
        cached = _call(cache, unet, 1, x2, t2, states)
    assert torch.equal(repeated, full)
    with torch.inference_mode():
        reference_full = unet(x1, t1, encoder_hidden_states=states).sample
        embedding = unet.time_embedding(unet.get_time_embed(sample=x2, timestep=t2), None)
        h = unet.conv_in(x2)
        first = unet.down_blocks[0]
        kwargs = {"encoder_hidden_states": states} if getattr(first, "has_cross_attention", False) else {}
        _, skips = first(hidden_states=h, temb=embedding, **kwargs)
        last = unet.up_blocks[-1]
        skips = (h, *skips)[: len(last.resnets)]
        kwargs = {"encoder_hidden_states": states} if getattr(last, "has_cross_attention", False) else {}
        out = last(hidden_states=feature, temb=embedding, res_hidden_states_tuple=skips, **kwargs)
        by_hand = unet.conv_out(unet.conv_act(unet.conv_norm_out(out)))
    torch.testing.assert_close(full, reference_full, rtol=0, atol=0)  # a full step is the plain UNet
    torch.testing.assert_close(cached, by_hand, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(cached, unet(x2, t2, encoder_hidden_states=states).sample, atol=1e-4)
    assert no_patch_left(unet)


def test_the_guidance_interval_switch_forces_a_full_step(pipe) -> None:
    scheduler = pipe.make_scheduler("Euler")
    scheduler.set_timesteps(6)
    threshold = int(float(scheduler.timesteps[1]))  # steps 0 and 1 guided, 2.. not
    cache, layout = DeepCache(3), Layout()
    pipe.run(make_request(**FAST, steps=6, guidance_min_timestep=threshold), extensions=[cache, layout])
    assert [guided for _, _, guided in layout.calls] == [True, True, False, False, False, False]
    assert [index for _, index in cache.full_steps] == [0, 2, 5]  # 2: the batch halves; then every 3rd


def test_the_hires_pass_starts_with_a_full_step(pipe) -> None:
    cache = DeepCache(2)
    pipe.run(make_request(**FAST, steps=3, hires_scale=2.0, hires_steps=3), extensions=[cache])
    assert cache.full_steps == [("sampling", 0), ("sampling", 2), ("hires", 0), ("hires", 2)]


@pytest.fixture(scope="module")
def control_pipe(tmp_path_factory, tiny_model_dir, reference_pipe):
    folder = tmp_path_factory.mktemp("ControlNet")
    save(perturbed_controlnet(reference_pipe.unet, seed=1), folder / "tiny-cn")
    return dapple.load(tiny_model_dir, device="cpu", control_dirs=[folder])


def test_controlnet_residuals_still_reach_the_cached_steps(control_pipe) -> None:
    unit = ControlUnit(model="tiny-cn", image=edge_map(3))
    request = dict(**FAST, steps=4, deep_cache_interval=4)  # one full step, three cached ones
    controlled = control_pipe.run(make_request(**request, controls=[unit])).pixels
    plain = control_pipe.run(make_request(**request)).pixels
    # The same ControlNet on the full step only (window: the first quarter): the cached steps' shallow residuals
    # are what differs.
    first_only = control_pipe.run(make_request(**request, controls=[unit.model_copy(update={"guidance_end": 0.25})]))
    assert torch.isfinite(controlled).all()
    assert not torch.allclose(controlled, first_only.pixels, atol=1e-4)
    assert not torch.allclose(controlled, plain, atol=1e-4)
    uncached = control_pipe.run(make_request(**{**request, "deep_cache_interval": 1}, controls=[unit])).pixels
    assert (controlled - uncached).abs().mean() < 0.1


@pytest.fixture(scope="module")
def adapter_pipe(tmp_path_factory):
    """The SD 1.x layout (cross-attention in the first block) with a T2I-Adapter that fits it."""
    return load_sd1_adapter_pipe(tmp_path_factory)


def test_t2i_adapter_features_and_the_sd1_layout_work_with_the_cache(adapter_pipe) -> None:
    unit = ControlUnit(model="tiny-adapter", image=edge_map(7))
    cache = DeepCache(2)
    result = adapter_pipe.run(make_request(**FAST, steps=4, controls=[unit]), extensions=[cache])
    uncached = adapter_pipe.run(make_request(**FAST, steps=4, controls=[unit])).pixels
    assert [index for _, index in cache.full_steps] == [0, 2]
    assert torch.isfinite(result.pixels).all() and (result.pixels - uncached).abs().mean() < 0.1
    assert no_patch_left(adapter_pipe.unet)


def test_inpainting_channels_reach_the_cached_steps(inpaint_model_dir) -> None:
    inpainter = dapple.load(inpaint_model_dir, device="cpu")
    fields = dict(**FAST, steps=4, strength=1.0)
    cached = inpainter.inpaint(smooth_image(1), half_mask(), **fields, deep_cache_interval=2)
    uncached = inpainter.inpaint(smooth_image(1), half_mask(), **fields)
    assert "DeepCache interval: 2" in cached.infotexts[0]
    assert torch.isfinite(cached.pixels).all() and not torch.equal(cached.pixels, uncached.pixels)
    assert (cached.pixels - uncached.pixels).abs().mean() < 0.1
    txt = inpainter.run(make_request(**FAST, steps=4, deep_cache_interval=2))  # the all-masked channels
    assert torch.isfinite(txt.pixels).all()


@pytest.mark.parametrize("value", [0, 11, -1, 2.5, "three"])
def test_bad_intervals_are_refused_with_what_is_allowed(value) -> None:
    with pytest.raises(InvalidRequestError, match=r"deep_cache_interval=.*1\.\.10|deep_cache_interval=.*integer"):
        make_request(**FAST, deep_cache_interval=value)
    with pytest.raises(InvalidRequestError, match="deep_cache_interval must be an integer from 1"):
        DeepCache(value)


def test_bad_intervals_are_422_in_the_native_and_a1111_apis(tmp_path, pipe) -> None:
    from fastapi.testclient import TestClient

    from dapple.interfaces.server import create_app
    from dapple.service.jobs import JobService

    service = JobService(tmp_path / "data", lambda: pipe, queue_size=2)
    service.start()
    try:
        with TestClient(create_app(service, model_name="tiny")) as client:
            answer = client.post("/api/v1/jobs", json={"prompt": "x", "steps": 2, "deep_cache_interval": 11})
            assert answer.status_code == 422 and "deep_cache_interval" in answer.text
            answer = client.post("/sdapi/v1/txt2img", json={"prompt": "x", "steps": 2, "deep_cache_interval": 0})
            assert answer.status_code == 422 and "deep_cache_interval" in answer.text, answer.text
            answer = client.post("/sdapi/v1/txt2img", json={"prompt": "x", "steps": 2, "seed": 1,
                                                             "deep_cache_interval": 2})
            assert answer.status_code == 200, answer.text
            assert "DeepCache interval: 2" in answer.json()["info"]
    finally:
        service.stop()


def test_the_patch_is_undone_after_an_error_and_a_cancel(pipe) -> None:
    with pytest.raises(RuntimeError, match="on purpose"):
        pipe.run(make_request(**FAST, steps=4, deep_cache_interval=2), extensions=[FailAt()])
    assert no_patch_left(pipe.unet)
    token = CancelToken()

    def cancel_after_first(context) -> None:
        token.cancel()

    with pytest.raises(GenerationCancelled):
        pipe.run(make_request(**FAST, steps=4, deep_cache_interval=2), cancel=token, callback=cancel_after_first)
    assert no_patch_left(pipe.unet)
    plain = pipe.run(make_request(**FAST, steps=2)).pixels  # the model is as it was
    assert torch.equal(plain, pipe.run(make_request(**FAST, steps=2)).pixels)


def test_a_forward_someone_else_set_on_a_block_is_restored() -> None:
    from dapple.engine.feature_cache import wrapped_forward

    module = torch.nn.Identity()

    def theirs(x):
        return x + 1

    module.forward = theirs
    with wrapped_forward(module, lambda original: (lambda x: original(x) * 10)):
        assert module(torch.ones(1)).item() == 20
    assert module.forward is theirs and module(torch.ones(1)).item() == 2
