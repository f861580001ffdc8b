"""Shared group-norm statistics for a tiled VAE decode (dapple.models.tiled_norms): with the whole image's own
statistics the decode is the plain one; estimated from the scaled-down latents they bring the tiled decode much
closer to the untiled one than diffusers' per-tile norms; the norms are restored afterwards, under accelerate's
offload hooks too; the memory option switches it."""

from __future__ import annotations

import pytest
import torch
from diffusers import AutoencoderKL

from dapple.engine.latents import decode
from dapple.errors import InvalidRequestError
from dapple.models.memory import MemoryOptions, sequential_offload, release, set_tile_size
from dapple.models.tiled_norms import needs_tiles, shared_norms

SCALE = 0.18215


@pytest.fixture(scope="module")
def vae() -> AutoencoderKL:
    torch.manual_seed(0)  # the tiny model's VAE: tiles of 64 px are 32 latents, 24 apart
    model = AutoencoderKL(block_out_channels=(32, 64), down_block_types=("DownEncoderBlock2D",) * 2,
                          up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=32,
                          sample_size=64).eval().requires_grad_(False)
    set_tile_size(model, 64)
    return model


def smooth_latents(side: int) -> torch.Tensor:
    """Low-frequency latents whose tiles differ in brightness, as a real picture's do."""
    y, x = torch.meshgrid(torch.linspace(0, 1, side), torch.linspace(0, 1, side), indexing="ij")
    return torch.stack([4 * x - 2, 3 * y - 1.5, torch.sin(6.28 * (x + 0.5 * y)), torch.cos(9.4 * (x - y))])[None]


def norms_of(vae) -> list[torch.nn.GroupNorm]:
    return [module for module in vae.decoder.modules() if isinstance(module, torch.nn.GroupNorm)]


def plain_decode(vae, latents, *, tiled: bool) -> torch.Tensor:
    vae.use_tiling = tiled
    try:
        return vae.decode(latents / SCALE, return_dict=False)[0]
    finally:
        vae.use_tiling = False


def test_the_images_own_statistics_give_the_plain_decode(vae) -> None:
    latents = torch.randn((2, 4, 24, 24), generator=torch.Generator().manual_seed(0))  # smaller than one tile
    with torch.no_grad():
        plain = plain_decode(vae, latents, tiled=False)
        with shared_norms(vae, latents / SCALE):  # nothing to scale down: the statistics are the image's own
            fixed = plain_decode(vae, latents, tiled=False)
    assert (fixed - plain).abs().max() <= 1e-4


def test_shared_statistics_bring_tiles_closer_to_the_untiled_decode(vae) -> None:
    latents = smooth_latents(96)  # 4 x 4 tiles
    assert needs_tiles(type("Tiling", (), {"use_tiling": True, "tile_latent_min_size": 32})(), latents)
    with torch.no_grad():
        untiled = plain_decode(vae, latents, tiled=False)
        per_tile = plain_decode(vae, latents, tiled=True)
        with shared_norms(vae, latents / SCALE):
            shared = plain_decode(vae, latents, tiled=True)
    per_tile_error = (per_tile - untiled).abs().mean().item()
    shared_error = (shared - untiled).abs().mean().item()
    assert shared_error < 0.5 * per_tile_error, (shared_error, per_tile_error)


def test_the_norms_are_restored_after_the_block_and_after_an_error(vae) -> None:
    latents = smooth_latents(64) / SCALE
    norms = norms_of(vae)
    with torch.no_grad():
        before = vae.decode(latents, return_dict=False)[0]
        with pytest.raises(RuntimeError, match="stop"), shared_norms(vae, latents):
            assert all("forward" in norm.__dict__ for norm in norms)
            raise RuntimeError("stop")
        assert not any("forward" in norm.__dict__ for norm in norms)
        assert torch.equal(vae.decode(latents, return_dict=False)[0], before)


def test_it_works_under_accelerates_sequential_offload_hooks(vae) -> None:
    latents = smooth_latents(64)
    with torch.no_grad(), shared_norms(vae, latents / SCALE):
        expected = plain_decode(vae, latents, tiled=True)
    sequential_offload(vae, torch.device("cpu"))  # each module's forward is now accelerate's wrapper
    try:
        hooked = norms_of(vae)[0]
        original = hooked.__dict__["_old_forward"]
        with torch.no_grad(), shared_norms(vae, latents / SCALE):
            offloaded = plain_decode(vae, latents, tiled=True)
        assert hooked.__dict__["_old_forward"] == original
    finally:
        release(vae, torch.device("cpu"))
    assert (offloaded - expected).abs().max() <= 1e-5


def test_the_memory_option_chooses_shared_or_per_tile_norms(vae) -> None:
    from types import SimpleNamespace

    from dapple.models.memory import MemoryState

    latents = smooth_latents(64)
    memory = MemoryState(SimpleNamespace(text_encoder=None, text_encoder_2=None, unet=torch.nn.Linear(1, 1),
                                            vae=vae, execution_device=None), torch.device("cpu"))
    try:
        memory.apply(MemoryOptions(vae_tiling=True, vae_tile_size=64))
        assert vae.shared_tile_norms
        with torch.no_grad():
            default = decode(vae, latents, SCALE)
            with shared_norms(vae, latents / SCALE):
                shared = (vae.tiled_decode(latents / SCALE, return_dict=False)[0] / 2 + 0.5).clamp(0, 1)
        memory.apply(MemoryOptions(vae_tiling=True, vae_tile_size=64, vae_tile_norms="per-tile"))
        assert not vae.shared_tile_norms
        with torch.no_grad():
            per_tile = decode(vae, latents, SCALE)
            theirs = (vae.tiled_decode(latents / SCALE, return_dict=False)[0] / 2 + 0.5).clamp(0, 1)
    finally:
        memory.undo()
    assert not vae.shared_tile_norms and not vae.use_tiling
    assert (default - shared).abs().max() <= 1e-5
    assert (per_tile - theirs).abs().max() <= 1e-5
    assert (default - per_tile).abs().max() > 1e-3
    assert MemoryOptions(vae_tiling=True, vae_tile_norms="per-tile").describe() == "VAE tiling (per-tile norms)"
    with pytest.raises(InvalidRequestError, match="vae_tile_norms 'global' is invalid; use 'shared'"):
        MemoryOptions(vae_tile_norms="global")
