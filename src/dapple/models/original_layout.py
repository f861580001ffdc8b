"""The original (CompVis / Stability "ldm") key layout of single-file Stable Diffusion checkpoints.

A1111 and ComfyUI users hold one .safetensors file per model, keyed the way the original training code named its
modules: `model.diffusion_model.input_blocks.1.0.in_layers.0.weight` where diffusers says
`down_blocks.0.resnets.0.norm1.weight`. This module pairs the two names for every tensor of a model, from the
model's diffusers config, so that the same table serves both directions: reading a single file into diffusers
modules (dapple.models.single_file) and writing diffusers modules as a single file (tests, `dapple convert`).

The pairing follows diffusers' own conversion scripts (scripts/convert_original_stable_diffusion_to_diffusers.py
and convert_diffusers_to_original_stable_diffusion.py), written out for any number of levels and layers per block,
so it fits SD 1.x, 2.x and XL as well as the tiny test models.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import torch

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_PREFIX = "cond_stage_model.transformer."  # SD 1.x: OpenAI CLIP ViT-L/14, HF names inside
OPEN_CLIP_PREFIX = "cond_stage_model.model."  # SD 2.x: OpenCLIP ViT-H/14, open_clip names inside
XL_CLIP_PREFIX = "conditioner.embedders.0.transformer."  # SDXL text encoder 1 (CLIP ViT-L/14)
XL_OPEN_CLIP_PREFIX = "conditioner.embedders.1.model."  # SDXL text encoder 2 (OpenCLIP ViT-bigG/14)

_RESNET = [("norm1", "in_layers.0"), ("conv1", "in_layers.2"), ("time_emb_proj", "emb_layers.1"),
           ("norm2", "out_layers.0"), ("conv2", "out_layers.3"), ("conv_shortcut", "skip_connection")]


def _suffixes(module: Mapping[str, Any], prefix: str) -> list[str]:
    """The parameter names under `prefix` in a diffusers state dict, without the prefix."""
    return [key[len(prefix):] for key in module if key.startswith(prefix)]


def _block(state: Mapping[str, Any], diffusers_prefix: str, original_prefix: str,
           renames: list[tuple[str, str]] | None = None) -> Iterator[tuple[str, str]]:
    """Pairs for every tensor under diffusers_prefix; the first matching rename (diffusers name, original name)
    applies to one dotted segment of the rest of the key."""
    for suffix in _suffixes(state, diffusers_prefix + "."):
        original_suffix = suffix
        for new, old in renames or []:
            if f".{new}." in f".{suffix}":
                original_suffix = f".{suffix}".replace(f".{new}.", f".{old}.", 1)[1:]
                break
        yield f"{diffusers_prefix}.{suffix}", f"{original_prefix}.{original_suffix}"


def unet_key_pairs(config: Mapping[str, Any], state: Mapping[str, Any]) -> Iterator[tuple[str, str]]:
    """(diffusers key, original key without UNET_PREFIX) for every tensor in a UNet2DConditionModel's state."""
    levels = len(config["block_out_channels"])
    per_block = config["layers_per_block"]

    def block(diffusers_prefix: str, original_prefix: str, renames: list[tuple[str, str]] | None = None):
        return _block(state, diffusers_prefix, original_prefix, renames)

    for diffusers_name, original in [("time_embedding.linear_1", "time_embed.0"),
                                     ("time_embedding.linear_2", "time_embed.2"),
                                     ("add_embedding.linear_1", "label_emb.0.0"),
                                     ("add_embedding.linear_2", "label_emb.0.2"),
                                     ("conv_in", "input_blocks.0.0"), ("conv_norm_out", "out.0"),
                                     ("conv_out", "out.2")]:
        for suffix in _suffixes(state, diffusers_name + "."):
            yield f"{diffusers_name}.{suffix}", f"{original}.{suffix}"

    for level in range(levels):
        for layer in range(per_block):
            index = 1 + level * (per_block + 1) + layer
            yield from block(f"down_blocks.{level}.resnets.{layer}", f"input_blocks.{index}.0", _RESNET)
            yield from block(f"down_blocks.{level}.attentions.{layer}", f"input_blocks.{index}.1")
        if level < levels - 1:
            index = (level + 1) * (per_block + 1)
            yield from block(f"down_blocks.{level}.downsamplers.0.conv", f"input_blocks.{index}.0.op")
        for layer in range(per_block + 1):
            index = level * (per_block + 1) + layer
            yield from block(f"up_blocks.{level}.resnets.{layer}", f"output_blocks.{index}.0", _RESNET)
            yield from block(f"up_blocks.{level}.attentions.{layer}", f"output_blocks.{index}.1")
        if level < levels - 1:
            index = level * (per_block + 1) + per_block
            has_attention = f"up_blocks.{level}.attentions.0.proj_in.weight" in state
            yield from block(f"up_blocks.{level}.upsamplers.0", f"output_blocks.{index}.{2 if has_attention else 1}")
    yield from block("mid_block.attentions.0", "middle_block.1")
    for layer in range(2):
        yield from block(f"mid_block.resnets.{layer}", f"middle_block.{2 * layer}", _RESNET)


_VAE_RESNET = [("conv_shortcut", "nin_shortcut")]
_VAE_ATTENTION = [("group_norm", "norm"), ("to_q", "q"), ("to_k", "k"), ("to_v", "v"), ("to_out.0", "proj_out")]


