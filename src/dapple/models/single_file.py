"""Single-file checkpoints (the .safetensors files A1111 and ComfyUI users download), loaded fully offline.

diffusers' from_single_file fetches each architecture's config from the hub. Dapple needs no config at all: it
recognises the model family from the tensor names (which text encoder the file carries), reads every size it
needs from the tensor shapes, and renames the tensors with dapple.models.original_layout. What shapes cannot say
follows each family's published configs:

- SD 1.x: OpenAI CLIP ViT-L/14 text encoder (quick-GELU, 64-dim attention heads), UNet with 8 attention heads.
- SD 2.x: OpenCLIP ViT-H/14 text encoder (GELU), used up to its penultimate layer as SD 2 was trained, and the
  tokenizer padding with "!"; UNet attention heads of 64 dims with linear projections. SD 2.x comes as epsilon
  (512 px "base") and v-prediction (768 px) models; the file alone does not say which. In order: the caller's
  `prediction_type`, a `v_pred` marker tensor in the file, a sidecar FILE.yaml with `parameterization: "v"` (the
  A1111 convention), else A1111's test: one UNet call on a constant input at t=999, where v-models answer with a
  strongly negative mean (modules/sd_models_config.py, is_using_v_parameterization_for_sd2).
- The VAE: 32 normalisation groups, scaling factor 0.18215.
- SDXL: CLIP ViT-L (all layers; SDXL reads its penultimate states) and OpenCLIP ViT-bigG with its projection
  under conditioner.embedders.0/1, the added text-and-time embedding (its time-embedding width follows from
  the shapes), VAE scaling factor 0.13025, 1024 px. Refiner files are refused with a clear message.
"""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from dapple.errors import ModelLoadError
from dapple.files import normal_permissions
from dapple.models.components import Components
from dapple.models.devices import resolve_device, resolve_dtype
from dapple.models.precision import load_weights_into, vae_dtype
from dapple.models.original_layout import (
    CLIP_PREFIX, OPEN_CLIP_PREFIX, UNET_PREFIX, VAE_PREFIX, XL_CLIP_PREFIX, XL_OPEN_CLIP_PREFIX, diffusers_to_open_clip,
    bare_clip_key, is_vae_attention_matrix, open_clip_to_diffusers, unet_key_pairs, vae_key_pairs,
)
from dapple.models.tiny import SD15_SCHEDULER_CONFIG
from dapple.models.tokenizer import BUNDLED_TOKENIZER_DIR, bundled_clip_tokenizer

FAMILIES = ("sd1", "sd2", "sdxl")
XL_VAE_SCALING_FACTOR = 0.13025
XL_TIME_IDS = 6  # original size, crop corner, target size: two numbers each
CHECKPOINT_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth")
VAE_SCALING_FACTOR = 0.18215
ATTENTION_HEAD_CHANNELS = 64  # CLIP, OpenCLIP and the SD 2.x / XL UNets all use 64-dim heads
SD1_UNET_HEADS = 8


def detect_family(keys: set[str] | list[str]) -> str:
    """'sd1', 'sd2' or 'sdxl' from the tensor names, or a ModelLoadError that says what the file holds."""
    keys = set(keys)
    has_unet = any(key.startswith(UNET_PREFIX) for key in keys)
    if has_unet and any(key.startswith(XL_OPEN_CLIP_PREFIX) for key in keys):
        if any(key.startswith(XL_CLIP_PREFIX) for key in keys):
            return "sdxl"
    if any(key.startswith("conditioner.embedders.0.model.") for key in keys):
        raise ModelLoadError("this is an SDXL refiner checkpoint (one OpenCLIP text encoder); Dapple loads SD 1.x, "
                             "2.x and SDXL base models")
    if has_unet and any(key.startswith(CLIP_PREFIX) and key.endswith("embeddings.token_embedding.weight")
                        for key in keys):
        return "sd1"
    if has_unet and f"{OPEN_CLIP_PREFIX}token_embedding.weight" in keys:
        return "sd2"
    prefixes = Counter(key.split(".")[0] for key in keys)
    found = ", ".join(f"{name}. ({count})" for name, count in prefixes.most_common(6)) or "no tensors"
    raise ModelLoadError(
        "not a Stable Diffusion checkpoint Dapple recognises: expected a UNet under model.diffusion_model. with an "
        f"SD 1.x text encoder ({CLIP_PREFIX}...), an SD 2.x one ({OPEN_CLIP_PREFIX}...) or SDXL's two "
        f"({XL_CLIP_PREFIX}... and {XL_OPEN_CLIP_PREFIX}...); found {found}. "
        "A file holding only a VAE, a LoRA or an embedding is not a full model."
    )


