"""The built-in model's architecture: Stable Diffusion's components (AutoencoderKL, a CLIP text encoder with the
real CLIP tokenizer, UNet2DConditionModel, SD's noise schedule) at toy scale for 64x64 shapes-world images."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

from dapple.models.tiny import SD15_SCHEDULER_CONFIG
from dapple.models.tokenizer import bundled_clip_tokenizer
from dapple.models.vocabulary import write_vocabulary
from dapple.train.data.captions import caption_vocabulary


@dataclass(frozen=True)
class Architecture:
    """Sizes of the three networks. The default is the shipped model; tests use a smaller one."""

    # 64 px -> 16x16 latents (factor 4). (16, 32, 64) beat (32, 64, 64) at equal CPU time: 29.7 vs 27.4 dB
    # held-out PSNR after ~30 single-thread minutes (1300 vs 500 steps of batch 32).
    vae_channels: tuple[int, ...] = (16, 32, 64)
    vae_layers_per_block: int = 1
    vae_norm_groups: int = 8  # trains the small VAE much faster than SD's 32 groups
    latent_channels: int = 4
    text_hidden: int = 64
    text_layers: int = 2
    text_heads: int = 4
    # (32, 64, 128) with cross-attention at 16x16 trains a step in 1.2 s (batch 64, 2 threads) against 2.2 s for
    # (64, 128, 128): twice the steps in the same CPU time.
    unet_channels: tuple[int, ...] = (32, 64, 128)
    unet_layers_per_block: int = 1
    unet_norm_groups: int = 16
    # Attention heads per UNet block (diffusers calls this `attention_head_dim`, but UNet2DConditionModel reads it
    # as the number of heads). 8 heads left 4 channels per head at 16x16, and CPU attention on such slivers was
    # half of a training step: 2 heads (16/32/64 channels each) train a step in 0.64 s against 0.98 s.
    attention_heads: int = 2

    def as_dict(self) -> dict:
        return asdict(self)

    def build_vae(self) -> AutoencoderKL:
        levels = len(self.vae_channels)
        return AutoencoderKL(
            in_channels=3, out_channels=3, latent_channels=self.latent_channels,
            block_out_channels=self.vae_channels, layers_per_block=self.vae_layers_per_block,
            down_block_types=("DownEncoderBlock2D",) * levels, up_block_types=("UpDecoderBlock2D",) * levels,
            norm_num_groups=self.vae_norm_groups, sample_size=64,
        )

    def build_text_encoder(self) -> CLIPTextModel:
        tokenizer = bundled_clip_tokenizer()
        return CLIPTextModel(CLIPTextConfig(
            vocab_size=len(tokenizer), hidden_size=self.text_hidden, intermediate_size=self.text_hidden * 4,
            num_hidden_layers=self.text_layers, num_attention_heads=self.text_heads, max_position_embeddings=77,
            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        ))

    def build_unet(self) -> UNet2DConditionModel:
        levels = len(self.unet_channels)
        # Cross-attention at every level, the full-resolution one included: "left"/"top" must reach every cell.
        return UNet2DConditionModel(
            sample_size=64 // 2 ** (len(self.vae_channels) - 1), in_channels=self.latent_channels,
            out_channels=self.latent_channels, block_out_channels=self.unet_channels,
            layers_per_block=self.unet_layers_per_block,
            down_block_types=("CrossAttnDownBlock2D",) * (levels - 1) + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (levels - 1),
            cross_attention_dim=self.text_hidden, attention_head_dim=self.attention_heads,
            norm_num_groups=self.unet_norm_groups,
        )


TINY_ARCHITECTURE = Architecture(  # for tests: same shapes of data (16x16x4 latents), a few thousand weights
    vae_channels=(8, 16, 16), vae_norm_groups=4, text_hidden=16, text_layers=1, text_heads=2,
    unet_channels=(16, 32), unet_norm_groups=8, attention_heads=4,
)


def export_diffusers_folder(
    folder: Path, vae: AutoencoderKL, text_encoder: CLIPTextModel, unet: UNet2DConditionModel,
    dtype: torch.dtype = torch.float16, scheduler_config: dict | None = None,
) -> Path:
    """Write the trained networks as a diffusers folder (safetensors in `dtype`) that dapple.load() reads.

    scheduler_config: the noise schedule the UNet was trained on (default: SD 1.x's)."""
    from diffusers import DDIMScheduler, PNDMScheduler, StableDiffusionPipeline

    if scheduler_config is None:
        scheduler = PNDMScheduler(**SD15_SCHEDULER_CONFIG)
    else:  # DDIM takes every key of a schedule, zero terminal SNR included (PNDM does not)
        scheduler = DDIMScheduler(**{k: v for k, v in scheduler_config.items() if k != "skip_prk_steps"})
    pipeline = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=bundled_clip_tokenizer(), unet=unet,
        scheduler=scheduler, safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    )
    pipeline.to(dtype=dtype)
    pipeline.save_pretrained(str(folder), safe_serialization=True)
    write_vocabulary(folder, caption_vocabulary())
    return folder
