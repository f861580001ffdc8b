"""LoRA: kohya and PEFT files, prompt syntax, exact removal, errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import dapple
from dapple.engine.prompt_syntax import extract_extra_networks
from dapple.errors import InvalidRequestError, ModelLoadError
from dapple.infotext import parse_infotext
from dapple.models.hashing import model_sha256

RANK = 4
# (kohya module path, diffusers/PEFT module path, in features, out features) of the tiny model's layers
BLOCK = "down_blocks.1.attentions.0.transformer_blocks.0"
UNET_LAYERS = [
    (f"{BLOCK}.attn1.to_q".replace(".", "_"), f"{BLOCK}.attn1.to_q", 64, 64),
    (f"{BLOCK}.attn2.to_k".replace(".", "_"), f"{BLOCK}.attn2.to_k", 32, 64),
    ("mid_block_attentions_0_proj_in", "mid_block.attentions.0.proj_in", 64, 64),
]
TEXT_LAYERS = [("text_model_encoder_layers_0_self_attn_q_proj", "text_model.encoder.layers.0.self_attn.q_proj", 32, 32)]
RUN = dict(steps=3, seed=4, guidance_scale=6.0, width=64, height=64)


def _factors(seed: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    factors = {}
    for kohya, _, fan_in, fan_out in UNET_LAYERS + TEXT_LAYERS:
        factors[kohya] = (torch.randn(RANK, fan_in, generator=generator) * 0.3,
                          torch.randn(fan_out, RANK, generator=generator) * 0.3)
    return factors


def _shape(tensor: torch.Tensor, kohya: str) -> torch.Tensor:
    """proj_in of SD 1.x is a 1x1 convolution: its factors are 4-D."""
    return tensor[:, :, None, None] if kohya.endswith("proj_in") else tensor


def write_kohya(path, factors, alpha: float = 2.0, ldm_names: bool = False) -> None:
    tensors = {}
    for kohya, _, _, _ in UNET_LAYERS + TEXT_LAYERS:
        prefix = "lora_te_" if kohya.startswith("text_model") else "lora_unet_"
        name = kohya
        if ldm_names and kohya == "mid_block_attentions_0_proj_in":
            name = "middle_block_1_proj_in"  # the original (ldm) name of the same layer
        down, up = factors[kohya]
        tensors[f"{prefix}{name}.lora_down.weight"] = _shape(down, kohya)
        tensors[f"{prefix}{name}.lora_up.weight"] = _shape(up, kohya)
        tensors[f"{prefix}{name}.alpha"] = torch.tensor(alpha)
    save_file(tensors, str(path))


def write_peft(folder, factors, alpha: float = 2.0) -> None:
    """diffusers' layout for the UNet part; the text encoder part under text_encoder.; alpha in adapter_config."""
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for kohya, module, _, _ in UNET_LAYERS + TEXT_LAYERS:
        prefix = "text_encoder." if kohya.startswith("text_model") else "unet."
        down, up = factors[kohya]
        tensors[f"{prefix}{module}.lora_A.weight"] = _shape(down, kohya)
        tensors[f"{prefix}{module}.lora_B.weight"] = _shape(up, kohya)
    save_file(tensors, str(folder / "peft_style.safetensors"))
    (folder / "adapter_config.json").write_text(json.dumps({"r": RANK, "lora_alpha": alpha}))


@pytest.fixture
def loras(tmp_path):
    kohya_dir, peft_dir = tmp_path / "Lora", tmp_path / "peft"
    kohya_dir.mkdir()
    write_kohya(kohya_dir / "kohya_style.safetensors", _factors(1))
    write_kohya(kohya_dir / "ldm_names.safetensors", _factors(1), ldm_names=True)
    write_kohya(kohya_dir / "other.safetensors", _factors(2), alpha=4.0)
    write_peft(peft_dir, _factors(1))
    return [kohya_dir, peft_dir]


@pytest.fixture
def lora_pipe(tiny_model_dir, loras) -> dapple.Pipeline:
    return dapple.load(tiny_model_dir, device="cpu", lora_dirs=loras)


def _pixels(pipe, prompt: str) -> np.ndarray:
    return pipe.generate(prompt, **RUN).pixels.numpy()


def test_kohya_and_peft_files_of_the_same_weights_draw_the_same_image(lora_pipe) -> None:
    plain = _pixels(lora_pipe, "a red circle")
    kohya = _pixels(lora_pipe, "a red circle <lora:kohya_style:0.8>")
    assert np.abs(kohya - plain).max() > 0.01  # the LoRA does something
    assert np.array_equal(_pixels(lora_pipe, "a red circle <lora:peft_style:0.8>"), kohya)
    assert np.array_equal(_pixels(lora_pipe, "a red circle <lora:ldm_names:0.8>"), kohya)


def test_weight_zero_and_no_lora_are_the_same_image(lora_pipe) -> None:
    plain = _pixels(lora_pipe, "a red circle")
    assert np.array_equal(_pixels(lora_pipe, "a red circle <lora:kohya_style:0>"), plain)


def test_the_merged_weight_is_w_plus_weight_times_alpha_over_rank_times_up_down(lora_pipe) -> None:
    module = lora_pipe.unet.get_submodule(UNET_LAYERS[0][1])
    before = module.weight.detach().clone()
    lora_pipe.generate("a red circle <lora:kohya_style:0.5>", **RUN)
    down, up = _factors(1)[UNET_LAYERS[0][0]]
    expected = before + 0.5 * (2.0 / RANK) * (up @ down)
    assert torch.allclose(module.weight, expected, atol=1e-6)


