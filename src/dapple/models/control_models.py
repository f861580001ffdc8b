"""Control models: ControlNets (Zhang, Rao & Agrawala, 2023, "Adding Conditional Control to Text-to-Image
Diffusion Models") and T2I-Adapters (Mou et al., 2023, "T2I-Adapter: Learning Adapters to Dig out More
Controllable Ability for Text-to-Image Diffusion Models"): finding them by name and loading them offline.

Where they come from:
- diffusers folders (config.json whose _class_name is ControlNetModel, ControlNetUnionModel or T2IAdapter);
- single .safetensors files as A1111 users keep them in models/ControlNet: the original ControlNet layout
  (`control_model.input_blocks...`, `control_model.zero_convs...`, `control_model.input_hint_block...`, with or
  without the `control_model.` prefix), the same network with diffusers' names, TencentARC's original T2I-Adapter
  layout (`conv_in`, `body.N.block1`; light: `body.N.body.M.block1`), or a T2I-Adapter with diffusers' names.
  The config is read off the tensor shapes (SD 1.x, 2.x and SDXL), as dapple.models.single_file does for
  checkpoints, and the tensors are renamed with the pairing table of dapple.models.original_layout.
- the built-in "builtin-canny" ControlNet shipped in assets/builtin_controlnet/.

Pickle files (.pth/.ckpt/.pt/.bin) are never unpickled unless the caller allows it, and then only through
torch's weights_only loader.

Names follow sd-webui-controlnet: the file name without extension (a folder by its name), shown as
"name [hash]" where hash is A1111's legacy model hash (sha256 of 64 KiB at offset 1 MiB, first 8 hex digits:
modules/sd_models.py model_hash, which the extension's model list prints). A name is looked up only among the
listed entries, so a name from a web request never reaches a file outside the folders.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from dapple.errors import InvalidRequestError, ModelLoadError, PickleRefusedError, did_you_mean
from dapple.models.original_layout import unet_key_pairs

BUILTIN_CONTROLNET_DIR = Path(__file__).parent / "assets" / "builtin_controlnet"
BUILTIN_CONTROLNET_NAME = "builtin-canny"
CONTROL_SUFFIXES = (".safetensors", ".pth", ".ckpt", ".pt", ".bin")  # sd-webui-controlnet's CN_MODEL_EXTS + .bin
PICKLE_SUFFIXES = (".pth", ".ckpt", ".pt", ".bin")
KINDS = ("controlnet", "t2i_adapter")
ORIGINAL_PREFIX = "control_model."
CONTROLNET_CLASSES = ("ControlNetModel", "ControlNetUnionModel")
ADAPTER_CLASSES = ("T2IAdapter",)
SDXL_TIME_EMBED_DIM = 256  # SDXL's addition_time_embed_dim (no tensor has it; the base UNet's config says it)
LEGACY_HASH_LENGTH = 8


@dataclass(frozen=True)
class ControlModelEntry:
    """One control model in the folders: its name, where it is, what it is and its A1111 short hash."""

    name: str
    path: Path
    kind: str  # "controlnet" or "t2i_adapter"
    short_hash: str

    @property
    def title(self) -> str:
        """"name [hash]", as sd-webui-controlnet lists models and writes them into infotext."""
        return f"{self.name} [{self.short_hash}]"


# -- hashes ----------------------------------------------------------------------------------------------------------
def weight_file(path: Path) -> Path:
    """The file whose bytes name a model: the file itself, or a diffusers folder's weight file."""
    if path.is_file():
        return path
    for name in ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin"):
        if (path / name).is_file():
            return path / name
    found = sorted(path.glob("*.safetensors")) or sorted(path.glob("*.bin"))
    if not found:
        raise ModelLoadError(f"{path}: no weight file (diffusion_pytorch_model.safetensors) in the folder")
    return found[0]


