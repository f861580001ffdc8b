"""Single-file (A1111 / ComfyUI layout) SD 1.x and 2.x checkpoints load offline and draw what their diffusers
folders draw."""

from __future__ import annotations

import socket
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint
from safetensors.torch import load_file, save_file

import dapple
from dapple.errors import ModelLoadError, PickleRefusedError
from dapple.models.loader import load_components
from dapple.models.original_layout import (
    UNET_PREFIX, VAE_PREFIX, is_vae_attention_matrix, unet_key_pairs, vae_key_pairs,
)
from dapple.models.single_file import write_single_file
from dapple.models.tiny import build_tiny_family_pipeline
from dapple.samplers import create_scheduler

GENERATE = dict(prompt="a red circle", negative_prompt="blurry", steps=4, seed=5, guidance_scale=6.0,
                width=64, height=64, sampler="DPM++ 2M Karras")


def _make(root: Path, family: str, prediction_type: str = "epsilon") -> tuple[Path, Path]:
    """A tiny diffusers folder and the same weights as an original-layout single file."""
    folder = root / f"{family}-{prediction_type}"
    build_tiny_family_pipeline(family, seed=7, prediction_type=prediction_type).save_pretrained(
        str(folder), safe_serialization=True)
    components = load_components(folder, device="cpu")
    extra = None
    if family == "sd2":  # SD 2 files carry the OpenCLIP layer after the penultimate one that SD 2 reads
        last = components.text_encoder.config.num_hidden_layers
        extra = {key.replace("encoder.layers.0.", f"encoder.layers.{last}."): torch.randn_like(value)
                 for key, value in components.text_encoder.state_dict().items()
                 if key.startswith("encoder.layers.0.")}
    file = write_single_file(components, root / f"{family}-{prediction_type}.safetensors", family,
                             extra_text_layer=extra)
    return folder, file


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, tuple[Path, Path]]:
    root = tmp_path_factory.mktemp("single-file")
    return {"sd1": _make(root, "sd1"), "sd2": _make(root, "sd2"), "sd2-v": _make(root, "sd2", "v_prediction")}


@pytest.fixture
def offline(monkeypatch):
    """Any attempt to open a network connection fails the test."""
    def refuse(*args, **kwargs):
        raise AssertionError("a network connection was attempted")
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def _pixels(pipe) -> np.ndarray:
    return pipe.generate(**GENERATE).pixels.numpy()


@pytest.mark.parametrize("name", ["sd1", "sd2"])
def test_a_single_file_draws_exactly_what_its_diffusers_folder_draws(models, offline, name) -> None:
    folder, file = models[name]
    from_file = dapple.load(file, device="cpu", prediction_type="epsilon" if name == "sd2" else None)
    assert from_file.components.prediction_type == "epsilon"
    assert np.array_equal(_pixels(from_file), _pixels(dapple.load(folder, device="cpu")))


def test_sd2_v_prediction_from_a_sidecar_yaml_matches_diffusers(models, offline, tmp_path) -> None:
    folder, file = models["sd2-v"]
    file.with_suffix(".yaml").write_text('model:\n  params:\n    parameterization: "v"\n')
    pipe = dapple.load(file, device="cpu")
    assert pipe.components.prediction_type == "v_prediction"
    assert pipe.components.unet.config.sample_size == 96  # the 768 px models

    reference = StableDiffusionPipeline.from_pretrained(str(folder), local_files_only=True, safety_checker=None,
                                                        requires_safety_checker=False)
    reference.set_progress_bar_config(disable=True)
    reference.scheduler = create_scheduler(GENERATE["sampler"], pipe.components.scheduler_config, seeds=[5])
    theirs = reference(GENERATE["prompt"], negative_prompt=GENERATE["negative_prompt"], num_inference_steps=4,
                       guidance_scale=6.0, width=64, height=64, output_type="np",
                       generator=torch.Generator().manual_seed(5)).images
    ours = pipe.generate(**GENERATE).pixels.permute(0, 2, 3, 1).numpy()
    assert np.abs(ours - theirs).max() <= 1e-3
    # and the same weights read as epsilon draw something else: the setting matters
    eps = dapple.load(file, device="cpu", prediction_type="epsilon").generate(**GENERATE).pixels.permute(0, 2, 3, 1)
    assert np.abs(eps.numpy() - theirs).max() > 0.05


def test_a_v_pred_marker_tensor_selects_v_prediction(models, tmp_path) -> None:
    _, file = models["sd2-v"]
    tensors = load_file(str(file))
    tensors["v_pred"] = torch.zeros(())
    marked = tmp_path / "marked.safetensors"
    save_file(tensors, str(marked))
    assert dapple.load(marked, device="cpu").components.prediction_type == "v_prediction"


