"""The extra input channels some UNets take beside the latents, as loop extensions.

- An inpainting UNet (9 channels for SD) takes the mask and the masked image's latents (diffusers'
  StableDiffusionInpaintPipeline); when everything is to be drawn (txt2img, img2img, hires fix) the mask is all
  ones and the masked image grey, as A1111 conditions inpainting models in txt2img.
- A depth UNet (5 channels, SD 2 depth) takes the depth map scaled to [-1, 1] (StableDiffusionDepth2ImgPipeline).

`default_input_channels` picks the one a model needs from its UNet; modes that know better (inpaint with its
mask, depth2img with its map) set their own on the run instead. This is the only place the engine asks what
kind of UNet it has.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from dapple.engine.depth import depth_channels
from dapple.engine.extensions import ORDER_INPUT_CHANNELS, Extension, ModelInputs
from dapple.models.components import Components

if TYPE_CHECKING:
    from dapple.engine.hooks import StepContext


class InputChannels(Extension):
    """Fixed extra channels (one row per image) appended to every UNet call of a pass."""

    name = "input channels"
    order = ORDER_INPUT_CHANNELS

    def __init__(self, channels: torch.Tensor) -> None:
        self.channels = channels

    def before_model(self, step: "StepContext", inputs: ModelInputs) -> None:
        inputs.add_channels(self.channels)


class UnmaskedInpaintingChannels(Extension):
    """An inpainting UNet's inputs when everything is to be drawn, at whatever size the pass runs (the hires pass
    runs larger): mask = 1, masked image = grey, encoded with the posterior mean (no random draw)."""

    name = "input channels"
    order = ORDER_INPUT_CHANNELS

    def __init__(self, components: Components) -> None:
        self.components = components
        self._by_size: dict[tuple[int, ...], torch.Tensor] = {}

    @property
    def model(self) -> torch.nn.Module:
        """The model this extension calls inside the loop (it encodes the grey image), lent with the UNet under
        CPU offload (memory.stage_models)."""
        return self.components.vae

    def channels(self, images: int, width: int, height: int) -> torch.Tensor:
        key = (images, width, height)
        if key not in self._by_size:
            self._by_size[key] = unmasked_inpainting_channels(self.components, images, width, height)
        return self._by_size[key]

    def before_model(self, step: "StepContext", inputs: ModelInputs) -> None:
        factor = self.components.vae_scale_factor
        height, width = (side * factor for side in inputs.sample.shape[-2:])
        inputs.add_channels(self.channels(inputs.images, width, height))


class DepthChannels(Extension):
    """The depth map as the UNet's fifth input channel, at the latent size of the pass."""

    name = "input channels"
    order = ORDER_INPUT_CHANNELS

    def __init__(self, depth: torch.Tensor) -> None:
        self.depth = depth
        self._by_size: dict[tuple[int, ...], torch.Tensor] = {}

    def before_model(self, step: "StepContext", inputs: ModelInputs) -> None:
        key = (inputs.images, *inputs.sample.shape[-2:])
        if key not in self._by_size:
            self._by_size[key] = depth_channels(self.depth, inputs.images, tuple(inputs.sample.shape[-2:])).to(
                inputs.sample.device, inputs.sample.dtype)
        inputs.add_channels(self._by_size[key])


def unmasked_inpainting_channels(components: Components, batch: int, width: int, height: int) -> torch.Tensor:
    """(batch, 1 + C, h, w): mask of ones and the latents of a grey image (A1111's txt2img conditioning for
    inpainting models)."""
    grey = torch.zeros((1, 3, height, width), device=components.device, dtype=components.vae.dtype)
    latents = components.vae.encode(grey).latent_dist.mean * components.latent_scaling_factor
    mask = torch.ones_like(latents[:, :1])
    return torch.cat([mask, latents], dim=1).repeat(batch, 1, 1, 1).to(components.dtype)


def default_input_channels(components: Components) -> Extension | None:
    """What a model's UNet needs beside the latents when the mode gives nothing more specific: nothing for a
    standard UNet, the all-masked inputs for an inpainting one. A depth UNet needs its depth map, which only
    depth2img gives (the mode dispatch refuses the other modes for depth models)."""
    if components.unet_kind == "inpainting":
        return UnmaskedInpaintingChannels(components)
    return None