def legacy_model_hash(path: str | Path) -> str:
    """A1111's old model hash, which sd-webui-controlnet shows after each model's name: sha256 of the 64 KiB at
    offset 1 MiB (a file shorter than that hashes what is there, possibly nothing), first 8 hex digits."""
    with open(weight_file(Path(path)), "rb") as handle:
        handle.seek(0x100000)
        return hashlib.sha256(handle.read(0x10000)).hexdigest()[:LEGACY_HASH_LENGTH]


# -- what a path holds -----------------------------------------------------------------------------------------------
def _folder_class(folder: Path) -> str | None:
    try:
        return str(json.loads((folder / "config.json").read_text()).get("_class_name"))
    except (OSError, ValueError, AttributeError):
        return None


def _safetensors_keys(path: Path) -> list[str]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:  # reads the header only
            return list(handle.keys())
    except Exception as error:  # safetensors raises its own error types for damaged headers
        raise ModelLoadError(f"{path}: not a readable .safetensors file ({error})") from None


def kind_of_keys(keys: Iterable[str]) -> str | None:
    """"controlnet", "t2i_adapter" or None (neither) from a weight file's tensor names."""
    keys = list(keys)
    if any("input_hint_block." in key or key.startswith("controlnet_cond_embedding.") for key in keys):
        return "controlnet"
    if any(key.startswith("adapter.") for key in keys) or _is_original_adapter(keys):
        return "t2i_adapter"
    return None


def _is_original_adapter(keys: Iterable[str]) -> bool:
    keys = set(keys)
    return any(re.match(r"body\.\d+\.(block1|body\.\d+\.block1)\.weight$", key) for key in keys) and \
        not any(key.startswith(("input_blocks.", "down_blocks.", "model.")) for key in keys)


def control_kind(path: Path) -> str | None:
    """What a file or folder in a control-model folder holds, read cheaply (a folder's config, a safetensors
    header; a pickle file is never opened for this, its name decides)."""
    if path.is_dir():
        class_name = _folder_class(path)
        if class_name in CONTROLNET_CLASSES:
            return "controlnet"
        if class_name in ADAPTER_CLASSES or class_name == "MultiAdapter":
            return "t2i_adapter"
        return None
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        try:
            return kind_of_keys(_safetensors_keys(path))
        except ModelLoadError:
            return None
    if suffix in PICKLE_SUFFIXES:
        # sd-webui-controlnet lists every file of these types; T2I-Adapters are named t2iadapter_*.pth
        return "t2i_adapter" if "adapter" in path.name.lower() else "controlnet"
    return None


# -- the library ------------------------------------------------------------------------------------------------------
def _entry(name: str, path: Path, kind: str) -> ControlModelEntry | None:
    try:
        return ControlModelEntry(name, path, kind, legacy_model_hash(path))
    except (OSError, ModelLoadError):
        return None  # unreadable: not listed


def list_control_models(dirs: Sequence[str | Path] = ()) -> list[ControlModelEntry]:
    """The built-in ControlNet (once it ships) and every control model in `dirs` (searched recursively, as
    sd-webui-controlnet does), each name once: the first folder wins, and nothing takes the built-in's name."""
    entries: dict[str, ControlModelEntry] = {}
    if (BUILTIN_CONTROLNET_DIR / "config.json").is_file():
        builtin = _entry(BUILTIN_CONTROLNET_NAME, BUILTIN_CONTROLNET_DIR, "controlnet")
        if builtin is not None:
            entries[BUILTIN_CONTROLNET_NAME.lower()] = builtin
    for folder in dirs:
        root = Path(folder).expanduser()
        if not root.is_dir():
            continue
        resolved_root = root.resolve()
        found: list[ControlModelEntry] = []
        for path in [root, *sorted(root.rglob("*"))]:
            if not path.resolve().is_relative_to(resolved_root):
                continue  # a symlink out of the folder is never listed
            if path.is_file() and (path.parent / "config.json").is_file():
                continue  # the weights inside a diffusers folder (listed as the folder)
            if path.is_file() and path.suffix.lower() not in CONTROL_SUFFIXES:
                continue
            kind = control_kind(path)
            if kind is None:
                continue
            entry = _entry(path.stem if path.is_file() else path.name, path, kind)
            if entry is not None:
                found.append(entry)
        for entry in sorted(found, key=lambda e: e.name.lower()):
            entries.setdefault(entry.name.lower(), entry)
    return sorted(entries.values(), key=lambda e: (e.name != BUILTIN_CONTROLNET_NAME, e.name.lower()))