def test_the_cli_generates_from_a_single_file(models, tmp_path) -> None:
    from typer.testing import CliRunner

    from dapple.interfaces.cli import app

    result = CliRunner().invoke(app, ["generate", "a red circle", "--model", str(models["sd1"][1]), "--steps", "2",
                                      "--width", "64", "--height", "64", "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert list(tmp_path.glob("*.png"))


def test_an_unrecognised_file_is_an_error_naming_what_it_holds(tmp_path) -> None:
    lora_like = tmp_path / "lora.safetensors"
    save_file({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(4, 32)}, str(lora_like))
    with pytest.raises(ModelLoadError, match=r"found lora_unet_down_blocks_0_attentions_0_proj_in\. \(1\)"):
        dapple.load(lora_like, device="cpu")


def test_an_sdxl_refiner_file_is_refused_clearly(tmp_path) -> None:
    refiner = tmp_path / "refiner.safetensors"
    save_file({"conditioner.embedders.0.model.positional_embedding": torch.zeros(77, 8),
               "model.diffusion_model.input_blocks.0.0.weight": torch.zeros(8, 4, 3, 3)}, str(refiner))
    with pytest.raises(ModelLoadError, match="SDXL refiner"):
        dapple.load(refiner, device="cpu")


def test_a_pickle_checkpoint_needs_the_opt_in(models, tmp_path) -> None:
    _, file = models["sd1"]
    ckpt = tmp_path / "model.ckpt"
    torch.save({"state_dict": load_file(str(file))}, str(ckpt))
    with pytest.raises(PickleRefusedError, match="dapple convert"):
        dapple.load(ckpt, device="cpu")
    pipe = dapple.load(ckpt, device="cpu", allow_pickle=True)  # torch's weights_only loader
    assert np.array_equal(_pixels(pipe), _pixels(dapple.load(file, device="cpu")))


@pytest.mark.parametrize("architecture", ["sd15", "sdxl"])
def test_the_key_layout_agrees_with_diffusers_converter_at_full_size(architecture) -> None:
    """Every tensor of the real SD 1.5 and SDXL UNets and VAEs, named by Dapple's table, lands where diffusers'
    own single-file converter puts it (built on the meta device: no memory, no download)."""
    if architecture == "sd15":
        unet_config = dict(block_out_channels=(320, 640, 1280, 1280), layers_per_block=2, cross_attention_dim=768,
                           down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                           up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)
    else:
        unet_config = dict(block_out_channels=(320, 640, 1280), layers_per_block=2, cross_attention_dim=2048,
                           attention_head_dim=[5, 10, 20], transformer_layers_per_block=[1, 2, 10],
                           down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                           up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                           use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
                           projection_class_embeddings_input_dim=2816)
    with torch.device("meta"):
        unet = UNet2DConditionModel(**unet_config)
        vae = AutoencoderKL(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
                            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)
    for model, pairs_of, prefix, convert in ((unet, unet_key_pairs, UNET_PREFIX, convert_ldm_unet_checkpoint),
                                             (vae, vae_key_pairs, VAE_PREFIX, convert_ldm_vae_checkpoint)):
        state = model.state_dict()
        pairs = list(pairs_of(model.config, state))
        assert sorted(d for d, _ in pairs) == sorted(state)  # every tensor named once
        labels = {d: float(i) for i, (d, _) in enumerate(pairs)}
        original = {prefix + o: torch.full((1, 1, 1, 1) if is_vae_attention_matrix(o) else (1,), labels[d])
                    for d, o in pairs}
        converted = convert(original, dict(model.config))
        assert {k: float(v.flatten()[0]) for k, v in converted.items()} == labels


def test_a_swapped_vae_decodes_and_is_named_in_the_infotext(models, tmp_path) -> None:
    from dapple.infotext import parse_infotext
    from dapple.models.hashing import short_hash
    from dapple.models.single_file import write_vae_file

    folder, file = models["sd1"]
    own = dapple.load(folder, device="cpu")
    other_vae = build_tiny_family_pipeline("sd1", seed=99).vae  # same shapes, other weights
    vae_file = write_vae_file(other_vae, tmp_path / "other-vae.safetensors")
    swapped = dapple.load(folder, device="cpu", vae=vae_file)
    assert swapped.vae.config.scaling_factor == own.vae.config.scaling_factor
    for name, tensor in other_vae.state_dict().items():
        assert torch.equal(swapped.vae.state_dict()[name], tensor), name

    a, b = own.generate(**GENERATE), swapped.generate(**GENERATE)
    assert np.abs(a.pixels.numpy() - b.pixels.numpy()).max() > 0.05  # the VAE in use is the swapped one
    parameters = parse_infotext(b.infotexts[0])
    assert parameters["VAE"] == "other-vae.safetensors" and parameters["VAE hash"] == short_hash(vae_file)
    assert "VAE" not in parse_infotext(a.infotexts[0])

    from_single = dapple.load(folder, device="cpu", vae=file)  # a full checkpoint's VAE also serves
    assert np.array_equal(from_single.generate(**GENERATE).pixels.numpy(), a.pixels.numpy())
    with pytest.raises(ModelLoadError, match="no VAE tensors"):
        lora = tmp_path / "x.safetensors"
        save_file({"something.weight": torch.zeros(2)}, str(lora))
        dapple.load(folder, device="cpu", vae=lora)


def test_an_sdxl_single_file_draws_exactly_what_its_diffusers_folder_draws(tmp_path, offline) -> None:
    from dapple.models.tiny import build_tiny_xl_pipeline

    folder = tmp_path / "xl"
    build_tiny_xl_pipeline(seed=5).save_pretrained(str(folder), safe_serialization=True)
    file = write_single_file(load_components(folder, device="cpu"), tmp_path / "xl.safetensors", "sdxl")
    from_file = dapple.load(file, device="cpu")
    assert from_file.components.is_xl and from_file.components.latent_scaling_factor == 0.13025
    settings = dict(GENERATE, guidance_scale=5.0)
    assert np.array_equal(from_file.generate(**settings).pixels.numpy(),
                          dapple.load(folder, device="cpu").generate(**settings).pixels.numpy())
