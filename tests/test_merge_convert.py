"""dapple merge (streamed A1111 merges) and dapple convert (pickles to safetensors without running code)."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from dapple.errors import DappleError, PickleRefusedError
from dapple.interfaces.cli import app
from dapple.models.convert import convert_to_safetensors
from dapple.models.merge import merge_checkpoints
from dapple.models.safetensors_stream import write_streaming


def model(path: Path, seed: int, **overrides) -> Path:
    generator = torch.Generator().manual_seed(seed)
    tensors = {"conv.weight": torch.randn(8, 4, 3, 3, generator=generator),
               "norm.bias": torch.randn(8, generator=generator).half(),
               "position_ids": torch.arange(6)[None]}
    tensors.update(overrides)
    save_file(tensors, str(path))
    return path


def test_streamed_file_reads_back_with_safetensors(tmp_path) -> None:
    tensors = {"a": torch.randn(3, 5), "b": torch.arange(7, dtype=torch.int64), "c": torch.randn(2).bfloat16()}
    write_streaming(tmp_path / "x.safetensors", [(n, tuple(t.shape), t.dtype) for n, t in tensors.items()],
                    tensors.__getitem__, {"note": "hello"})
    loaded = load_file(str(tmp_path / "x.safetensors"))
    assert all(torch.equal(loaded[name], tensor) for name, tensor in tensors.items())


def test_weighted_sum_and_add_difference(tmp_path) -> None:
    a, b, c = (model(tmp_path / f"{n}.safetensors", seed) for n, seed in (("a", 1), ("b", 2), ("c", 3)))
    ta, tb, tc = (load_file(str(p)) for p in (a, b, c))
    merged = load_file(str(merge_checkpoints(a, b, tmp_path / "ws.safetensors", alpha=0.3)))
    assert torch.allclose(merged["conv.weight"], ta["conv.weight"] * 0.7 + tb["conv.weight"] * 0.3)
    assert merged["norm.bias"].dtype == torch.float16  # each tensor keeps A's dtype
    assert torch.equal(merged["position_ids"], ta["position_ids"])  # integer buffers are not averaged
    diff = load_file(str(merge_checkpoints(a, b, tmp_path / "ad.safetensors", mode="add-difference", alpha=1.0,
                                           c=c)))
    assert torch.allclose(diff["conv.weight"], ta["conv.weight"] + tb["conv.weight"] - tc["conv.weight"])


@pytest.mark.parametrize("make_b, kwargs, message", [
    (lambda p: model(p, 2, extra=torch.zeros(1)), {}, "1 extra"),
    (lambda p: model(p, 2, **{"conv.weight": torch.zeros(8, 4, 1, 1)}), {}, "1 of another shape"),
    (lambda p: model(p, 2), {"mode": "average"}, "merge mode 'average' is unknown"),
    (lambda p: model(p, 2), {"mode": "add-difference"}, "needs a third model"),
    (lambda p: model(p, 2), {"alpha": 1.5}, "alpha=1.5 is invalid"),
])
def test_merge_refuses_clearly_and_writes_nothing(tmp_path, make_b, kwargs, message) -> None:
    a = model(tmp_path / "a.safetensors", 1)
    b = make_b(tmp_path / "b.safetensors")
    with pytest.raises(DappleError, match=message):
        merge_checkpoints(a, b, tmp_path / "out.safetensors", **kwargs)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.safetensors", "b.safetensors"]


class Exploit:
    """A pickle that would run a command when loaded."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        import os

        return (os.system, (f"touch {self.marker}",))


def test_convert_writes_the_tensors_of_a_ckpt(tmp_path) -> None:
    weights = {"conv.weight": torch.randn(4, 4), "shared": torch.ones(2)}
    weights["alias"] = weights["shared"]  # shared storage: safetensors would refuse it unless copied
    torch.save({"state_dict": weights, "global_step": 1000}, tmp_path / "model.ckpt")
    target, report = convert_to_safetensors(tmp_path / "model.ckpt")
    assert target == tmp_path / "model.safetensors" and report["tensors"] == 3
    loaded = load_file(str(target))
    assert torch.equal(loaded["conv.weight"], weights["conv.weight"]) and torch.equal(loaded["alias"], torch.ones(2))


