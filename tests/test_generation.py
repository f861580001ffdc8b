"""Seeds, batches, callbacks, previews, cancellation and request validation of Pipeline.generate."""

import pytest
import torch

import dapple
from dapple.errors import GenerationCancelled, InvalidRequestError, UnknownSamplerError
from dapple.request import GenerationRequest, Limits, make_request

FAST = dict(prompt="a red circle", steps=3, sampler="Euler a")


def test_same_seed_same_image_different_seed_different_image(pipe) -> None:
    first = pipe.generate(**FAST, seed=5)
    again = pipe.generate(**FAST, seed=5)
    other = pipe.generate(**FAST, seed=6)
    assert torch.equal(first.pixels, again.pixels)
    assert (first.pixels - other.pixels).abs().max() > 0.05


def test_batch_image_i_uses_seed_plus_i_and_reproduces_alone(pipe) -> None:
    batch = pipe.generate(**FAST, seed=100, batch_size=3)
    assert batch.seeds == [100, 101, 102]
    assert len(batch.images) == len(batch.infotexts) == 3
    alone = pipe.generate(**FAST, seed=102)
    assert (batch.pixels[2] - alone.pixels[0]).abs().max() < 1e-5
    assert "Seed: 102," in batch.infotexts[2]


def test_seed_minus_one_draws_a_random_seed_and_reports_it(pipe) -> None:
    first = pipe.generate(**FAST, seed=-1, batch_size=2)
    second = pipe.generate(**FAST, seed=-1)
    assert first.seeds[1] == first.seeds[0] + 1
    assert first.seeds[0] != second.seeds[0]
    replay = pipe.generate(**FAST, seed=second.seeds[0])
    assert torch.equal(second.pixels, replay.pixels)


def test_defaults_native_size_and_result_fields(pipe) -> None:
    result = pipe.generate("a red circle", steps=2, seed=1)
    assert result.images[0].size == (64, 64)  # the tiny model's native size
    assert result.request.sampler == "DPM++ 2M Karras"
    assert set(result.timings) == {"encode_prompt", "denoise", "decode", "total"}
    assert result.infotexts[0].startswith("a red circle\nSteps: 2, Sampler: DPM++ 2M, Schedule type: Karras")


def test_non_square_size(pipe) -> None:
    result = pipe.generate(**FAST, seed=1, width=96, height=64)
    assert result.images[0].size == (96, 64)
    assert "Size: 96x64" in result.infotexts[0]


def test_callback_sees_every_step_with_previews(pipe) -> None:
    seen = []

    def callback(context: dapple.StepContext) -> None:
        cheap = context.preview("cheap")
        full = context.preview("full")
        seen.append((context.step, context.total, cheap[0].size, full[0].size, context.denoised is not None))

    pipe.generate(**FAST, seed=1, batch_size=2, callback=callback)
    assert [s[:2] for s in seen] == [(1, 3), (2, 3), (3, 3)]
    assert all(s[2] == (32, 32) and s[3] == (64, 64) and s[4] for s in seen)  # cheap is 1/scale, full is full


def test_cancel_stops_between_steps_and_the_pipeline_still_works(pipe) -> None:
    token = dapple.CancelToken()
    steps_run = []

    def cancel_after_two(context: dapple.StepContext) -> None:
        steps_run.append(context.step)
        if context.step == 2:
            token.cancel()

    with pytest.raises(GenerationCancelled, match="cancelled before step 3 of 10"):
        pipe.generate(**{**FAST, "steps": 10}, seed=1, callback=cancel_after_two, cancel=token)
    assert steps_run == [1, 2]
    assert pipe.generate(**FAST, seed=1).images  # nothing left half-done


def test_a_cancelled_run_releases_its_latents(pipe) -> None:
    import gc
    import weakref

    token = dapple.CancelToken()
    held = []

    def remember_and_cancel(context: dapple.StepContext) -> None:
        held.append(weakref.ref(context.latents))
        token.cancel()

    with pytest.raises(GenerationCancelled) as caught:
        pipe.generate(**{**FAST, "steps": 10}, seed=1, callback=remember_and_cancel, cancel=token)
    gc.collect()
    assert caught.value is not None  # the exception is still held here ...
    assert held and held[0]() is None  # ... and yet the run's latents are gone