def strip_hash(name: str) -> str:
    """A model name without A1111's " [hash]" suffix."""
    name = name.strip()
    if name.endswith("]") and " [" in name:
        name = name[: name.rindex(" [")]
    return name


def find_control_model(name: str, dirs: Sequence[str | Path] = ()) -> ControlModelEntry:
    """The control model called `name` ("name", "name [hash]" or its file name), as sd-webui-controlnet's
    find_closest_lora_model_name looks it up: exactly, then ignoring case, then the shortest name that contains
    it. An unknown name is an InvalidRequestError that lists the models (and the nearest one)."""
    entries = list_control_models(dirs)
    wanted = strip_hash(name)
    folded = wanted.casefold()
    for test in (lambda e: e.name == wanted or e.path.name == wanted,
                 lambda e: e.name.casefold() == folded or e.path.name.casefold() == folded):
        for entry in entries:
            if test(entry):
                return entry
    containing = sorted((e for e in entries if folded and folded in e.name.casefold()), key=lambda e: len(e.name))
    if containing:
        return containing[0]
    names = [entry.name for entry in entries]
    listing = ", ".join(names[:30]) + (f" and {len(names) - 30} more" if len(names) > 30 else "")
    where = ", ".join(str(Path(d)) for d in dirs) or "no control-model folders are configured (control_dirs)"
    raise InvalidRequestError(f"no control model named {wanted!r} (looked in: {where}); available: "
                              f"{listing or 'none'}{did_you_mean(wanted, names)}")


# -- reading weights -------------------------------------------------------------------------------------------------
def read_weights(path: Path, allow_pickle: bool = False) -> dict[str, torch.Tensor]:
    """Every tensor of a weight file; pickle files only with allow_pickle, through torch's weights_only loader."""
    if path.suffix.lower() == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as error:
            raise ModelLoadError(f"{path}: not a readable .safetensors file ({error})") from None
    if not allow_pickle:
        raise PickleRefusedError(
            f"{path}: a pickle file ({path.suffix}) can run code when loaded, so Dapple refuses it by default; use "
            "the model's .safetensors file, or opt in with allow_pickle=True (--allow-pickle), which reads it with "
            "torch's weights_only loader"
        )
    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as error:
        raise ModelLoadError(f"{path}: torch's weights_only loader refused or failed to read it ({error})") from None
    if isinstance(state, Mapping) and isinstance(state.get("state_dict"), Mapping):
        state = state["state_dict"]
    return {key: value for key, value in state.items() if isinstance(value, torch.Tensor)}


def _indices(keys: Iterable[str], pattern: str) -> list[int]:
    regex = re.compile(pattern)
    return sorted({int(m.group(1)) for key in keys if (m := regex.match(key))})


def _family(shapes: Mapping[str, tuple[int, ...]], linear: bool, xl: bool) -> str:
    if xl:
        return "sdxl"
    return "sd2" if linear else "sd1"