def test_convert_refuses_a_pickle_that_runs_code(tmp_path) -> None:
    marker = tmp_path / "pwned"
    (tmp_path / "evil.ckpt").write_bytes(pickle.dumps({"state_dict": Exploit(marker)}))
    with pytest.raises(PickleRefusedError, match="refused by torch's weights_only loader"):
        convert_to_safetensors(tmp_path / "evil.ckpt")
    assert not marker.exists() and not (tmp_path / "evil.safetensors").exists()


def test_merge_and_convert_commands(tmp_path) -> None:
    a, b = model(tmp_path / "a.safetensors", 1), model(tmp_path / "b.safetensors", 2)
    runner = CliRunner()
    result = runner.invoke(app, ["merge", str(a), str(b), "--alpha", "0.25", "--out", str(tmp_path / "m.safetensors")])
    assert result.exit_code == 0 and result.stdout.strip() == str(tmp_path / "m.safetensors")
    torch.save({"w": torch.ones(3)}, tmp_path / "x.pt")
    result = runner.invoke(app, ["convert", str(tmp_path / "x.pt")])
    assert result.exit_code == 0 and "1 tensors written" in result.stderr
    bad = runner.invoke(app, ["merge", str(a), str(tmp_path / "none.safetensors"), "--out",
                              str(tmp_path / "o.safetensors")])
    assert bad.exit_code == 2 and "does not exist" in bad.stderr
    unnamed = runner.invoke(app, ["merge", str(a), str(b), "--out", str(tmp_path / "o")])
    assert unnamed.exit_code == 2 and "the name must end in .safetensors" in unnamed.stderr
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("alpha, source", [(0.0, "a"), (1.0, "b")])
def test_weighted_sum_at_alpha_0_and_1_returns_an_input_bit_identically(tmp_path, alpha, source) -> None:
    paths = {"a": model(tmp_path / "a.safetensors", 1), "b": model(tmp_path / "b.safetensors", 2)}
    merged = load_file(str(merge_checkpoints(paths["a"], paths["b"], tmp_path / "m.safetensors", alpha=alpha)))
    original = load_file(str(paths[source]))
    assert all(torch.equal(merged[name], original[name]) for name in original if name != "position_ids")


def _mode(path: Path) -> int:
    return path.stat().st_mode & 0o777


def _normal_mode() -> int:
    from dapple.files import current_umask

    return 0o666 & ~current_umask()


def test_a_refused_pickle_is_one_sentence_without_torchs_advice(tmp_path, tiny_model_dir) -> None:
    marker = tmp_path / "pwned"
    torch.save({"state_dict": Exploit(marker)}, tmp_path / "evil.ckpt")  # torch's own zip format
    runner = CliRunner()
    for args in (["convert", str(tmp_path / "evil.ckpt")],
                 ["generate", "x", "--model", str(tmp_path / "evil.ckpt"), "--allow-pickle", "--out",
                  str(tmp_path / "out")]):
        result = runner.invoke(app, args)
        lines = result.stderr.strip().splitlines()
        assert result.exit_code == 2 and len(lines) == 1, result.output
        assert "refused" in lines[0] and "GLOBAL posix.system" in lines[0]  # what the file wanted to run
        assert "weights_only=False" not in lines[0] and "False" not in lines[0] and "trusted" not in lines[0]
    assert not marker.exists()


