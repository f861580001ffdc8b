"""Model folders in A1111's and ComfyUI's layouts: listing with hashes, choosing by name, staying inside."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

from dapple.errors import ModelLoadError
from dapple.interfaces.cli import app
from dapple.models.library import ModelFolders
from dapple.models.loader import load_components
from dapple.models.single_file import write_single_file, write_vae_file
from dapple.models.tiny import build_tiny_family_pipeline


@pytest.fixture(scope="module")
def webui(tmp_path_factory) -> Path:
    """An A1111 folder: a single-file checkpoint, a diffusers folder, a VAE, a LoRA for the model, an embedding."""
    root = tmp_path_factory.mktemp("webui")
    for sub in ("models/Stable-diffusion", "models/VAE", "models/Lora", "embeddings"):
        (root / sub).mkdir(parents=True)
    pipeline = build_tiny_family_pipeline("sd1", seed=3)
    pipeline.save_pretrained(str(root / "models/Stable-diffusion/tiny-folder"), safe_serialization=True)
    components = load_components(root / "models/Stable-diffusion/tiny-folder", device="cpu")
    write_single_file(components, root / "models/Stable-diffusion/tiny.safetensors", "sd1")
    write_vae_file(build_tiny_family_pipeline("sd1", seed=4).vae, root / "models/VAE/other.safetensors")
    (root / "embeddings" / "thing.pt").write_bytes(b"not read by the listing")
    return root


def test_both_layouts_are_found_under_their_roots(tmp_path) -> None:
    for sub in ("models/checkpoints", "models/loras", "models/vae", "models/embeddings"):
        (tmp_path / "comfy" / sub).mkdir(parents=True)
    folders = ModelFolders.from_root(tmp_path / "comfy")
    assert folders.checkpoints == (tmp_path / "comfy/models/checkpoints",)
    assert folders.loras == (tmp_path / "comfy/models/loras",)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="models/Stable-diffusion"):
        ModelFolders.from_root(tmp_path / "empty")


def test_dapple_models_lists_everything_with_a1111_short_hashes(webui) -> None:
    result = CliRunner().invoke(app, ["models", "--models-dir", str(webui), "--json"])
    assert result.exit_code == 0, result.output
    rows = {(row["kind"], row["name"]): row for row in json.loads(result.stdout)}
    assert set(rows) == {("checkpoints", "tiny"), ("checkpoints", "tiny-folder"), ("vae", "other"),
                         ("embeddings", "thing")}
    single = webui / "models/Stable-diffusion/tiny.safetensors"
    assert rows[("checkpoints", "tiny")]["hash"] == hashlib.sha256(single.read_bytes()).hexdigest()[:10]
    table = CliRunner().invoke(app, ["models", "--models-dir", str(webui), "--kind", "vae"])
    assert "other" in table.stdout and "tiny" not in table.stdout


def test_generate_takes_model_vae_and_lora_by_name(webui, tmp_path) -> None:
    layer = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    save_file({f"{layer}.lora_down.weight": torch.randn(2, 64), f"{layer}.lora_up.weight": torch.randn(64, 2)},
              str(webui / "models/Lora/style.safetensors"))
    result = CliRunner().invoke(app, [
        "generate", "a red circle <lora:style:0.5>", "--models-dir", str(webui), "--model", "tiny", "--vae", "other",
        "--steps", "2", "--width", "64", "--height", "64", "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    from PIL import Image

    from dapple.infotext import PNG_KEY, parse_infotext

    parameters = parse_infotext(Image.open(next(tmp_path.glob("*.png"))).text[PNG_KEY])
    assert parameters["Model"] == "tiny" and parameters["VAE"] == "other.safetensors"
    assert parameters["Lora hashes"].startswith("style: ")


def test_names_never_leave_the_folders(webui, tmp_path) -> None:
    folders = ModelFolders.from_root(webui)
    for bad in ("../secret", "a/b", ""):
        with pytest.raises(ModelLoadError, match="chosen by name"):
            folders.find("checkpoints", bad)
    outside = tmp_path / "outside.safetensors"
    outside.write_bytes(b"x")
    link = webui / "models/Stable-diffusion/linked.safetensors"
    link.symlink_to(outside)
    try:
        assert "linked" not in [entry.name for entry in folders.entries("checkpoints")]
        with pytest.raises(ModelLoadError, match="no checkpoint named 'linked'; available: tiny, tiny-folder"):
            folders.find("checkpoints", "linked")
    finally:
        link.unlink()
