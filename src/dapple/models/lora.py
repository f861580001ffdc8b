"""LoRA (Hu et al., 2021, "LoRA: Low-Rank Adaptation of Large Language Models") for the UNet and text encoder.

A LoRA file holds, for some Linear / Conv2d layers, two thin matrices `down` (rank x in) and `up` (out x rank) and
a scale alpha; the layer's weight becomes W + weight x (alpha / rank) x up @ down. Files come in two layouts:

- kohya (sd-scripts, A1111, civitai): `lora_unet_<module path with _>.lora_down.weight` / `.lora_up.weight` /
  `.alpha`, text encoder under `lora_te_` (SDXL: `lora_te1_`, `lora_te2_`). UNet module paths are diffusers
  names (kohya) or original ldm names (`lora_unet_input_blocks_1_1_proj_in`, older trainers); both resolve.
- diffusers / PEFT: `unet.<module path>.lora_A.weight` / `.lora_B.weight` (text encoder under `text_encoder.`),
  or PEFT's own `base_model.model.<module path>...` with alpha in an adapter_config.json beside the file.
  Without an alpha the scale is 1 (alpha = rank), as diffusers saves them.

Dapple merges the deltas into the weights (no per-step overhead) and keeps a copy of every original weight it
touched, so removing or changing LoRAs restores the originals bit for bit: nothing drifts however often a
server switches LoRAs between requests.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file

from dapple.errors import ModelLoadError
from dapple.models.original_layout import unet_key_pairs


@dataclass(frozen=True)
class LoraLayer:
    """One adapted layer: which component, which module, and its low-rank factors with their scale."""

    component: str  # "unet", "text_encoder" or (SDXL) "text_encoder_2"
    module: str  # the module's name in that component (named_modules())
    down: torch.Tensor
    up: torch.Tensor
    scale: float  # alpha / rank

    def delta(self, shape: torch.Size) -> torch.Tensor:
        """up @ down x scale, shaped like the weight (a 1x1 `up` composes with any kernel size of `down`)."""
        product = self.up.flatten(1).float() @ self.down.flatten(1).float()
        return (product * self.scale).reshape(shape)


def _normalise(name: str) -> str:
    return name.replace(".", "_")


def _module_index(model: torch.nn.Module, ldm_names: dict[str, str] | None = None) -> dict[str, str]:
    """kohya-style flattened name -> module name, for every Linear and Conv2d of a model (and, for the UNet, the
    original ldm names of the same modules)."""
    index = {}
    for name, module in model.named_modules():
        if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)):
            index[_normalise(name)] = name
    for original, name in (ldm_names or {}).items():
        if name in index.values():
            index[_normalise(original)] = name
    return index


def _ldm_module_names(unet: torch.nn.Module) -> dict[str, str]:
    """Original ldm module name -> diffusers module name, from the tensor-name table."""
    names = {}
    for diffusers_key, original in unet_key_pairs(unet.config, unet.state_dict()):
        if diffusers_key.endswith(".weight"):
            names[original[: -len(".weight")]] = diffusers_key[: -len(".weight")]
    return names


def _text_module_name(flat: str, index: dict[str, str]) -> str | None:
    """Text-encoder module names differ by a "text_model." level between transformers classes and versions."""
    for candidate in (flat, flat.removeprefix("text_model_"), f"text_model_{flat}"):
        if candidate in index:
            return index[candidate]
    return None


def read_lora(path: str | Path, unet: torch.nn.Module, text_encoder: torch.nn.Module,
              text_encoder_2: torch.nn.Module | None = None) -> list[LoraLayer]:
    """The layers a LoRA file adapts, resolved against this model's modules (SDXL's second text encoder too).
    Unknown layers are an error naming them (a LoRA for another architecture), since silently skipping them
    would change what the LoRA does."""
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ModelLoadError(f"{path}: LoRA files are read from .safetensors only (convert pickles with `dapple "
                             "convert` first)")
    tensors = load_file(str(path))
    unet_index = _module_index(unet, _ldm_module_names(unet))
    text_indices = {"text_encoder": _module_index(text_encoder)}
    if text_encoder_2 is not None:
        text_indices["text_encoder_2"] = _module_index(text_encoder_2)
    if any(key.endswith(".lora_down.weight") for key in tensors):
        return _read_kohya(tensors, unet_index, text_indices, path)
    if any(key.endswith(".lora_A.weight") for key in tensors):
        return _read_peft(tensors, unet_index, text_indices, path)
    raise ModelLoadError(f"{path}: not a LoRA Dapple reads: expected kohya keys (*.lora_down.weight) or "
                         "diffusers/PEFT keys (*.lora_A.weight)")


def _read_layers(tensors: dict[str, torch.Tensor], down_suffix: str, up_suffix: str, default_alpha: float | None,
                 locate, path: Path) -> list[LoraLayer]:
    """The layers of either layout: for each `<base><down_suffix>` its up matrix and alpha (a `<base>.alpha`
    tensor, else default_alpha, else the rank); locate(base) -> (component, module name or None)."""
    layers, unknown = [], []
    for key in sorted(k for k in tensors if k.endswith(down_suffix)):
        base = key[: -len(down_suffix)]
        down, up = tensors[key], tensors[f"{base}{up_suffix}"]
        rank = down.shape[0]
        alpha = float(tensors[f"{base}.alpha"]) if f"{base}.alpha" in tensors else float(default_alpha or rank)
        component, module = locate(base)
        if module is None:
            unknown.append(base)
            continue
        layers.append(LoraLayer(component, module, down, up, alpha / rank))
    _refuse_unknown(unknown, path)
    return layers


def _read_kohya(tensors, unet_index, text_indices, path) -> list[LoraLayer]:
    def locate(base: str) -> tuple[str, str | None]:
        if base.startswith("lora_unet_"):
            return "unet", unet_index.get(base[len("lora_unet_"):])
        for prefix, encoder in (("lora_te_", "text_encoder"), ("lora_te1_", "text_encoder"),
                                ("lora_te2_", "text_encoder_2")):  # te1/te2: SDXL's two encoders
            if base.startswith(prefix) and encoder in text_indices:
                return encoder, _text_module_name(base[len(prefix):], text_indices[encoder])
        return "", None

    return _read_layers(tensors, ".lora_down.weight", ".lora_up.weight", None, locate, path)


def _read_peft(tensors, unet_index, text_indices, path) -> list[LoraLayer]:
    config_file = path.with_name("adapter_config.json")
    config = json.loads(config_file.read_text()) if config_file.is_file() else {}

    def locate(base: str) -> tuple[str, str | None]:
        name = re.sub(r"^base_model\.model\.", "unet.", base)
        if name.startswith("unet."):
            return "unet", unet_index.get(_normalise(name[len("unet."):]))
        for encoder, index in text_indices.items():
            if name.startswith(encoder + "."):
                return encoder, _text_module_name(_normalise(name[len(encoder) + 1:]), index)
        return "", None

    return _read_layers(tensors, ".lora_A.weight", ".lora_B.weight", config.get("lora_alpha"), locate, path)


def _refuse_unknown(unknown: list[str], path: Path) -> None:
    if unknown:
        raise ModelLoadError(f"{path}: {len(unknown)} LoRA layers match no layer of this model (e.g. {unknown[0]}); "
                             "is it for another architecture (SD 1.x vs 2.x vs XL)?")


class LoraPatcher:
    """Applies a set of (LoRA layers, weight) to a model's UNet and text encoder by merging, and restores the
    original weights exactly. apply() with the same set twice does nothing the second time."""

    def __init__(self, unet: torch.nn.Module, text_encoder: torch.nn.Module,
                 text_encoder_2: torch.nn.Module | None = None) -> None:
        self._models = {"unet": unet, "text_encoder": text_encoder}
        if text_encoder_2 is not None:
            self._models["text_encoder_2"] = text_encoder_2
        self._originals: dict[tuple[str, str], torch.Tensor] = {}
        self._active: tuple = ()

    def _weight(self, component: str, module: str) -> torch.nn.Parameter:
        return self._models[component].get_submodule(module).weight

    @torch.no_grad()
    def apply(self, loras: list[tuple[str, list[LoraLayer], float]]) -> None:
        """Make exactly these (name, layers, weight) active; an empty list restores the plain model."""
        key = tuple((name, weight) for name, _, weight in loras)
        if key == self._active:
            return
        self.restore()
        deltas: dict[tuple[str, str], torch.Tensor] = {}
        for _, layers, weight in loras:
            if weight == 0:
                continue
            for layer in layers:
                target = (layer.component, layer.module)
                parameter = self._weight(*target)
                delta = layer.delta(parameter.shape) * weight
                deltas[target] = deltas[target] + delta if target in deltas else delta
        for target, delta in deltas.items():
            parameter = self._weight(*target)
            self._originals[target] = parameter.detach().clone()
            parameter.copy_((parameter.float() + delta.to(parameter.device)).to(parameter.dtype))
        self._active = key

    @torch.no_grad()
    def restore(self) -> None:
        """Put every touched weight back as it was loaded."""
        for target, original in self._originals.items():
            self._weight(*target).copy_(original)
        self._originals.clear()
        self._active = ()

    @property
    def active(self) -> tuple:
        """The (name, weight) pairs now merged in."""
        return self._active


LORA_SUFFIXES = (".safetensors",)
LORA_HASH_LENGTH = 12  # A1111 writes "Lora hashes" with the first 12 hex digits of the file's sha256


def find_in_folders(name: str, folders: list[Path], suffixes: tuple[str, ...] = LORA_SUFFIXES) -> Path:
    """The file called `name` (+ a suffix) in the first folder that has it, searched recursively as A1111 does.
    What is found must lie inside that folder once symlinks are resolved: a name never reaches outside."""
    if "/" in name or "\\" in name or ".." in name:
        raise ModelLoadError(f"{name!r}: a LoRA is named by its file name, without folders or '..'")
    for folder in folders:
        root = Path(folder).expanduser().resolve()
        if not root.is_dir():
            continue
        for candidate in sorted(root.rglob("*")):
            if candidate.suffix in suffixes and candidate.stem == name and candidate.is_file():
                if not candidate.resolve().is_relative_to(root):
                    raise ModelLoadError(f"{candidate} links outside {root}; refused")
                return candidate
    searched = ", ".join(str(f) for f in folders) or "none configured"
    raise ModelLoadError(f"no LoRA named {name!r} (looked for {name}.safetensors in: {searched})")
