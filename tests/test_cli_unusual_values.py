"""Every command with an unusual value for every option: no traceback ever reaches the user.

The cases are generated from the commands themselves (click's parameters), so a new option is covered when it is
added. Each option of each command gets the unusual values of its type (negative, zero, huge, non-numeric, empty,
not UTF-8, a missing file, a folder where a file is expected and the reverse, a file that is not an image); the
command must then either run (exit 0) or refuse with exit code 2 and an `error: ...` line or a usage error.
A few real subprocess runs check what the shell hands over: bytes that are not UTF-8.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import save_file
from typer.main import get_command
from typer.testing import CliRunner

from dapple.interfaces.cli import app

runner = CliRunner()
NOT_UTF8 = b"\xff\xfe cat".decode("utf-8", "surrogateescape")  # what Python makes of such bytes in argv

COMMON = ["--model", "TINY", "--out", "OUT", "--steps", "1", "--seed", "1"]
INSPECT = ["--model", "TINY", "--out", "OUT"]
# A valid invocation of every command, cheap on the tiny model; each case changes one option of it.
BASE: dict[str, list[str]] = {
    "generate": ["a cat", *COMMON],
    "img2img": ["IMAGE", "a cat", *COMMON],
    "inpaint": ["IMAGE", "MASK", "a cat", *COMMON],
    "outpaint": ["IMAGE", "a cat", "--right", "8", *COMMON],
    "depth2img": ["IMAGE", "IMAGE", "a cat", "--model", "DEPTH", "--out", "OUT", "--steps", "1", "--seed", "1"],
    "convert": ["CKPT", "--out", "OUT/converted.safetensors"],
    "merge": ["SAFE_A", "SAFE_B", "--out", "OUT/merged.safetensors"],
    "serve": ["--model", "TINY", "--data-dir", "OUT/data", "--port", "PORT"],
    "models": ["--models-dir", "MODELS"],
    "samplers": [],
    "info": ["PNG"],
    "inspect tokens": ["a cat"],
    "inspect embeddings": ["a cat", *INSPECT],
    "inspect schedule": ["--steps", "2", "--out", "OUT"],
    "inspect vae": ["IMAGE", *INSPECT],
    "inspect noise": ["IMAGE", "--timesteps", "0,500", *INSPECT],
    "inspect denoise": ["a cat", "--steps", "1", *INSPECT],
    "inspect guidance": ["a cat", "--scales", "1,2", "--steps", "1", *INSPECT],
    "inspect unet": ["IMAGE", "a cat", *INSPECT],
    "train builtin": ["--out", "OUT/run", "--stop-after", "0"],
    "train export": ["--run", "OUT/no-run", "--out", "OUT/exported"],
    "eval builtin": ["--model", "TINY", "--n", "1", "--steps", "1"],
    "train controlnet": ["--out", "OUT/cnrun", "--stop-after", "0"],
    "eval controlnet": ["--model", "OUT/no-controlnet", "--n", "1"],
    "control detect": ["IMAGE", "--out", "OUT/map.png"],
    "control modules": [],
    "control models": [],
    "create-tiny-model": ["OUT/tiny"],
}

# Base invocations that are refused themselves (a training run takes seconds to make and export): an option whose
# unusual value is still valid meets this refusal instead.
BASE_REFUSED = {"train export": "holds no checkpoint.pt", "eval controlnet": "is not a ControlNet folder"}

# ("" for a number meets the same parse error as "abc", and inf the same bounds as 1e308.)
INT_VALUES = ["-1", "0", "99999999999999999999", "abc"]
FLOAT_VALUES = ["-1", "0", "1e308", "nan", "abc"]
TEXT_VALUES = ["", NOT_UTF8, "zzz unknown"]
PATH_VALUES = ["", "MISSING", "DIR", "FILE", "BADIMAGE", "BADSAFE", "OUT/" + NOT_UTF8]
# Where one of these values is a valid request, the command runs: keep those runs short.
SLOW_WHEN_VALID = {("eval builtin", "n"), ("train controlnet", "stop_after"), ("train builtin", "stop_after"), ("train builtin", "vae_steps"),
                   ("train builtin", "diffusion_steps"), ("inspect schedule", "steps")}
# Valid values that start seconds of real work: --vae-steps 0 skips stage 1 and evaluates the VAE on 200 images.
SKIPPED_VALID = {("train builtin", "vae_steps", "0")}


def _commands() -> dict:
    root = get_command(app)
    found = {}
    for name, command in root.commands.items():
        if hasattr(command, "commands"):  # a group: inspect, train, eval
            found.update({f"{name} {sub}": each for sub, each in command.commands.items()})
        else:
            found[name] = command
    return found


def _values(parameter) -> list[str]:
    kind = parameter.type_descriptor.annotation
    if kind is bool:
        return []  # a flag: present or not
    if kind is int:
        return INT_VALUES
    if kind is float:
        return FLOAT_VALUES
    if kind is Path:
        return PATH_VALUES
    return TEXT_VALUES


def _with_value(base: list[str], command, parameter, value: str) -> list[str]:
    """base with one parameter set to value: an option replaced or appended, an argument replaced in place."""
    if parameter.param_type_name == "option":
        flag = max(parameter.opts, key=len)
        args, index = list(base), 0
        for position, arg in enumerate(base):  # drop the base's value of this option
            if arg in parameter.opts:
                args = base[:position] + base[position + 2:]
                break
        return [*args, flag, value]
    arguments = [p for p in command.params if p.param_type_name == "argument"]
    index = arguments.index(parameter)
    args = list(base)
    if index < len(args) and not args[index].startswith("--"):
        args[index] = value
    else:
        args.insert(index, value)
    return args


def _cases() -> list[tuple[str, str, str]]:
    cases = []
    for name, command in _commands().items():
        assert name in BASE, f"no valid base invocation for {name!r}: add one to BASE"
        for parameter in command.params:
            if parameter.name in ("help",):
                continue
            for value in _values(parameter):
                if (name, parameter.name) in SLOW_WHEN_VALID and value == "99999999999999999999":
                    continue  # a valid huge count would run for hours; its bound (if any) is tested below
                if (name, parameter.name, value) not in SKIPPED_VALID:
                    cases.append((name, parameter.name, value))
    return cases


@pytest.fixture(scope="module")
def places(tmp_path_factory, tiny_model_dir, depth_model_dir) -> dict[str, str]:
    root = tmp_path_factory.mktemp("unusual")
    Image.new("RGB", (64, 64), (200, 40, 40)).save(root / "image.png")
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (0, 0, 32, 64))
    mask.save(root / "mask.png")
    torch.save({"weight": torch.ones(2)}, root / "model.ckpt")
    save_file({"a": torch.ones(2)}, str(root / "a.safetensors"))
    save_file({"a": torch.zeros(2)}, str(root / "b.safetensors"))
    (root / "models" / "models" / "Stable-diffusion").mkdir(parents=True)
    png = root / "with-infotext.png"
    result = runner.invoke(app, ["generate", "a cat", "--model", str(tiny_model_dir), "--out", str(root / "gen"),
                                 "--steps", "1", "--seed", "3"])
    assert result.exit_code == 0, result.output
    (root / "gen" / "00000-3.png").rename(png)
    return {"TINY": str(tiny_model_dir), "DEPTH": str(depth_model_dir), "IMAGE": str(root / "image.png"),
            "MASK": str(root / "mask.png"), 
            "CKPT": str(root / "model.ckpt"), "SAFE_A": str(root / "a.safetensors"),
            "SAFE_B": str(root / "b.safetensors"), "MODELS": str(root / "models"), "PNG": str(png),
            "OUT": str(root / "out"), "PORT": str(_free_port())}


def _free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _expand(args: list[str], places: dict[str, str], case_dir: Path) -> list[str]:
    """Placeholders to paths. The ones a case could change (a folder it writes into, a file it replaces) are
    made afresh in the case's own folder, so that no case sees what another left."""
    fresh = case_dir / "fresh"
    fresh.mkdir(parents=True, exist_ok=True)
    (fresh / "bad.png").write_bytes(b"not an image at all")
    (fresh / "bad.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    (fresh / "file.txt").write_text("a file where a folder belongs")
    (fresh / "folder").mkdir(exist_ok=True)
    places = {**places, "BADIMAGE": str(fresh / "bad.png"), "BADSAFE": str(fresh / "bad.safetensors"),
              "FILE": str(fresh / "file.txt"), "DIR": str(fresh / "folder"),
              "MISSING": str(fresh / "missing" / "nothing.png")}
    expanded = []
    for arg in args:
        head, _, tail = arg.partition("/")
        if head == "OUT":
            expanded.append(str(case_dir / tail) if tail else str(case_dir))
        else:
            expanded.append(places.get(arg, arg))
    return expanded


_loaded: dict = {}


@pytest.fixture()
def quick(monkeypatch, tmp_path) -> None:
    """Each case runs in its own folder (an empty path means the current one), and a model the cases have
    loaded before is lent again instead of read again (a VAE swap changes the components, so those load)."""
    import dapple

    real_load = dapple.load

    def load(path=None, **options):
        if options.get("vae") is not None:
            return real_load(path, **options)
        key = (str(path), repr(sorted(options.items(), key=lambda item: item[0])))
        if key not in _loaded:
            _loaded[key] = real_load(path, **options)
        return _loaded[key]

    monkeypatch.setattr(dapple, "load", load)
    monkeypatch.chdir(tmp_path)


@pytest.fixture()
def no_server(monkeypatch) -> list:
    """`dapple serve` stops where uvicorn would start serving; the calls are recorded."""
    import uvicorn

    calls = []
    monkeypatch.setattr(uvicorn.Server, "run", lambda server, *args, **kwargs: calls.append(server.config))
    return calls


def _assert_no_traceback(result, args) -> None:
    shown = f"dapple {' '.join(map(ascii, args))}\n{result.output}"
    assert result.exception is None or isinstance(result.exception, SystemExit), (
        f"{shown}\n{type(result.exception).__name__}: {result.exception}")
    assert "Traceback" not in result.output, shown
    assert result.exit_code in (0, 2), shown
    if result.exit_code == 2:  # a usage error from typer, or one line from Dapple, the last one
        lines = result.stderr.strip().splitlines()
        usage = any(line.startswith("Usage:") for line in lines) and "Invalid value" in result.stderr or (
            "Missing" in result.stderr or "No such option" in result.stderr)
        assert usage or (lines and lines[-1].startswith("error: ")), shown
        assert usage or sum(line.startswith("error: ") for line in lines) == 1, shown


def test_every_command_is_covered() -> None:
    assert set(_commands()) == set(BASE)
    assert len(_cases()) > 800
    for name in BASE:  # and each one's help, as the wrapping that checks text keeps it
        result = runner.invoke(app, [*name.split(), "--help"])
        assert result.exit_code == 0 and "Usage:" in result.stdout, name


def test_every_base_invocation_runs(places, tmp_path, no_server, quick) -> None:
    """The cases below change one thing each: the unchanged invocations must succeed."""
    for name, base in BASE.items():
        if name in BASE_REFUSED:
            result = runner.invoke(app, [*name.split(), *_expand(base, places, tmp_path / "refused")])
            assert result.exit_code == 2 and BASE_REFUSED[name] in result.stderr, result.output
            continue
        args = [*name.split(), *_expand(base, places, tmp_path / name.replace(" ", "-"))]
        result = runner.invoke(app, args)
        assert result.exit_code == 0, f"{args}\n{result.output}\n{result.exception!r}"


def _check_case(command: str, option: str, value: str, places: dict[str, str], case_dir: Path) -> None:
    commands = _commands()
    parameter = next(p for p in commands[command].params if p.name == option)
    args = [*command.split(), *_expand(_with_value(BASE[command], commands[command], parameter, value), places,
                                       case_dir)]
    result = runner.invoke(app, args)
    _assert_no_traceback(result, args)
    line = result.stderr.strip().splitlines()[-1] if result.exit_code == 2 else ""
    if line.startswith("error: ") and not (command in BASE_REFUSED and BASE_REFUSED[command] in line):
        # Dapple's own refusal says which input was wrong: its flag, its name or its value
        expanded = _expand([value], places, case_dir)[0]
        if parameter.type_descriptor.annotation is Path:
            expanded = str(Path(expanded))  # an empty path is the current folder, "."
        shown = expanded.encode("utf-8", "surrogateescape").decode("utf-8", "replace")  # as CliRunner decodes
        names = [*parameter.opts, option.upper(), option.replace("_", "-")]
        assert any(name in line for name in names) or shown in line, f"{ascii(args)}\n{line}"


@pytest.mark.parametrize("command", sorted(BASE))
def test_unusual_values_give_an_error_line_not_a_traceback(command, places, tmp_path, monkeypatch, no_server,
                                                           quick) -> None:
    """Every option of the command, one unusual value at a time (one test per command: pytest's own cost per
    test would otherwise double the time); every failing case is reported."""
    failures = []
    cases = [(option, value) for name, option, value in _cases() if name == command]
    for number, (option, value) in enumerate(cases):
        case_dir = tmp_path / f"case{number}"
        case_dir.mkdir()
        monkeypatch.chdir(case_dir)  # an empty path means the current folder: keep what it writes here
        try:
            _check_case(command, option, value, places, case_dir)
        except AssertionError as error:
            failures.append(f"--{option} {value!a}: {error}")
    assert not failures, f"{len(failures)} of {len(cases)} cases failed:\n" + "\n\n".join(failures[:10])


def _one_error_line(result) -> str:
    lines = result.stderr.strip().splitlines()
    assert result.exit_code == 2 and len(lines) == 1 and lines[0].startswith("error: "), result.output
    assert "Traceback" not in result.output
    return lines[0]


def test_a_device_this_machine_lacks_is_one_line(tiny_model_dir, tmp_path) -> None:
    # cuda:99 is missing everywhere: on a machine without CUDA the message says so, else it names the count
    line = _one_error_line(runner.invoke(app, ["generate", "x", "--model", str(tiny_model_dir), "--out",
                                               str(tmp_path), "--device", "cuda:99"]))
    assert line.startswith("error: --device cuda:99: ") and ("CUDA is not available" in line or "cuda:0.." in line)
    assert not (tmp_path / "00000-1.png").exists()
    line = _one_error_line(runner.invoke(app, ["train", "builtin", "--out", str(tmp_path / "run"), "--device",
                                               "tpu"]))
    assert "--device 'tpu'" in line and "allowed: cpu, cuda, cuda:N, mps" in line


def test_a_diffusers_layout_vae_file_points_at_its_folder(tiny_model_dir, tmp_path) -> None:
    vae_file = tiny_model_dir / "vae" / "diffusion_pytorch_model.safetensors"
    line = _one_error_line(runner.invoke(app, ["generate", "x", "--model", str(tiny_model_dir), "--out",
                                               str(tmp_path), "--vae", str(vae_file)]))
    assert "is a VAE in the diffusers layout" in line and f"--vae {vae_file.parent}" in line
    result = runner.invoke(app, ["generate", "x", "--model", str(tiny_model_dir), "--out", str(tmp_path),
                                 "--vae", str(vae_file.parent), "--steps", "1", "--seed", "2"])
    assert result.exit_code == 0, result.output  # the advice works
    assert (tmp_path / "00000-2.png").is_file()


@pytest.mark.parametrize("command", [["generate"], ["inspect", "tokens"], ["generate", "a cat", "--negative"]])
def test_shell_bytes_that_are_not_utf8_are_one_line(command, tmp_path) -> None:
    """A real process, so the bytes go through the interpreter's own argv decoding, in a C locale as well."""
    executable = Path(sys.executable).with_name("dapple")
    for locale in ("C.UTF-8", "C"):
        env = {**os.environ, "LC_ALL": locale, "LANG": locale}
        completed = subprocess.run([str(executable), *command, b"\xff\xfe cat"], capture_output=True, env=env,
                                   cwd=tmp_path, timeout=120)
        stderr = completed.stderr.decode("utf-8", "replace")
        assert completed.returncode == 2, stderr
        assert stderr.strip().splitlines() == [stderr.strip()] and "Traceback" not in stderr
        label = "--negative" if "--negative" in command else ("TEXT" if "tokens" in command else "PROMPT")
        assert stderr.startswith(f"error: {label} is not valid UTF-8 text (b'\\xff\\xfe cat')"), stderr


def test_an_output_name_that_is_not_utf8_is_printed_as_its_bytes(tiny_model_dir, tmp_path) -> None:
    folder = tmp_path / b"out-\xff".decode("utf-8", "surrogateescape")
    executable = Path(sys.executable).with_name("dapple")
    completed = subprocess.run([str(executable), "generate", "a cat", "--model", str(tiny_model_dir), "--out",
                                os.fsencode(folder), "--steps", "1", "--seed", "4"], capture_output=True,
                               timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert completed.returncode == 0, completed.stderr.decode("utf-8", "replace")[-2000:]
    assert completed.stdout.strip() == os.fsencode(folder / "00000-4.png")
    assert (folder / "00000-4.png").is_file()
