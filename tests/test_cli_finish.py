"""The small things a finished command line has: --version, serve's ready line, progress that suits where it goes,
quiet libraries, "did you mean", --threads everywhere a model loads, create-tiny-model that never overwrites."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

import dapple
from dapple.interfaces import cli
from dapple.interfaces.cli import app

runner = CliRunner()
DAPPLE = str(Path(sys.executable).with_name("dapple"))


def test_version() -> None:
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0 and result.stdout.strip() == f"dapple {dapple.__version__}"


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_serve_prints_its_urls_ready_and_the_auth_hint_once_it_listens(tiny_model_dir, tmp_path) -> None:
    port = _free_port()
    process = subprocess.Popen([DAPPLE, "serve", "--model", str(tiny_model_dir), "--port", str(port), "--data-dir",
                                str(tmp_path / "data"), "--api-auth", "ann:secret"], stderr=subprocess.PIPE,
                               stdout=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    lines = []
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            line = process.stderr.readline()
            if not line:
                break
            lines.append(line.rstrip("\n"))
            if line.startswith("HTTP Basic auth"):
                break
        ready = next(line for line in lines if line.startswith("ready: "))
        assert f"http://127.0.0.1:{port}/" in ready and f"http://127.0.0.1:{port}/docs" in ready
        with socket.create_connection(("127.0.0.1", port), timeout=5):
            pass  # "ready" is printed once the socket listens
        auth = lines[-1]
        assert auth.startswith("HTTP Basic auth is on") and "curl -u ann:PASSWORD" in auth
        assert "secret" not in "\n".join(lines)  # the password is never echoed
        assert lines.index(ready) > next(i for i, line in enumerate(lines) if line.startswith("loaded "))
    finally:
        process.terminate()
        process.wait(timeout=30)
        process.stderr.close()
        process.stdout.close()


def test_a_command_in_a_pipe_shows_plain_progress_and_no_library_noise(tiny_model_dir, tmp_path) -> None:
    """A real process, so that nothing earlier in this one silenced the libraries' warnings first."""
    completed = subprocess.run([DAPPLE, "generate", "a cat", "--model", str(tiny_model_dir), "--out",
                                str(tmp_path), "--steps", "3", "--seed", "1"], capture_output=True, text=True,
                               timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert completed.returncode == 0, completed.stderr
    stderr = completed.stderr
    assert "requires torchvision" not in stderr and "Loading weights" not in stderr
    assert "\r" not in stderr and "\x1b" not in stderr  # no bar redrawn into a file
    lines = stderr.splitlines()
    assert lines[0].startswith(f"loaded {tiny_model_dir} in ")
    assert "sampling: 3 steps" in lines


def test_the_progress_bar_opens_before_the_first_step(tiny_model_dir, tmp_path, monkeypatch) -> None:
    from dapple.engine.hooks import StepHooks

    events: list[str] = []
    for name in ("run_before", "run_after"):
        original = getattr(StepHooks, name)

        def recorded(self, context, _original=original, _name=name):
            events.append(_name)
            return _original(self, context)

        monkeypatch.setattr(StepHooks, name, recorded)
    monkeypatch.setattr(cli.Progress, "begin", lambda self, name, total, unit="step": events.append(f"begin {total}"))
    monkeypatch.setattr(cli.Progress, "advance", lambda self, name: events.append("advance"))
    result = runner.invoke(app, ["generate", "a cat", "--model", str(tiny_model_dir), "--out", str(tmp_path),
                                 "--steps", "2", "--seed", "1"])
    assert result.exit_code == 0, result.output
    assert events[:4] == ["run_before", "begin 2", "run_after", "advance"]


def test_progress_on_a_terminal_is_a_bar_and_elsewhere_a_line(monkeypatch, capsys) -> None:
    monkeypatch.setattr(sys.stderr, "isatty", lambda: False)
    plain = cli.Progress()
    plain.begin("sampling", 3)
    plain.advance("sampling")
    plain.close()
    assert capsys.readouterr().err == "sampling: 3 steps\n"
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    bar = cli.Progress()
    bar.begin("sampling", 3)
    bar.advance("sampling")
    bar.close()
    assert "1/3" in capsys.readouterr().err  # tqdm's bar


@pytest.mark.parametrize("command", [["inspect", "denoise", "a cat", "--steps", "2"],
                                     ["inspect", "guidance", "a cat", "--scales", "1,2", "--steps", "1"]])
def test_inspect_denoise_and_guidance_show_progress(command, tiny_model_dir, tmp_path) -> None:
    result = runner.invoke(app, [*command, "--model", str(tiny_model_dir), "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    expected = "denoising: 2 steps" if "denoise" in command else "grid: 2 images"
    assert expected in result.stderr.splitlines() and f"loaded {tiny_model_dir} in " in result.stderr


def test_threads_reach_dapple_load_from_every_command_that_loads(tiny_model_dir, tmp_path, monkeypatch) -> None:
    import uvicorn

    from PIL import Image

    seen = []
    real_load = dapple.load

    def load(path=None, **options):
        seen.append(options.get("threads"))
        return real_load(path, **options)

    monkeypatch.setattr(dapple, "load", load)
    monkeypatch.setattr(uvicorn.Server, "run", lambda self, *a, **k: None)
    image = tmp_path / "in.png"
    Image.new("RGB", (64, 64), "red").save(image)
    model, out = ["--model", str(tiny_model_dir)], ["--out", str(tmp_path / "out")]
    commands = [
        ["generate", "x", *model, *out, "--steps", "1"], ["img2img", image, "x", *model, *out, "--steps", "1"],
        ["outpaint", image, "x", "--left", "8", *model, *out, "--steps", "1"],
        ["serve", *model, "--data-dir", str(tmp_path / "data")],
        ["inspect", "embeddings", "x", *model, *out], ["inspect", "vae", image, *model, *out],
        ["inspect", "noise", image, "--timesteps", "1", *model, *out], ["inspect", "unet", image, "x", *model, *out],
        ["inspect", "denoise", "x", "--steps", "1", *model, *out], ["inspect", "schedule", "--steps", "2", *model, *out],
        ["inspect", "guidance", "x", "--scales", "1", "--steps", "1", *model, *out],
        ["eval", "builtin", *model, "--n", "1", "--steps", "1"],
    ]
    for command in commands:
        seen.clear()
        result = runner.invoke(app, [*map(str, command), "--threads", "3"])
        assert result.exit_code == 0, (command, result.output)
        assert seen == [3], command
    assert runner.invoke(app, ["generate", "x", "--threads", "0"]).exit_code == 2  # a usage error: 1..1024
    seen.clear()
    assert runner.invoke(app, ["generate", "x", *model, *out, "--steps", "1"]).exit_code == 0
    assert seen == [None]  # automatic


def test_models_without_a_folder_lists_the_built_in_model() -> None:
    from dapple.api import BUILTIN_MODEL_DIR

    result = runner.invoke(app, ["models", "--no-hashes"], env={"DAPPLE_MODELS_DIR": None})
    assert result.exit_code == 0, result.output
    rows = result.stdout.splitlines()[1:]
    assert len(rows) == 1 and rows[0].startswith("checkpoints  builtin") and rows[0].endswith(str(BUILTIN_MODEL_DIR))
    assert "the built-in model only" in result.stderr


def test_inspect_schedule_defaults_to_the_built_in_models_schedule(tmp_path) -> None:
    from dapple.api import BUILTIN_MODEL_DIR

    default = runner.invoke(app, ["inspect", "schedule", "--steps", "4", "--out", str(tmp_path / "a")])
    explicit = runner.invoke(app, ["inspect", "schedule", "--steps", "4", "--out", str(tmp_path / "b"), "--model",
                                   str(BUILTIN_MODEL_DIR)])
    assert default.exit_code == 0 and explicit.exit_code == 0, default.output + explicit.output
    numbers = [line for line in default.stderr.splitlines() if not line.startswith("loaded ")]
    assert numbers == [line for line in explicit.stderr.splitlines() if not line.startswith("loaded ")]
    assert "0.00000 at t=999" in numbers[0]  # zero terminal SNR, which SD 1.5's schedule (0.00466) is not


def test_did_you_mean(tiny_model_dir, tmp_path) -> None:
    kind = runner.invoke(app, ["models", "--kind", "chekpoints"])
    assert kind.exit_code == 2 and kind.stderr.strip().endswith("did you mean 'checkpoints'?")
    typo = tiny_model_dir.parent / "tyni"
    missing = runner.invoke(app, ["generate", "x", "--model", str(typo), "--out", str(tmp_path)])
    assert missing.exit_code == 2 and f"did you mean '{tiny_model_dir}'?" in missing.stderr
    dtype = runner.invoke(app, ["generate", "x", "--dtype", "fp61", "--out", str(tmp_path)])
    assert dtype.exit_code == 2 and "did you mean 'fp16'?" in dtype.stderr
    models = tmp_path / "webui"
    (models / "models" / "Stable-diffusion").mkdir(parents=True)
    (models / "models" / "Stable-diffusion" / "dreamshaper.safetensors").write_bytes(b"")
    named = runner.invoke(app, ["generate", "x", "--models-dir", str(models), "--model", "dreamshapr", "--out",
                                str(tmp_path)])
    assert named.exit_code == 2 and named.stderr.strip().endswith("did you mean 'dreamshaper'?")


def test_create_tiny_model_never_overwrites_and_picks_a_fresh_seed(tmp_path) -> None:
    first = runner.invoke(app, ["create-tiny-model", str(tmp_path / "a")])
    second = runner.invoke(app, ["create-tiny-model", str(tmp_path / "b")])
    assert first.exit_code == 0 and second.exit_code == 0, first.output + second.output
    seeds = [int(re.search(r"^seed (\d+)$", r.stderr, re.M).group(1)) for r in (first, second)]
    assert seeds[0] != seeds[1]
    weights = [(tmp_path / name / "unet" / "diffusion_pytorch_model.safetensors").read_bytes() for name in "ab"]
    assert weights[0] != weights[1]
    again = runner.invoke(app, ["create-tiny-model", str(tmp_path / "c"), "--seed", str(seeds[0])])
    assert again.exit_code == 0
    assert (tmp_path / "c" / "unet" / "diffusion_pytorch_model.safetensors").read_bytes() == weights[0]
    before = sorted(p.stat().st_mtime_ns for p in (tmp_path / "a").rglob("*"))
    refused = runner.invoke(app, ["create-tiny-model", str(tmp_path / "a")])
    assert refused.exit_code == 2 and "exists and is not empty" in refused.stderr
    assert sorted(p.stat().st_mtime_ns for p in (tmp_path / "a").rglob("*")) == before
    (tmp_path / "empty").mkdir()
    assert runner.invoke(app, ["create-tiny-model", str(tmp_path / "empty"), "--seed", "1"]).exit_code == 0


@pytest.mark.parametrize(("size", "expected"), [((101, 203), (96, 200)), ((64, 72), (64, 72)), ((70, 45), (64, 64))])
def test_img2img_without_a_size_rounds_the_images_size_down_to_multiples_of_8(size, expected, tiny_model_dir,
                                                                              tmp_path) -> None:
    """As the README says; a side under 64 becomes 64, the smallest size a request may have."""
    from PIL import Image

    Image.new("RGB", size, "red").save(tmp_path / "in.png")
    result = runner.invoke(app, ["img2img", str(tmp_path / "in.png"), "x", "--model", str(tiny_model_dir), "--steps",
                                 "1", "--out", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    assert Image.open(result.stdout.strip()).size == expected


@pytest.mark.parametrize(("name", "schedule_type", "suggestion"), [
    ("Eular a", None, "Euler a"), ("dpm++ 2m karas", None, "DPM++ 2M Karras"), ("Euler", "Karas", "Karras"),
    ("zzz", None, None),
])
def test_a_misspelt_sampler_or_schedule_type_gets_a_suggestion(name, schedule_type, suggestion) -> None:
    from dapple.errors import UnknownSamplerError
    from dapple.samplers import resolve_sampler

    with pytest.raises(UnknownSamplerError) as raised:
        resolve_sampler(name, schedule_type)
    message = str(raised.value)
    assert message.startswith("unknown ") and "valid " in message  # the list of what is allowed stays
    if suggestion is None:
        assert "did you mean" not in message
    else:
        assert message.endswith(f"; did you mean {suggestion!r}?")


def test_the_cli_passes_the_sampler_suggestion_on(tmp_path) -> None:
    result = runner.invoke(app, ["generate", "x", "--sampler", "Eular a", "--out", str(tmp_path)])
    assert result.exit_code == 2 and result.stderr.strip().endswith("did you mean 'Euler a'?")


def test_a_misspelt_choice_gets_a_suggestion(tmp_path) -> None:
    from PIL import Image

    Image.new("RGB", (64, 64)).save(tmp_path / "i.png")
    fill = runner.invoke(app, ["inpaint", str(tmp_path / "i.png"), str(tmp_path / "i.png"), "x", "--fill", "orignal"])
    assert fill.exit_code == 2 and fill.stderr.strip().endswith("(or its index); did you mean 'original'?")
    upscaler = runner.invoke(app, ["generate", "x", "--hires-scale", "2", "--hires-upscaler", "Lanczoss"])
    assert upscaler.exit_code == 2 and upscaler.stderr.strip().endswith("did you mean 'Lanczos'?")
    unlike = runner.invoke(app, ["generate", "x", "--hires-scale", "2", "--hires-upscaler", "qqqqq"])
    assert unlike.exit_code == 2 and "did you mean" not in unlike.stderr and "must be one of" in unlike.stderr
    mode = runner.invoke(app, ["merge", "a.safetensors", "b.safetensors", "--mode", "weighted", "--out",
                               str(tmp_path / "m.safetensors")])
    assert mode.exit_code == 2 and mode.stderr.strip().endswith("did you mean 'weighted-sum'?")


def test_serve_on_a_port_in_use_is_one_line(tmp_path) -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        result = runner.invoke(app, ["serve", "--port", str(port), "--data-dir", str(tmp_path / "data")])
    lines = [line for line in result.stderr.strip().splitlines() if not line.startswith("loaded ")]
    assert result.exit_code == 2 and len(lines) == 1, result.output
    assert lines[0].startswith(f"error: cannot listen on --host 127.0.0.1 --port {port}: ") and "in use" in lines[0]
    unknown = runner.invoke(app, ["serve", "--host", "no-such-host.invalid", "--data-dir", str(tmp_path / "data")])
    assert unknown.exit_code == 2 and "cannot listen on --host no-such-host.invalid" in unknown.stderr
