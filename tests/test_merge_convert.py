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
