"""The OpenVINO backend (dapple.models.openvino_backend) against its oracle, the torch UNet and VAE it was
converted from: in fp32 the two agree to float rounding (measured max |difference| ~2e-6 on the tiny model, in
the UNet's prediction and in a whole generation's pixels), so the tolerances below are 1e-4."""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import pytest
import torch

import dapple
from dapple.engine.extensions import Extension
from dapple.errors import InvalidRequestError, ModelLoadError
from dapple.infotext import parse_infotext
from dapple.models import openvino_backend
from dapple.models.openvino_backend import OpenVINOUNet, compile_unet

pytest.importorskip("openvino")

TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def ov_cache(hash_cache: Path) -> Path:
    """The default cache folder, $DAPPLE_CACHE_DIR/openvino (conftest points DAPPLE_CACHE_DIR at a temporary
    folder), so that the CLI tests reuse the conversion."""
    folder = openvino_backend.default_cache_dir()
    assert folder == hash_cache / "openvino"
    return folder


@pytest.fixture(scope="module")
def torch_pipe(tiny_model_dir: Path) -> dapple.Pipeline:
    return dapple.load(tiny_model_dir, device="cpu", dtype="fp32")


@pytest.fixture(scope="module")
def ov_pipe(tiny_model_dir: Path, ov_cache: Path) -> dapple.Pipeline:
    return dapple.load(tiny_model_dir, device="cpu", dtype="fp32", backend="openvino", openvino_cache_dir=ov_cache)


def test_the_unet_is_replaced_and_reports_what_the_engine_reads(ov_pipe, torch_pipe) -> None:
    unet = ov_pipe.unet
    assert isinstance(unet, OpenVINOUNet)
    assert unet.config == torch_pipe.unet.config
    assert unet.dtype == torch.float32 and unet.device == torch.device("cpu")
    assert unet.num_parameters() == torch_pipe.unet.num_parameters()
    assert ov_pipe.components.unet_kind == "standard" and ov_pipe.components.native_size == 64
    with pytest.raises(AttributeError, match='backend="torch"'):
        unet.up_blocks  # an extension that patches UNet blocks fails clearly, not silently


@pytest.mark.parametrize(("batch", "height", "width", "tokens"),
                         [(1, 32, 32, 77), (2, 32, 32, 77), (2, 9, 13, 77), (1, 16, 40, 154)])
def test_unet_prediction_matches_torch(ov_pipe, torch_pipe, batch, height, width, tokens) -> None:
    """One converted model serves batch 1 and 2, every size (odd latent sides too, where the upsamplers follow the
    skip connections' sizes) and long prompts (154 tokens)."""
    generator = torch.Generator().manual_seed(batch * 1000 + height)
    sample = torch.randn(batch, 4, height, width, generator=generator)
    states = torch.randn(batch, tokens, 32, generator=generator)
    for t in (torch.tensor(981), torch.tensor([321.5] * batch), 7):
        expected = torch_pipe.unet(sample, t, encoder_hidden_states=states, return_dict=False)[0]
        got = ov_pipe.unet(sample, t, encoder_hidden_states=states, return_dict=False)[0]
        assert got.shape == expected.shape
        assert (got - expected).abs().max() < TOLERANCE
        assert (got - expected).abs().max() < 1e-3 * expected.abs().max()
    assert torch.equal(ov_pipe.unet(sample, 7, encoder_hidden_states=states).sample, got)  # return_dict=True


@pytest.mark.parametrize(("width", "height", "batch"), [(64, 64, 1), (72, 88, 2)])
def test_generation_matches_torch(ov_pipe, torch_pipe, width, height, batch) -> None:
    """Whole runs, with guided (batch 2 per image) and unguided steps (the guidance interval) in each."""
    options = dict(width=width, height=height, batch_size=batch, steps=4, seed=5, guidance_min_timestep=500)
    expected = torch_pipe.generate("a red circle", **options)
    got = ov_pipe.generate("a red circle", **options)
    assert got.pixels.shape == (batch, 3, height, width)
    assert (got.pixels - expected.pixels).abs().max() < TOLERANCE
    assert "Backend: openvino" in got.infotexts[0] and "Backend" not in expected.infotexts[0]
    assert parse_infotext(got.infotexts[0])["Backend"] == "openvino"


