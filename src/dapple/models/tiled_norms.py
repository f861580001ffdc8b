"""One set of group-norm statistics for every tile of a tiled VAE decode.

A tiled decode (diffusers' AutoencoderKL.tiled_decode) runs the decoder on each overlapping tile alone, so every
group norm inside it normalises by that tile's own mean and variance. Tiles with different content come out with
different brightness and contrast, and the linear blend between them turns the difference into soft seams.

pkuliyi2015's Tiled VAE (the multidiffusion-upscaler extension for A1111) removes the cause: every tile is
normalised by the same statistics. Its fast mode estimates them from one decode of the latents scaled down to a
tile's size; that is what this module does:

1. scale the latents down (nearest-exact, which keeps their per-channel distribution) so the longer side fits
   one tile, and decode that once, recording each decoder group norm's per-image, per-group mean and variance;
2. during the tiled decode, every group norm uses the recorded statistics instead of the tile's.

The statistics are an estimate of the full image's, so the result is not the untiled decode bit for bit (neither
is plain tiling); what it removes is the tile-to-tile disagreement. benchmarks/vae_tiling.py measures both.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F


def estimate_statistics(decoder_input: torch.nn.Module, norms: list[torch.nn.GroupNorm],
                        small: torch.Tensor) -> dict[torch.nn.GroupNorm, tuple[torch.Tensor, torch.Tensor]]:
    """Run decoder_input(small) once and return each group norm's (mean, var) of its input, shaped
    (batch, groups), in float32. A norm that did not run is left out."""
    statistics: dict[torch.nn.GroupNorm, tuple[torch.Tensor, torch.Tensor]] = {}

    def record(module: torch.nn.GroupNorm, args: tuple) -> None:
        grouped = args[0].float().reshape(args[0].shape[0], module.num_groups, -1)
        statistics[module] = (grouped.mean(dim=2), grouped.var(dim=2, unbiased=False))

    handles = [norm.register_forward_pre_hook(record) for norm in norms]
    try:
        decoder_input(small)
    finally:
        for handle in handles:
            handle.remove()
    return statistics


def _fixed_group_norm(module: torch.nn.GroupNorm, mean: torch.Tensor, var: torch.Tensor):
    """A forward for `module` that normalises by the given per-(image, group) statistics.

    (x - mean) / sqrt(var + eps) * weight + bias is folded into one per-(image, channel) scale and shift, so the
    tile's activations go through a single fused multiply-add (in float32, as torch's own group norm computes)."""
    per_group = module.num_channels // module.num_groups

    def forward(x: torch.Tensor) -> torch.Tensor:
        batch = x.shape[0]
        scale = torch.rsqrt(var[:batch] + module.eps).repeat_interleave(per_group, dim=1)  # (batch, channels)
        shift = -mean[:batch].repeat_interleave(per_group, dim=1) * scale
        if module.affine:
            scale = scale * module.weight.float()
            shift = shift * module.weight.float() + module.bias.float()
        shape = scale.shape + (1,) * (x.dim() - 2)
        return torch.addcmul(shift.reshape(shape), x.float(), scale.reshape(shape)).to(x.dtype)

    return forward


@contextmanager
def shared_norms(vae: torch.nn.Module, scaled_latents: torch.Tensor) -> Iterator[None]:
    """Within this block, the VAE decoder's group norms use statistics estimated from `scaled_latents` (the
    latents already divided by the scaling factor, as vae.decode takes them) scaled down to one tile."""
    norms = [module for module in vae.decoder.modules() if isinstance(module, torch.nn.GroupNorm)]
    height, width = scaled_latents.shape[-2:]
    tile = int(vae.tile_latent_min_size)
    shrink = max(height, width) / tile
    size = (max(1, round(height / shrink)), max(1, round(width / shrink))) if shrink > 1 else (height, width)
    small = F.interpolate(scaled_latents, size=size, mode="nearest-exact")

    def decoder_input(latents: torch.Tensor) -> torch.Tensor:  # what tiled_decode runs on each tile
        if vae.post_quant_conv is not None:
            latents = vae.post_quant_conv(latents)
        return vae.decoder(latents)

    statistics = estimate_statistics(decoder_input, norms, small)
    replaced: list[tuple[torch.nn.GroupNorm, str, object]] = []
    try:
        for norm, (mean, var) in statistics.items():
            # An instance attribute shadows the class's forward. Under accelerate's offload hooks the module's
            # forward is the hook's wrapper, which moves the weights in and then calls _old_forward: replace that.
            attribute = "_old_forward" if hasattr(norm, "_hf_hook") else "forward"
            replaced.append((norm, attribute, norm.__dict__.get(attribute)))
            setattr(norm, attribute, _fixed_group_norm(norm, mean, var))
        yield
    finally:
        for norm, attribute, previous in replaced:
            if previous is None:
                norm.__dict__.pop(attribute, None)
            else:
                setattr(norm, attribute, previous)


def needs_tiles(vae: torch.nn.Module, scaled_latents: torch.Tensor) -> bool:
    """True when vae.decode will tile these latents (use_tiling on and larger than one tile)."""
    tile = getattr(vae, "tile_latent_min_size", None)
    return bool(getattr(vae, "use_tiling", False)) and tile is not None and max(scaled_latents.shape[-2:]) > tile
