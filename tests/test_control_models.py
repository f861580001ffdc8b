"""Control-model loading and the library. The oracle for single files is diffusers' own reader
(ControlNetModel.from_single_file with a local config folder, offline): a ControlNet written in the original
(A1111 models/ControlNet) layout must load to the same weights in Dapple as in diffusers, and as the network it
was written from. Names, A1111's legacy hash, lookup, pickle refusal and the family check are tested on their own."""

from __future__ import annotations

import hashlib
import os
import pickle
from pathlib import Path

import pytest
import torch
from diffusers import ControlNetModel, T2IAdapter
from safetensors.torch import save_file

from control_fixtures import perturbed_controlnet, save, tiny_adapter
from dapple.errors import InvalidRequestError, ModelLoadError, PickleRefusedError
from dapple.models.control_models import (
    BUILTIN_CONTROLNET_DIR, ORIGINAL_PREFIX, check_fits, controlnet_key_pairs, find_control_model,
    legacy_model_hash, list_control_models, load_control_model,
)
from dapple.models.tiny import build_tiny_family_pipeline, build_tiny_pipeline, build_tiny_xl_pipeline

REAL_HINT = (16, 32, 96, 256)  # the hint encoder of every released ControlNet (diffusers' converter assumes it)


def original_layout(controlnet: ControlNetModel, prefix: str = ORIGINAL_PREFIX) -> dict[str, torch.Tensor]:
    """The ControlNet's tensors under original-layout names (what lllyasviel's files hold)."""
    state = controlnet.state_dict()
    tensors = {prefix + original: state[key].contiguous() for key, original in
               controlnet_key_pairs(controlnet.config, state)}
    assert len(tensors) == len(state)  # every tensor has a name
    return tensors


def assert_same_weights(a: torch.nn.Module, b: torch.nn.Module, skip: tuple[str, ...] = ()) -> None:
    first, second = a.state_dict(), b.state_dict()
    assert set(first) == set(second)
    different = [key for key in first if not key.startswith(skip) and not torch.equal(first[key], second[key])]
    assert not different, different[:5]


