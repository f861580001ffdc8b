"""The dapple command line: outputs, and bad input as one line with exit code 2."""

import json
from pathlib import Path

import pytest
from PIL import Image
from typer.testing import CliRunner

from dapple.interfaces.cli import app
from dapple.service.outputs import read_infotext

runner = CliRunner()


def invoke(*args: str):
    return runner.invoke(app, [str(a) for a in args])


def test_generate_writes_numbered_pngs_with_infotext_and_prints_their_paths(tiny_model_dir, tmp_path) -> None:
    result = invoke("generate", "a red circle", "--model", tiny_model_dir, "--out", tmp_path, "--seed", "42",
                    "--batch", "2", "--steps", "3", "--sampler", "Euler a", "--negative", "blurry")
    assert result.exit_code == 0, result.output
    printed = [line for line in result.stdout.splitlines() if line.endswith(".png")]
    assert printed == [str(tmp_path / "00000-42.png"), str(tmp_path / "00001-43.png")]
    assert "sampling" in result.stderr  # the progress bar
    assert read_infotext(printed[1]).startswith("a red circle\nNegative prompt: blurry\nSteps: 3, Sampler: Euler a")


def test_info_prints_text_and_json(tiny_model_dir, tmp_path) -> None:
    invoke("generate", "a cat", "--model", tiny_model_dir, "--out", tmp_path, "--seed", "3", "--steps", "1")
    image = tmp_path / "00000-3.png"
    text = invoke("info", image)
    assert text.exit_code == 0 and "Seed: 3" in text.stdout
    parsed = json.loads(invoke("info", image, "--json").stdout)
    assert parsed["Prompt"] == "a cat" and parsed["Seed"] == 3 and parsed["width"] == 64


def test_inspect_tokens_prints_the_id_table() -> None:
    result = invoke("inspect", "tokens", "a photo of a cat")
    assert result.exit_code == 0
    lines = result.stdout.splitlines()
    assert lines[2].split() == ["1", "320", "a</w>"]
    assert lines[6].split() == ["5", "2368", "cat</w>"]
    assert "7 of 77 slots used" in lines[-1]


def test_samplers_lists_every_registered_sampler() -> None:
    result = invoke("samplers")
    assert result.exit_code == 0
    names = [line[:14].strip() for line in result.stdout.splitlines()]
    assert {"Euler a", "DPM++ 2M", "DPM++ SDE", "UniPC", "LCM"} <= set(names)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["generate", "x", "--width", "100"], "--width 100 is invalid (Input should be a multiple of 8); allowed: multiples of 8"),
        (["generate", "x", "--steps", "500"], "--steps 500 is invalid"),
        (["generate", "x", "--sampler", "Euler b"], "unknown sampler 'Euler b'; valid samplers: Euler,"),
        (["generate", "x", "--model", "/nonexistent/model"], "model folder /nonexistent/model does not exist"),
        (["info", "/nonexistent.png"], "No such file or directory"),
        (["generate", "x", "--model", "TINY", "--dtype", "fp7"], "unknown dtype 'fp7'"),
        (["generate", "x", "--hires-scale", "5"], "--hires-scale 5.0 is invalid"),
        (["img2img", "/nonexistent.png", "x", "--model", "TINY"], "IMAGE file '/nonexistent.png' does not exist"),
        (["img2img", "IMAGE", "x", "--strength", "1.5"], "--strength 1.5 is invalid"),
        (["inpaint", "IMAGE", "BLACK", "x", "--model", "TINY"], "nothing to inpaint"),
        (["outpaint", "IMAGE", "x", "--left", "10"], "--left 10 is invalid"),
        (["depth2img", "IMAGE", "IMAGE", "x", "--model", "TINY"], "DEPTH needs a depth model"),
    ],
)
def test_bad_input_is_one_line_and_exit_code_2(args, message, tiny_model_dir, tmp_path) -> None:
    Image.new("RGB", (64, 64), "red").save(tmp_path / "image.png")
    Image.new("L", (64, 64), 0).save(tmp_path / "black.png")
    paths = {"TINY": tiny_model_dir, "IMAGE": tmp_path / "image.png", "BLACK": tmp_path / "black.png"}
    result = invoke(*[str(paths.get(a, a)) for a in args])
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    # one error line, the last; before it at most the line saying the model loaded (for errors that need it)
    assert lines[-1].startswith("error: ") and message in lines[-1]
    assert all(line.startswith("loaded ") for line in lines[:-1]), lines
    assert "Traceback" not in result.output


def test_unreadable_image_for_info(tmp_path: Path) -> None:
    not_an_image = tmp_path / "notes.png"
    not_an_image.write_text("hello")
    result = invoke("info", not_an_image)
    assert result.exit_code == 2 and "cannot identify image file" in result.stderr


def test_png_without_parameters(tmp_path: Path) -> None:
    from PIL import Image

    Image.new("RGB", (8, 8)).save(tmp_path / "plain.png")
    result = invoke("info", tmp_path / "plain.png")
    assert result.exit_code == 2 and "carries no generation parameters" in result.stderr


def test_a_long_prompt_generates_without_warnings(tiny_model_dir, tmp_path) -> None:
    result = invoke("generate", " ".join(["cat"] * 80), "--model", tiny_model_dir, "--out", tmp_path,
                    "--steps", "1", "--seed", "1")
    assert result.exit_code == 0
    assert "warning" not in result.stderr  # 80 tokens are two chunks now, nothing is dropped
    assert (tmp_path / "00000-1.png").exists()


def test_inspect_tokens_uses_a_models_tokenizer(tiny_model_dir, tmp_path) -> None:
    result = invoke("inspect", "tokens", "a photo of a cat", "--model", tiny_model_dir)
    assert result.exit_code == 0 and result.stdout.splitlines()[6].split() == ["5", "2368", "cat</w>"]
    missing = invoke("inspect", "tokens", "x", "--model", tmp_path / "nowhere")
    assert missing.exit_code == 2 and "does not exist" in missing.stderr


def test_image_mode_commands_write_pngs_with_their_parameters(tiny_model_dir, tmp_path) -> None:
    Image.new("RGB", (64, 64), (200, 40, 40)).save(tmp_path / "in.png")
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (0, 0, 32, 64))
    mask.save(tmp_path / "mask.png")
    common = ["--model", tiny_model_dir, "--out", tmp_path / "out", "--seed", "5", "--steps", "4"]
    runs = {
        "img2img": (["img2img", tmp_path / "in.png", "a cat", "--strength", "0.5"], "Denoising strength: 0.5"),
        "inpaint": (["inpaint", tmp_path / "in.png", tmp_path / "mask.png", "a cat", "--mask-blur", "2"],
                    "Mask blur: 2"),
        "outpaint": (["outpaint", tmp_path / "in.png", "a cat", "--right", "16"], "Outpaint: right=16"),
        "hires": (["generate", "a cat", "--hires-scale", "1.5", "--hires-steps", "2"], "Hires upscale: 1.5"),
    }
    sizes = {"img2img": (64, 64), "inpaint": (64, 64), "outpaint": (80, 64), "hires": (96, 96)}
    for name, (args, entry) in runs.items():
        result = invoke(*args, *common)
        assert result.exit_code == 0, result.output
        path = result.stdout.strip().splitlines()[-1]
        assert entry in read_infotext(path) and Image.open(path).size == sizes[name]
    assert "hires" in result.stderr  # the second pass has its own progress bar
