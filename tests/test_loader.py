"""Loading model folders: safetensors by default, pickle refused unless asked, never the network."""

import shutil
import socket
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import dapple
from dapple.errors import ModelLoadError, PickleRefusedError
from dapple.models.devices import resolve_device, resolve_dtype


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args, **kwargs):
        raise AssertionError("the network was touched")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def _pickle_only_copy(source: Path, target: Path, components: tuple[str, ...] = ("text_encoder", "unet", "vae")) -> Path:
    """The same model with the components' .safetensors files rewritten as torch pickles (.bin)."""
    shutil.copytree(source, target)
    for weights in [w for name in components for w in (target / name).glob("*.safetensors")]:
        name = "pytorch_model.bin" if weights.parent.name == "text_encoder" else "diffusion_pytorch_model.bin"
        torch.save(load_file(weights), weights.parent / name)
        weights.unlink()
    return target


def test_local_folder_loads_and_generates_without_the_network(tiny_model_dir, no_network) -> None:
    pipe = dapple.load(tiny_model_dir, device="cpu")
    assert pipe.generate("a red circle", steps=1, seed=1).images


def test_components_are_exposed(pipe) -> None:
    c = pipe.components
    assert pipe.unet is c.unet and pipe.vae is c.vae and pipe.text_encoder is c.text_encoder
    assert c.prediction_type == "epsilon"
    assert c.latent_scaling_factor == pytest.approx(0.18215)
    assert c.vae_scale_factor == 2 and c.native_size == 64
    assert pipe.scheduler.__class__.__name__ == "DPMSolverMultistepScheduler"


def test_pickle_only_folder_is_refused_with_the_way_to_opt_in(tiny_model_dir, tmp_path) -> None:
    folder = _pickle_only_copy(tiny_model_dir, tmp_path / "pickled")
    with pytest.raises(PickleRefusedError, match=r"only has pickle weights.*allow_pickle=True.*weights_only"):
        dapple.load(folder, device="cpu")


def test_pickle_opt_in_loads_the_same_model(tiny_model_dir, tmp_path, pipe) -> None:
    folder = _pickle_only_copy(tiny_model_dir, tmp_path / "pickled")
    pickled = dapple.load(folder, device="cpu", allow_pickle=True)
    a = pickled.generate("a red circle", steps=2, seed=9, sampler="Euler").pixels
    b = pipe.generate("a red circle", steps=2, seed=9, sampler="Euler").pixels
    assert torch.equal(a, b)


def test_a_folder_with_one_pickled_component_loads_the_others_from_safetensors(tiny_model_dir, tmp_path, pipe) -> None:
    folder = _pickle_only_copy(tiny_model_dir, tmp_path / "mixed", components=("unet",))
    with pytest.raises(PickleRefusedError, match="unet/ only has pickle weights"):
        dapple.load(folder, device="cpu")
    mixed = dapple.load(folder, device="cpu", allow_pickle=True)
    assert torch.equal(mixed.generate("x", steps=1, seed=3).pixels, pipe.generate("x", steps=1, seed=3).pixels)


def test_missing_folder_is_a_clear_error(tmp_path) -> None:
    with pytest.raises(ModelLoadError, match="does not exist"):
        dapple.load(tmp_path / "nowhere")


def test_folder_without_model_index_is_a_clear_error(tmp_path) -> None:
    with pytest.raises(ModelLoadError, match="no model_index.json"):
        dapple.load(tmp_path)


def test_folder_without_weights_is_a_clear_error(tiny_model_dir, tmp_path) -> None:
    folder = shutil.copytree(tiny_model_dir, tmp_path / "empty")
    for weights in Path(folder, "unet").glob("*.safetensors"):
        weights.unlink()
    with pytest.raises(ModelLoadError, match="no weights in unet/"):
        dapple.load(folder)


def test_no_path_says_what_to_pass(monkeypatch, tmp_path) -> None:
    import dapple.api

    monkeypatch.setattr(dapple.api, "BUILTIN_MODEL_DIR", tmp_path / "not_shipped")
    with pytest.raises(ModelLoadError, match="pass a diffusers model folder"):
        dapple.load()


def test_no_path_loads_the_builtin_folder_when_it_ships(monkeypatch, tiny_model_dir) -> None:
    import dapple.api

    monkeypatch.setattr(dapple.api, "BUILTIN_MODEL_DIR", tiny_model_dir)
    assert dapple.load(device="cpu").components.source == str(tiny_model_dir)


def test_bundled_tokenizer_is_used_when_the_folder_has_none(tiny_model_dir, tmp_path, pipe) -> None:
    folder = shutil.copytree(tiny_model_dir, tmp_path / "no_tokenizer")
    shutil.rmtree(Path(folder, "tokenizer"))
    bare = dapple.load(folder, device="cpu")
    assert bare.tokenizer("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert torch.equal(bare.generate("x", steps=1, seed=2).pixels, pipe.generate("x", steps=1, seed=2).pixels)


def test_dtype_follows_the_device() -> None:
    assert resolve_dtype(None, torch.device("cpu")) == torch.float32
    assert resolve_dtype(None, torch.device("cuda")) == torch.float16
    assert resolve_dtype("bf16", torch.device("cpu")) == torch.bfloat16
    assert resolve_device("cpu").type == "cpu"
    with pytest.raises(ModelLoadError, match="unknown dtype 'fp8'"):
        resolve_dtype("fp8", torch.device("cpu"))


def test_a_hub_id_is_fetched_then_loaded_from_the_local_snapshot(tiny_model_dir, monkeypatch) -> None:
    import huggingface_hub

    asked = []

    def fake_snapshot_download(repo_id, allow_patterns):
        asked.append(repo_id)
        assert "*/*.safetensors" in allow_patterns and not any(p.endswith(".bin") for p in allow_patterns)
        return str(tiny_model_dir)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    pipe = dapple.load("someone/tiny-sd", device="cpu")
    assert asked == ["someone/tiny-sd"] and pipe.components.native_size == 64


def test_a_relative_path_that_looks_like_a_hub_id_but_exists_is_never_fetched(tiny_model_dir, monkeypatch) -> None:
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda *a, **k: pytest.fail("hub was asked"))
    monkeypatch.chdir(tiny_model_dir.parent.parent)
    relative = f"{tiny_model_dir.parent.name}/{tiny_model_dir.name}"
    assert dapple.load(relative, device="cpu").components.name == "tiny"