@pytest.fixture(scope="module")
def sd_controlnet(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cn-sd")
    controlnet = perturbed_controlnet(build_tiny_pipeline(0).unet, seed=1, hint_channels=REAL_HINT)
    return controlnet, save(controlnet, folder / "config")


@pytest.mark.parametrize("prefix", [ORIGINAL_PREFIX, ""])
def test_original_single_file_loads_as_diffusers_reads_it(sd_controlnet, tmp_path, prefix) -> None:
    controlnet, config = sd_controlnet
    tensors = original_layout(controlnet, prefix)
    # a few names exactly as control_v11p_sd15_canny.safetensors has them
    for name in ("input_blocks.1.0.in_layers.0.weight", "zero_convs.0.0.weight", "input_hint_block.14.weight",
                 "middle_block_out.0.bias", "middle_block.1.transformer_blocks.0.attn2.to_k.weight"):
        assert prefix + name in tensors
    path = tmp_path / "control_v11p_tiny_canny.safetensors"
    save_file(tensors, str(path))
    theirs = ControlNetModel.from_single_file(str(path), config=str(config), local_files_only=True)
    ours = load_control_model(path)
    assert_same_weights(theirs, ours)
    assert_same_weights(controlnet, ours)
    for key in ("block_out_channels", "layers_per_block", "cross_attention_dim", "attention_head_dim",
                "conditioning_embedding_out_channels", "down_block_types", "use_linear_projection"):
        assert list(ours.config[key]) == list(controlnet.config[key]) if isinstance(ours.config[key], (list, tuple)) \
            else ours.config[key] == controlnet.config[key], key


def test_a_full_checkpoint_with_a_controlnet_inside_loads_the_controlnet(sd_controlnet, tmp_path) -> None:
    """Old 'control_sd15_*.pth' files carry the whole SD model beside control_model.; only the latter is read."""
    controlnet, _ = sd_controlnet
    tensors = {**original_layout(controlnet), "model.diffusion_model.out.2.weight": torch.zeros(4, 32, 3, 3),
               "first_stage_model.encoder.conv_in.weight": torch.zeros(32, 3, 3, 3)}
    save_file(tensors, str(tmp_path / "full.safetensors"))
    assert_same_weights(controlnet, load_control_model(tmp_path / "full.safetensors"))


def test_sd2_style_controlnet_single_file(tmp_path) -> None:
    """SD 2.x ControlNets: linear projections and 64-channel attention heads, read off the shapes."""
    controlnet = perturbed_controlnet(build_tiny_family_pipeline("sd2", seed=3).unet, seed=2, hint_channels=REAL_HINT)
    config = save(controlnet, tmp_path / "config")
    save_file(original_layout(controlnet), str(tmp_path / "sd21.safetensors"))
    ours = load_control_model(tmp_path / "sd21.safetensors")
    theirs = ControlNetModel.from_single_file(str(tmp_path / "sd21.safetensors"), config=str(config),
                                              local_files_only=True)
    assert_same_weights(theirs, ours)
    assert ours.config.use_linear_projection and list(ours.config.attention_head_dim) == [1, 2]
    assert ours.config.upcast_attention  # as SD 2.1's UNet


def test_sdxl_controlnet_single_file(tmp_path) -> None:
    """SDXL ControlNets add the text-and-time embedding (label_emb). diffusers' ControlNet converter leaves that
    embedding out (it maps only its 'layers' table), so those four tensors are checked against diffusers' own
    DIFFUSERS_TO_LDM_MAPPING['controlnet']['addition_embed_type'] table and the rest against from_single_file."""
    from diffusers.loaders.single_file_utils import DIFFUSERS_TO_LDM_MAPPING

    unet = build_tiny_xl_pipeline(seed=2).unet
    controlnet = perturbed_controlnet(unet, seed=3, hint_channels=REAL_HINT)
    config = save(controlnet, tmp_path / "config")
    tensors = original_layout(controlnet)
    save_file(tensors, str(tmp_path / "xl.safetensors"))
    ours = load_control_model(tmp_path / "xl.safetensors", base=unet.config)
    assert ours.config.addition_embed_type == "text_time"
    assert ours.config.addition_time_embed_dim == unet.config.addition_time_embed_dim
    theirs = ControlNetModel.from_single_file(str(tmp_path / "xl.safetensors"), config=str(config),
                                              local_files_only=True, low_cpu_mem_usage=False)
    assert_same_weights(theirs, ours, skip=("add_embedding.",))
    for diffusers_key, original in DIFFUSERS_TO_LDM_MAPPING["controlnet"]["addition_embed_type"].items():
        assert torch.equal(ours.state_dict()[diffusers_key], tensors[ORIGINAL_PREFIX + original])
    assert_same_weights(controlnet, ours)


def test_diffusers_named_single_files(sd_controlnet, tmp_path) -> None:
    """ControlNets and T2I-Adapters shared as one file with diffusers' names (many SDXL ones are)."""
    controlnet, _ = sd_controlnet
    save_file({k: v.contiguous() for k, v in controlnet.state_dict().items()}, str(tmp_path / "cn.safetensors"))
    assert_same_weights(controlnet, load_control_model(tmp_path / "cn.safetensors"))
    unet = build_tiny_family_pipeline("sd1", seed=4).unet
    for light in (False, True):
        adapter = tiny_adapter(unet, seed=5, light=light, vae_factor=8)
        path = tmp_path / f"adapter-{light}.safetensors"
        save_file(dict(adapter.state_dict()), str(path))
        loaded = load_control_model(path)
        assert loaded.config.adapter_type == adapter.config.adapter_type
        assert_same_weights(adapter, loaded)
    xl_unet = build_tiny_xl_pipeline(seed=2).unet
    xl_adapter = tiny_adapter(xl_unet, seed=6, vae_factor=8)  # unshuffles by 16, as SDXL adapters do
    save_file(dict(xl_adapter.state_dict()), str(tmp_path / "xl-adapter.safetensors"))
    assert load_control_model(tmp_path / "xl-adapter.safetensors").config.adapter_type == "full_adapter_xl"


def test_tencentarc_original_adapter_layout(tmp_path) -> None:
    """TencentARC's t2iadapter files: a flat body of resnet blocks (full) or levels of them (light), renamed as
    diffusers' scripts/convert_original_t2i_adapter.py does (e.g. body.2.in_conv -> adapter.body.1.in_conv,
    body.3.block2 -> adapter.body.1.resnets.1.block2, light body.1.body.2.block1 -> adapter.body.1.resnets.2.block1)."""
    full = T2IAdapter(in_channels=3, channels=[32, 64, 128, 128], num_res_blocks=2, downscale_factor=8,
                      adapter_type="full_adapter")
    state = full.state_dict()
    original = {"conv_in.weight": state["adapter.conv_in.weight"], "conv_in.bias": state["adapter.conv_in.bias"]}
    for level in range(4):
        for block in range(2):
            for part in ("block1", "block2"):
                for kind in ("weight", "bias"):
                    original[f"body.{level * 2 + block}.{part}.{kind}"] = \
                        state[f"adapter.body.{level}.resnets.{block}.{part}.{kind}"]
        if f"adapter.body.{level}.in_conv.weight" in state:
            for kind in ("weight", "bias"):
                original[f"body.{level * 2}.in_conv.{kind}"] = state[f"adapter.body.{level}.in_conv.{kind}"]
    assert "body.2.in_conv.weight" in original and "body.6.in_conv.weight" not in original  # as the script expects
    save_file({k: v.contiguous() for k, v in original.items()}, str(tmp_path / "t2iadapter_tiny.safetensors"))
    assert_same_weights(full, load_control_model(tmp_path / "t2iadapter_tiny.safetensors"))

    light = T2IAdapter(in_channels=3, channels=[32, 64, 128], num_res_blocks=4, adapter_type="light_adapter")
    state = light.state_dict()
    original = {}
    for key, value in state.items():
        level, rest = key[len("adapter.body."):].split(".", 1)
        rest = rest.replace("resnets.", "body.", 1)
        original[f"body.{level}.{rest}"] = value.contiguous()
    assert "body.1.body.2.block1.weight" in original
    save_file(original, str(tmp_path / "t2iadapter_color.safetensors"))
    loaded = load_control_model(tmp_path / "t2iadapter_color.safetensors")
    assert loaded.config.adapter_type == "light_adapter"
    assert_same_weights(light, loaded)


class Boom:
    """A pickle that would create a file if it were ever unpickled by the unsafe loader."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_pickles_are_refused_and_never_executed(sd_controlnet, tmp_path) -> None:
    controlnet, _ = sd_controlnet
    safe = tmp_path / "plain.pth"
    torch.save(original_layout(controlnet), safe)
    with pytest.raises(PickleRefusedError, match="allow_pickle"):
        load_control_model(safe)
    assert_same_weights(controlnet, load_control_model(safe, allow_pickle=True))  # weights_only reads tensors
    marker = tmp_path / "executed"
    evil = tmp_path / "evil.pth"
    with open(evil, "wb") as handle:
        pickle.dump({"control_model.time_embed.0.weight": Boom(marker)}, handle, protocol=2)
    with pytest.raises(ModelLoadError, match="weights_only"):
        load_control_model(evil, allow_pickle=True)
    assert not marker.exists()


def test_legacy_hash_is_a1111s_model_hash(tmp_path) -> None:
    """sd-webui-controlnet names models 'name [hash]' with A1111's sd_models.model_hash: sha256 of the 64 KiB at
    offset 1 MiB, first 8 hex digits."""
    data = os.urandom(0x100000 + 0x18000)
    path = tmp_path / "big.safetensors"
    path.write_bytes(data)
    assert legacy_model_hash(path) == hashlib.sha256(data[0x100000:0x110000]).hexdigest()[:8]
    path.write_bytes(data[:1000])  # shorter than 1 MiB: nothing is read, as in A1111
    assert legacy_model_hash(path) == hashlib.sha256(b"").hexdigest()[:8]


@pytest.fixture(scope="module")
def library(tmp_path_factory, sd_controlnet):
    controlnet, _ = sd_controlnet
    root = tmp_path_factory.mktemp("models") / "ControlNet"
    root.mkdir()
    save_file(original_layout(controlnet), str(root / "control_v11p_sd15_canny.safetensors"))
    (root / "sub").mkdir()
    save_file(original_layout(controlnet), str(root / "sub" / "control_v11f1p_sd15_depth.safetensors"))
    save(controlnet, root / "diffusers-canny")  # a folder: listed by its name, its weight file not separately
    save(tiny_adapter(build_tiny_family_pipeline("sd1").unet, seed=1), root / "t2iadapter_sketch")
    (root / "notes.txt").write_text("not a model")
    save_file({"lora_up.weight": torch.zeros(2, 2)}, str(root / "some_lora.safetensors"))  # neither kind
    outside = tmp_path_factory.mktemp("outside")
    save_file(original_layout(controlnet), str(outside / "secret.safetensors"))
    (root / "escape.safetensors").symlink_to(outside / "secret.safetensors")
    return root


def test_list_control_models(library) -> None:
    entries = list_control_models([library])
    names = [entry.name for entry in entries if entry.name != "builtin-canny"]
    assert names == ["control_v11f1p_sd15_depth", "control_v11p_sd15_canny", "diffusers-canny", "t2iadapter_sketch"]
    kinds = {entry.name: entry.kind for entry in entries}
    assert kinds["t2iadapter_sketch"] == "t2i_adapter" and kinds["diffusers-canny"] == "controlnet"
    canny = next(entry for entry in entries if entry.name == "control_v11p_sd15_canny")
    data = canny.path.read_bytes()
    assert canny.short_hash == hashlib.sha256(data[0x100000:0x110000]).hexdigest()[:8]
    assert canny.title == f"control_v11p_sd15_canny [{canny.short_hash}]"
    assert list_control_models([library / "missing"]) == list_control_models([])


def test_builtin_controlnet_is_listed_when_it_ships() -> None:
    entries = list_control_models([])
    if not (BUILTIN_CONTROLNET_DIR / "config.json").is_file():
        assert entries == []
        pytest.skip("the built-in ControlNet is not shipped yet")
    assert entries[0].name == "builtin-canny" and entries[0].kind == "controlnet"
    assert find_control_model("builtin-canny").path == BUILTIN_CONTROLNET_DIR


def test_find_control_model_by_name_hash_case_and_part(library) -> None:
    canny = find_control_model("control_v11p_sd15_canny", [library])
    assert find_control_model(canny.title, [library]) == canny
    assert find_control_model("control_v11p_sd15_canny [00000000]", [library]) == canny  # a stale hash is ignored
    assert find_control_model("Control_V11P_SD15_Canny", [library]) == canny
    assert find_control_model("control_v11p_sd15_canny.safetensors", [library]) == canny
    assert find_control_model("sd15_depth", [library]).name == "control_v11f1p_sd15_depth"  # A1111: contains
    with pytest.raises(InvalidRequestError) as error:
        find_control_model("control_v11p_sd15_cany_x", [library])
    message = str(error.value)
    assert "control_v11p_sd15_canny" in message and "t2iadapter_sketch" in message
    assert "did you mean 'control_v11p_sd15_canny'?" in message
    with pytest.raises(InvalidRequestError, match="secret|escape"):  # the symlink out is not a model here
        find_control_model("escape", [library])


def test_control_models_must_fit_the_model_family(sd_controlnet) -> None:
    controlnet, _ = sd_controlnet
    xl_unet = build_tiny_xl_pipeline(seed=2).unet
    with pytest.raises(InvalidRequestError, match="ControlNet for cross-attention 32; this model is SDXL"):
        check_fits(controlnet, xl_unet.config, "tiny-sd")
    check_fits(controlnet, build_tiny_pipeline(0).unet.config, "tiny-sd")  # fits its own
    inpainting = build_tiny_pipeline(1, unet_in_channels=9).unet
    check_fits(controlnet, inpainting.config, "tiny-sd")  # an SD ControlNet drives an inpainting UNet too
    with pytest.raises(InvalidRequestError, match="takes 9 input channels; this model's latents have 4"):
        check_fits(ControlNetModel.from_unet(inpainting), inpainting.config, "made-from-inpainting")
    adapter = tiny_adapter(build_tiny_family_pipeline("sd1").unet, seed=1)
    with pytest.raises(InvalidRequestError, match="SD 1.x/2.x T2I-Adapter"):
        check_fits(adapter, xl_unet.config, "sketch")


def test_unreadable_and_foreign_files_have_clear_errors(tmp_path) -> None:
    (tmp_path / "broken.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ModelLoadError, match="not a readable .safetensors"):
        load_control_model(tmp_path / "broken.safetensors")
    save_file({"lora_up.weight": torch.zeros(2, 2)}, str(tmp_path / "lora.safetensors"))
    with pytest.raises(ModelLoadError, match="neither a ControlNet"):
        load_control_model(tmp_path / "lora.safetensors")
    (tmp_path / "folder").mkdir()
    (tmp_path / "folder" / "config.json").write_text('{"_class_name": "UNet2DConditionModel"}')
    with pytest.raises(ModelLoadError, match="ControlNetModel"):
        load_control_model(tmp_path / "folder")