def vae_key_pairs(config: Mapping[str, Any], state: Mapping[str, Any]) -> Iterator[tuple[str, str]]:
    """(diffusers key, original key without VAE_PREFIX) for every tensor in an AutoencoderKL's state."""
    levels = len(config["block_out_channels"])

    def block(diffusers_prefix: str, original_prefix: str, renames: list[tuple[str, str]] | None = None):
        return _block(state, diffusers_prefix, original_prefix, renames)

    for part in ("encoder", "decoder"):
        yield from block(f"{part}.conv_in", f"{part}.conv_in")
        yield from block(f"{part}.conv_out", f"{part}.conv_out")
        yield from block(f"{part}.conv_norm_out", f"{part}.norm_out")
        yield from block(f"{part}.mid_block.attentions.0", f"{part}.mid.attn_1", _VAE_ATTENTION)
        for layer in range(2):
            yield from block(f"{part}.mid_block.resnets.{layer}", f"{part}.mid.block_{layer + 1}", _VAE_RESNET)
    for level in range(levels):
        yield from block(f"encoder.down_blocks.{level}.resnets", f"encoder.down.{level}.block", _VAE_RESNET)
        yield from block(f"encoder.down_blocks.{level}.downsamplers.0", f"encoder.down.{level}.downsample")
        original_level = levels - 1 - level  # the decoder's levels are numbered from the bottom up
        yield from block(f"decoder.up_blocks.{level}.resnets", f"decoder.up.{original_level}.block", _VAE_RESNET)
        yield from block(f"decoder.up_blocks.{level}.upsamplers.0", f"decoder.up.{original_level}.upsample")
    yield from block("quant_conv", "quant_conv")
    yield from block("post_quant_conv", "post_quant_conv")


def is_vae_attention_matrix(original_key: str) -> bool:
    """The VAE's mid-block attention uses 1x1 convolutions in the original layout and linear layers in diffusers."""
    return ".mid.attn_1." in original_key and original_key.endswith(("q.weight", "k.weight", "v.weight",
                                                                     "proj_out.weight"))


_OPEN_CLIP_LAYER = [("layer_norm1", "ln_1"), ("layer_norm2", "ln_2"), ("mlp.fc1", "mlp.c_fc"),
                    ("mlp.fc2", "mlp.c_proj"), ("self_attn.out_proj", "attn.out_proj")]


def bare_clip_key(key: str) -> str:
    """A transformers CLIP text-model key without the "text_model." level, which some classes and some
    transformers versions add and others do not (SD 1.4 files lack it; later ones have it)."""
    return key[len("text_model."):] if key.startswith("text_model.") else key


def open_clip_to_diffusers(tensors: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """OpenCLIP text-tower tensors (keys under `prefix`) -> transformers CLIP text-model tensors (bare keys, see
    bare_clip_key), every layer kept. The fused attention in-projection is split into q, k and v; the projection
    matrix is transposed."""
    out: dict[str, torch.Tensor] = {}
    for key, tensor in tensors.items():
        if not key.startswith(prefix):
            continue
        name = key[len(prefix):]
        if name == "token_embedding.weight":
            out["embeddings.token_embedding.weight"] = tensor
        elif name == "positional_embedding":
            out["embeddings.position_embedding.weight"] = tensor
        elif name.startswith("ln_final."):
            out["final_layer_norm." + name.split(".", 1)[1]] = tensor
        elif name == "text_projection":
            out["text_projection.weight"] = tensor.T.contiguous()
        elif name.startswith("transformer.resblocks."):
            layer, rest = name[len("transformer.resblocks."):].split(".", 1)
            base = f"encoder.layers.{layer}."
            if rest.startswith("attn.in_proj_"):
                kind = rest.rsplit("_", 1)[1]  # weight or bias
                for part, chunk in zip(("q_proj", "k_proj", "v_proj"), tensor.chunk(3, dim=0), strict=True):
                    out[f"{base}self_attn.{part}.{kind}"] = chunk.contiguous()
                continue
            for new, old in _OPEN_CLIP_LAYER:
                if rest.startswith(old + "."):
                    rest = new + rest[len(old):]
                    break
            out[base + rest] = tensor
    return out


def diffusers_to_open_clip(state: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The inverse of open_clip_to_diffusers (bare keys in)."""
    out: dict[str, torch.Tensor] = {}
    fused: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in state.items():
        if key == "embeddings.token_embedding.weight":
            out[prefix + "token_embedding.weight"] = tensor
        elif key == "embeddings.position_embedding.weight":
            out[prefix + "positional_embedding"] = tensor
        elif key.startswith("final_layer_norm."):
            out[prefix + "ln_final." + key.rsplit(".", 1)[1]] = tensor
        elif key == "text_projection.weight":
            out[prefix + "text_projection"] = tensor.T.contiguous()
        elif key.startswith("encoder.layers."):
            layer, rest = key[len("encoder.layers."):].split(".", 1)
            base = f"{prefix}transformer.resblocks.{layer}."
            if rest.startswith("self_attn.") and rest.split(".")[1] in ("q_proj", "k_proj", "v_proj"):
                part, kind = rest.split(".")[1:3]
                fused.setdefault(f"{base}attn.in_proj_{kind}", {})[part] = tensor
                continue
            for new, old in _OPEN_CLIP_LAYER:
                if rest.startswith(new + "."):
                    rest = old + rest[len(new):]
                    break
            out[base + rest] = tensor
    for key, parts in fused.items():
        out[key] = torch.cat([parts["q_proj"], parts["k_proj"], parts["v_proj"]], dim=0)
    return out
