"""Tiny random control models for the control tests: ControlNets made from the tiny UNets with
ControlNetModel.from_unet (whose zero convolutions are then given seeded random weights, since all-zero ones
would add nothing and prove nothing), and T2I-Adapters sized for the tiny UNets."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from diffusers import ControlNetModel, T2IAdapter, UNet2DConditionModel
from PIL import Image


def perturbed_controlnet(unet: UNet2DConditionModel, seed: int, scale: float = 0.3,
                         hint_channels: tuple[int, ...] = (16, 32)) -> ControlNetModel:
    """ControlNetModel.from_unet, then seeded random weights in the zero convolutions and the hint encoder's last
    convolution (from_unet leaves them zero), so the residuals are large enough to move the image.

    hint_channels: the hint encoder's widths; it downsamples len - 1 times, so (16, 32) fits the tiny VAE's
    factor 2 (real ControlNets use (16, 32, 96, 256) for SD's factor 8)."""
    controlnet = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=hint_channels)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in controlnet.named_parameters():
            if name.startswith(("controlnet_down_blocks", "controlnet_mid_block", "controlnet_cond_embedding.conv_out")):
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * scale)
    return controlnet.eval()


def tiny_adapter(unet: UNet2DConditionModel, seed: int, *, light: bool = False, in_channels: int = 3,
                 vae_factor: int = 2) -> T2IAdapter:
    """A T2I-Adapter whose features fit a tiny UNet: full ("full_adapter" for SD, "full_adapter_xl" for SDXL) or
    light, its pixel-unshuffle matched to the tiny VAE's factor, with seeded weights scaled up a little."""
    torch.manual_seed(seed)
    xl = unet.config.addition_embed_type == "text_time"
    channels = list(unet.config.block_out_channels)
    if light:
        adapter = T2IAdapter(in_channels=in_channels, channels=channels, num_res_blocks=1,
                             downscale_factor=vae_factor, adapter_type="light_adapter")
    else:
        # the XL adapter downsamples once less, so it unshuffles by twice the factor
        adapter = T2IAdapter(in_channels=in_channels, channels=channels, num_res_blocks=1,
                             downscale_factor=vae_factor * 2 if xl else vae_factor,
                             adapter_type="full_adapter_xl" if xl else "full_adapter")
    return adapter.eval()


def save(model: torch.nn.Module, folder: Path) -> Path:
    model.save_pretrained(str(folder), safe_serialization=True)
    return folder


def edge_map(seed: int, size: int = 64, height: int | None = None) -> Image.Image:
    """A random white-on-black line map (what an edge ControlNet is given), at the output size."""
    rng = np.random.default_rng(seed)
    canvas = np.zeros((height or size, size), np.uint8)
    for _ in range(6):
        if rng.random() < 0.5:
            canvas[rng.integers(0, canvas.shape[0]), :] = 255
        else:
            canvas[:, rng.integers(0, size)] = 255
    coarse = (rng.random((8, 8)) > 0.6).astype(np.uint8) * 255
    blocks = np.asarray(Image.fromarray(coarse).resize((size, height or size), Image.NEAREST))
    return Image.fromarray(np.stack([np.maximum(canvas, blocks)] * 3, axis=-1))


def union_controlnet(unet: UNet2DConditionModel, seed: int, scale: float = 0.3):
    """A tiny ControlNetUnionModel (ControlNet++'s architecture) on a tiny SDXL UNet: its encoder copied from the
    UNet, its zero-initialised parts (zero convolutions, the control-type projection) given seeded weights."""
    from diffusers import ControlNetUnionModel

    keys = ("in_channels", "down_block_types", "block_out_channels", "layers_per_block", "cross_attention_dim",
            "attention_head_dim", "use_linear_projection", "addition_embed_type", "addition_time_embed_dim",
            "projection_class_embeddings_input_dim", "transformer_layers_per_block", "norm_num_groups")
    torch.manual_seed(seed)
    width = unet.config.block_out_channels[0]
    union = ControlNetUnionModel(**{key: unet.config[key] for key in keys}, conditioning_embedding_out_channels=(16, 32),
                                 num_control_type=8, num_trans_channel=width, num_trans_head=4,
                                 num_proj_channel=width)
    shared = {key: value for key, value in unet.state_dict().items() if key in union.state_dict()}
    union.load_state_dict(shared, strict=False)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in union.named_parameters():
            if name.startswith(("controlnet_down_blocks", "controlnet_mid_block", "controlnet_cond_embedding.conv_out",
                                "spatial_ch_projs")):
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * scale)
    return union.eval()


def load_sd1_adapter_pipe(tmp_path_factory):
    """The SD 1.x-style tiny model (cross-attention in its first block, as SD 1.5) loaded with a T2I-Adapter that
    fits it, named "tiny-adapter"."""
    import dapple
    from dapple.models.tiny import build_tiny_family_pipeline

    model_dir = tmp_path_factory.mktemp("tiny-sd1")
    built = build_tiny_family_pipeline("sd1", seed=4)
    built.save_pretrained(str(model_dir), safe_serialization=True)
    adapters = tmp_path_factory.mktemp("adapters")
    save(tiny_adapter(built.unet, seed=3), adapters / "tiny-adapter")
    return dapple.load(model_dir, device="cpu", control_dirs=[adapters])
