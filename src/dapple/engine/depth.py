"""Depth maps for depth-guided generation: the SD 2 depth UNet takes the depth map, resized to the latents and
scaled to [-1, 1], as a fifth input channel (diffusers' StableDiffusionDepth2ImgPipeline.prepare_depth_map)."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from dapple.errors import InvalidRequestError


def depth_tensor(source: Any) -> torch.Tensor:
    """An image (any mode; luminance is used), an (H, W) array or tensor -> (1, H, W) float32, larger = nearer."""
    if isinstance(source, Image.Image):
        mode_ok = source.mode in ("L", "I", "I;16", "F")
        array = np.asarray(source if mode_ok else source.convert("L")).astype(np.float32)
    elif isinstance(source, torch.Tensor):
        array = source.detach().cpu().float().numpy()
    elif isinstance(source, np.ndarray):
        array = source.astype(np.float32)
    else:
        raise InvalidRequestError(
            f"depth_map has type {type(source).__name__}; allowed: an image, or an (H, W) numpy array or tensor")
    array = np.squeeze(array)
    if array.ndim != 2:
        raise InvalidRequestError(f"depth_map has shape {array.shape}; allowed: (H, W)")
    if not np.isfinite(array).all():
        raise InvalidRequestError("depth_map holds NaN or infinite values")
    return torch.from_numpy(np.ascontiguousarray(array))[None]


def depth_channels(depth: torch.Tensor, batch: int, latent_size: tuple[int, int]) -> torch.Tensor:
    """(1, H, W) depth -> (batch, 1, h, w) at latent size (bicubic), min-max scaled to [-1, 1] (a flat map -> 0)."""
    resized = F.interpolate(depth.float().unsqueeze(1), size=tuple(latent_size), mode="bicubic", align_corners=False)
    low = torch.amin(resized, dim=[1, 2, 3], keepdim=True)
    high = torch.amax(resized, dim=[1, 2, 3], keepdim=True)
    spread = high - low
    scaled = torch.where(spread > 0, 2.0 * (resized - low) / spread.clamp(min=1e-12) - 1.0, torch.zeros_like(resized))
    return scaled.repeat(batch, 1, 1, 1)
