"""Load a diffusers-format model folder (model_index.json + tokenizer/ text_encoder/ unet/ vae/ scheduler/).

Local folders are read with local_files_only, so they never touch the network. A hub id is downloaded through
huggingface_hub (for users who are online) and then loaded from the local snapshot by the same code.
Weights load from safetensors; pickle weights need an explicit allow_pickle=True and then go through torch's
weights_only loader (diffusers and transformers both use it), which refuses arbitrary objects.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import diffusers
import torch
import transformers

from dapple.errors import ModelLoadError, PickleRefusedError
from dapple.models.components import Components
from dapple.models.devices import resolve_device, resolve_dtype
from dapple.models.generation_defaults import read_generation_defaults
from dapple.models.precision import (load_weights_into, parameter_count, safetensors_files, stored_dtype,
                                    vae_dtype)
from dapple.models.tokenizer import folder_tokenizer
from dapple.models.vocabulary import read_vocabulary

WEIGHT_COMPONENTS = ("text_encoder", "unet", "vae")
PICKLE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth")
_HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")
_LIBRARIES = {"diffusers": diffusers, "transformers": transformers}


def _weight_format(folder: Path) -> str:
    """'safetensors', 'pickle' or 'none': what weight files a component folder holds."""
    names = [p.name for p in folder.iterdir()] if folder.is_dir() else []
    if any(name.endswith(".safetensors") for name in names):
        return "safetensors"
    if any(name.endswith(PICKLE_SUFFIXES) for name in names):
        return "pickle"
    return "none"


def _check_weights(root: Path, allow_pickle: bool, names: tuple[str, ...] = WEIGHT_COMPONENTS) -> dict[str, str]:
    """Raise unless every component has loadable weights; return each component's weight format."""
    formats = {name: _weight_format(root / name) for name in names}
    missing = [name for name, kind in formats.items() if kind == "none"]
    if missing:
        raise ModelLoadError(f"{root}: no weights in {', '.join(n + '/' for n in missing)} (expected .safetensors)")
    pickled = [name for name, kind in formats.items() if kind == "pickle"]
    if pickled and not allow_pickle:
        raise PickleRefusedError(
            f"{root}: {', '.join(n + '/' for n in pickled)} only has pickle weights (.bin/.ckpt/.pt). Pickle files "
            "can run code when loaded, so Dapple refuses them by default. Convert them to .safetensors, or opt in "
            "with allow_pickle=True (--allow-pickle), which loads with torch's weights_only mode."
        )
    return formats


def _component_class(index: dict[str, Any], name: str, default: tuple[str, str]) -> type:
    library, class_name = index.get(name) or default
    module = _LIBRARIES.get(library)
    if module is None or not hasattr(module, class_name):
        raise ModelLoadError(f"model_index.json names {library}.{class_name} for {name}/, which Dapple cannot load")
    return getattr(module, class_name)


def _dtype_kwarg(library_module: Any, dtype: torch.dtype) -> dict[str, torch.dtype]:
    # transformers 5 renamed torch_dtype to dtype; diffusers still calls it torch_dtype.
    if library_module is transformers and int(transformers.__version__.split(".")[0]) >= 5:
        return {"dtype": dtype}
    return {"torch_dtype": dtype}


