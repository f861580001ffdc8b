"""Memory options: attention and VAE slicing give the same image (and diffusers' with the same option), VAE tiling
matches diffusers' tiled decode, offload lends each model to its stage and puts it back (on error too), allocation
failures become a clear error that names the options, and the flags reach the pipeline."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch
from diffusers.models.attention_processor import SlicedAttnProcessor
from typer.testing import CliRunner

import dapple
from dapple.engine.extensions import Extension
from dapple.engine.latents import decode
from dapple.errors import InvalidRequestError, NotEnoughMemoryError
from dapple.interfaces.cli import app, memory_from_flags
from dapple.models import memory
from dapple.models.memory import MemoryOptions, lent, on_device, out_of_memory_error, plan
from dapple.request import make_request
from dapple.samplers import create_scheduler
from dapple.settings import Settings

TOLERANCE = 1e-3  # max abs difference on float pixels in [0, 1]
RUN = dict(prompt="a red circle", negative_prompt="blurry", steps=3, guidance_scale=6.0, seed=3, sampler="Euler")


@pytest.fixture(scope="module")
def own_pipe(tiny_model_dir):
    """A pipeline of this module's own: the tests change its memory options (the session's `pipe` stays plain)."""
    return dapple.load(tiny_model_dir, device="cpu", dtype="fp32")


@pytest.fixture
def mem_pipe(own_pipe):
    yield own_pipe
    own_pipe.set_memory(None)


def pixels(pipe, **changes) -> np.ndarray:
    return pipe.generate(**{**RUN, **changes}).pixels.permute(0, 2, 3, 1).numpy()


def reference(reference_pipe, pipe, seeds, **kwargs) -> np.ndarray:
    reference_pipe.scheduler = create_scheduler("Euler", pipe.components.scheduler_config, seeds=seeds)
    return reference_pipe(prompt=RUN["prompt"], negative_prompt=RUN["negative_prompt"], num_inference_steps=3,
                          guidance_scale=6.0, num_images_per_prompt=len(seeds), output_type="np",
                          generator=[torch.Generator("cpu").manual_seed(seed) for seed in seeds], **kwargs).images


def decoder_batches(vae) -> tuple[list, object]:
    calls: list[tuple[int, ...]] = []
    handle = vae.decoder.register_forward_pre_hook(lambda module, args: calls.append(tuple(args[0].shape)))
    return calls, handle


# -- attention and VAE slicing: the same image, and diffusers' with the same option ----------------------------

def test_attention_slicing_gives_the_same_image_as_without_and_as_diffusers(mem_pipe, reference_pipe) -> None:
    plain = pixels(mem_pipe, batch_size=2)
    mem_pipe.set_memory(MemoryOptions(attention_slicing="max"))
    processors = set(map(type, mem_pipe.unet.attn_processors.values()))
    assert processors == {SlicedAttnProcessor}  # the option really took effect
    sliced = pixels(mem_pipe, batch_size=2)
    reference_pipe.enable_attention_slicing("max")
    try:
        theirs = reference(reference_pipe, mem_pipe, [3, 4])
    finally:
        reference_pipe.disable_attention_slicing()
    assert np.abs(sliced - plain).max() <= TOLERANCE
    assert np.abs(sliced - theirs).max() <= TOLERANCE
    mem_pipe.set_memory(None)  # off again: the processors the model had before
    assert SlicedAttnProcessor not in set(map(type, mem_pipe.unet.attn_processors.values()))


def test_vae_slicing_decodes_one_image_at_a_time_with_the_same_result(mem_pipe, reference_pipe) -> None:
    plain = pixels(mem_pipe, batch_size=3)
    mem_pipe.set_memory(MemoryOptions(vae_slicing=True))
    calls, handle = decoder_batches(mem_pipe.vae)
    try:
        sliced = pixels(mem_pipe, batch_size=3)
    finally:
        handle.remove()
    assert [shape[0] for shape in calls] == [1, 1, 1]
    reference_pipe.vae.enable_slicing()
    try:
        theirs = reference(reference_pipe, mem_pipe, [3, 4, 5])
    finally:
        reference_pipe.vae.disable_slicing()
    assert np.abs(sliced - plain).max() <= TOLERANCE
    assert np.abs(sliced - theirs).max() <= TOLERANCE


# -- VAE tiling ---------------------------------------------------------------------------------------------------

def test_vae_tiling_matches_diffusers_tiled_decode_over_several_tiles(mem_pipe) -> None:
    vae = mem_pipe.vae  # tiles of 64 px = 32 latents, overlapping by a quarter: 96 latents make 4 x 4 tiles
    latents = torch.randn((1, 4, 96, 96), generator=torch.Generator().manual_seed(0))
    scale = mem_pipe.components.latent_scaling_factor
    untiled = decode(vae, latents, scale)
    mem_pipe.set_memory(MemoryOptions(vae_tiling=True, vae_tile_norms="per-tile"))  # diffusers' plain tiling
    calls, handle = decoder_batches(vae)
    try:
        tiled = decode(vae, latents, scale)
    finally:
        handle.remove()
    assert len(calls) == 16 and {shape[-1] for shape in calls} <= {32, 24}
    with torch.no_grad():  # the oracle: diffusers' own tiled decode on the same VAE
        theirs = (vae.tiled_decode(latents / scale, return_dict=False)[0] / 2 + 0.5).clamp(0, 1)
    assert tiled.shape == untiled.shape == (1, 3, 192, 192)
    assert (tiled - theirs).abs().max() <= 1e-5
    assert (tiled - untiled).abs().max() > 1e-4  # tiles see only themselves: the image changes a little


def test_vae_tiling_in_a_run_matches_diffusers_pipeline_with_tiling(mem_pipe, reference_pipe) -> None:
    mem_pipe.set_memory({"vae_tiling": True, "vae_tile_norms": "per-tile"})
    ours = pixels(mem_pipe, width=192, height=128)
    reference_pipe.vae.enable_tiling()
    try:
        theirs = reference(reference_pipe, mem_pipe, [3], width=192, height=128)
    finally:
        reference_pipe.vae.disable_tiling()
    assert ours.shape == theirs.shape == (1, 128, 192, 3)
    assert np.abs(ours - theirs).max() <= TOLERANCE


def test_one_tile_equals_untiled_and_the_tile_size_is_an_option(mem_pipe) -> None:
    vae, scale = mem_pipe.vae, mem_pipe.components.latent_scaling_factor
    one_tile = torch.randn((2, 4, 32, 32), generator=torch.Generator().manual_seed(1))  # 64 px: one tile
    untiled = decode(vae, one_tile, scale)
    mem_pipe.set_memory(MemoryOptions(vae_tiling=True))
    assert torch.equal(decode(vae, one_tile, scale), untiled)
    mem_pipe.set_memory(MemoryOptions(vae_tiling=True, vae_tile_size=128))  # 64 latents, 48 apart
    calls, handle = decoder_batches(vae)
    try:
        decode(vae, torch.randn((1, 4, 96, 96)), scale)
    finally:
        handle.remove()
    # one decode of the latents scaled down to one tile (the shared norms' statistics), then 2 x 2 tiles
    assert [shape[-1] for shape in calls] == [64, 64, 48, 64, 48]
    mem_pipe.set_memory(None)
    assert vae.tile_latent_min_size == 32 and not vae.use_tiling  # back to the VAE's own


# -- offload: the stage lends the model and puts it back --------------------------------------------------------

class MoveRecorder(torch.nn.Linear):
    """A module that records where .to() sends it (on the CPU every device is the same one)."""

    def __init__(self) -> None:
        super().__init__(2, 2)
        self.moves: list[str] = []

    def to(self, *args, **kwargs):
        self.moves.append(str(args[0] if args else kwargs.get("device")))
        return self


def test_lent_moves_to_the_device_for_the_block_and_back_on_error_too() -> None:
    model = MoveRecorder()
    memory.offload_to_cpu(model, torch.device("cuda"))  # (no GPU needed: the recorder only records)
    assert model.moves == ["cpu"] and not on_device(model)
    with lent(model):
        assert on_device(model) and model.moves[-1] == "cuda"
        with lent(model, None):  # nested: moved once
            pass
        assert on_device(model) and model.moves == ["cpu", "cuda"]
    assert model.moves == ["cpu", "cuda", "cpu"] and not on_device(model)
    with pytest.raises(RuntimeError, match="boom"):
        with lent(model):
            raise RuntimeError("boom")
    assert model.moves[-2:] == ["cuda", "cpu"] and not on_device(model)
    plain = MoveRecorder()
    with lent(plain):  # not offloaded: left alone
        pass
    assert plain.moves == []
    memory.release(model)


def test_model_offload_lends_each_model_for_its_stage_only(mem_pipe) -> None:
    plain = pixels(mem_pipe)
    mem_pipe._memory.apply("medvram", offload_anywhere=True)  # on the CPU: rest and run on the CPU
    c = mem_pipe.components
    models = {"text_encoder": c.text_encoder, "unet": c.unet, "vae": c.vae}
    seen: dict[str, set] = {}
    handles = []
    for name, stage in (("text_encoder", c.text_encoder), ("unet", c.unet), ("vae", c.vae.decoder)):
        def record(module, args, name=name):
            seen.setdefault(name, set()).add(frozenset(key for key, model in models.items() if on_device(model)))
        handles.append(stage.register_forward_pre_hook(record))
    model = torch.nn.Linear(1, 1)
    lent_in_loop = []

    class UsesAModel(Extension):  # like a ControlNet unit: its model is lent with the UNet
        name = "uses a model"

        def __init__(self) -> None:
            self.model = mem_pipe._memory.adopt(model)

        def before_model(self, step, inputs) -> None:
            lent_in_loop.append(on_device(self.model))

    try:
        request = make_request(**RUN)
        offloaded = mem_pipe.run(request, extensions=[UsesAModel()]).pixels.permute(0, 2, 3, 1).numpy()
    finally:
        for handle in handles:
            handle.remove()
    assert seen == {"text_encoder": {frozenset({"text_encoder"})}, "unet": {frozenset({"unet"})},
                    "vae": {frozenset({"vae"})}}
    assert lent_in_loop == [True] * 3 and not on_device(model)
    assert not any(on_device(each) for each in models.values())  # all back at rest after the run
    assert mem_pipe.memory.offload == "model" and c.device == torch.device("cpu")
    assert np.abs(offloaded - plain).max() == 0


@pytest.mark.parametrize("offload", ["model", "sequential"])
def test_offload_covers_the_vae_inside_the_loop_and_hires_fix(inpaint_model_dir, offload) -> None:
    """An inpainting UNet's default channels encode a grey image inside the loop; a Lanczos hires pass decodes and
    encodes between the passes: under offload each finds its model on the device, and the image is unchanged."""
    pipe = dapple.load(inpaint_model_dir, device="cpu", dtype="fp32")
    run = {**RUN, "hires": {"scale": 1.5, "upscaler": "Lanczos", "steps": 2}}
    plain = pixels(pipe, **run)
    pipe._memory.apply(MemoryOptions(offload=offload), offload_anywhere=True)
    found: list[tuple[str, bool]] = []
    handles = [part.register_forward_pre_hook(lambda module, args, name=name: found.append((name, on_device(pipe.vae))))
               for name, part in (("encode", pipe.vae.encoder), ("decode", pipe.vae.decoder))]
    try:
        offloaded = pixels(pipe, **run)
    finally:
        for handle in handles:
            handle.remove()
    # grey image in the loop (base size, then hires size), the Lanczos round trip, the final decode
    assert [name for name, _ in found] == ["encode", "decode", "encode", "encode", "decode"]
    assert all(lent_now for _, lent_now in found)
    assert on_device(pipe.vae) is (offload == "sequential")  # (sequential: accelerate's hooks move the weights)
    assert np.abs(offloaded - plain).max() <= TOLERANCE
    pipe.set_memory(None)


def test_a_failing_stage_puts_its_model_back(mem_pipe) -> None:
    mem_pipe._memory.apply(MemoryOptions(offload="model"), offload_anywhere=True)
    unet = mem_pipe.unet

    def fail(module, args):
        assert on_device(unet)
        raise RuntimeError("a bug in the UNet")

    handle = unet.register_forward_pre_hook(fail)
    try:
        with pytest.raises(RuntimeError, match="a bug in the UNet"):
            mem_pipe.generate(**RUN)
    finally:
        handle.remove()
    assert not on_device(unet) and memory._HOMES[unet].holders == 0


def test_sequential_offload_streams_the_weights_and_gives_the_same_image(mem_pipe) -> None:
    plain = pixels(mem_pipe)
    mem_pipe._memory.apply("lowvram", offload_anywhere=True)
    assert next(mem_pipe.unet.parameters()).device.type == "meta"  # the weights live in accelerate's map
    assert memory.is_offloaded(mem_pipe.unet) == "sequential" and memory.is_offloaded(mem_pipe.text_encoder) == "model"
    assert np.abs(pixels(mem_pipe) - plain).max() <= TOLERANCE
    with pytest.raises(InvalidRequestError, match="medvram"):
        mem_pipe.generate(**{**RUN, "prompt": "a red circle <lora:style:0.8>"})
    mem_pipe.set_memory(None)
    assert next(mem_pipe.unet.parameters()).device.type == "cpu" and memory.is_offloaded(mem_pipe.unet) is None
    assert np.abs(pixels(mem_pipe) - plain).max() == 0


# -- options, presets and devices -------------------------------------------------------------------------------

def test_presets_on_the_cpu_keep_what_helps_there_and_say_what_they_leave_out() -> None:
    medvram, notes = plan("medvram", "cpu")
    assert medvram == MemoryOptions(vae_slicing=True, preset="medvram") and "no model offload" in notes[0]
    lowvram, notes = plan("lowvram", "cpu")
    assert (lowvram.offload, lowvram.slice_size, lowvram.vae_slicing, lowvram.vae_tiling) == (None, None, True, True)
    assert len(notes) == 2 and "attention slicing" in notes[1]
    assert plan("lowvram", "cuda") == (memory.PRESETS["lowvram"], [])
    assert plan(MemoryOptions(attention_slicing=True), "cpu")[0].slice_size == "auto"  # asked for: kept


@pytest.mark.parametrize(("value", "message"), [
    ("ultravram", "memory preset 'ultravram' is unknown; use one of none, medvram, lowvram"),
    ("medram", "did you mean 'medvram'?"),
    ({"offload": "gpu"}, "offload 'gpu' is invalid; use None (off), 'model' or 'sequential'"),
    ({"attention_slicing": 0}, "attention_slicing 0 is invalid"),
    ({"attention_slicing": "half"}, "attention_slicing 'half' is invalid"),
    ({"vae_tile_size": 50}, "vae_tile_size 50 is invalid; use None (the VAE's own) or a multiple of 8 pixels >= 64"),
    ({"vae_tiling": "yes"}, "vae_tiling must be True or False"),
    ({"tiling": True}, "memory option(s) 'tiling' unknown"),
    (MemoryOptions(offload="model"), "offload='model' moves models between CPU and GPU memory; this pipeline runs "
                                     "on cpu"),
    (42, "memory=42 is invalid"),
])
def test_bad_memory_options_are_clear_errors(value, message) -> None:
    with pytest.raises(InvalidRequestError) as raised:
        plan(value, "cpu")
    assert message in str(raised.value)


def test_load_takes_memory_and_settings_has_it(tiny_model_dir) -> None:
    pipe = dapple.load(tiny_model_dir, device="cpu", memory="lowvram")
    assert (pipe.memory.vae_slicing, pipe.memory.vae_tiling, pipe.memory.offload) == (True, True, None)
    assert pipe.vae.use_tiling and pipe.vae.use_slicing and len(pipe.memory_notes) == 2
    with pytest.raises(InvalidRequestError, match="offload='sequential'"):
        dapple.load(tiny_model_dir, device="cpu", memory={"offload": "sequential"})
    assert Settings(memory="medvram").memory == "medvram" and Settings().memory is None


# -- allocation failures --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("error", [
    torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
    RuntimeError("[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: not enough memory: you tried to "
                 "allocate 4294967296 bytes."),
    RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 4294967296 bytes."),
])
def test_an_allocation_failure_becomes_a_clear_error_and_the_pipeline_still_works(mem_pipe, error) -> None:
    def run_out(module, args):
        raise error

    handle = mem_pipe.vae.decoder.register_forward_pre_hook(run_out)
    try:
        with pytest.raises(NotEnoughMemoryError) as raised:
            mem_pipe.generate(**{**RUN, "width": 128, "height": 64})
    finally:
        handle.remove()
    message = str(raised.value)
    assert message.startswith("not enough CPU memory for txt2img at 128x64, batch 1 on cpu")
    assert "--vae-tiling (memory=MemoryOptions(vae_tiling=True))" in message and "smaller size or batch" in message
    assert pixels(mem_pipe).shape == (1, 64, 64, 3)


def test_other_errors_pass_unchanged_and_cuda_advice_names_the_presets(mem_pipe) -> None:
    def bug(module, args):
        raise RuntimeError("mat1 and mat2 shapes cannot be multiplied")

    handle = mem_pipe.unet.register_forward_pre_hook(bug)
    try:
        with pytest.raises(RuntimeError, match="shapes cannot be multiplied"):
            mem_pipe.generate(**RUN)
    finally:
        handle.remove()
    cuda = torch.device("cuda")
    plain = str(out_of_memory_error(torch.OutOfMemoryError("CUDA out of memory"), MemoryOptions(), cuda,
                                    batch_size=4))
    assert "not enough GPU memory" in plain and "--medvram (memory='medvram')" in plain and "--vae-slicing" in plain
    medvram = str(out_of_memory_error(MemoryError(), memory.PRESETS["medvram"], cuda))
    assert "--lowvram (memory='lowvram')" in medvram and "--medvram (" not in medvram
    assert "--lowvram" not in str(out_of_memory_error(MemoryError(), memory.PRESETS["lowvram"], cuda))


def test_a_job_that_runs_out_of_memory_fails_cleanly(tmp_path, mem_pipe) -> None:
    from dapple.service.jobs import JobService

    def wait_for(condition, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            assert time.monotonic() < deadline, "timed out"
            time.sleep(0.05)

    def run_out(module, args):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    fast = {"prompt": "a red circle", "steps": 2, "seed": 1}
    service = JobService(tmp_path / "data", lambda: mem_pipe, queue_size=3)
    handle = mem_pipe.unet.register_forward_pre_hook(run_out)
    try:
        failing = service.submit(fast)
        service.start()
        wait_for(lambda: service.get(failing.id).status in ("failed", "finished"))
    finally:
        handle.remove()
    try:
        job = service.get(failing.id)
        assert job.status == "failed" and job.error.startswith("not enough CPU memory") and "--vae-tiling" in job.error
        following = service.submit(fast)
        wait_for(lambda: service.get(following.id).status == "finished")
        assert [entry["job_id"] for entry in service.images()] == [following.id]
    finally:
        service.stop()


# -- the command line ----------------------------------------------------------------------------------------------

def test_memory_flags_make_the_option() -> None:
    assert memory_from_flags() is None
    assert memory_from_flags(medvram=True) == "medvram"
    assert memory_from_flags(lowvram=True, vae_tiling=True) == memory.PRESETS["lowvram"]
    assert memory_from_flags(vae_slicing=True, offload="Model") == MemoryOptions(vae_slicing=True, offload="model")
    assert memory_from_flags(attention_slicing=True).slice_size == "auto"
    assert memory_from_flags(vae_tiling=True, vae_tile_norms="Per-Tile") == MemoryOptions(vae_tiling=True,
                                                                                         vae_tile_norms="per-tile")


def test_cli_flags_reach_the_pipeline(tiny_model_dir, tmp_path, monkeypatch) -> None:
    runner = CliRunner()
    loaded = []
    real_load = dapple.load
    monkeypatch.setattr(dapple, "load", lambda *args, **kwargs: loaded.append(kwargs["memory"]) or
                        real_load(*args, **kwargs))
    base = ["generate", "a red circle", "--model", str(tiny_model_dir), "--out", str(tmp_path), "--steps", "1",
            "--device", "cpu"]
    result = runner.invoke(app, [*base, "--vae-slicing", "--vae-tiling", "--attention-slicing"])
    assert result.exit_code == 0, result.output
    assert loaded[-1] == MemoryOptions(attention_slicing=True, vae_slicing=True, vae_tiling=True)
    assert "memory: attention slicing, VAE slicing, VAE tiling" in result.stderr
    result = runner.invoke(app, [*base, "--medvram"])
    assert result.exit_code == 0 and loaded[-1] == "medvram"
    assert "memory: VAE slicing; medvram on cpu: no model offload" in result.stderr
    for flags, message in ((["--offload", "model"], "error: offload='model' moves models between CPU and GPU"),
                           (["--offload", "gpu"], "error: --offload 'gpu' is invalid; use model or sequential"),
                           (["--medvram", "--lowvram"], "error: --medvram and --lowvram are two presets")):
        result = runner.invoke(app, [*base, *flags])
        assert result.exit_code == 2 and result.stderr.strip().splitlines()[-1].startswith(message), result.output
    assert len(loaded) == 2  # refused before the model loads


def test_serve_takes_the_memory_flags(tiny_model_dir, tmp_path, monkeypatch) -> None:
    class Loaded(Exception):
        pass

    def load(*args, **kwargs):
        raise Loaded(kwargs["memory"])

    monkeypatch.setattr(dapple, "load", load)
    result = CliRunner().invoke(app, ["serve", "--model", str(tiny_model_dir), "--data-dir", str(tmp_path / "d"),
                                      "--device", "cpu", "--lowvram", "--vae-tiling"])
    assert isinstance(result.exception, Loaded) and result.exception.args[0] == memory.PRESETS["lowvram"]