def test_inpainting_model_takes_its_extra_channels(inpaint_model_dir, tmp_path) -> None:
    """A 9-channel UNet (latents, mask, masked-image latents): the channels the loop appends reach the graph."""
    from PIL import Image

    image, mask = Image.new("RGB", (64, 64), (200, 40, 40)), Image.new("L", (64, 64), 0)
    mask.paste(255, (16, 16, 48, 48))
    options = dict(steps=3, seed=2, strength=1.0)
    expected = dapple.load(inpaint_model_dir, device="cpu", dtype="fp32").inpaint(image, mask, "x", **options)
    ov = dapple.load(inpaint_model_dir, device="cpu", dtype="fp32", backend="openvino", openvino_cache_dir=tmp_path)
    assert ov.components.unet_kind == "inpainting"
    got = ov.inpaint(image, mask, "x", **options)
    assert (got.pixels - expected.pixels).abs().max() < TOLERANCE


def test_vae_tiling_decodes_on_the_torch_decoder(ov_pipe, torch_pipe) -> None:
    """With tiling on, the kept torch decoder tiles (bounded memory, as asked); the result is the torch one."""
    latents = torch.randn(1, 4, 40, 40, generator=torch.Generator().manual_seed(4))
    untiled = ov_pipe.vae.decode(latents).sample
    for vae in (ov_pipe.vae, torch_pipe.vae):
        vae.enable_tiling()
        vae.tile_sample_min_size, vae.tile_latent_min_size = 32, 16  # tiles smaller than the image
    try:
        expected = torch_pipe.vae.decode(latents).sample
        assert torch.equal(ov_pipe.vae.decode(latents).sample, expected)
        assert (expected - untiled).abs().max() > 1e-3  # it did tile
    finally:
        for vae in (ov_pipe.vae, torch_pipe.vae):
            vae.disable_tiling()


def test_vae_decoder_matches_torch_and_slicing(ov_pipe, torch_pipe) -> None:
    latents = torch.randn(2, 4, 11, 7, generator=torch.Generator().manual_seed(3))
    expected = torch_pipe.vae.decode(latents, return_dict=False)[0]
    got = ov_pipe.vae.decode(latents, return_dict=False)[0]
    assert got.shape == expected.shape == (2, 3, 22, 14)
    assert (got - expected).abs().max() < TOLERANCE
    ov_pipe.vae.enable_slicing()
    try:
        assert (ov_pipe.vae.decode(latents).sample - got).abs().max() < TOLERANCE
    finally:
        ov_pipe.vae.disable_slicing()


def test_a_second_load_reads_the_cache(tiny_model_dir, ov_cache, ov_pipe) -> None:
    entries = sorted(path.name for path in ov_cache.iterdir())
    assert [name.split("-f32-")[0] for name in entries] == ["unet", "vae-decoder"]
    assert all((ov_cache / name / "model.xml").is_file() for name in entries)
    before = openvino_backend.conversions
    again = dapple.load(tiny_model_dir, device="cpu", dtype="fp32", backend="openvino", openvino_cache_dir=ov_cache)
    assert openvino_backend.conversions == before  # nothing converted
    assert sorted(path.name for path in ov_cache.iterdir()) == entries
    assert again.unet.cache_key == ov_pipe.unet.cache_key
    sample, states = torch.randn(1, 4, 8, 8), torch.randn(1, 77, 32)
    assert torch.equal(again.unet(sample, 10, encoder_hidden_states=states).sample,
                       ov_pipe.unet(sample, 10, encoder_hidden_states=states).sample)


def test_the_torch_unet_is_freed_before_openvino_compiles(tiny_model_dir, ov_cache, ov_pipe, monkeypatch) -> None:
    """Peak memory: never the torch UNet and the compiled one at once (here on a cache hit)."""
    import weakref

    from dapple.models.loader import load_components

    components = load_components(tiny_model_dir, device="cpu", dtype="fp32")
    torch_unet = weakref.ref(components.unet)
    alive_at_compile = []
    compile_ = openvino_backend._compile
    monkeypatch.setattr(openvino_backend, "_compile",
                        lambda *args: (alive_at_compile.append(torch_unet() is not None), compile_(*args))[1])
    openvino_backend.use_openvino(components, cache_dir=ov_cache, threads=1)
    assert alive_at_compile == [False, False]  # the UNet's compile, then the decoder's
    assert isinstance(components.unet, OpenVINOUNet)


def test_the_cache_key_follows_weights_precision_and_dtype(torch_pipe) -> None:
    unet = torch_pipe.unet
    key = openvino_backend.cache_key("unet", unet, None, "f32")
    assert openvino_backend.cache_key("unet", unet, None, "f32") == key
    assert openvino_backend.cache_key("unet", unet, None, "bf16") != key
    assert openvino_backend.cache_key("unet", unet, None, "f32", {"xl": True}) != key
    weight = unet.conv_in.bias
    original = weight.detach().clone()
    with torch.no_grad():
        weight.add_(1e-3)  # any change of the weights is a new entry
    try:
        assert openvino_backend.cache_key("unet", unet, None, "f32") != key
    finally:
        with torch.no_grad():
            weight.copy_(original)


