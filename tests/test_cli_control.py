"""The command line's control units: --control MODEL:IMAGE[:weight[:start:end]] with its companion options on
each generating command, the infotext they leave, their errors, and `dapple control detect/modules/models`."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

import dapple
from control_fixtures import edge_map, perturbed_controlnet, save
from dapple.interfaces.cli import app
from dapple.service.outputs import read_infotext
from sample_images import smooth_image

runner = CliRunner()
FAST = ("--steps", "2", "--sampler", "Euler", "--seed", "5")


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def control_dir(tmp_path_factory, tiny_model_dir):
    folder = tmp_path_factory.mktemp("ControlNet")
    save(perturbed_controlnet(dapple.load(tiny_model_dir).components.unet, seed=3), folder / "tiny-canny")
    return folder


@pytest.fixture(scope="module")
def pictures(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pictures")
    edge_map(1).save(folder / "edges.png")
    smooth_image(2).save(folder / "photo.png")
    Image.fromarray(np.where(np.arange(64)[None, :] < 32, 255, 0).repeat(64, 0).astype(np.uint8)).save(folder / "mask.png")
    return folder


def pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.int16)


def test_generate_with_a_unit_changes_the_image_and_records_it(tiny_model_dir, control_dir, pictures, tmp_path) -> None:
    plain = invoke("generate", "a red circle", "--model", tiny_model_dir, "--out", tmp_path / "plain", *FAST)
    controlled = invoke("generate", "a red circle", "--model", tiny_model_dir, "--out", tmp_path / "cn", *FAST,
                        "--control-dir", control_dir, "--control", f"tiny-canny:{pictures / 'edges.png'}:1.5:0:1")
    assert plain.exit_code == 0 and controlled.exit_code == 0, controlled.output
    a, b = pixels(tmp_path / "plain" / "00000-5.png"), pixels(tmp_path / "cn" / "00000-5.png")
    assert np.abs(a - b).max() > 10
    info = read_infotext(tmp_path / "cn" / "00000-5.png")
    assert 'ControlNet 0: "Module: none, Model: tiny-canny' in info and "Weight: 1.5" in info


def test_weight_zero_from_the_command_line_is_the_plain_image(tiny_model_dir, control_dir, pictures, tmp_path) -> None:
    invoke("generate", "a red circle", "--model", tiny_model_dir, "--out", tmp_path / "plain", *FAST)
    result = invoke("generate", "a red circle", "--model", tiny_model_dir, "--out", tmp_path / "zero", *FAST,
                    "--control-dir", control_dir, "--control", f"tiny-canny:{pictures / 'edges.png'}:0")
    assert result.exit_code == 0, result.output
    assert np.array_equal(pixels(tmp_path / "plain" / "00000-5.png"), pixels(tmp_path / "zero" / "00000-5.png"))


@pytest.mark.parametrize("command", ["img2img", "inpaint", "outpaint"])
def test_each_image_command_takes_units_with_a_module(command, tiny_model_dir, control_dir, pictures, tmp_path) -> None:
    extra = {"img2img": [], "inpaint": [pictures / "mask.png"], "outpaint": []}[command]
    sides = ["--right", "16"] if command == "outpaint" else []
    result = invoke(command, pictures / "photo.png", *extra, "a red circle", "--model", tiny_model_dir, "--out",
                    tmp_path, *FAST, *sides, "--control-dir", control_dir,
                    "--control", f"tiny-canny:{pictures / 'photo.png'}", "--control-module", "canny",
                    "--control-mode", "ControlNet is more important", "--control-resize", "Just Resize")
    assert result.exit_code == 0, result.output
    info = read_infotext(next(tmp_path.glob("*.png")))
    assert "Module: canny" in info and "Control Mode: ControlNet is more important" in info


@pytest.mark.parametrize("args, message", [
    (["--control", "tiny-canny"], "has 1 part"),
    (["--control", "tiny-canny:missing.png"], "does not exist"),
    (["--control", "tiny-canny:{edges}:strong"], "is not a number"),
    (["--control", "tiny-canny:{edges}", "--control-module", "cany"], "did you mean 'canny'"),
    (["--control", "nope:{edges}"], "no control model named 'nope'"),
    (["--control", "tiny-canny:{edges}:1:0.9:0.1"], "guidance_start"),
    (["--control-module", "canny"], "needs a --control unit"),
    (["--control", "tiny-canny:{edges}", "--control", "tiny-canny:{edges}", "--control", "tiny-canny:{edges}",
      "--control-mode", "Balanced", "--control-mode", "Balanced"], "given 2 times for 3"),
])
def test_bad_units_are_clear_errors(args, message, tiny_model_dir, control_dir, pictures, tmp_path) -> None:
    args = [arg.format(edges=pictures / "edges.png") for arg in args]
    result = invoke("generate", "a red circle", "--model", tiny_model_dir, "--out", tmp_path, *FAST,
                    "--control-dir", control_dir, *args)
    assert result.exit_code != 0
    assert message in result.output and "Traceback" not in result.output


def test_detect_writes_the_map(pictures, tmp_path) -> None:
    square = Image.new("RGB", (64, 64), (35, 70, 220))
    square.paste((220, 35, 35), (16, 16, 48, 48))
    square.save(tmp_path / "square.png")
    result = invoke("control", "detect", tmp_path / "square.png", "--module", "canny", "--out", tmp_path / "map.png")
    assert result.exit_code == 0, result.output
    edges = np.asarray(Image.open(tmp_path / "map.png"))[..., 0] > 0
    assert edges.shape == (64, 64) and edges[14:18, 20:44].any(axis=0).all() and not edges[30, 30]
    assert invoke("control", "detect", tmp_path / "square.png", "--module", "nope").exit_code != 0


def test_modules_and_models_are_listed(control_dir) -> None:
    modules = invoke("control", "modules")
    assert modules.exit_code == 0 and "canny" in modules.stdout and "Canny Low Threshold 100" in modules.stdout
    models = invoke("control", "models", "--control-dir", control_dir)
    assert models.exit_code == 0 and "tiny-canny [" in models.stdout and "controlnet" in models.stdout