def test_a_token_cancelled_before_the_run_stops_it_at_once(pipe) -> None:
    token = dapple.CancelToken()
    token.cancel()
    with pytest.raises(GenerationCancelled, match="before step 1"):
        pipe.generate(**FAST, cancel=token)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"width": 100}, r"width=100 is invalid \(Input should be a multiple of 8\); allowed: multiples of 8 in 64..2048"),
        ({"height": 4096}, r"height=4096 is invalid .*allowed: multiples of 8 in 64..2048"),
        ({"width": 32}, r"width=32 is invalid .*64..2048"),
        ({"steps": 0}, r"steps=0 is invalid .*allowed: in 1..150"),
        ({"steps": 151}, r"steps=151 is invalid .*allowed: in 1..150"),
        ({"guidance_scale": 31}, r"guidance_scale=31 is invalid .*allowed: in 0.0..30.0"),
        ({"guidance_scale": -1}, r"guidance_scale=-1 is invalid"),
        ({"batch_size": 17}, r"batch_size=17 is invalid .*allowed: in 1..16"),
        ({"batch_size": 0}, r"batch_size=0 is invalid"),
        ({"seed": -2}, r"seed=-2 is invalid .*allowed: in -1..4294967295"),
        ({"sampler": ""}, r"sampler='' is invalid .*a non-empty string"),
        ({"sampeler": "Euler"}, r"sampeler='Euler' is invalid \(Extra inputs are not permitted\)"),
    ],
)
def test_each_validation_error_names_the_field_and_the_allowed_values(fields, message) -> None:
    with pytest.raises(InvalidRequestError, match=message):
        make_request(prompt="x", **fields)


def test_generate_reports_bad_fields_before_running(pipe) -> None:
    with pytest.raises(InvalidRequestError, match="width=65"):
        pipe.generate("x", width=65)
    with pytest.raises(UnknownSamplerError, match="valid samplers"):
        pipe.generate("x", sampler="Euler b", steps=1)


def test_configured_limits_are_enforced(tiny_model_dir) -> None:
    limited = dapple.load(tiny_model_dir, device="cpu", limits=Limits(max_width=512, max_steps=30))
    with pytest.raises(InvalidRequestError, match="width=1024 exceeds this server's limit; allowed: at most 512"):
        limited.generate("x", width=1024)
    with pytest.raises(InvalidRequestError, match="steps=40 exceeds"):
        limited.run(GenerationRequest(prompt="x", steps=40))


def test_the_request_schema_carries_the_bounds() -> None:
    schema = GenerationRequest.model_json_schema()["properties"]
    assert schema["steps"]["minimum"] == 1 and schema["steps"]["maximum"] == 150
    assert schema["batch_size"]["maximum"] == 16


def test_words_outside_a_models_vocabulary_are_named_in_a_warning(tiny_model_dir, tmp_path) -> None:
    import shutil
    import warnings

    from dapple.engine.conditioning import UnknownWordsWarning
    from dapple.models.vocabulary import write_vocabulary

    folder = shutil.copytree(tiny_model_dir, tmp_path / "closed_world")
    write_vocabulary(folder, ["a", "red", "circle", "on", "blue", "background"])
    closed = dapple.load(folder, device="cpu")
    with pytest.warns(UnknownWordsWarning, match=r"never saw the words 'dog', 'sunny' .*it knows: a, background"):
        result = closed.generate("a red dog on a sunny blue background", steps=1, seed=1)
    assert result.images  # still generates
    with warnings.catch_warnings():
        warnings.simplefilter("error", dapple.DappleWarning)
        closed.generate("A red circle, on a blue background", steps=1, seed=1)  # case and commas are fine
        dapple.load(tiny_model_dir, device="cpu").generate("a dog", steps=1, seed=1)  # no vocabulary: no check
