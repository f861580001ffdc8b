"""Shared fixtures: one tiny random model folder per test session, loaded by Dapple and by diffusers."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

import dapple
from dapple.models.tiny import save_tiny_model


@pytest.fixture(scope="session", autouse=True)
def hash_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Model-hash cache in a temporary folder, not the user's ~/.cache."""
    folder = tmp_path_factory.mktemp("cache")
    os.environ["DAPPLE_CACHE_DIR"] = str(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("models") / "tiny", seed=0)


@pytest.fixture(scope="session")
def pipe(tiny_model_dir: Path) -> dapple.Pipeline:
    return dapple.load(tiny_model_dir, device="cpu")


@pytest.fixture(scope="session")
def reference_pipe(tiny_model_dir: Path):
    """diffusers' own StableDiffusionPipeline on the same folder: the peer we must match."""
    from diffusers import StableDiffusionPipeline

    reference = StableDiffusionPipeline.from_pretrained(
        str(tiny_model_dir), safety_checker=None, requires_safety_checker=False, local_files_only=True
    )
    reference.set_progress_bar_config(disable=True)
    return reference


@pytest.fixture(scope="session")
def inpaint_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random inpainting model: its UNet takes 9 channels (latents, mask, masked-image latents)."""
    return save_tiny_model(tmp_path_factory.mktemp("models") / "tiny-inpaint", seed=1, unet_in_channels=9)


@pytest.fixture(scope="session")
def depth_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random depth model: its UNet takes 5 channels (latents, depth), the SD 2 depth layout."""
    return save_tiny_model(tmp_path_factory.mktemp("models") / "tiny-depth", seed=2, unet_in_channels=5)