def test_convert_a_model_folder_to_a_single_file_that_diffusers_loads(tmp_path, tiny_model_dir) -> None:
    """diffusers' own single-file reader, given the folder as config, is the oracle: every tensor comes back."""
    from diffusers import StableDiffusionPipeline

    runner = CliRunner()
    result = runner.invoke(app, ["convert", str(tiny_model_dir), "--out", str(tmp_path / "tiny.safetensors")])
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == str(tmp_path / "tiny.safetensors") and "sd1 single-file layout" in result.stderr
    assert _mode(tmp_path / "tiny.safetensors") == _normal_mode()
    loaded = StableDiffusionPipeline.from_single_file(str(tmp_path / "tiny.safetensors"), config=str(tiny_model_dir),
                                                      local_files_only=True, safety_checker=None)
    reference = StableDiffusionPipeline.from_pretrained(str(tiny_model_dir), local_files_only=True,
                                                        safety_checker=None)
    for name in ("unet", "vae", "text_encoder"):
        ours, theirs = getattr(loaded, name).state_dict(), getattr(reference, name).state_dict()
        assert ours.keys() == theirs.keys(), name
        assert all(torch.equal(ours[key], theirs[key]) for key in theirs), name
    again = runner.invoke(app, ["convert", str(tiny_model_dir), "--out", str(tmp_path / "tiny.safetensors")])
    assert again.exit_code == 2 and "already exists" in again.stderr


def test_merge_works_on_what_create_tiny_model_writes_once_converted(tmp_path) -> None:
    runner = CliRunner()
    for name, seed in (("a", "1"), ("b", "2")):
        assert runner.invoke(app, ["create-tiny-model", str(tmp_path / name), "--seed", seed]).exit_code == 0
    folders = runner.invoke(app, ["merge", str(tmp_path / "a"), str(tmp_path / "b"), "--out",
                                  str(tmp_path / "m.safetensors")])
    assert folders.exit_code == 2 and "is a folder" in folders.stderr and "pickle" not in folders.stderr
    assert f"dapple convert {tmp_path / 'a'} --out a.safetensors" in folders.stderr
    for name in "ab":  # the default name: beside the folder
        converted = runner.invoke(app, ["convert", str(tmp_path / name)])
        assert converted.exit_code == 0 and converted.stdout.strip() == str(tmp_path / f"{name}.safetensors")
    merged = runner.invoke(app, ["merge", str(tmp_path / "a.safetensors"), str(tmp_path / "b.safetensors"),
                                 "--alpha", "0.5", "--out", str(tmp_path / "m.safetensors")])
    assert merged.exit_code == 0, merged.output
    a, b, m = (load_file(str(tmp_path / f"{n}.safetensors")) for n in "abm")
    key = "model.diffusion_model.out.2.weight"
    assert torch.allclose(m[key], (a[key] + b[key]) / 2) and not torch.equal(a[key], b[key])
    generated = runner.invoke(app, ["generate", "x", "--model", str(tmp_path / "m.safetensors"), "--steps", "1",
                                    "--out", str(tmp_path / "out")])
    assert generated.exit_code == 0, generated.output  # the merge is a model Dapple loads


def test_written_model_files_have_normal_permissions(tmp_path) -> None:
    """safetensors writes through a private temporary file (0600); what Dapple writes gets open()'s mode."""
    runner = CliRunner()
    assert runner.invoke(app, ["create-tiny-model", str(tmp_path / "tiny"), "--seed", "1"]).exit_code == 0
    files = [p for p in (tmp_path / "tiny").rglob("*") if p.is_file()]
    assert any(p.suffix == ".safetensors" for p in files)
    assert {_mode(p) for p in files} == {_normal_mode()}
    torch.save({"w": torch.ones(3)}, tmp_path / "x.pt")
    assert runner.invoke(app, ["convert", str(tmp_path / "x.pt")]).exit_code == 0
    assert _mode(tmp_path / "x.safetensors") == _normal_mode()
    image = runner.invoke(app, ["generate", "x", "--model", str(tmp_path / "tiny"), "--steps", "1", "--out",
                                str(tmp_path / "out")])
    assert image.exit_code == 0 and _mode(Path(image.stdout.strip())) == _normal_mode()