def _heads(family: str, channels: Sequence[int]) -> int | list[int]:
    """Attention heads (shapes do not show them): SD 1.x uses 8, SD 2.x and XL 64-channel heads."""
    return 8 if family == "sd1" else [max(1, c // 64) for c in channels]


def _added_embedding(shapes: Mapping[str, tuple[int, ...]], key: str,
                     base: Mapping[str, Any] | None) -> dict[str, Any]:
    if key not in shapes:
        return {}
    time_dim = (base or {}).get("addition_time_embed_dim") or SDXL_TIME_EMBED_DIM
    return {"addition_embed_type": "text_time", "projection_class_embeddings_input_dim": shapes[key][1],
            "addition_time_embed_dim": int(time_dim)}


def original_controlnet_config(shapes: Mapping[str, tuple[int, ...]], base: Mapping[str, Any] | None = None
                               ) -> dict[str, Any]:
    """A ControlNetModel config read off an original-layout ControlNet's tensor shapes (keys without the
    control_model. prefix). base: the UNet config the ControlNet will drive, for what no tensor shows (SDXL's
    time-embedding width)."""
    levels: list[dict[str, Any]] = [{"channels": [], "attention": False, "depth": 1}]
    for index in _indices(shapes, r"input_blocks\.(\d+)\.")[1:]:
        if f"input_blocks.{index}.0.op.weight" in shapes:
            levels.append({"channels": [], "attention": False, "depth": 1})
            continue
        level = levels[-1]
        level["channels"].append(shapes[f"input_blocks.{index}.0.out_layers.3.weight"][0])
        if f"input_blocks.{index}.1.proj_in.weight" in shapes:
            level["attention"] = True
            level["depth"] = len(_indices(shapes, rf"input_blocks\.{index}\.1\.transformer_blocks\.(\d+)\."))
    per_block = {len(level["channels"]) for level in levels}
    if len(per_block) != 1 or not levels[0]["channels"]:
        raise ModelLoadError("the ControlNet's input blocks do not form equal levels; not an SD ControlNet")
    if "middle_block.1.proj_in.weight" not in shapes:
        raise ModelLoadError("the ControlNet has no attention in its middle block; Dapple loads ControlNets "
                             "whose middle block is resnet-attention-resnet (SD 1.x, 2.x, XL)")
    channels = [level["channels"][0] for level in levels]
    hint = _indices(shapes, r"input_hint_block\.(\d+)\.weight")
    embedding = [shapes[f"input_hint_block.{index}.weight"][0] for index in hint[:-1:2]]
    proj_in = next(key for key in shapes if key.endswith(".proj_in.weight"))
    linear = len(shapes[proj_in]) == 2
    added = _added_embedding(shapes, "label_emb.0.0.weight", base)
    family = _family(shapes, linear, bool(added))
    depths = [level["depth"] for level in levels]
    mid_depth = len(_indices(shapes, r"middle_block\.1\.transformer_blocks\.(\d+)\."))
    if mid_depth != depths[-1]:
        raise ModelLoadError(f"the ControlNet's middle block has {mid_depth} transformer layers and its last level "
                             f"{depths[-1]}; diffusers' ControlNetModel needs them equal")
    return {
        **added,
        "in_channels": shapes["input_blocks.0.0.weight"][1],
        "conditioning_channels": shapes[f"input_hint_block.{hint[0]}.weight"][1],
        "conditioning_embedding_out_channels": embedding,
        "block_out_channels": channels,
        "layers_per_block": per_block.pop(),
        "down_block_types": ["CrossAttnDownBlock2D" if level["attention"] else "DownBlock2D" for level in levels],
        "cross_attention_dim": shapes[next(k for k in shapes if k.endswith("attn2.to_k.weight"))][1],
        "attention_head_dim": _heads(family, channels),
        "use_linear_projection": linear,
        "transformer_layers_per_block": depths if len(set(depths)) > 1 else depths[0],
        "upcast_attention": family == "sd2",  # as SD 2.1's UNet (a no-op in fp32)
    }


def diffusers_controlnet_config(shapes: Mapping[str, tuple[int, ...]], base: Mapping[str, Any] | None = None
                                ) -> dict[str, Any]:
    """A ControlNetModel config read off a ControlNet's tensor shapes in diffusers' names (a single file saved
    from a diffusers ControlNetModel, as many SDXL ControlNets are shared)."""
    levels = _indices(shapes, r"down_blocks\.(\d+)\.")
    channels = [shapes[f"down_blocks.{level}.resnets.0.conv2.weight"][0] for level in levels]
    attention = [f"down_blocks.{level}.attentions.0.proj_in.weight" in shapes for level in levels]
    depths = [len(_indices(shapes, rf"down_blocks\.{level}\.attentions\.0\.transformer_blocks\.(\d+)\.")) or 1
              for level in levels]
    blocks = _indices(shapes, r"controlnet_cond_embedding\.blocks\.(\d+)\.weight")
    embedding = [shapes["controlnet_cond_embedding.conv_in.weight"][0],
                 *(shapes[f"controlnet_cond_embedding.blocks.{b}.weight"][0] for b in blocks[1::2])]
    proj_in = next(key for key in shapes if key.endswith(".proj_in.weight"))
    linear = len(shapes[proj_in]) == 2
    added = _added_embedding(shapes, "add_embedding.linear_1.weight", base)
    family = _family(shapes, linear, bool(added))
    if "mid_block.attentions.0.proj_in.weight" not in shapes:
        raise ModelLoadError("the ControlNet has no attention in its middle block; Dapple loads ControlNets "
                             "whose middle block is resnet-attention-resnet (SD 1.x, 2.x, XL)")
    return {
        **added,
        "in_channels": shapes["conv_in.weight"][1],
        "conditioning_channels": shapes["controlnet_cond_embedding.conv_in.weight"][1],
        "conditioning_embedding_out_channels": embedding,
        "block_out_channels": channels,
        "layers_per_block": len(_indices(shapes, r"down_blocks\.0\.resnets\.(\d+)\.")),
        "down_block_types": ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attention],
        "cross_attention_dim": shapes[next(k for k in shapes if k.endswith("attn2.to_k.weight"))][1],
        "attention_head_dim": _heads(family, channels),
        "use_linear_projection": linear,
        "transformer_layers_per_block": depths if len(set(depths)) > 1 else depths[0],
        "upcast_attention": family == "sd2",
    }


def controlnet_key_pairs(config: Mapping[str, Any], state: Mapping[str, Any]) -> list[tuple[str, str]]:
    """(diffusers key, original key without control_model.) for every tensor of a ControlNetModel: the UNet's
    encoder half as in original_layout.unet_key_pairs, the zero convolutions and the hint encoder."""
    pairs = [(d, o) for d, o in unet_key_pairs(config, state)]
    blocks = _indices(state, r"controlnet_cond_embedding\.blocks\.(\d+)\.weight")
    hint = {"controlnet_cond_embedding.conv_in": 0,
            **{f"controlnet_cond_embedding.blocks.{b}": 2 * (b + 1) for b in blocks},
            "controlnet_cond_embedding.conv_out": 2 * (len(blocks) + 1)}
    for diffusers_name, index in hint.items():
        pairs += [(f"{diffusers_name}.{kind}", f"input_hint_block.{index}.{kind}") for kind in ("weight", "bias")]
    for index in _indices(state, r"controlnet_down_blocks\.(\d+)\.weight"):
        pairs += [(f"controlnet_down_blocks.{index}.{kind}", f"zero_convs.{index}.0.{kind}")
                  for kind in ("weight", "bias")]
    pairs += [(f"controlnet_mid_block.{kind}", f"middle_block_out.0.{kind}") for kind in ("weight", "bias")]
    return pairs


def _load_state(module: torch.nn.Module, state: Mapping[str, torch.Tensor], what: str) -> None:
    expected = module.state_dict()
    missing = [key for key in expected if key not in state]
    unexpected = [key for key in state if key not in expected]
    if missing or unexpected:
        detail = f"lacks {len(missing)} tensors, e.g. {missing[0]}" if missing else \
            f"has {len(unexpected)} tensors the shapes do not explain, e.g. {unexpected[0]}"
        raise ModelLoadError(f"{what} {detail}")
    wrong = [key for key, value in expected.items() if tuple(state[key].shape) != tuple(value.shape)]
    if wrong:
        raise ModelLoadError(f"{what}: tensor {wrong[0]} has shape {tuple(state[wrong[0]].shape)}, expected "
                             f"{tuple(expected[wrong[0]].shape)}")
    module.load_state_dict(dict(state), strict=True)


def _sidecar_global_pool(path: Path) -> bool:
    """ControlNet 1.1 shuffle's FILE.yaml says global_average_pooling: True (sd-webui-controlnet reads it)."""
    sidecar = path.with_suffix(".yaml")
    return sidecar.is_file() and re.search(r"global_average_pooling:\s*[Tt]rue", sidecar.read_text()) is not None


def controlnet_from_tensors(tensors: Mapping[str, torch.Tensor], base: Mapping[str, Any] | None = None,
                            what: str = "the ControlNet", global_pool: bool = False):
    """A diffusers ControlNetModel from a single file's tensors, in the original layout (with or without the
    control_model. prefix; a full checkpoint's other tensors are ignored) or with diffusers' names."""
    from diffusers import ControlNetModel

    if any(key.startswith(("task_embedding", "control_add_embedding", "transformer_layes")) for key in tensors):
        raise ModelLoadError(f"{what} is a ControlNet union model; load it from its diffusers folder (config.json "
                             "with ControlNetUnionModel), which says which control types it knows")
    if "controlnet_cond_embedding.conv_in.weight" in tensors:  # diffusers' names
        config = diffusers_controlnet_config({k: tuple(v.shape) for k, v in tensors.items()}, base)
        model = ControlNetModel(**config, global_pool_conditions=global_pool)
        _load_state(model, tensors, what)
        return model
    if any(key.startswith(ORIGINAL_PREFIX) for key in tensors):
        tensors = {k[len(ORIGINAL_PREFIX):]: v for k, v in tensors.items() if k.startswith(ORIGINAL_PREFIX)}
    if "input_hint_block.0.weight" not in tensors or "time_embed.0.weight" not in tensors:
        raise ModelLoadError(f"{what} is not a ControlNet in the original layout (no input_hint_block / "
                             "time_embed tensors)")
    if any(key.startswith(("output_blocks.", "out.")) for key in tensors):
        raise ModelLoadError(f"{what} has a UNet decoder under control_model.; not a ControlNet Dapple knows")
    config = original_controlnet_config({k: tuple(v.shape) for k, v in tensors.items()}, base)
    model = ControlNetModel(**config, global_pool_conditions=global_pool)
    pairs = controlnet_key_pairs(model.config, model.state_dict())
    missing = [original for _, original in pairs if original not in tensors]
    if missing:
        raise ModelLoadError(f"{what} lacks {len(missing)} tensors its shapes imply, e.g. {missing[0]}")
    _load_state(model, {diffusers_key: tensors[original] for diffusers_key, original in pairs}, what)
    return model


def adapter_from_tensors(tensors: Mapping[str, torch.Tensor], what: str = "the T2I-Adapter"):
    """A diffusers T2IAdapter from a single file's tensors: diffusers' names (adapter.*) or TencentARC's
    original layout (full: conv_in, body.N.block1 with N = level * blocks + block; light: body.N.in_conv,
    body.N.body.M.block1, body.N.out_conv), renamed as diffusers' scripts/convert_original_t2i_adapter.py does."""
    from diffusers import T2IAdapter

    if not any(key.startswith("adapter.") for key in tensors):
        tensors = _original_adapter_to_diffusers(tensors, what)
    bare = {k[len("adapter."):]: tuple(v.shape) for k, v in tensors.items() if k.startswith("adapter.")}
    levels = _indices(bare, r"body\.(\d+)\.")
    blocks = len(_indices(bare, r"body\.0\.resnets\.(\d+)\."))
    if "conv_in.weight" in bare:  # full adapter: pixel-unshuffle, conv_in, then levels of resnets
        unshuffled = bare["conv_in.weight"][1]
        # TencentARC's adapters take RGB (3) or one channel (sketch, canny); unshuffle by 8 (SD) or 16 (SDXL)
        factor, in_channels = next(((f, c) for f in (8, 16) for c in (3, 1) if c * f * f == unshuffled),
                                   (8, unshuffled // 64))
        channels = [bare[f"body.{level}.resnets.0.block1.weight"][0] for level in levels]
        config = {"in_channels": in_channels, "channels": channels, "num_res_blocks": blocks,
                  "downscale_factor": factor, "adapter_type": "full_adapter_xl" if factor == 16 else "full_adapter"}
    elif "body.0.in_conv.weight" in bare and "body.0.out_conv.weight" in bare:  # light adapter
        channels = [bare[f"body.{level}.out_conv.weight"][0] for level in levels[:-1]]
        config = {"in_channels": bare["body.0.in_conv.weight"][1] // 64, "channels": channels,
                  "num_res_blocks": blocks, "downscale_factor": 8, "adapter_type": "light_adapter"}
    else:
        raise ModelLoadError(f"{what}: not a T2I-Adapter layout Dapple knows (no conv_in, no in_conv/out_conv)")
    model = T2IAdapter(**config)
    _load_state(model, tensors, what)
    return model


def _original_adapter_to_diffusers(tensors: Mapping[str, torch.Tensor], what: str) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    if "conv_in.weight" in tensors:  # full: a flat body of resnet blocks, `blocks` per level
        starts = _indices(tensors, r"body\.(\d+)\.in_conv\.weight")
        count = len(_indices(tensors, r"body\.(\d+)\."))
        blocks = starts[0] if starts else count  # the first in_conv opens level 1
        for key, value in tensors.items():
            match = re.match(r"body\.(\d+)\.(.+)$", key)
            if key.startswith("conv_in."):
                out[f"adapter.{key}"] = value
            elif match and match.group(2).startswith("in_conv."):
                out[f"adapter.body.{int(match.group(1)) // blocks}.{match.group(2)}"] = value
            elif match and match.group(2).startswith(("block1.", "block2.")):
                index = int(match.group(1))
                out[f"adapter.body.{index // blocks}.resnets.{index % blocks}.{match.group(2)}"] = value
            else:
                raise ModelLoadError(f"{what}: tensor {key} has no place in a T2I-Adapter")
        return out
    for key, value in tensors.items():  # light: levels with their own in_conv, body, out_conv
        match = re.match(r"body\.(\d+)\.(in_conv|out_conv)\.(weight|bias)$", key) or \
            re.match(r"body\.(\d+)\.body\.(\d+)\.(block1|block2)\.(weight|bias)$", key)
        if match is None:
            raise ModelLoadError(f"{what}: tensor {key} has no place in a T2I-Adapter")
        parts = match.groups()
        name = f"adapter.body.{parts[0]}." + (f"{parts[1]}.{parts[2]}" if len(parts) == 3 else
                                              f"resnets.{parts[1]}.{parts[2]}.{parts[3]}")
        out[name] = value
    return out


def load_control_model(path: str | Path, *, allow_pickle: bool = False, base: Mapping[str, Any] | None = None):
    """Load a ControlNetModel, ControlNetUnionModel or T2IAdapter from a diffusers folder or a single file,
    offline. base: the config of the UNet it will drive (for SDXL's time-embedding width)."""
    path = Path(path).expanduser()
    if path.is_dir():
        return _load_folder(path, allow_pickle)
    if not path.is_file() or path.suffix.lower() not in CONTROL_SUFFIXES:
        raise ModelLoadError(f"control model {path} is not a folder with config.json or a "
                             f"{'/'.join(CONTROL_SUFFIXES)} file")
    tensors = read_weights(path, allow_pickle)
    kind = kind_of_keys(tensors)
    what = f"control model {path.name}"
    if kind == "controlnet":
        return controlnet_from_tensors(tensors, base, what, global_pool=_sidecar_global_pool(path))
    if kind == "t2i_adapter":
        return adapter_from_tensors(tensors, what)
    prefixes = sorted({key.split(".")[0] for key in tensors})[:6]
    raise ModelLoadError(f"{what} is neither a ControlNet (control_model.input_hint_block...) nor a T2I-Adapter "
                         f"(conv_in / body.N...); its tensors start with {', '.join(prefixes) or 'nothing'}")


def _load_folder(folder: Path, allow_pickle: bool):
    import diffusers

    class_name = _folder_class(folder)
    if class_name == "MultiAdapter":
        raise ModelLoadError(f"{folder} is a MultiAdapter (several T2I-Adapters); give each adapter as its own "
                             "control unit, with its own image and weight")
    if class_name not in (*CONTROLNET_CLASSES, *ADAPTER_CLASSES):
        raise ModelLoadError(f"{folder}: config.json names {class_name!r}; control-model folders hold one of "
                             f"{', '.join(CONTROLNET_CLASSES + ADAPTER_CLASSES)}")
    has_safetensors = any(folder.glob("*.safetensors"))
    if not has_safetensors:
        if not any(folder.glob("*.bin")):
            raise ModelLoadError(f"{folder}: no weight file (diffusion_pytorch_model.safetensors)")
        if not allow_pickle:
            raise PickleRefusedError(f"{folder}: only pickle weights (.bin), which can run code when loaded; opt "
                                     "in with allow_pickle=True (--allow-pickle) to read them with torch's "
                                     "weights_only loader")
    model_class = getattr(diffusers, class_name)
    try:
        return model_class.from_pretrained(str(folder), local_files_only=True, use_safetensors=has_safetensors)
    except (OSError, ValueError, RuntimeError) as error:
        raise ModelLoadError(f"{folder}: could not load the {class_name} ({error})") from None


# -- does it fit the model -------------------------------------------------------------------------------------------
def family_label(config: Mapping[str, Any]) -> str:
    """A person's name for the family a UNet-like config belongs to."""
    cross = config.get("cross_attention_dim")
    if config.get("addition_embed_type") == "text_time":
        return f"SDXL (cross-attention {cross})"
    return {768: "SD 1.x (cross-attention 768)", 1024: "SD 2.x (cross-attention 1024)"}.get(
        cross, f"cross-attention {cross}")


def check_fits(model: torch.nn.Module, unet_config: Mapping[str, Any], name: str) -> None:
    """Refuse a control model made for another model family, with what each one is."""
    config = model.config
    if "adapter_type" in config:  # a T2I-Adapter
        xl_adapter = config["adapter_type"] == "full_adapter_xl"
        xl_unet = unet_config.get("addition_embed_type") == "text_time"
        blocks = list(unet_config["block_out_channels"])
        channels = list(config["channels"])[: len(blocks)]
        if xl_adapter != xl_unet or channels != blocks[: len(channels)]:
            raise InvalidRequestError(
                f"control model {name!r} is a {'SDXL' if xl_adapter else 'SD 1.x/2.x'} T2I-Adapter with channels "
                f"{list(config['channels'])}; this model is {family_label(unet_config)} with block channels "
                f"{blocks}: use a T2I-Adapter made for it")
        return
    if config.get("in_channels") != unet_config.get("out_channels"):  # it reads the latents (4 channels for SD)
        raise InvalidRequestError(
            f"control model {name!r} takes {config.get('in_channels')} input channels; this model's latents have "
            f"{unet_config.get('out_channels')} (a ControlNet reads the latents alone, also for inpainting UNets)")
    mismatched = [key for key in ("cross_attention_dim", "block_out_channels", "layers_per_block")
                  if _as_list(config.get(key)) != _as_list(unet_config.get(key))]
    xl_mismatch = (config.get("addition_embed_type") == "text_time") != \
        (unet_config.get("addition_embed_type") == "text_time")
    if mismatched or xl_mismatch:
        raise InvalidRequestError(
            f"control model {name!r} is a ControlNet for {family_label(config)}; this model is "
            f"{family_label(unet_config)} ({', '.join(mismatched) or 'added conditioning'} differ): use a "
            "ControlNet made for this model's family")


def _as_list(value: Any) -> Any:
    return list(value) if isinstance(value, (list, tuple)) else value
