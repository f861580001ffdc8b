"""The components of a Stable Diffusion model, handed to the engine as one object."""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTokenizer

# A1111's "Approx cheap" preview (modules/sd_vae_approx.py): a linear map from SD 1.x's four latent channels
# (as the UNet sees them, i.e. already multiplied by the VAE scaling factor) to RGB in [-1, 1].
SD1_LATENT_RGB_FACTORS = (
    (0.298, 0.207, 0.208),
    (0.187, 0.286, 0.173),
    (-0.158, 0.189, 0.264),
    (-0.184, -0.271, -0.473),
)


@dataclass
class Components:
    """Tokenizer, text encoder, UNet, VAE and the noise-schedule config of one model, already on its device."""

    tokenizer: CLIPTokenizer
    text_encoder: CLIPTextModel
    unet: UNet2DConditionModel
    vae: AutoencoderKL
    scheduler_config: dict[str, Any]
    name: str = "model"
    source: str | None = None
    latent_rgb_factors: tuple[tuple[float, float, float], ...] = field(default=SD1_LATENT_RGB_FACTORS)
    vocabulary: frozenset[str] | None = None  # the words a closed-world model was trained on (None: not known)
    # Settings the model's folder recommends (generation_defaults.json), for request fields the caller left unset.
    generation_defaults: dict[str, Any] = field(default_factory=dict)
    # Depth2img's seam for a depth estimator (image -> (H, W) array, larger = nearer); none ships or downloads.
    depth_estimator: Any = None
    vae_source: str | None = None  # a VAE swapped in from elsewhere (None: the model's own)
    # SDXL's second tokenizer and text encoder (OpenCLIP ViT-bigG with projection); None for SD 1.x/2.x.
    tokenizer_2: CLIPTokenizer | None = None
    text_encoder_2: Any = None
    lora_hashes: dict[str, str] = field(default_factory=dict)  # LoRAs merged into the weights now: name -> hash
    # Textual-inversion embeddings installed in the tokenizer/text encoder: name -> placeholder text, name -> hash
    embedding_triggers: dict[str, str] = field(default_factory=dict)
    embedding_hashes: dict[str, str] = field(default_factory=dict)
    # Where the models compute while they rest in CPU memory between stages (CPU offload, models/memory.py);
    # None: where the UNet's weights are.
    execution_device: torch.device | None = None

    @cached_property
    def short_hash(self) -> str | None:
        """A1111's short model hash (sha256 of the checkpoint file, first 10 hex; for a diffusers folder, of its
        UNet weights), or None for components that were not loaded from disk."""
        from dapple.models.hashing import short_hash

        if self.source is None or not Path(self.source).exists():
            return None
        try:
            return short_hash(self.source)
        except FileNotFoundError:
            return None

    @cached_property
    def vae_short_hash(self) -> str | None:
        """The swapped-in VAE's short hash (A1111's "VAE hash"), or None for the model's own VAE."""
        from dapple.models.hashing import short_hash

        if self.vae_source is None or not Path(self.vae_source).is_file():
            return None
        return short_hash(self.vae_source)

    @property
    def is_xl(self) -> bool:
        """SDXL: two text encoders, pooled text and size conditioning."""
        return self.text_encoder_2 is not None

    @property
    def device(self) -> torch.device:
        """Where the run's tensors go: the execution device under CPU offload, else the UNet's device."""
        return self.execution_device if self.execution_device is not None else self.unet.device

    @property
    def dtype(self) -> torch.dtype:
        return self.unet.dtype

    @property
    def prediction_type(self) -> str:
        """What the UNet predicts: "epsilon" (SD 1.x, 2.x-base) or "v_prediction" (SD 2.x 768)."""
        return str(self.scheduler_config.get("prediction_type", "epsilon"))

    @property
    def latent_scaling_factor(self) -> float:
        """The VAE latents are multiplied by this so that they have roughly unit variance (0.18215 for SD 1.x)."""
        return float(self.vae.config.scaling_factor)

    @property
    def vae_scale_factor(self) -> int:
        """Pixels per latent cell along each side (8 for SD)."""
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def latent_channels(self) -> int:
        """Channels of the latent image (4 for SD), whatever extra inputs the UNet takes."""
        return int(self.vae.config.latent_channels)

    @property
    def unet_kind(self) -> str:
        """What the UNet takes besides the latents, from its input channels: "standard" (4: latents only),
        "inpainting" (9: + mask + masked-image latents) or "depth" (5: + depth map)."""
        extra = int(self.unet.config.in_channels) - self.latent_channels
        kinds = {0: "standard", self.latent_channels + 1: "inpainting", 1: "depth"}
        if extra not in kinds:
            raise ValueError(f"a UNet with {self.unet.config.in_channels} input channels is not supported; "
                             f"known: {self.latent_channels} (standard), {2 * self.latent_channels + 1} "
                             f"(inpainting), {self.latent_channels + 1} (depth)")
        return kinds[extra]

    def latent_shape(self, width: int, height: int) -> tuple[int, int, int]:
        """(channels, height, width) of the latents for an image of width x height pixels."""
        factor = self.vae_scale_factor
        return (self.latent_channels, height // factor, width // factor)

    @property
    def native_size(self) -> int:
        """The image side the UNet was trained at, in pixels (512 for SD 1.x)."""
        return int(self.unet.config.sample_size) * self.vae_scale_factor