# -- configs from shapes ----------------------------------------------------------------------------------------
def _indices(shapes: dict[str, tuple[int, ...]], pattern: str) -> list[int]:
    regex = re.compile(pattern)
    return sorted({int(m.group(1)) for key in shapes if (m := regex.match(key))})


def unet_config(shapes: dict[str, tuple[int, ...]], family: str, pooled_dim: int = 0) -> dict[str, Any]:
    """A UNet2DConditionModel config read off the original-layout UNet tensors (keys without UNET_PREFIX).
    pooled_dim: SDXL's pooled text embedding width (the second text encoder's projection)."""
    levels: list[dict[str, Any]] = [{"channels": [], "attention": False, "depth": 1}]
    for index in _indices(shapes, r"input_blocks\.(\d+)\.")[1:]:
        if f"input_blocks.{index}.0.op.weight" in shapes:  # a downsampler closes the level
            levels.append({"channels": [], "attention": False, "depth": 1})
            continue
        level = levels[-1]
        level["channels"].append(shapes[f"input_blocks.{index}.0.out_layers.3.weight"][0])
        if f"input_blocks.{index}.1.proj_in.weight" in shapes:
            level["attention"] = True
            level["depth"] = len(_indices(shapes, rf"input_blocks\.{index}\.1\.transformer_blocks\.(\d+)\."))
    per_block = {len(level["channels"]) for level in levels}
    if len(per_block) != 1:
        raise ModelLoadError(f"UNet levels have different numbers of blocks ({sorted(per_block)}); not an SD UNet")
    channels = [level["channels"][0] for level in levels]
    attention_key = next(key for key in shapes if key.endswith("attn2.to_k.weight"))
    proj_in = next(key for key in shapes if key.endswith(".proj_in.weight"))
    linear = len(shapes[proj_in]) == 2
    heads: int | list[int] = (SD1_UNET_HEADS if family == "sd1"
                              else [max(1, c // ATTENTION_HEAD_CHANNELS) for c in channels])
    depths = [level["depth"] for level in levels]
    extra: dict[str, Any] = {}
    if "label_emb.0.0.weight" in shapes:  # SDXL's added text-and-time conditioning
        added = shapes["label_emb.0.0.weight"][1]
        extra = {"addition_embed_type": "text_time", "projection_class_embeddings_input_dim": added,
                 "addition_time_embed_dim": (added - pooled_dim) // XL_TIME_IDS}
    return {
        **extra,
        "sample_size": 128 if family == "sdxl" else 64,
        "in_channels": shapes["input_blocks.0.0.weight"][1],
        "out_channels": shapes["out.2.weight"][0],
        "block_out_channels": channels,
        "layers_per_block": per_block.pop(),
        "down_block_types": ["CrossAttnDownBlock2D" if level["attention"] else "DownBlock2D" for level in levels],
        "up_block_types": ["CrossAttnUpBlock2D" if level["attention"] else "UpBlock2D" for level in reversed(levels)],
        "cross_attention_dim": shapes[attention_key][1],
        "attention_head_dim": heads,
        "use_linear_projection": linear,
        "transformer_layers_per_block": depths if len(set(depths)) > 1 else depths[0],
        # SD 2.1 overflows in fp16 attention without it (diffusers' SD 2.1 config sets it); a no-op in fp32
        "upcast_attention": family == "sd2",
    }


def vae_config(shapes: dict[str, tuple[int, ...]], scaling_factor: float = VAE_SCALING_FACTOR) -> dict[str, Any]:
    """An AutoencoderKL config read off the original-layout VAE tensors (keys without VAE_PREFIX)."""
    levels = _indices(shapes, r"encoder\.down\.(\d+)\.")
    return {
        "in_channels": shapes["encoder.conv_in.weight"][1],
        "out_channels": shapes["decoder.conv_out.weight"][0],
        "latent_channels": shapes["encoder.conv_out.weight"][0] // 2,
        "block_out_channels": [shapes[f"encoder.down.{level}.block.0.conv1.weight"][0] for level in levels],
        "layers_per_block": len(_indices(shapes, r"encoder\.down\.0\.block\.(\d+)\.")),
        "down_block_types": ["DownEncoderBlock2D"] * len(levels),
        "up_block_types": ["UpDecoderBlock2D"] * len(levels),
        "scaling_factor": scaling_factor,
        "sample_size": 512,
    }


def text_config(shapes: dict[str, tuple[int, ...]], family: str, tokenizer: CLIPTokenizer,
                open_clip: bool | None = None) -> CLIPTextConfig:
    """The text encoder's config from the shapes of its tensors (bare transformers names). SD 2.x keeps all but
    the last layer: it conditions on the penultimate layer's output (SDXL takes that layer's states itself)."""
    vocab, hidden = shapes["embeddings.token_embedding.weight"]
    layers = len(_indices(shapes, r"encoder\.layers\.(\d+)\."))
    open_clip = family == "sd2" if open_clip is None else open_clip
    projection = {"projection_dim": shapes["text_projection.weight"][0]} if "text_projection.weight" in shapes else {}
    return CLIPTextConfig(
        **projection,
        vocab_size=vocab, hidden_size=hidden,
        intermediate_size=shapes["encoder.layers.0.mlp.fc1.weight"][0],
        num_hidden_layers=layers - 1 if family == "sd2" else layers,
        num_attention_heads=max(1, hidden // ATTENTION_HEAD_CHANNELS),
        max_position_embeddings=shapes["embeddings.position_embedding.weight"][0],
        hidden_act="gelu" if open_clip else "quick_gelu",
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )


def family_tokenizer(family: str) -> CLIPTokenizer:
    """The CLIP BPE tokenizer; SD 2.x's pads with "!" (OpenCLIP's convention) instead of <|endoftext|>."""
    if family == "sd2":
        return CLIPTokenizer.from_pretrained(str(BUNDLED_TOKENIZER_DIR), local_files_only=True, pad_token="!")
    return bundled_clip_tokenizer()


# -- reading -------------------------------------------------------------------------------------------------------
def read_tensors(path: Path, allow_pickle: bool = False) -> dict[str, torch.Tensor]:
    """Every tensor of a .safetensors file; pickle checkpoints only with allow_pickle, via weights_only."""
    if path.suffix == ".safetensors":
        tensors = {}
        with safe_open(str(path), framework="pt") as handle:
            for key in handle.keys():
                tensors[key] = handle.get_tensor(key)
        return tensors
    if not allow_pickle:
        from dapple.errors import PickleRefusedError

        raise PickleRefusedError(
            f"{path}: a pickle checkpoint can run code when loaded, so Dapple refuses it by default. Convert it "
            "first with `dapple convert` (which never runs its code), or opt in with allow_pickle=True "
            "(--allow-pickle): torch's weights_only loader then reads it."
        )
    state = torch.load(str(path), map_location="cpu", weights_only=True)
    state = state.get("state_dict", state)
    return {key: value for key, value in state.items() if isinstance(value, torch.Tensor)}


def _sidecar_says_v(path: Path) -> bool:
    """A1111's convention: FILE.yaml beside FILE.safetensors, whose model params say parameterization: "v"."""
    sidecar = path.with_suffix(".yaml")
    pattern = re.compile(r"parameterization:\s*['\"]?v['\"]?\s*$", re.M)
    return sidecar.is_file() and pattern.search(sidecar.read_text()) is not None


@torch.no_grad()
def _a1111_v_test(unet: UNet2DConditionModel) -> bool:
    """A1111's detector: v-models map a constant 0.5 input at t=999 to an output far below it."""
    sample = torch.full((1, unet.config.in_channels, 8, 8), 0.5, dtype=unet.dtype, device=unet.device)
    context = torch.full((1, 2, unet.config.cross_attention_dim), 0.5, dtype=unet.dtype, device=unet.device)
    output = unet(sample, torch.tensor([999], device=unet.device), encoder_hidden_states=context).sample
    return (output - sample).mean().item() < -1


def load_single_file(
    path: str | Path,
    *,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    allow_pickle: bool = False,
    prediction_type: str | None = None,
) -> Components:
    """Load an original-layout SD 1.x / 2.x / XL checkpoint file offline into the engine's Components."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise ModelLoadError(f"checkpoint file {path} does not exist")
    if prediction_type not in (None, "epsilon", "v_prediction"):
        raise ModelLoadError(f"prediction_type {prediction_type!r}: allowed are 'epsilon' and 'v_prediction'")
    tensors = read_tensors(path, allow_pickle)
    family = detect_family(tensors)
    torch_device = resolve_device(device)
    unet_parameters = sum(tensor.numel() for key, tensor in tensors.items()
                          if key.startswith(UNET_PREFIX) and tensor.is_floating_point())
    torch_dtype = resolve_dtype(dtype, torch_device, unet_parameters)

    tokenizer = family_tokenizer(family)
    text_encoder, text_encoder_2, tokenizer_2 = _text_encoders(tensors, family, tokenizer, path)
    pooled_dim = text_encoder_2.config.projection_dim if text_encoder_2 is not None else 0
    unet_tensors = {k[len(UNET_PREFIX):]: v for k, v in tensors.items() if k.startswith(UNET_PREFIX)}
    unet = UNet2DConditionModel(**unet_config({k: tuple(v.shape) for k, v in unet_tensors.items()}, family,
                                              pooled_dim))
    _load_renamed(unet, {d: o for d, o in unet_key_pairs(unet.config, unet.state_dict())}, unet_tensors, "UNet")

    vae_tensors = {k[len(VAE_PREFIX):]: v for k, v in tensors.items() if k.startswith(VAE_PREFIX)}
    if not vae_tensors:
        raise ModelLoadError(f"{path}: no VAE tensors under {VAE_PREFIX}; Dapple needs the VAE inside the file")
    scaling = XL_VAE_SCALING_FACTOR if family == "sdxl" else VAE_SCALING_FACTOR
    vae = AutoencoderKL(**vae_config({k: tuple(v.shape) for k, v in vae_tensors.items()}, scaling))
    vae_tensors = {k: v.flatten(1) if is_vae_attention_matrix(k) else v for k, v in vae_tensors.items()}
    _load_renamed(vae, {d: o for d, o in vae_key_pairs(vae.config, vae.state_dict())}, vae_tensors, "VAE")

    if prediction_type is None:
        if "v_pred" in tensors or _sidecar_says_v(path):
            prediction_type = "v_prediction"
        elif family == "sd2":
            prediction_type = "v_prediction" if _a1111_v_test(unet.float()) else "epsilon"
        else:
            prediction_type = "epsilon"
    if prediction_type == "v_prediction":
        unet.register_to_config(sample_size=96)  # SD 2.x v-models are the 768 px ones

    # The VAE, and a reduced-precision UNet on the CPU, get channels-last weights (see models/loader._load_part).
    unet = load_weights_into(unet, [], torch_dtype, channels_last=torch_device.type == "cpu" and
                             torch_dtype != torch.float32)
    vae = load_weights_into(vae, [], vae_dtype(torch_dtype, torch_device, bool(vae.config.force_upcast)),
                            channels_last=True)
    models = [model.to(torch_device).eval().requires_grad_(False) if model is not None else None
              for model in (text_encoder.to(torch_dtype), unet, vae,
                            text_encoder_2.to(torch_dtype) if text_encoder_2 is not None else None)]
    return Components(
        tokenizer=tokenizer, text_encoder=models[0], unet=models[1], vae=models[2],
        tokenizer_2=tokenizer_2, text_encoder_2=models[3],
        scheduler_config={**SD15_SCHEDULER_CONFIG, "prediction_type": prediction_type},
        name=path.stem, source=str(path),
    )


def _text_encoder(text_tensors: dict[str, torch.Tensor], config: CLIPTextConfig, path: Path,
                  with_projection: bool = False) -> torch.nn.Module:
    from transformers import CLIPTextModelWithProjection

    encoder = (CLIPTextModelWithProjection if with_projection else CLIPTextModel)(config)
    wanted = {bare_clip_key(key): key for key in encoder.state_dict() if not key.endswith("position_ids")}
    missing = [bare for bare in wanted if bare not in text_tensors]
    if missing:
        raise ModelLoadError(f"{path}: a text encoder lacks {len(missing)} tensors, e.g. {missing[0]}")
    encoder.load_state_dict({key: text_tensors[bare] for bare, key in wanted.items()}, strict=False)
    return encoder


def _text_encoders(tensors: dict[str, torch.Tensor], family: str, tokenizer: CLIPTokenizer, path: Path):
    """(text encoder, SDXL's second one or None, SDXL's second tokenizer or None)."""
    def shapes(group: dict[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
        return {k: tuple(v.shape) for k, v in group.items()}

    if family == "sd2":
        group = open_clip_to_diffusers(tensors, OPEN_CLIP_PREFIX)
        return _text_encoder(group, text_config(shapes(group), family, tokenizer), path), None, None
    prefix = XL_CLIP_PREFIX if family == "sdxl" else CLIP_PREFIX
    group = {bare_clip_key(k[len(prefix):]): v for k, v in tensors.items() if k.startswith(prefix)}
    group.pop("text_projection.weight", None)
    first = _text_encoder(group, text_config(shapes(group), family, tokenizer, open_clip=False), path)
    if family != "sdxl":
        return first, None, None
    tokenizer_2 = family_tokenizer("sd2")  # the same BPE, padding with "!"
    group = open_clip_to_diffusers(tensors, XL_OPEN_CLIP_PREFIX)
    config = text_config(shapes(group), "sdxl", tokenizer_2, open_clip=True)
    return first, _text_encoder(group, config, path, with_projection=True), tokenizer_2


def _load_renamed(module: torch.nn.Module, pairs: dict[str, str], tensors: dict[str, torch.Tensor], what: str) -> None:
    missing = [original for original in pairs.values() if original not in tensors]
    if missing:
        raise ModelLoadError(f"the {what} lacks {len(missing)} tensors the shapes imply, e.g. {missing[0]}")
    state = {diffusers_key: tensors[original] for diffusers_key, original in pairs.items()}
    wrong = [k for k, v in module.state_dict().items() if k in state and tuple(state[k].shape) != tuple(v.shape)]
    if wrong:
        raise ModelLoadError(f"the {what} tensor {pairs[wrong[0]]} has shape {tuple(state[wrong[0]].shape)}, "
                             f"expected {tuple(module.state_dict()[wrong[0]].shape)}")
    module.load_state_dict(state, strict=True)


# -- writing ------------------------------------------------------------------------------------------------------
def write_single_file(components: Components, out: str | Path, family: str,
                      extra_text_layer: dict[str, torch.Tensor] | None = None) -> Path:
    """Write components in the original single-file layout (what A1111 reads), as safetensors.

    SD 2.x files carry one more text-encoder layer than SD 2 conditions on; extra_text_layer gives its tensors
    (names under encoder.layers.N, N = the encoder's layer count)."""
    if family not in FAMILIES:
        raise ValueError(f"family {family!r}: allowed are {', '.join(FAMILIES)}")
    tensors: dict[str, torch.Tensor] = {}
    unet_state = components.unet.state_dict()
    for diffusers_key, original in unet_key_pairs(components.unet.config, unet_state):
        tensors[UNET_PREFIX + original] = unet_state[diffusers_key]
    vae_state = components.vae.state_dict()
    for diffusers_key, original in vae_key_pairs(components.vae.config, vae_state):
        tensor = vae_state[diffusers_key]
        tensors[VAE_PREFIX + original] = tensor[:, :, None, None] if is_vae_attention_matrix(original) else tensor
    text_state = {bare_clip_key(k): v for k, v in components.text_encoder.state_dict().items()
                  if not k.endswith("position_ids")}
    if family in ("sd1", "sdxl"):  # the layout of SD 1.5 and later files: transformers names under text_model.
        prefix = XL_CLIP_PREFIX if family == "sdxl" else CLIP_PREFIX
        tensors.update({f"{prefix}text_model.{key}": value for key, value in text_state.items()})
    if family == "sdxl":
        second = {bare_clip_key(k): v for k, v in components.text_encoder_2.state_dict().items()
                  if not k.endswith("position_ids")}
        tensors.update(diffusers_to_open_clip(second, XL_OPEN_CLIP_PREFIX))
    elif family == "sd2":
        if "text_projection.weight" not in text_state:  # OpenCLIP always has one; CLIPTextModel drops it
            hidden = components.text_encoder.config.hidden_size
            text_state["text_projection.weight"] = torch.eye(hidden)
        tensors.update(diffusers_to_open_clip({**text_state, **(extra_text_layer or {})}, OPEN_CLIP_PREFIX))
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(out))
    return normal_permissions(out)  # safetensors' temporary file would leave 0600


# -- VAE swap -------------------------------------------------------------------------------------------------------
def load_vae(path: str | Path, *, scaling_factor: float, allow_pickle: bool = False) -> AutoencoderKL:
    """A VAE other than the checkpoint's (A1111's models/VAE): an original-layout file (as A1111 and ComfyUI
    keep them, keys with or without first_stage_model.), a full single-file checkpoint (its VAE is taken),
    a diffusers AutoencoderKL folder, or a diffusers model folder (its vae/). The scaling factor stays the
    model's: SD 1.x and 2.x VAEs share 0.18215, and it belongs to the diffusion model's training."""
    path = Path(path).expanduser()
    if path.is_dir():
        folder = path / "vae" if (path / "vae" / "config.json").is_file() else path
        if not (folder / "config.json").is_file():
            raise ModelLoadError(f"{path}: not a VAE: expected a .safetensors file or a folder with config.json")
        vae = AutoencoderKL.from_pretrained(str(folder), local_files_only=True)
    elif path.is_file() and path.suffix.lower() in CHECKPOINT_SUFFIXES:
        tensors = read_tensors(path, allow_pickle)
        if any(key.startswith(VAE_PREFIX) for key in tensors):
            tensors = {k[len(VAE_PREFIX):]: v for k, v in tensors.items() if k.startswith(VAE_PREFIX)}
        if "encoder.conv_in.weight" not in tensors or "decoder.conv_out.weight" not in tensors:
            raise ModelLoadError(f"{path}: no VAE tensors (encoder.*, decoder.*) in the original layout")
        vae = AutoencoderKL(**vae_config({k: tuple(v.shape) for k, v in tensors.items()}))
        tensors = {k: v.flatten(1) if is_vae_attention_matrix(k) else v for k, v in tensors.items()}
        _load_renamed(vae, dict(vae_key_pairs(vae.config, vae.state_dict())), tensors, "VAE")
    else:
        raise ModelLoadError(f"VAE {path} does not exist or is not a .safetensors / .ckpt file or a folder")
    vae.register_to_config(scaling_factor=scaling_factor)
    return vae


def write_vae_file(vae: AutoencoderKL, out: str | Path) -> Path:
    """A VAE as a standalone original-layout .safetensors file (the form A1111's models/VAE holds)."""
    state = vae.state_dict()
    tensors = {}
    for diffusers_key, original in vae_key_pairs(vae.config, state):
        tensor = state[diffusers_key]
        tensors[original] = tensor[:, :, None, None] if is_vae_attention_matrix(original) else tensor
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(out))
    return Path(out)