def _load_part(folder: Path, cls: type, weight_format: str, device: torch.device,
               dtype: torch.dtype) -> torch.nn.Module:
    """One component in `dtype` on `device`, never holding its weights twice (see dapple.models.precision).

    The library loads it in the dtype its files hold, as views of the memory-mapped files (no copy); a different
    dtype is then read tensor by tensor. The VAE always gets weights of its own, channels-last (a quarter faster
    decoding); so does a reduced-precision UNet on the CPU (bf16 convolutions: 5.7 s -> 4.6 s a step at 512 px)."""
    library = transformers if cls.__module__.startswith("transformers") else diffusers
    files = safetensors_files(folder) if weight_format == "safetensors" else []
    file_dtype = stored_dtype(files) or dtype
    try:
        model = cls.from_pretrained(str(folder), local_files_only=True, use_safetensors=weight_format == "safetensors",
                                    **_dtype_kwarg(library, file_dtype if files else dtype))
    except (OSError, ValueError, RuntimeError) as error:
        raise ModelLoadError(f"{folder}: could not load {cls.__name__}: {error}") from None
    vae = folder.name == "vae"
    if vae:
        dtype = vae_dtype(dtype, device, bool(getattr(model.config, "force_upcast", True)))
    channels_last = vae or (folder.name == "unet" and device.type == "cpu" and dtype != torch.float32)
    if vae or channels_last or model.dtype != dtype:
        model = load_weights_into(model, files, dtype, channels_last=channels_last)
    return model.to(device).eval().requires_grad_(False)


def _download(hub_id: str) -> Path:
    from huggingface_hub import snapshot_download

    patterns = ["model_index.json", "*/*.json", "*/*.txt", "*/*.safetensors"]
    try:
        return Path(snapshot_download(hub_id, allow_patterns=patterns))
    except Exception as error:  # the hub's errors vary by version; say what was tried
        raise ModelLoadError(f"{hub_id!r} is not a local folder and could not be fetched from the hub: {error}")


def locate_model(path: str | Path) -> Path:
    """The local folder for a path or hub id, or a clear error."""
    folder = Path(path).expanduser()
    if folder.is_dir():
        return folder
    if folder.exists():
        raise ModelLoadError(f"{path}: is a file but not a checkpoint; expected a single-file checkpoint "
                             "(.safetensors, .ckpt, .pt, .pth) or a diffusers model folder with model_index.json")
    if isinstance(path, str) and _HUB_ID.match(path) and not path.startswith("."):
        return _download(path)
    raise ModelLoadError(f"model folder {path} does not exist")


def load_components(
    path: str | Path,
    *,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    allow_pickle: bool = False,
) -> Components:
    """Load every component of a diffusers model folder onto one device, in one dtype."""
    root = locate_model(path)
    index_file = root / "model_index.json"
    if not index_file.is_file():
        raise ModelLoadError(
            f"{root} is not a diffusers model folder: no model_index.json "
            "(expected model_index.json with tokenizer/, text_encoder/, unet/, vae/, scheduler/)"
        )
    try:
        index = json.loads(index_file.read_text())
        scheduler_config = json.loads((root / "scheduler" / "scheduler_config.json").read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise ModelLoadError(f"{root}: unreadable model config: {error}") from None
    xl = index.get("text_encoder_2") is not None  # SDXL: a second text encoder with projection
    weight_formats = _check_weights(root, allow_pickle, WEIGHT_COMPONENTS + (("text_encoder_2",) if xl else ()))
    torch_device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, torch_device, parameter_count(safetensors_files(root / "unet")))

    models = {}
    parts = [("text_encoder", ("transformers", "CLIPTextModel")), ("unet", ("diffusers", "UNet2DConditionModel")),
             ("vae", ("diffusers", "AutoencoderKL"))]
    if xl:
        parts.append(("text_encoder_2", ("transformers", "CLIPTextModelWithProjection")))
    for name, default in parts:
        models[name] = _load_part(root / name, _component_class(index, name, default), weight_formats[name],
                                  torch_device, torch_dtype)
    return Components(
        tokenizer=folder_tokenizer(root),
        tokenizer_2=folder_tokenizer(root, "tokenizer_2") if xl else None,
        text_encoder_2=models.get("text_encoder_2"),
        text_encoder=models["text_encoder"],
        unet=models["unet"],
        vae=models["vae"],
        scheduler_config=scheduler_config,
        name=root.name if root.name else str(root),
        vocabulary=read_vocabulary(root),
        generation_defaults=read_generation_defaults(root),
        source=str(root),
    )
