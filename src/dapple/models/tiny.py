"""Tiny random Stable Diffusion components: the same architecture as SD 1.x, a few hundred kB of weights.

Used by the tests, the benchmark-free quickstart until a trained model ships, and anyone who wants to see the
machinery run in milliseconds. The images they make are noise: the weights are random.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch
from diffusers import AutoencoderKL, PNDMScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

from dapple.models.tokenizer import bundled_clip_tokenizer

if TYPE_CHECKING:
    from diffusers import StableDiffusionPipeline

# SD 1.5's noise schedule (its scheduler/scheduler_config.json).
SD15_SCHEDULER_CONFIG = {
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "prediction_type": "epsilon",
    "timestep_spacing": "leading",
}


def build_tiny_pipeline(seed: int = 0, unet_in_channels: int = 4) -> StableDiffusionPipeline:
    """A diffusers pipeline with tiny random components (64x64 px native size) and the real CLIP tokenizer.

    unet_in_channels: 4 for a standard model, 9 for an inpainting model, 5 for a depth model."""
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64),
        layers_per_block=2,
        sample_size=32,
        in_channels=unet_in_channels,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32,
        norm_num_groups=32,
    )
    vae = AutoencoderKL(
        block_out_channels=(32, 64),
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        latent_channels=4,
        norm_num_groups=32,
        sample_size=64,
    )
    tokenizer = bundled_clip_tokenizer()
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=32,
            intermediate_size=37,
            num_attention_heads=4,
            num_hidden_layers=2,
            max_position_embeddings=77,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    from diffusers import StableDiffusionPipeline  # imported here: it pulls transformers' image processors

    return StableDiffusionPipeline(
        vae=vae.eval(),
        text_encoder=text_encoder.eval(),
        tokenizer=tokenizer,
        unet=unet.eval(),
        scheduler=PNDMScheduler(**SD15_SCHEDULER_CONFIG),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def save_tiny_model(folder: str | Path, seed: int = 0, unet_in_channels: int = 4) -> Path:
    """Write a tiny random model as a diffusers folder with safetensors weights; return the folder."""
    folder = Path(folder)
    build_tiny_pipeline(seed, unet_in_channels).save_pretrained(str(folder), safe_serialization=True)
    return folder


def build_tiny_family_pipeline(family: str, seed: int = 0, prediction_type: str = "epsilon"
                               ) -> StableDiffusionPipeline:
    """Tiny random components that follow a family's conventions exactly as its single files imply them
    (dapple.models.single_file): "sd1" (CLIP text encoder with quick-GELU, 8-head UNet attention) or "sd2"
    (OpenCLIP-style GELU text encoder, tokenizer padding with "!", 64-dim attention heads, linear projections).
    Attention heads are 64 channels wide, as in the real models, so every size is a multiple of 64."""
    from transformers import CLIPTokenizer

    from dapple.models.tokenizer import BUNDLED_TOKENIZER_DIR

    if family not in ("sd1", "sd2"):
        raise ValueError(f"family {family!r}: allowed are 'sd1' and 'sd2'")
    torch.manual_seed(seed)
    sd2 = family == "sd2"
    unet = UNet2DConditionModel(
        block_out_channels=(64, 128), layers_per_block=1, sample_size=32, in_channels=4, out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=64, attention_head_dim=[1, 2] if sd2 else 8, use_linear_projection=sd2,
    )
    vae = AutoencoderKL(
        block_out_channels=(32, 64), in_channels=3, out_channels=3, latent_channels=4, sample_size=64,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
    )
    tokenizer = (CLIPTokenizer.from_pretrained(str(BUNDLED_TOKENIZER_DIR), local_files_only=True, pad_token="!")
                 if sd2 else bundled_clip_tokenizer())
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_attention_heads=1,
        num_hidden_layers=2, max_position_embeddings=77, hidden_act="gelu" if sd2 else "quick_gelu",
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    ))
    from diffusers import StableDiffusionPipeline  # imported here: it pulls transformers' image processors

    return StableDiffusionPipeline(
        vae=vae.eval(), text_encoder=text_encoder.eval(), tokenizer=tokenizer, unet=unet.eval(),
        scheduler=PNDMScheduler(**{**SD15_SCHEDULER_CONFIG, "prediction_type": prediction_type}),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )


def build_tiny_xl_pipeline(seed: int = 0):
    """Tiny random SDXL components with the real CLIP tokenizers, following SDXL's conventions as its single files
    imply them (64-channel attention heads, 32 normalisation groups): two text encoders 64 wide (the second with
    a 64-dim projection), a UNet with text-and-time added conditioning, 64x64 px."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline
    from transformers import CLIPTextModelWithProjection, CLIPTokenizer

    from dapple.models.tokenizer import BUNDLED_TOKENIZER_DIR

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        block_out_channels=(64, 128), layers_per_block=1, sample_size=32, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(1, 2), use_linear_projection=True, addition_embed_type="text_time",
        addition_time_embed_dim=8, transformer_layers_per_block=(1, 2),
        projection_class_embeddings_input_dim=112,  # 6 time ids x 8 + the 64-dim pooled text embedding
        cross_attention_dim=128,  # the two encoders' 64-wide states side by side
    )
    vae = AutoencoderKL(
        block_out_channels=(32, 64), in_channels=3, out_channels=3, latent_channels=4, sample_size=64,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        scaling_factor=0.13025,
    )
    tokenizer = bundled_clip_tokenizer()
    tokenizer_2 = CLIPTokenizer.from_pretrained(str(BUNDLED_TOKENIZER_DIR), local_files_only=True, pad_token="!")

    def text_config(pad_token_id: int, act: str) -> CLIPTextConfig:
        return CLIPTextConfig(
            vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_attention_heads=1,
            num_hidden_layers=3, max_position_embeddings=77, hidden_act=act, projection_dim=64,
            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=pad_token_id,
        )

    return StableDiffusionXLPipeline(
        vae=vae.eval(), text_encoder=CLIPTextModel(text_config(tokenizer.pad_token_id, "quick_gelu")).eval(),
        text_encoder_2=CLIPTextModelWithProjection(text_config(tokenizer_2.pad_token_id, "gelu")).eval(),
        tokenizer=tokenizer, tokenizer_2=tokenizer_2, unet=unet.eval(),
        scheduler=EulerDiscreteScheduler(**{k: v for k, v in SD15_SCHEDULER_CONFIG.items()
                                            if k not in ("set_alpha_to_one", "skip_prk_steps")}),
    )