def test_a_bf16_pipeline_compiles_in_bf16(torch_pipe, tmp_path) -> None:
    """Precision follows the dtype; the result stays close to the torch bf16 UNet's."""
    unet = copy.deepcopy(torch_pipe.unet).to(torch.bfloat16)  # a copy: the fixture's weights stay fp32
    compiled = compile_unet(unet, source=None, xl=False, cache_dir=tmp_path, threads=1)
    assert "-bf16-" in compiled.cache_key and compiled.dtype == torch.bfloat16
    sample, states = torch.randn(2, 4, 16, 16), torch.randn(2, 77, 32)
    expected = unet(sample.bfloat16(), 500, encoder_hidden_states=states.bfloat16()).sample.float()
    got = compiled(sample.bfloat16(), 500, encoder_hidden_states=states.bfloat16()).sample.float()
    assert unet.dtype == torch.bfloat16  # the trace's fp32 copy went back to bf16
    assert (got - expected).norm() / expected.norm() < 0.05


def test_static_shapes_compile_per_shape_and_agree(torch_pipe, ov_pipe, ov_cache) -> None:
    before = openvino_backend.conversions
    static = compile_unet(torch_pipe.unet, source=str(torch_pipe.components.source), xl=False, cache_dir=ov_cache,
                          threads=1, static_shapes=True)
    assert openvino_backend.conversions == before and static.cache_key == ov_pipe.unet.cache_key  # same entry
    for batch, side in ((1, 8), (2, 8), (1, 12), (1, 8)):
        sample, states = torch.randn(batch, 4, side, side), torch.randn(batch, 77, 32)
        expected = torch_pipe.unet(sample, 300, encoder_hidden_states=states).sample
        assert (static(sample, 300, encoder_hidden_states=states).sample - expected).abs().max() < TOLERANCE
    assert len(static._static._requests) == 3  # one compiled model per shape seen