def test_a_hundred_apply_and_remove_cycles_leave_the_weights_bit_identical(lora_pipe) -> None:
    original = {name: tensor.clone() for name, tensor in lora_pipe.unet.state_dict().items()}
    original_text = {name: tensor.clone() for name, tensor in lora_pipe.text_encoder.state_dict().items()}
    prompts = ["<lora:kohya_style:0.7>", "<lora:other:1.3> <lora:peft_style:0.2>", "plain", "<lora:other:-0.4>"]
    for cycle in range(100):
        lora_pipe.apply_loras(extract_extra_networks(prompts[cycle % len(prompts)])[1])
    lora_pipe.apply_loras([])
    for name, tensor in lora_pipe.unet.state_dict().items():
        assert torch.equal(tensor, original[name]), name
    for name, tensor in lora_pipe.text_encoder.state_dict().items():
        assert torch.equal(tensor, original_text[name]), name


def test_several_loras_add_up_and_the_infotext_lists_their_hashes(lora_pipe, loras) -> None:
    result = lora_pipe.generate("a red circle <lora:kohya_style:0.5> <lora:other:0.25>", **RUN)
    parameters = parse_infotext(result.infotexts[0])
    first = model_sha256(loras[0] / "kohya_style.safetensors")[:12]
    second = model_sha256(loras[0] / "other.safetensors")[:12]
    assert parameters["Lora hashes"] == f"kohya_style: {first}, other: {second}"
    assert "<lora:kohya_style:0.5>" in result.infotexts[0]  # the prompt is recorded as written, as A1111 does
    # the next request without tags runs on the plain model again
    assert "Lora hashes" not in parse_infotext(lora_pipe.generate("a red circle", **RUN).infotexts[0])


def test_the_text_encoder_part_applies(lora_pipe) -> None:
    module = lora_pipe.text_encoder.get_submodule(TEXT_LAYERS[0][1].removeprefix("text_model."))
    before = module.weight.detach().clone()
    lora_pipe.apply_loras(extract_extra_networks("<lora:kohya_style:1>")[1])
    assert not torch.equal(module.weight, before)


def test_lora_errors_say_what_is_wrong(lora_pipe, tmp_path) -> None:
    with pytest.raises(ModelLoadError, match="no LoRA named 'missing'"):
        lora_pipe.generate("x <lora:missing:1>", **RUN)
    with pytest.raises(InvalidRequestError, match="not a LoRA name"):
        lora_pipe.generate("x <lora:../../etc/passwd:1>", **RUN)
    with pytest.raises(InvalidRequestError, match="not supported"):
        lora_pipe.generate("x <hypernet:thing:1>", **RUN)
    with pytest.raises(InvalidRequestError, match="not a number"):
        lora_pipe.generate("x <lora:kohya_style:strong>", **RUN)
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    save_file({"lora_unet_input_blocks_7_1_proj_in.lora_down.weight": torch.zeros(4, 1280),
               "lora_unet_input_blocks_7_1_proj_in.lora_up.weight": torch.zeros(1280, 4)},
              str(foreign / "sdxl_thing.safetensors"))
    lora_pipe.lora_dirs.append(foreign)
    with pytest.raises(ModelLoadError, match="match no layer of this model"):
        lora_pipe.generate("x <lora:sdxl_thing:1>", **RUN)


def test_a_symlink_out_of_the_lora_folder_is_refused(lora_pipe, loras, tmp_path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    write_kohya(outside / "secret.safetensors", _factors(3))
    (loras[0] / "secret.safetensors").symlink_to(outside / "secret.safetensors")
    with pytest.raises(ModelLoadError, match="links outside"):
        lora_pipe.generate("x <lora:secret:1>", **RUN)


def test_an_sdxl_lora_reaches_both_text_encoders_and_comes_off_exactly(tmp_path) -> None:
    from dapple.models.tiny import build_tiny_xl_pipeline

    folder = tmp_path / "xl"
    build_tiny_xl_pipeline(seed=1).save_pretrained(str(folder), safe_serialization=True)
    generator = torch.Generator().manual_seed(5)
    layers = {"lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q": 128,
              "lora_te1_text_model_encoder_layers_0_self_attn_q_proj": 64,
              "lora_te2_text_model_encoder_layers_0_self_attn_q_proj": 64}
    tensors = {}
    for name, width in layers.items():
        tensors[f"{name}.lora_down.weight"] = torch.randn(2, width, generator=generator)
        tensors[f"{name}.lora_up.weight"] = torch.randn(width, 2, generator=generator)
    (tmp_path / "Lora").mkdir()
    save_file(tensors, str(tmp_path / "Lora" / "xl_style.safetensors"))
    pipe = dapple.load(folder, device="cpu", lora_dirs=[tmp_path / "Lora"])
    second = pipe.components.text_encoder_2
    before = {name: tensor.clone() for name, tensor in second.state_dict().items()}
    plain = _pixels(pipe, "a red circle")
    styled = _pixels(pipe, "a red circle <lora:xl_style:1>")
    assert np.abs(styled - plain).max() > 0.01
    changed = [name for name, tensor in second.state_dict().items() if not torch.equal(tensor, before[name])]
    assert changed == ["text_model.encoder.layers.0.self_attn.q_proj.weight"]
    assert np.array_equal(_pixels(pipe, "a red circle"), plain)
    assert all(torch.equal(tensor, before[name]) for name, tensor in second.state_dict().items())
