"""The dapple command line: outputs, and bad input as one line with exit code 2."""

import json
from pathlib import Path

import pytest
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
        (["generate", "x", "--width", "100"], "width=100 is invalid (Input should be a multiple of 8); allowed: multiples of 8"),
        (["generate", "x", "--steps", "500"], "steps=500 is invalid"),
        (["generate", "x", "--sampler", "Euler b"], "unknown sampler 'Euler b'; valid samplers: Euler,"),
        (["generate", "x", "--model", "/nonexistent/model"], "model folder /nonexistent/model does not exist"),
        (["generate", "x"], "no model given"),
        (["info", "/nonexistent.png"], "No such file or directory"),
        (["generate", "x", "--model", "TINY", "--dtype", "fp7"], "unknown dtype 'fp7'"),
    ],
)
def test_bad_input_is_one_line_and_exit_code_2(args, message, tiny_model_dir) -> None:
    result = invoke(*[str(tiny_model_dir) if a == "TINY" else a for a in args])
    assert result.exit_code == 2
    assert result.stderr.strip().splitlines() == [result.stderr.strip()]  # exactly one line
    assert result.stderr.startswith("error: ") and message in result.stderr
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


def test_a_long_prompt_warns_on_one_line_and_still_generates(tiny_model_dir, tmp_path) -> None:
    result = invoke("generate", " ".join(["cat"] * 80), "--model", tiny_model_dir, "--out", tmp_path,
                    "--steps", "1", "--seed", "1")
    assert result.exit_code == 0
    assert "warning: prompt has 80 tokens but the text encoder reads 75; the last 5 tokens were dropped" in result.stderr
    assert (tmp_path / "00000-1.png").exists()


def test_inspect_tokens_uses_a_models_tokenizer(tiny_model_dir, tmp_path) -> None:
    result = invoke("inspect", "tokens", "a photo of a cat", "--model", tiny_model_dir)
    assert result.exit_code == 0 and result.stdout.splitlines()[6].split() == ["5", "2368", "cat</w>"]
    missing = invoke("inspect", "tokens", "x", "--model", tmp_path / "nowhere")
    assert missing.exit_code == 2 and "does not exist" in missing.stderr