def test_a_unet_with_three_downsamplings_at_sizes_not_multiples_of_64_px(tmp_path) -> None:
    """SD's UNet halves the latents three times: a 520 px image (65 latents) needs the upsamplers to follow their
    skip connections, which the trace at an odd size records."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 32, 32, 32), layers_per_block=1, sample_size=8, cross_attention_dim=32,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D", "DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D", "UpBlock2D", "CrossAttnUpBlock2D"), norm_num_groups=8,
    ).eval()
    compiled = compile_unet(unet, source=None, xl=False, cache_dir=tmp_path, threads=1)
    for side in ((8, 8), (65, 63), (9, 24)):
        sample, states = torch.randn(2, 4, *side), torch.randn(2, 77, 32)
        expected = unet(sample, 500, encoder_hidden_states=states).sample
        assert (compiled(sample, 500, encoder_hidden_states=states).sample - expected).abs().max() < TOLERANCE


def test_sdxl_unet_with_added_conditioning(tmp_path) -> None:
    from dapple.models.tiny import build_tiny_xl_pipeline

    unet = build_tiny_xl_pipeline(seed=0).unet
    compiled = compile_unet(unet, source=None, xl=True, cache_dir=tmp_path, threads=1)
    generator = torch.Generator().manual_seed(0)
    for batch, side in ((1, 32), (2, 13)):
        sample = torch.randn(batch, 4, side, side, generator=generator)
        states = torch.randn(batch, 77, 128, generator=generator)
        added = {"text_embeds": torch.randn(batch, 64, generator=generator),
                 "time_ids": torch.tensor([[256.0, 256.0, 0.0, 0.0, 256.0, 256.0]] * batch)}
        expected = unet(sample, 500, encoder_hidden_states=states, added_cond_kwargs=added).sample
        got = compiled(sample, 500, encoder_hidden_states=states, added_cond_kwargs=added).sample
        assert (got - expected).abs().max() < TOLERANCE


class _PatchesUNet(Extension):
    name = "patches-unet"
    needs_torch_unet = True


def test_what_the_compiled_unet_cannot_run_is_refused(ov_pipe) -> None:
    """Refused before any step, each naming the torch backend; never a silent switch to torch."""
    with pytest.raises(InvalidRequestError, match='controls .*backend="torch"'):
        ov_pipe.generate("x", steps=1, controls=[{"model": "builtin-canny", "image": None}])
    with pytest.raises(InvalidRequestError, match='LoRA style .*backend="torch"'):
        ov_pipe.generate("x <lora:style:0.8>", steps=1)  # refused before the file is even looked for
    request = dapple.GenerationRequest(prompt="x", steps=1)
    with pytest.raises(InvalidRequestError, match="'patches-unet' patches the torch UNet"):
        ov_pipe.run(request, extensions=[_PatchesUNet()])
    for fields in ({"deep_cache_interval": 3}, {"token_merging_ratio": 0.5}):  # the built-in UNet patchers
        with pytest.raises(InvalidRequestError, match='patches the torch UNet.*backend="torch"'):
            ov_pipe.run(dapple.GenerationRequest(prompt="x", steps=1, **fields))
    with pytest.raises(InvalidRequestError, match="attention slicing"):
        ov_pipe.set_memory({"attention_slicing": True})
    sample, states = torch.randn(1, 4, 8, 8), torch.randn(1, 77, 32)
    with pytest.raises(InvalidRequestError, match="ControlNet residuals"):
        ov_pipe.unet(sample, 1, encoder_hidden_states=states, mid_block_additional_residual=torch.zeros(1))
    with pytest.raises(InvalidRequestError, match="cross_attention_kwargs"):
        ov_pipe.unet(sample, 1, encoder_hidden_states=states, cross_attention_kwargs={"scale": 0.5})
    assert ov_pipe.generate("x", steps=1).images  # and the pipeline still runs afterwards


def test_missing_openvino_says_how_to_install(tiny_model_dir, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "openvino", None)  # `import openvino` now raises ImportError
    with pytest.raises(ModelLoadError, match=r'pip install "dapple\[openvino\]"'):
        dapple.load(tiny_model_dir, device="cpu", backend="openvino")


def test_unknown_backend_lists_the_allowed_ones(tiny_model_dir) -> None:
    with pytest.raises(InvalidRequestError, match="'torch', 'openvino'"):
        dapple.load(tiny_model_dir, backend="onnx")


def test_cli_generate_with_the_openvino_backend(tiny_model_dir, ov_pipe, tmp_path) -> None:
    from typer.testing import CliRunner

    from dapple.interfaces.cli import app
    from dapple.service.outputs import read_infotext

    before = openvino_backend.conversions
    result = CliRunner().invoke(app, ["generate", "a red circle", "--model", str(tiny_model_dir), "--out",
                                      str(tmp_path), "--steps", "2", "--dtype", "fp32", "--backend", "openvino"])
    assert result.exit_code == 0, result.output
    assert openvino_backend.conversions == before  # the default cache folder served it
    image = next(tmp_path.glob("*.png"))
    assert parse_infotext(read_infotext(image))["Backend"] == "openvino"


@pytest.mark.parametrize(("args", "message"), [
    (["--backend", "onnx"], "backend 'onnx': allowed are 'torch', 'openvino'"),
    (["--backend", "openvino", "--control", "builtin-canny:{edges}"], "controls (ControlNet"),
    (["--backend", "openvino", "--steps", "1", "<lora:style:1>"], 'LoRA style would change'),
])
def test_cli_refuses_before_loading(args, message, tmp_path) -> None:
    from typer.testing import CliRunner

    from PIL import Image

    from dapple.interfaces.cli import app

    Image.new("RGB", (64, 64)).save(tmp_path / "edges.png")
    before = openvino_backend.conversions
    prompt = [arg for arg in args if arg.startswith("<")]
    options = [arg.format(edges=tmp_path / "edges.png") for arg in args if not arg.startswith("<")]
    result = CliRunner().invoke(app, ["generate", f"a cat {' '.join(prompt)}", "--model", str(tmp_path / "none"),
                                      "--out", str(tmp_path), *options])
    assert result.exit_code != 0
    assert message in result.output
    assert openvino_backend.conversions == before


def test_a1111_api_answers_what_the_backend_refuses_with_422(ov_pipe, tmp_path) -> None:
    """Over HTTP, a LoRA on the OpenVINO backend is the client's mistake (422 naming the torch backend), never a
    500; a plain request generates and records the backend."""
    from fastapi.testclient import TestClient

    from dapple.interfaces.server import create_app
    from dapple.service.jobs import JobService

    service = JobService(tmp_path / "data", lambda: ov_pipe, queue_size=2)
    service.start()
    try:
        with TestClient(create_app(service)) as client:
            refused = client.post("/sdapi/v1/txt2img", json={"prompt": "x <lora:style:1>", "steps": 1})
            assert refused.status_code == 422 and 'backend=\\"torch\\"' in refused.text
            done = client.post("/sdapi/v1/txt2img", json={"prompt": "x", "steps": 1, "width": 64, "height": 64})
            assert done.status_code == 200 and "Backend: openvino" in done.json()["info"]
    finally:
        service.stop()
