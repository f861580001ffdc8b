"""The `dapple` command line (typer). Each command builds Settings from its flags and calls the layers below.

Bad input ends with a one-line `error: ...` on stderr and exit code 2, never a traceback.
"""

from __future__ import annotations

import functools
import inspect
import json
import math
import pickle
import sys
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional

import typer
from PIL import UnidentifiedImageError

from dapple.errors import DappleError, DappleWarning, closest, did_you_mean
from dapple.infotext import parse_infotext
from dapple.request import SPEED_PRESETS, GenerationRequest, make_request
from dapple.settings import Settings

app = typer.Typer(help="Dapple: Stable Diffusion from the command line.", no_args_is_help=True, add_completion=False)
inspect_app = typer.Typer(help="Look inside the model: tokens, embeddings, schedule, vae, noise, denoise, guidance grids, unet.", no_args_is_help=True)
app.add_typer(inspect_app, name="inspect")

USAGE_ERROR = 2
_defaults = GenerationRequest.model_fields


def _print_version(value: bool) -> None:
    if value:
        from dapple._version import __version__

        typer.echo(f"dapple {__version__}")
        raise typer.Exit()


@app.callback()
def _root(version: bool = typer.Option(False, "--version", is_eager=True, callback=_print_version,
                                       help="print Dapple's version and exit")) -> None:
    """Dapple: Stable Diffusion from the command line."""


def say(text: str, err: bool = False) -> None:
    """typer.echo, except that text holding bytes that are not UTF-8 (file names from the shell reach Python as
    surrogates) is written as those bytes instead of failing."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        typer.echo(text.encode("utf-8", "surrogateescape"), err=err)
    else:
        typer.echo(text, err=err)


def _os_error(error: OSError) -> str:
    """An OSError as one sentence: what failed on which path ("cannot write /x: Permission denied")."""
    if error.filename is None or not error.strerror:
        return str(error)
    return f"{error.filename}: {error.strerror}"


# Request fields by the names the command line gives them, so that an error names the flag the user typed.
FIELD_FLAGS = {
    "prompt": "PROMPT", "init_image": "IMAGE", "mask": "MASK", "depth_map": "DEPTH",
    "negative_prompt": "--negative", "guidance_scale": "--guidance", "guidance_min_timestep": "--guidance-min-t",
    "batch_size": "--batch", "hires_scale": "--hires-scale", "hires_upscaler": "--hires-upscaler",
    "hires_steps": "--hires-steps", "hires_strength": "--hires-strength", "outpaint_left": "--left",
    "outpaint_right": "--right", "outpaint_top": "--top", "outpaint_bottom": "--bottom", "inpainting_fill": "--fill",
    "mask_blur": "--mask-blur", "invert_mask": "--invert-mask", "resize_mode": "--resize-mode", "width": "--width",
    "height": "--height", "steps": "--steps", "seed": "--seed", "sampler": "--sampler", "strength": "--strength",
    "deep_cache_interval": "--deep-cache", "token_merging_ratio": "--token-merging", "speed": "--speed",
}


def cli_names(message: str) -> str:
    """A request error in the command line's words: "outpaint_left=10 is invalid" becomes "--left 10 is invalid",
    and a field named in the text (outpaint_left, init_image) becomes its flag."""
    import re

    for field, flag in sorted(FIELD_FLAGS.items(), key=lambda item: -len(item[0])):
        message = re.sub(rf"(?<![\w.-]){field}=", f"{flag} ", message)
        if "_" in field:
            message = re.sub(rf"(?<![\w.-]){field}\b", flag, message)
    choice = re.search(r"'([^']*)' is invalid: \S+ must be one of ((?:'[^']*'(?:, )?)+)", message)
    if choice:  # a misspelt choice: "--fill 'orignal' is invalid: ... must be one of 'fill', 'original', ..."
        message += _did_you_mean(choice.group(1), re.findall(r"'([^']*)'", choice.group(2)))
    return message


@contextmanager
def user_errors() -> Iterator[None]:
    """Turn the errors a user can cause into one line on stderr and exit code 2."""
    try:
        yield
    except DappleError as error:
        say(f"error: {cli_names(str(error))}", err=True)
        raise typer.Exit(USAGE_ERROR) from None
    except UnidentifiedImageError as error:
        say(f"error: {error}", err=True)
        raise typer.Exit(USAGE_ERROR) from None
    except OSError as error:
        say(f"error: {_os_error(error)}", err=True)
        raise typer.Exit(USAGE_ERROR) from None
    except pickle.UnpicklingError as error:  # --allow-pickle: torch's weights_only loader refused the file
        from dapple.models.convert import refusal_reason

        say(f"error: torch's weights_only loader refused the pickle (it would have to run code to load): "
            f"{refusal_reason(str(error))}", err=True)
        raise typer.Exit(USAGE_ERROR) from None


def fail(message: str) -> None:
    """Stop with `error: message` and exit code 2 (for checks outside a user_errors block)."""
    say(f"error: {message}", err=True)
    raise typer.Exit(USAGE_ERROR)


def _undecodable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def _refuse_undecodable_text(callback):
    """Wrap a command so that a text argument that is not valid UTF-8 (bytes from the shell, e.g. $'\\xff') is
    refused with one line instead of failing deep in the tokenizer. Paths may hold any bytes, as file names can."""
    parameters = inspect.signature(callback).parameters

    @functools.wraps(callback)
    def checked(**kwargs):
        for name, value in kwargs.items():
            for each in value if isinstance(value, (list, tuple)) else [value]:
                if isinstance(each, str) and _undecodable(each):
                    declared = parameters[name].default
                    flags = [d for d in getattr(declared, "param_decls", None) or () if d.startswith("--")]
                    label = flags[0] if flags else (f"--{name.replace('_', '-')}" if isinstance(
                        declared, typer.models.OptionInfo) else name.upper())
                    raw = each.encode("utf-8", "surrogateescape")
                    fail(f"{label} is not valid UTF-8 text ({raw!r}); give text in UTF-8 (check the terminal's "
                         "or script's encoding)")
        return callback(**kwargs)

    return checked


def check_device(device: Optional[str]) -> None:
    """Refuse a device this machine does not have, before anything loads (torch would fail deep inside .to())."""
    if device is None:
        return
    import torch

    from dapple.models.devices import check_available

    try:
        parsed = torch.device(device)
    except (RuntimeError, ValueError, TypeError):
        fail(f"--device {device!r} is unknown; allowed: cpu, cuda, cuda:N, mps")
    try:
        check_available(parsed, "--device")
    except DappleError as error:
        fail(str(error))


def check_image_file(path: Path, label: str) -> None:
    if path.is_dir():
        fail(f"{label} {path} is a folder; give an image file (PNG, JPEG, WebP ...)")


def check_can_listen(host: str, port: int) -> None:
    """Bind the address once before serving, so that a port in use or a host name that does not resolve is one
    line and exit code 2, not uvicorn's log line and exit code 1."""
    import socket

    try:
        family, kind, protocol, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        with socket.socket(family, kind, protocol) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
            probe.bind(address)
    except OSError as error:
        reason = error.strerror or str(error)
        fail(f"cannot listen on --host {host} --port {port}: {reason}; choose another --port (or stop what uses "
             "it), or a --host this machine has")


def check_dtype(dtype: Optional[str]) -> None:
    if dtype is not None:
        import torch

        from dapple.models.devices import resolve_dtype

        try:
            resolve_dtype(dtype, torch.device("cpu"))
        except DappleError as error:
            fail(f"{error}{_did_you_mean(dtype, ['fp16', 'bf16', 'fp32'])}")


def check_backend(backend: str, request: Optional[GenerationRequest] = None) -> None:
    """An unknown backend, openvino without its package, or a request it cannot run (controls, LoRAs) is
    reported before the model loads."""
    from dapple.engine.prompt_syntax import extract_extra_networks
    from dapple.models import openvino_backend

    try:
        if openvino_backend.check_backend(backend) == "openvino":
            openvino_backend.import_openvino()
            if request is not None:
                openvino_backend.refuse_request(request, extract_extra_networks(request.prompt)[1])
    except DappleError as error:
        fail(str(error))


def check_output_folder(folder: Path, flag: str = "--out") -> None:
    """An output folder may be missing (it is created) but neither it nor a parent may be a file."""
    for each in (folder, *folder.parents):
        if each.exists():
            if not each.is_dir():
                fail(f"{flag} {folder}: {each} is a file, not a folder; give a folder (it is created if missing)")
            return


def check_output_file(path: Path, flag: str, suffixes: tuple[str, ...]) -> None:
    """An output file needs one of suffixes, must not be a folder, and its folder must be creatable."""
    if path.is_dir() or not path.name:
        fail(f"{flag} {path} is a folder; give a file name ending in {' or '.join(suffixes)}")
    if path.suffix.lower() not in suffixes:
        fail(f"{flag} {path}: the name must end in {' or '.join(suffixes)}")
    check_output_folder(path.parent, flag)


def _safetensors_keys(path: Path, flag: str) -> list[str]:
    """The tensor names of a .safetensors file (its header only), or one line saying that it is damaged."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            return list(handle.keys())
    except Exception as error:  # safetensors raises its own error type (SafetensorError) for a damaged header
        fail(f"{flag} {path} is not a readable .safetensors file ({str(error).splitlines()[0]})")


def check_model_file(model: Optional[Path], flag: str = "--model") -> None:
    """A missing model is named with the nearest name beside it; a single-file checkpoint's header is read before
    loading, so that a damaged file is one line."""
    if model is None:
        return
    if not model.exists():
        parent = model.expanduser().parent
        siblings = [child.name for child in parent.iterdir()] if parent.is_dir() else []
        nearest = _closest(model.name, siblings) if model.name else None
        close = f"; did you mean {str(parent / nearest)!r}?" if nearest else ""
        fail(f"model folder {model} does not exist{close}; give a diffusers model folder or a single-file "
             "checkpoint (.safetensors), or leave --model out for the built-in model")
    if model.is_file() and model.suffix.lower() == ".safetensors":
        _safetensors_keys(model, flag)


def check_utf8_path(path: Path, flag: str) -> None:
    """Folders that get a tokenizer written into them need a UTF-8 name: the tokenizers library cannot write to
    any other."""
    if _undecodable(str(path)):
        fail(f"{flag} {path} is not a valid UTF-8 name, which the tokenizer files cannot be written under; "
             "choose a UTF-8 name")


def check_vae_file(vae: Optional[Path]) -> None:
    """--vae takes an original-layout VAE file (as A1111's models/VAE holds) or a diffusers folder. A diffusers
    VAE's .safetensors on its own lacks the config that its layout needs: point at its folder instead."""
    if vae is None:
        return
    from dapple.models.single_file import CHECKPOINT_SUFFIXES

    if not vae.exists():
        fail(f"--vae {vae} does not exist; give a .safetensors file (as in A1111's models/VAE) or a diffusers "
             "folder")
    if vae.is_dir():
        if not ((vae / "config.json").is_file() or (vae / "vae" / "config.json").is_file()):
            fail(f"--vae {vae} is a folder without config.json (or vae/config.json); give a diffusers VAE or "
                 "model folder, or a .safetensors file")
        return
    if vae.suffix.lower() not in CHECKPOINT_SUFFIXES:
        fail(f"--vae {vae}: allowed are {', '.join(CHECKPOINT_SUFFIXES)} files and diffusers folders")
    if vae.suffix.lower() != ".safetensors":
        return
    keys = _safetensors_keys(vae, "--vae")
    if any(".down_blocks." in key or ".mid_block." in key for key in keys):
        hint = (f"give its folder instead: --vae {vae.parent}" if (vae.parent / "config.json").is_file()
                else "give the folder that holds it with its config.json")
        fail(f"--vae {vae} is a VAE in the diffusers layout, which needs its config.json; {hint}. A single "
             "file must be in the original layout (as in A1111's models/VAE)")


def _quiet_libraries() -> None:
    """Keep the terminal for Dapple's own output: no per-file progress bars or info logs from the libraries."""
    import diffusers
    import transformers

    diffusers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


MEMORY_FLAGS = {
    "medvram": (bool, typer.Option(False, "--medvram", help="model CPU offload + VAE slicing: one model on the GPU "
                                   "at a time (CUDA; on the CPU only the VAE slicing applies)")),
    "lowvram": (bool, typer.Option(False, "--lowvram", help="sequential CPU offload + attention slicing + VAE "
                                   "slicing + VAE tiling: the least GPU memory, much slower (CUDA; on the CPU only "
                                   "the VAE slicing and tiling apply)")),
    "attention_slicing": (bool, typer.Option(False, "--attention-slicing", help="attention a few heads at a time "
                                             "(same image; slower, and no gain on the CPU)")),
    "vae_slicing": (bool, typer.Option(False, "--vae-slicing", help="decode one image of a batch at a time (same "
                                       "image)")),
    "vae_tiling": (bool, typer.Option(False, "--vae-tiling", help="decode large images in blended tiles: bounded "
                                      "memory (the image changes slightly)")),
    "vae_tile_norms": (str, typer.Option("shared", "--vae-tile-norms", help="with VAE tiling: shared (one set of "
                                         "group-norm statistics for all tiles, no seams) or per-tile (diffusers' "
                                         "plain tiling)")),
    "offload": (Optional[str], typer.Option(None, "--offload", show_default=False, help="model | sequential: rest "
                                            "models in CPU memory between uses (CUDA only)")),
}


def memory_from_flags(medvram: bool = False, lowvram: bool = False, attention_slicing: bool = False,
                      vae_slicing: bool = False, vae_tiling: bool = False, offload: Optional[str] = None,
                      vae_tile_norms: str = "shared"):
    """The memory option dapple.load takes, from the command line's flags: None, a preset, or MemoryOptions
    (a preset with the single switches added)."""
    from dataclasses import replace

    from dapple.models.memory import OFFLOAD_MODES, PRESETS, TILE_NORMS

    if medvram and lowvram:
        fail("--medvram and --lowvram are two presets; choose one")
    if offload is not None and offload.strip().lower() not in OFFLOAD_MODES:
        fail(f"--offload {offload!r} is invalid; use model or sequential{_did_you_mean(offload, OFFLOAD_MODES)}")
    preset = "medvram" if medvram else "lowvram" if lowvram else None
    switches = {name: True for name, on in (("attention_slicing", attention_slicing), ("vae_slicing", vae_slicing),
                                            ("vae_tiling", vae_tiling)) if on}
    if offload is not None:
        switches["offload"] = offload.strip().lower()
    norms = vae_tile_norms.strip().lower()
    if norms not in TILE_NORMS:
        fail(f"--vae-tile-norms {vae_tile_norms!r} is invalid; use shared or per-tile"
             f"{_did_you_mean(vae_tile_norms, TILE_NORMS)}")
    if norms != "shared":
        switches["vae_tile_norms"] = norms
    if not switches:
        return preset
    return replace(PRESETS[preset or "none"], **switches)


def memory_flags(command):
    """Give a command --medvram, --lowvram, --attention-slicing, --vae-slicing, --vae-tiling, --vae-tile-norms and
    --offload; it receives them as one `memory` keyword (see memory_from_flags), declared last in its signature."""
    signature = inspect.signature(command, eval_str=True)  # real types: typer reads them from this signature
    parameters = [parameter for parameter in signature.parameters.values() if parameter.name != "memory"]
    flags = [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=option, annotation=annotation)
             for name, (annotation, option) in MEMORY_FLAGS.items()]

    @functools.wraps(command)
    def with_memory(**kwargs):
        memory = memory_from_flags(**{name: kwargs.pop(name) for name in MEMORY_FLAGS})
        return command(**kwargs, memory=memory)

    with_memory.__signature__ = signature.replace(parameters=[
        parameter.replace(kind=inspect.Parameter.KEYWORD_ONLY) for parameter in parameters] + flags)
    with_memory.__annotations__ = {**{parameter.name: parameter.annotation for parameter in parameters},
                                   **{name: annotation for name, (annotation, _) in MEMORY_FLAGS.items()}}
    return with_memory


def check_memory(memory, device: Optional[str]) -> None:
    """Bad memory options (offload on a CPU device) are reported before the model loads."""
    from dapple.models.devices import resolve_device
    from dapple.models.memory import plan

    plan(memory, resolve_device(device))


def memory_summary(pipe) -> Optional[str]:
    """"memory: model offload, VAE slicing" and what the device left out, for stderr (None when all is off)."""
    notes = pipe.memory_notes
    if pipe.memory.describe() == "none" and not notes:
        return None
    return f"memory: {pipe.memory.describe()}" + "".join(f"; {note}" for note in notes)


class GenerationOptions:
    """The options every generating command shares, declared once."""

    negative = typer.Option(_defaults["negative_prompt"].default, "--negative", "-n", help="what to avoid")
    width = typer.Option(None, help="multiple of 8 in 64..2048 (default: the model's size, or the image's)")
    height = typer.Option(None, help="multiple of 8 in 64..2048 (default: the model's size, or the image's)")
    steps = typer.Option(None, show_default=False, help="sampling steps, 1..150 [default: the model's, else "
                         f"{_defaults['steps'].default}]")
    # sampler, guidance and guidance_min_t left unset take the model folder's recommendation, else these defaults
    guidance = typer.Option(None, "--guidance", "--cfg", show_default=False, help="CFG scale 0..30 [default: the "
                            f"model's, else {_defaults['guidance_scale'].default:g}]")
    guidance_min_t = typer.Option(None, "--guidance-min-t", show_default=False,
                                  help="guide only steps at timesteps >= this, 0..1000 [default: the model's, else 0: "
                                  "every step]")
    deep_cache = typer.Option(None, "--deep-cache", show_default=False,
                              help="DeepCache interval 1..10: the full UNet every N-th step, its cached deep features "
                              "between (faster, approximate) [default: the --speed preset's: 1, off]")
    token_merging = typer.Option(None, "--token-merging", show_default=False,
                                 help="ToMe token merging ratio 0..0.9 in the highest-resolution attention blocks "
                                 "(faster, approximate) [default: the --speed preset's: 0, off]")
    speed = typer.Option(None, "--speed", show_default=False,
                         help="speed preset: quality (exact) or fast (" + ", ".join(
                             f"{FIELD_FLAGS[k]} {v:g}" for k, v in SPEED_PRESETS["fast"].items()) +
                         "); --deep-cache / --token-merging win over it [default: fast for SD-sized models on the CPU, "
                         "quality (exact) on GPUs, for small models and on --backend openvino]")
    seed = typer.Option(_defaults["seed"].default, help="-1 for random; image i uses seed + i")
    sampler = typer.Option(None, show_default=False, help="see `dapple samplers` [default: the model's, else "
                           f"{_defaults['sampler'].default}]")
    batch = typer.Option(_defaults["batch_size"].default, help="images per run, 1..16")
    model = typer.Option(None, "--model", "-m", help="diffusers model folder or single-file checkpoint "
                         "(default: the built-in model)")
    vae = typer.Option(None, "--vae", help="a VAE instead of the model's own (.safetensors file or folder)")
    models_dir = typer.Option(None, "--models-dir", envvar="DAPPLE_MODELS_DIR",
                              help="an A1111 or ComfyUI folder: --model/--vae by name, <lora:name:w> from its LoRAs")
    out = typer.Option(Path("outputs"), help="folder for the PNGs")
    device = typer.Option(None, help="cpu, cuda, cuda:N, mps (default: best available)")
    dtype = typer.Option(None, help="fp32, fp16, bf16 (default: fp16 on GPU; on the CPU bf16 for SD-sized models "
                         "where the CPU has native bf16, else fp32; fp32 reproduces bit for bit)")
    allow_pickle = typer.Option(False, help="allow .bin/.ckpt weights (weights_only loading)")
    strength = typer.Option(_defaults["strength"].default, help="denoising strength 0..1: how much changes")
    resize_mode = typer.Option(_defaults["resize_mode"].default, help="just resize | crop and resize | resize and fill")
    mask_blur = typer.Option(_defaults["mask_blur"].default, help="soft edge of the pasted-back area, pixels")
    control = typer.Option([], "--control", help="a ControlNet / T2I-Adapter unit MODEL:IMAGE[:weight[:start:end]], "
                           "repeatable (e.g. builtin-canny:edges.png; see `dapple control models`)")
    control_module = typer.Option([], "--control-module", help="the preprocessor of each --control (one for all, or "
                                  "one per unit; default none: the image is the map; see `dapple control modules`)")
    control_mode = typer.Option([], "--control-mode", help="Balanced | My prompt is more important | ControlNet is "
                                "more important (one for all, or one per unit)")
    control_resize = typer.Option([], "--control-resize", help="Just Resize | Crop and Resize | Resize and Fill "
                                  "(one for all, or one per unit)")
    control_dir = typer.Option([], "--control-dir", help="a folder of ControlNets / T2I-Adapters (repeatable)")
    threads = typer.Option(None, "--threads", min=1, max=1024, show_default=False,
                           help="torch's CPU threads [default: automatic: 1 for small models such as the built-in "
                           "one, else the cores this process may use]")
    backend = typer.Option("torch", "--backend", help="torch | openvino: openvino runs the UNet and VAE decoder as "
                           "compiled OpenVINO models on the CPU (pip install \"dapple[openvino]\"; converted once, "
                           "cached in ~/.cache/dapple/openvino; no ControlNet or LoRA)")


def _run_and_save(fields: dict, *, model: Optional[Path], out: Path, device: Optional[str], dtype: Optional[str],
                  allow_pickle: bool, vae: Optional[Path] = None, models_dir: Optional[Path] = None,
                  threads: Optional[int] = None, control: tuple = (), backend: str = "torch",
                  memory=None) -> None:
    """Validate a request, load the model, generate with a progress bar per pass, save PNGs, print their paths.
    control: (--control specs, --control-module, --control-mode, --control-resize, --control-dir) lists."""
    import dapple
    from dapple.engine.hooks import StepHooks
    from dapple.engine.images import open_image
    from dapple.models.generation_defaults import unset_recommendations
    from dapple.samplers import resolve_sampler
    from dapple.service.outputs import save_result

    settings = Settings(model=model, device=device, dtype=dtype, output_dir=out, allow_pickle=allow_pickle,
                        models_dir=models_dir, threads=threads, backend=backend, memory=memory)
    specs, control_modules, control_modes, control_resizes, control_dirs = control or ([], [], [], [], [])
    with user_errors():
        # Check everything that needs no model first, so mistakes are reported in a second, not after loading.
        if specs or control_modules or control_modes or control_resizes:
            from dapple.engine.control_maps import check_module
            from dapple.interfaces.cli_control import parse_controls

            fields = {**fields, "controls": parse_controls(specs, control_modules, control_modes, control_resizes)}
            for unit in fields["controls"]:
                check_module(unit.get("module", "none"))
        request = make_request(**{name: value for name, value in fields.items() if value is not None})
        resolve_sampler(request.sampler)
        settings.limits.check(request)
        check_device(settings.device)
        check_dtype(settings.dtype)
        check_backend(settings.backend, request)
        check_memory(settings.memory, settings.device)
        for field in ("init_image", "mask", "depth_map"):  # their headers, before the model loads
            if isinstance(fields.get(field), Path):
                check_image_file(fields[field], FIELD_FLAGS[field])
                open_image(fields[field], what=field).close()
        check_output_folder(settings.output_dir)
        _quiet_libraries()
        model, vae, lora_dirs, embedding_dirs = _resolve_names(settings.model, vae, settings.models_dir)
        check_model_file(model)
        check_vae_file(vae)
        with _loading_message(model):
            pipe = dapple.load(model, device=settings.device, dtype=settings.dtype,
                               allow_pickle=settings.allow_pickle, limits=settings.limits, vae=vae,
                               lora_dirs=lora_dirs, embedding_dirs=embedding_dirs, threads=settings.threads,
                               control_dirs=control_dirs, backend=settings.backend,
                               openvino_cache_dir=settings.openvino_cache_dir, memory=settings.memory)
        if memory_summary(pipe):
            typer.echo(memory_summary(pipe), err=True)
        progress = Progress()
        # The bar opens before the first step (the step count is known once the sampler has its timesteps).
        hooks = StepHooks(before_step={"progress": lambda context: progress.begin(context.phase, context.total)},
                          after_step={"progress": lambda context: progress.advance(context.phase)})

        recommended = unset_recommendations(request, pipe.components.generation_defaults)
        if recommended:
            typer.echo("the model's recommended settings: " + ", ".join(f"{name}={value}" for name, value
                                                                        in recommended.items()), err=True)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", DappleWarning)
            try:
                result = pipe.run(request, hooks=hooks)
            finally:
                progress.close()
        for warning in caught:
            if issubclass(warning.category, DappleWarning):
                typer.echo(f"warning: {warning.message}", err=True)
        paths = save_result(result, settings.output_dir)
    timing = result.timings.get("total", 0.0)
    typer.echo(f"{len(paths)} image(s) in {timing:.1f}s, seeds {', '.join(map(str, result.seeds))}", err=True)
    for path in paths:
        say(str(path))


class Progress:
    """Progress on stderr: a tqdm bar per phase on a terminal; anywhere else (a pipe, a log file, CI) one plain line
    per phase, without the carriage returns and escape codes a bar would leave there."""

    def __init__(self) -> None:
        self.bars: dict[str, object] = {}
        self.terminal = sys.stderr.isatty()

    def begin(self, name: str, total: int, unit: str = "step") -> None:
        if name in self.bars:
            return
        if self.terminal:
            from tqdm import tqdm

            self.bars[name] = tqdm(total=total, desc=name, unit=unit, file=sys.stderr)
        else:
            self.bars[name] = None
            say(f"{name}: {total} {unit}{'s' if total != 1 else ''}", err=True)

    def advance(self, name: str) -> None:
        bar = self.bars.get(name)
        if bar is not None:
            bar.update(1)

    def close(self) -> None:
        for bar in self.bars.values():
            if bar is not None:
                bar.close()
        self.bars.clear()


class _ProgressPipe:
    """A pipeline that reports the progress of each generate() it is asked for (for the inspect commands, which
    call generate themselves): per step for one image, per image for a grid."""

    def __init__(self, pipe, progress: Progress, *, name: str, images: int = 0) -> None:
        self._pipe, self._progress, self._name, self._images = pipe, progress, name, images

    def __getattr__(self, attribute: str):
        return getattr(self._pipe, attribute)

    def generate(self, prompt: str, **options):
        callback = options.pop("callback", None)

        def step(context) -> None:
            if not self._images:
                self._progress.begin(self._name, context.total)
                self._progress.advance(self._name)
            if callback is not None:
                callback(context)

        if self._images:
            self._progress.begin(self._name, self._images, unit="image")
        result = self._pipe.generate(prompt, callback=step, **options)
        if self._images:
            self._progress.advance(self._name)
        return result


def _closest(name: str, choices) -> Optional[str]:
    """The CLI suggests a little more eagerly than the library (ratio >= 0.5): a typed path or flag value."""
    return closest(name, choices, cutoff=0.5)


def _did_you_mean(name: str, choices) -> str:
    return did_you_mean(name, choices, cutoff=0.5)


@contextmanager
def _closing(progress: Progress) -> Iterator[Progress]:
    try:
        yield progress
    finally:
        progress.close()


@contextmanager
def _loading_message(model: Optional[Path]) -> Iterator[None]:
    """Loading takes seconds on real models: on a terminal a line says so while it runs; then one line with the
    time (none when loading fails, so that an error stays the only line)."""
    import time

    name = "the built-in model" if model is None else str(model)
    if sys.stderr.isatty():
        say(f"loading {name} ...", err=True)
    start = time.perf_counter()
    yield
    say(f"loaded {name} in {time.perf_counter() - start:.1f}s", err=True)


def _model_folders(models_dir: Path):
    """The A1111 / ComfyUI folders under --models-dir, or an error that names the flag."""
    from dapple.models.library import ModelFolders

    try:
        return ModelFolders.from_root(models_dir)
    except DappleError as error:
        raise type(error)(f"--models-dir: {error}") from None


def _resolve_names(model: Optional[Path], vae: Optional[Path], models_dir: Optional[Path]
                   ) -> tuple[Optional[Path], Optional[Path], list[Path], list[Path]]:
    """With a models folder, --model and --vae may be names from it (a path that exists still wins), its LoRA
    folders are where <lora:name:w> looks, and its embeddings are used when a prompt names them."""
    if models_dir is None:
        return model, vae, [], []
    folders = _model_folders(models_dir)

    def find(kind: str, name: str) -> Path:
        try:
            return folders.find(kind, name)
        except DappleError as error:
            raise type(error)(f"{error}{_did_you_mean(name, [e.name for e in folders.entries(kind)])}") from None

    if model is not None and not model.exists():
        model = find("checkpoints", str(model))
    if vae is not None and not vae.exists():
        vae = find("vae", str(vae))
    return model, vae, list(folders.loras), list(folders.embeddings)


@app.command()
@memory_flags
def generate(
    prompt: str = typer.Argument(..., help="what to draw"),
    negative: str = GenerationOptions.negative,
    width: Optional[int] = GenerationOptions.width,
    height: Optional[int] = GenerationOptions.height,
    steps: Optional[int] = GenerationOptions.steps,
    guidance: Optional[float] = GenerationOptions.guidance,
    guidance_min_t: Optional[int] = GenerationOptions.guidance_min_t,
    deep_cache: Optional[int] = GenerationOptions.deep_cache,
    token_merging: Optional[float] = GenerationOptions.token_merging,
    speed: Optional[str] = GenerationOptions.speed,
    seed: int = GenerationOptions.seed,
    sampler: Optional[str] = GenerationOptions.sampler,
    batch: int = GenerationOptions.batch,
    hires_scale: float = typer.Option(1.0, help="hires fix: > 1 upscales by this factor and redraws (1..4)"),
    hires_upscaler: str = typer.Option("Latent", help="Latent, Latent (antialiased), Latent (bicubic), "
                                       "Latent (bicubic antialiased), Latent (nearest), Latent (nearest-exact), "
                                       "Lanczos, Nearest"),
    hires_steps: int = typer.Option(0, help="hires fix second-pass steps (0: the same as --steps)"),
    hires_strength: float = typer.Option(0.7, help="hires fix second-pass denoising strength 0..1"),
    model: Optional[Path] = GenerationOptions.model,
    out: Path = GenerationOptions.out,
    device: Optional[str] = GenerationOptions.device,
    dtype: Optional[str] = GenerationOptions.dtype,
    allow_pickle: bool = GenerationOptions.allow_pickle,
    vae: Optional[Path] = GenerationOptions.vae,
    models_dir: Optional[Path] = GenerationOptions.models_dir,
    threads: Optional[int] = GenerationOptions.threads,
    backend: str = GenerationOptions.backend,
    control: list[str] = GenerationOptions.control,
    control_module: list[str] = GenerationOptions.control_module,
    control_mode: list[str] = GenerationOptions.control_mode,
    control_resize: list[str] = GenerationOptions.control_resize,
    control_dir: list[Path] = GenerationOptions.control_dir,
    memory=None,  # --medvram, --lowvram, ... (memory_flags)
) -> None:
    """Generate images from a prompt and save them as PNGs with A1111 infotext."""
    fields = dict(prompt=prompt, negative_prompt=negative, width=width, height=height, steps=steps,
                  guidance_scale=guidance, seed=seed, sampler=sampler, batch_size=batch, hires_scale=hires_scale,
                  hires_upscaler=hires_upscaler, hires_steps=hires_steps, hires_strength=hires_strength,
                  guidance_min_timestep=guidance_min_t,
                  deep_cache_interval=deep_cache, token_merging_ratio=token_merging, speed=speed)
    _run_and_save(fields, memory=memory,
                  model=model, out=out, device=device, dtype=dtype, allow_pickle=allow_pickle, vae=vae,
                  models_dir=models_dir, threads=threads, backend=backend,
                  control=(control, control_module, control_mode, control_resize, control_dir))


@app.command()
@memory_flags
def img2img(
    image: Path = typer.Argument(..., help="the picture to start from"),
    prompt: str = typer.Argument(..., help="what to turn it into"),
    strength: float = GenerationOptions.strength,
    resize_mode: str = GenerationOptions.resize_mode,
    negative: str = GenerationOptions.negative,
    width: Optional[int] = GenerationOptions.width,
    height: Optional[int] = GenerationOptions.height,
    steps: Optional[int] = GenerationOptions.steps,
    guidance: Optional[float] = GenerationOptions.guidance,
    guidance_min_t: Optional[int] = GenerationOptions.guidance_min_t,
    deep_cache: Optional[int] = GenerationOptions.deep_cache,
    token_merging: Optional[float] = GenerationOptions.token_merging,
    speed: Optional[str] = GenerationOptions.speed,
    seed: int = GenerationOptions.seed,
    sampler: Optional[str] = GenerationOptions.sampler,
    batch: int = GenerationOptions.batch,
    model: Optional[Path] = GenerationOptions.model,
    out: Path = GenerationOptions.out,
    device: Optional[str] = GenerationOptions.device,
    dtype: Optional[str] = GenerationOptions.dtype,
    allow_pickle: bool = GenerationOptions.allow_pickle,
    vae: Optional[Path] = GenerationOptions.vae,
    models_dir: Optional[Path] = GenerationOptions.models_dir,
    threads: Optional[int] = GenerationOptions.threads,
    backend: str = GenerationOptions.backend,
    control: list[str] = GenerationOptions.control,
    control_module: list[str] = GenerationOptions.control_module,
    control_mode: list[str] = GenerationOptions.control_mode,
    control_resize: list[str] = GenerationOptions.control_resize,
    control_dir: list[Path] = GenerationOptions.control_dir,
    memory=None,  # --medvram, --lowvram, ... (memory_flags)
) -> None:
    """Redraw an image after a prompt; --strength 0..1 sets how much changes (int(steps x strength) steps run)."""
    fields = dict(prompt=prompt, init_image=image, strength=strength, resize_mode=resize_mode,
                  negative_prompt=negative, width=width, height=height, steps=steps, guidance_scale=guidance,
                  seed=seed, sampler=sampler, batch_size=batch, guidance_min_timestep=guidance_min_t,
                  deep_cache_interval=deep_cache, token_merging_ratio=token_merging, speed=speed)
    _run_and_save(fields, memory=memory,
                  model=model, out=out, device=device, dtype=dtype, allow_pickle=allow_pickle, vae=vae,
                  models_dir=models_dir, threads=threads, backend=backend,
                  control=(control, control_module, control_mode, control_resize, control_dir))


@app.command()
@memory_flags
def inpaint(
    image: Path = typer.Argument(..., help="the picture to change"),
    mask: Path = typer.Argument(..., help="white = repaint, black = keep (or the opaque part of a transparent PNG)"),
    prompt: str = typer.Argument(..., help="what to draw in the masked area"),
    strength: float = GenerationOptions.strength,
    mask_blur: int = GenerationOptions.mask_blur,
    invert_mask: bool = typer.Option(False, help="repaint the black area instead"),
    fill: str = typer.Option("original", "--fill", help="masked content: fill | original | latent noise | "
                             "latent nothing"),
    resize_mode: str = GenerationOptions.resize_mode,
    negative: str = GenerationOptions.negative,
    width: Optional[int] = GenerationOptions.width,
    height: Optional[int] = GenerationOptions.height,
    steps: Optional[int] = GenerationOptions.steps,
    guidance: Optional[float] = GenerationOptions.guidance,
    guidance_min_t: Optional[int] = GenerationOptions.guidance_min_t,
    deep_cache: Optional[int] = GenerationOptions.deep_cache,
    token_merging: Optional[float] = GenerationOptions.token_merging,
    speed: Optional[str] = GenerationOptions.speed,
    seed: int = GenerationOptions.seed,
    sampler: Optional[str] = GenerationOptions.sampler,
    batch: int = GenerationOptions.batch,
    model: Optional[Path] = GenerationOptions.model,
    out: Path = GenerationOptions.out,
    device: Optional[str] = GenerationOptions.device,
    dtype: Optional[str] = GenerationOptions.dtype,
    allow_pickle: bool = GenerationOptions.allow_pickle,
    vae: Optional[Path] = GenerationOptions.vae,
    models_dir: Optional[Path] = GenerationOptions.models_dir,
    threads: Optional[int] = GenerationOptions.threads,
    backend: str = GenerationOptions.backend,
    control: list[str] = GenerationOptions.control,
    control_module: list[str] = GenerationOptions.control_module,
    control_mode: list[str] = GenerationOptions.control_mode,
    control_resize: list[str] = GenerationOptions.control_resize,
    control_dir: list[Path] = GenerationOptions.control_dir,
    memory=None,  # --medvram, --lowvram, ... (memory_flags)
) -> None:
    """Repaint the masked area of an image after a prompt; the rest keeps its original pixels."""
    fields = dict(prompt=prompt, init_image=image, mask=mask, strength=strength, mask_blur=mask_blur,
                  invert_mask=invert_mask, inpainting_fill=fill, resize_mode=resize_mode, negative_prompt=negative,
                  width=width, height=height, steps=steps, guidance_scale=guidance, seed=seed, sampler=sampler,
                  batch_size=batch, guidance_min_timestep=guidance_min_t,
                  deep_cache_interval=deep_cache, token_merging_ratio=token_merging, speed=speed)
    _run_and_save(fields, memory=memory,
                  model=model, out=out, device=device, dtype=dtype, allow_pickle=allow_pickle, vae=vae,
                  models_dir=models_dir, threads=threads, backend=backend,
                  control=(control, control_module, control_mode, control_resize, control_dir))


@app.command()
@memory_flags
def outpaint(
    image: Path = typer.Argument(..., help="the picture to extend"),
    prompt: str = typer.Argument(..., help="what the extended picture shows"),
    left: int = typer.Option(0, help="pixels to add on the left (multiple of 8)"),
    right: int = typer.Option(0, help="pixels to add on the right (multiple of 8)"),
    top: int = typer.Option(0, help="pixels to add at the top (multiple of 8)"),
    bottom: int = typer.Option(0, help="pixels to add at the bottom (multiple of 8)"),
    strength: float = GenerationOptions.strength,
    mask_blur: int = GenerationOptions.mask_blur,
    negative: str = GenerationOptions.negative,
    steps: Optional[int] = GenerationOptions.steps,
    guidance: Optional[float] = GenerationOptions.guidance,
    guidance_min_t: Optional[int] = GenerationOptions.guidance_min_t,
    deep_cache: Optional[int] = GenerationOptions.deep_cache,
    token_merging: Optional[float] = GenerationOptions.token_merging,
    speed: Optional[str] = GenerationOptions.speed,
    seed: int = GenerationOptions.seed,
    sampler: Optional[str] = GenerationOptions.sampler,
    batch: int = GenerationOptions.batch,
    model: Optional[Path] = GenerationOptions.model,
    out: Path = GenerationOptions.out,
    device: Optional[str] = GenerationOptions.device,
    dtype: Optional[str] = GenerationOptions.dtype,
    allow_pickle: bool = GenerationOptions.allow_pickle,
    vae: Optional[Path] = GenerationOptions.vae,
    models_dir: Optional[Path] = GenerationOptions.models_dir,
    threads: Optional[int] = GenerationOptions.threads,
    backend: str = GenerationOptions.backend,
    control: list[str] = GenerationOptions.control,
    control_module: list[str] = GenerationOptions.control_module,
    control_mode: list[str] = GenerationOptions.control_mode,
    control_resize: list[str] = GenerationOptions.control_resize,
    control_dir: list[Path] = GenerationOptions.control_dir,
    memory=None,  # --medvram, --lowvram, ... (memory_flags)
) -> None:
    """Extend an image's canvas on the chosen sides and draw the new area."""
    fields = dict(prompt=prompt, init_image=image, outpaint_left=left, outpaint_right=right, outpaint_top=top,
                  outpaint_bottom=bottom, strength=strength, mask_blur=mask_blur, negative_prompt=negative,
                  steps=steps, guidance_scale=guidance, seed=seed, sampler=sampler, batch_size=batch,
                  guidance_min_timestep=guidance_min_t,
                  deep_cache_interval=deep_cache, token_merging_ratio=token_merging, speed=speed)
    _run_and_save(fields, memory=memory,
                  model=model, out=out, device=device, dtype=dtype, allow_pickle=allow_pickle, vae=vae,
                  models_dir=models_dir, threads=threads, backend=backend,
                  control=(control, control_module, control_mode, control_resize, control_dir))


@app.command()
@memory_flags
def depth2img(
    image: Path = typer.Argument(..., help="the picture to start from"),
    depth: Path = typer.Argument(..., help="depth map image, brighter = nearer"),
    prompt: str = typer.Argument(..., help="what to draw with that layout"),
    strength: float = typer.Option(0.8, help="denoising strength 0..1"),
    negative: str = GenerationOptions.negative,
    steps: Optional[int] = GenerationOptions.steps,
    guidance: Optional[float] = GenerationOptions.guidance,
    guidance_min_t: Optional[int] = GenerationOptions.guidance_min_t,
    deep_cache: Optional[int] = GenerationOptions.deep_cache,
    token_merging: Optional[float] = GenerationOptions.token_merging,
    speed: Optional[str] = GenerationOptions.speed,
    seed: int = GenerationOptions.seed,
    sampler: Optional[str] = GenerationOptions.sampler,
    batch: int = GenerationOptions.batch,
    model: Optional[Path] = GenerationOptions.model,
    out: Path = GenerationOptions.out,
    device: Optional[str] = GenerationOptions.device,
    dtype: Optional[str] = GenerationOptions.dtype,
    allow_pickle: bool = GenerationOptions.allow_pickle,
    vae: Optional[Path] = GenerationOptions.vae,
    models_dir: Optional[Path] = GenerationOptions.models_dir,
    threads: Optional[int] = GenerationOptions.threads,
    backend: str = GenerationOptions.backend,
    memory=None,  # --medvram, --lowvram, ... (memory_flags)
) -> None:
    """Depth-guided generation for depth models (SD 2 depth layout: a 5-channel UNet)."""
    fields = dict(prompt=prompt, init_image=image, depth_map=depth, strength=strength, negative_prompt=negative,
                  steps=steps, guidance_scale=guidance, seed=seed, sampler=sampler, batch_size=batch,
                  guidance_min_timestep=guidance_min_t,
                  deep_cache_interval=deep_cache, token_merging_ratio=token_merging, speed=speed)
    _run_and_save(fields, memory=memory,
                  model=model, out=out, device=device, dtype=dtype, allow_pickle=allow_pickle, vae=vae,
                  models_dir=models_dir, threads=threads, backend=backend)


@app.command()
def convert(
    source: Path = typer.Argument(..., help="a pickled checkpoint (.ckpt, .pt, .pth, .bin) or a diffusers model "
                                  "folder"),
    out: Optional[Path] = typer.Option(None, help="output .safetensors (default: beside the source)"),
) -> None:
    """Convert a pickle checkpoint to .safetensors without running its code (torch weights_only, own process), or
    a diffusers model folder to one original-layout .safetensors file (for A1111, ComfyUI and `dapple merge`)."""
    from dapple.models.convert import convert_to_safetensors, folder_to_single_file

    with user_errors():
        if out is not None:
            check_output_file(out, "--out", (".safetensors",))
        if source.is_dir():
            _quiet_libraries()
            target, report = folder_to_single_file(source, out)
            typer.echo(f"{report['tensors']} tensors written in the {report['family']} single-file layout", err=True)
        else:
            target, report = convert_to_safetensors(source, out)
            skipped = report["skipped"]
            typer.echo(f"{report['tensors']} tensors written" + (
                f"; left out non-tensor entries: {', '.join(skipped)}" if skipped else ""), err=True)
    say(str(target))


@app.command()
def merge(
    a: Path = typer.Argument(..., help="model A (.safetensors)"),
    b: Path = typer.Argument(..., help="model B (.safetensors)"),
    c: Optional[Path] = typer.Argument(None, help="model C, for add-difference"),
    mode: str = typer.Option("weighted-sum", help="weighted-sum: A(1-alpha) + B alpha; add-difference: "
                             "A + (B - C) alpha"),
    alpha: float = typer.Option(0.5, help="the share of B (weighted-sum) or the difference's multiplier"),
    out: Path = typer.Option(..., help="the merged .safetensors file"),
) -> None:
    """Merge checkpoints tensor by tensor (memory stays near one tensor)."""
    from dapple.models.merge import merge_checkpoints

    with user_errors():
        if not math.isfinite(alpha):
            raise DappleError(f"--alpha {alpha}: allowed is a finite number (0..1 for weighted-sum)")
        check_output_file(out, "--out", (".safetensors",))
        merge_checkpoints(a, b, out, mode=mode, alpha=alpha, c=c)
    say(str(out))


@app.command()
@memory_flags
def serve(
    host: str = typer.Option("127.0.0.1", help="address to bind; loopback by default"),
    port: int = typer.Option(7860, min=1, max=65535, help="TCP port, 1..65535"),
    data_dir: Path = typer.Option(Path("dapple-data"), help="job database and gallery images"),
    model: Optional[Path] = typer.Option(None, "--model", "-m", help="model folder, single file or, with "
                                         "--models-dir, name (default: the built-in model)"),
    models_dir: Optional[Path] = GenerationOptions.models_dir,
    queue_size: int = typer.Option(64, min=1, max=100_000, help="queued jobs beyond this get 429 (1..100000)"),
    api_auth: Optional[str] = typer.Option(None, help="user:password for HTTP Basic auth on every route"),
    cors_origin: Optional[list[str]] = typer.Option(None, help="an origin allowed to call from a browser; repeat"),
    allowed_host: Optional[list[str]] = typer.Option(None, help="a Host name the server answers besides its own "
                                                     "(loopback names on loopback, the bound address elsewhere); "
                                                     "repeat. Others get 421 (DNS rebinding)"),
    device: Optional[str] = GenerationOptions.device,
    dtype: Optional[str] = GenerationOptions.dtype,
    threads: Optional[int] = GenerationOptions.threads,
    control_dir: list[Path] = GenerationOptions.control_dir,
    backend: str = GenerationOptions.backend,
    memory=None,  # --medvram, --lowvram, ... (memory_flags)
) -> None:
    """Serve the native job API (/api/v1, OpenAPI at /docs) and the A1111 API (/sdapi/v1, with sd-webui-controlnet's
    /controlnet routes) on one job queue."""
    import signal

    import uvicorn

    import dapple
    from dapple.interfaces.guard import default_allowed_hosts, loopback_host
    from dapple.interfaces.server import create_app
    from dapple.service.jobs import JobService
    from dapple.service.models import ModelPool

    credentials = None
    if api_auth is not None:
        user, colon, password = api_auth.partition(":")
        if not colon or not user or not password:
            typer.echo("error: --api-auth must be user:password", err=True)
            raise typer.Exit(USAGE_ERROR)
        credentials = (user, password)
    if not host.strip():
        fail("--host is empty; give an address to bind, e.g. 127.0.0.1 (this machine only) or 0.0.0.0 (every "
             "interface)")
    check_device(device)
    check_dtype(dtype)
    check_backend(backend)
    check_output_folder(data_dir, "--data-dir")
    if not loopback_host(host) and credentials is None:
        typer.echo(f"warning: serving on {host} without --api-auth; anyone who can reach it can use it", err=True)
    if default_allowed_hosts(host, allowed_host or ()) is None:
        typer.echo(f"warning: serving on {host} with no --allowed-host: any Host header is answered; name the "
                   "machine's with --allowed-host to refuse DNS rebinding", err=True)
    _quiet_libraries()
    with user_errors():
        model, _, lora_dirs, embedding_dirs = _resolve_names(model, None, models_dir)
        check_model_file(model)
        settings = Settings(model=model, device=device, dtype=dtype, threads=threads, memory=memory,
                            control_dirs=tuple(control_dir), backend=backend)
        check_memory(settings.memory, settings.device)

        def load(path: Optional[Path]) -> dapple.Pipeline:
            return dapple.load(path, device=settings.device, dtype=settings.dtype, lora_dirs=lora_dirs,
                               embedding_dirs=embedding_dirs, threads=settings.threads,
                               control_dirs=settings.control_dirs, backend=settings.backend,
                               memory=settings.memory)

        with _loading_message(model):
            pipe = load(model)  # fail now, not on the first job
        if memory_summary(pipe):
            typer.echo(memory_summary(pipe), err=True)
        folders = _model_folders(models_dir) if models_dir is not None else None
        pool = ModelPool(lambda: pipe, pipe.components.name, folders, load)
        service = JobService(data_dir, lambda: pipe, queue_size=queue_size, models=pool)
    check_can_listen(host, port)
    service.start()
    try:  # uvicorn re-raises SIGTERM once it has shut down: exit through `finally`, which stops the worker
        signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(0))
        app = create_app(service, model_name=pipe.components.name,
                         model_path=Path(pipe.components.source) if pipe.components.source else None,
                         auth=credentials, cors_origins=cors_origin,
                         allowed_hosts=default_allowed_hosts(host, allowed_host or ()))
        server = _ReadyServer(uvicorn.Config(app, host=host, port=port, log_level="warning",
                                            timeout_graceful_shutdown=3),
                              announce=_serve_announcement(host, port, credentials),
                              on_exit=service.release_waiters)
        server.run()
    finally:
        service.stop()


def _serve_announcement(host: str, port: int, credentials: Optional[tuple[str, str]]) -> list[str]:
    """What `dapple serve` prints once it listens: the URL, "ready", and how clients authenticate."""
    shown = f"[{host}]" if ":" in host else host
    url = f"http://{shown}:{port}"
    lines = [f"ready: the studio at {url}/, the job API at {url}/api/v1 (docs at {url}/docs), "
             f"the A1111 API at {url}/sdapi/v1; Ctrl+C stops"]
    if host in ("0.0.0.0", "::"):
        lines.append(f"listening on every interface: use this machine's address instead of {host}")
    if credentials is not None:
        lines.append(f"HTTP Basic auth is on: clients send user {credentials[0]!r} and its password, e.g. "
                     f"curl -u {credentials[0]}:PASSWORD {url}/sdapi/v1/options; in a browser, the page asks")
    return lines


def _ready_server_class():
    import uvicorn

    class ReadyServer(uvicorn.Server):
        """uvicorn's server, printing the announcement once the socket listens (not before: a port in use fails)."""

        def __init__(self, config, announce: list[str], on_exit=None) -> None:
            super().__init__(config)
            self.announce, self.on_exit = announce, on_exit

        def handle_exit(self, sig, frame) -> None:
            if self.on_exit is not None:  # first: answer waiting requests before uvicorn cuts them off with a 500
                self.on_exit()
            super().handle_exit(sig, frame)

        async def startup(self, sockets=None) -> None:
            await super().startup(sockets=sockets)
            if self.started:
                for line in self.announce:
                    say(line, err=True)

    return ReadyServer


def _ReadyServer(config, announce: list[str], on_exit=None):
    return _ready_server_class()(config, announce, on_exit)


@app.command()
def models(
    models_dir: Optional[Path] = typer.Option(None, "--models-dir", envvar="DAPPLE_MODELS_DIR",
                                              help="an A1111 (stable-diffusion-webui) or ComfyUI folder "
                                              "(default: list the built-in model)"),
    kind: Optional[str] = typer.Option(None, help="checkpoints, vae, loras or embeddings (default: all)"),
    hashes: bool = typer.Option(True, "--hashes/--no-hashes", help="A1111 short hashes (cached after the first)"),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """List the checkpoints, VAEs, LoRAs and embeddings in a models folder, with A1111's short hashes; without a
    folder, the built-in model (what --model defaults to)."""
    _quiet_libraries()
    from dapple.api import BUILTIN_MODEL_DIR
    from dapple.models.hashing import short_hash
    from dapple.models.library import KINDS

    with user_errors():
        if kind is not None and kind not in KINDS:
            raise DappleError(f"--kind {kind!r} is unknown; allowed: {', '.join(KINDS)}"
                              + _did_you_mean(kind, KINDS))
        rows = []
        if models_dir is None:
            if kind in (None, "checkpoints") and (BUILTIN_MODEL_DIR / "model_index.json").is_file():
                size = sum(f.stat().st_size for f in BUILTIN_MODEL_DIR.rglob("*") if f.is_file())
                rows.append({"kind": "checkpoints", "name": "builtin (the default --model)",
                             "hash": short_hash(BUILTIN_MODEL_DIR) if hashes else None,
                             "size_mb": round(size / 2**20, 1), "path": str(BUILTIN_MODEL_DIR)})
            typer.echo("no --models-dir (or DAPPLE_MODELS_DIR): the built-in model only; give an A1111 or ComfyUI "
                       "folder to list its models", err=True)
        else:
            folders = _model_folders(models_dir)
            for each in [kind] if kind else KINDS:
                for entry in folders.entries(each):
                    rows.append({"kind": each, "name": entry.name, "hash": short_hash(entry.path) if hashes and (
                        entry.path.is_file() or each == "checkpoints") else None,
                        "size_mb": round(entry.size / 2**20, 1), "path": str(entry.path)})
    if as_json:
        say(json.dumps(rows, indent=1, ensure_ascii=False))
        return
    typer.echo(f"{'kind':<12} {'name':<32} {'hash':<10} {'MB':>9}  path")
    for row in rows:
        say(f"{row['kind']:<12} {row['name']:<32} {row['hash'] or '-':<10} {row['size_mb']:>9}  {row['path']}")


@app.command()
def samplers() -> None:
    """List the sampler names, their schedule types and aliases."""
    from dapple.samplers import SAMPLERS

    for spec in SAMPLERS:
        kinds = ", ".join(spec.schedule_types)
        aliases = ", ".join(spec.aliases)
        typer.echo(f"{spec.name:<14} {spec.class_name:<34} schedule types: {kinds:<32} aliases: {aliases}")


@app.command()
def info(
    image: Path = typer.Argument(..., help="a PNG made by Dapple or AUTOMATIC1111"),
    as_json: bool = typer.Option(False, "--json", help="print the parsed parameters as JSON"),
) -> None:
    """Print the generation parameters stored in a PNG."""
    from dapple.service.outputs import read_infotext

    with user_errors():
        check_image_file(image, "IMAGE")
        text = read_infotext(image)
        if text is None:
            raise DappleError(f"{image} carries no generation parameters (no 'parameters' PNG text chunk)")
    say(json.dumps(parse_infotext(text), indent=2, ensure_ascii=False) if as_json else text)


@inspect_app.command("tokens")
def inspect_tokens(
    text: str = typer.Argument(..., help="a prompt"),
    model: Optional[Path] = typer.Option(None, "--model", "-m", help="use this model's tokenizer"),
) -> None:
    """Show the token ids a prompt becomes and the token each id stands for."""
    from dapple.models.tokenizer import bundled_clip_tokenizer, folder_tokenizer

    with user_errors():
        if model is not None and not model.is_dir():
            raise DappleError(f"model folder {model} does not exist")
        tokenizer = folder_tokenizer(model) if model is not None else bundled_clip_tokenizer()
    from dapple.engine.prompt_syntax import chunk_tokens

    limit = tokenizer.model_max_length
    chunks = chunk_tokens(tokenizer, text)  # A1111 syntax: weights, BREAK, 75 tokens per chunk
    for number, chunk in enumerate(chunks, start=1):
        if len(chunks) > 1:
            typer.echo(f"chunk {number} of {len(chunks)}")
        typer.echo(f"{'#':>3}  {'id':>6}  token")
        rows = [(tokenizer.bos_token_id, 1.0), *zip(chunk.ids, chunk.weights), (tokenizer.eos_token_id, 1.0)]
        for position, (token_id, weight) in enumerate(rows):
            emphasis = "" if weight == 1.0 else f"  weight {weight:.3g}"
            typer.echo(f"{position:>3}  {token_id:>6}  {tokenizer.convert_ids_to_tokens(token_id)}{emphasis}")
        used = len(rows)
        typer.echo(f"{used} of {limit} slots used ({used - 2} prompt tokens + start and end); "
                   f"{limit - used} padding")


_inspect_model = typer.Option(None, "--model", "-m", help="model folder (default: the built-in model)")
_inspect_out = typer.Option(Path("outputs/inspect"), "--out", help="folder for the pictures")
_seed = typer.Option(0, min=0, max=2**32 - 1, help="seed of the noise, 0..4294967295")


def _inspect_pipe(model: Optional[Path], out: Optional[Path] = None, threads: Optional[int] = None):
    """Load the model an inspect command looks inside, with the libraries kept quiet, after checking the output
    folder (so that a mistake there is reported before the loading)."""
    import dapple

    if out is not None:
        check_output_folder(out)
    check_model_file(model)
    _quiet_libraries()
    with _loading_message(model):
        return dapple.load(model, threads=threads)


def _report(inspection) -> None:
    """An inspection's numbers, then the paths of its files (one per line, as generate prints them)."""
    for line in inspection.lines:
        say(line, err=True)
    for path in inspection.files:
        say(str(path))


def _split(values: Optional[str], kind: type) -> list:
    if not values:
        return []
    try:
        return [kind(value.strip()) for value in values.split(",") if value.strip()]
    except ValueError:
        raise DappleError(f"{values!r} is not a comma-separated list of {kind.__name__} values") from None


@inspect_app.command("embeddings")
def inspect_embeddings(
    text: str = typer.Argument(..., help="a prompt"),
    vs: Optional[str] = typer.Option(None, "--vs", help="a second prompt to compare with"),
    model: Optional[Path] = _inspect_model, out: Path = _inspect_out,
    threads: Optional[int] = GenerationOptions.threads,
) -> None:
    """The text embedding's shape, per-token norms and (with --vs) the cosine similarity heatmap."""
    from dapple.inspect import embeddings

    with user_errors():
        _report(embeddings(_inspect_pipe(model, out, threads), text, out, vs=vs))


@inspect_app.command("schedule")
def inspect_schedule(
    sampler: str = typer.Option("DPM++ 2M Karras", "--sampler", help="one or more names, comma-separated"),
    steps: int = typer.Option(20, help="sampling steps, 1..150"),
    model: Optional[Path] = typer.Option(None, "--model", "-m", help="use this model's schedule (default: the "
                                         "built-in model's, as every command's --model)"),
    out: Path = _inspect_out,
    threads: Optional[int] = GenerationOptions.threads,
) -> None:
    """Plot alphas_cumprod and the timesteps and sigmas each sampler visits."""
    _quiet_libraries()
    from dapple.api import BUILTIN_MODEL_DIR
    from dapple.inspect import noise_schedule
    from dapple.samplers import resolve_sampler

    with user_errors():
        names = _split(sampler, str)
        if not names:
            raise DappleError("--sampler is empty; give one or more sampler names, comma-separated (see "
                              "`dapple samplers`)")
        for name in names:
            resolve_sampler(name)
        if not 1 <= steps <= 150:
            raise DappleError(f"steps={steps} is invalid; allowed: 1..150")
        check_output_folder(out)
        builtin_config = BUILTIN_MODEL_DIR / "scheduler" / "scheduler_config.json"
        if model is None and builtin_config.is_file():  # the built-in model's schedule, without loading it
            config = json.loads(builtin_config.read_text())
        else:
            config = _inspect_pipe(model, out, threads).components.scheduler_config
        _report(noise_schedule(config, out, names, steps))


def _open_picture(path: Path):
    from dapple.engine.images import open_image

    check_image_file(path, "IMAGE")
    return open_image(path, what="IMAGE").convert("RGB")


@inspect_app.command("vae")
def inspect_vae(image: Path = typer.Argument(..., help="a picture"), model: Optional[Path] = _inspect_model,
                out: Path = _inspect_out, threads: Optional[int] = GenerationOptions.threads) -> None:
    """Encode and decode a picture: original, reconstruction, error, latent channels; compression and PSNR."""
    from dapple.inspect import vae_round_trip

    with user_errors():
        picture = _open_picture(image)
        _report(vae_round_trip(_inspect_pipe(model, out, threads), picture, out))


@inspect_app.command("noise")
def inspect_noise(image: Path = typer.Argument(..., help="a picture"),
                  timesteps: str = typer.Option("0,50,150,300,500,750,999", help="comma-separated, 0..999"),
                  seed: int = _seed, model: Optional[Path] = _inspect_model, out: Path = _inspect_out,
                  threads: Optional[int] = GenerationOptions.threads) -> None:
    """The forward process: a picture noised to a row of timesteps, in latent and in pixel space."""
    from dapple.inspect import forward_noise

    with user_errors():
        values = _split(timesteps, int)
        if not values or any(not 0 <= t <= 999 for t in values):
            raise DappleError(f"timesteps={timesteps!r} is invalid; allowed: comma-separated integers in 0..999")
        picture = _open_picture(image)
        _report(forward_noise(_inspect_pipe(model, out, threads), picture, out, values, seed=seed))


@inspect_app.command("denoise")
def inspect_denoise(
    prompt: str = typer.Argument(..., help="what to draw"),
    steps: Optional[int] = GenerationOptions.steps, guidance: Optional[float] = GenerationOptions.guidance,
    seed: int = _seed, sampler: Optional[str] = GenerationOptions.sampler,
    negative: str = GenerationOptions.negative, model: Optional[Path] = _inspect_model, out: Path = _inspect_out,
    threads: Optional[int] = GenerationOptions.threads,
) -> None:
    """Generate while keeping every step: animated GIF, contact sheet, latent statistics plot."""
    from dapple.inspect import denoise_steps

    with user_errors():
        progress = Progress()
        pipe = _ProgressPipe(_inspect_pipe(model, out, threads), progress, name="denoising")
        with _closing(progress):
            inspection = denoise_steps(pipe, prompt, out, steps=steps, guidance_scale=guidance, seed=seed,
                                       sampler=sampler, negative_prompt=negative)
        _report(inspection)


@inspect_app.command("guidance")
def inspect_guidance(
    prompt: str = typer.Argument(..., help="what to draw"),
    scales: Optional[str] = typer.Option(None, help="CFG scales, e.g. 1,4,8,12"),
    steps: Optional[str] = typer.Option(None, help="step counts, e.g. 5,10,20,40"),
    samplers: Optional[str] = typer.Option(None, help="sampler names, e.g. 'Euler a,DDIM,DPM++ 2M Karras'"),
    seeds: Optional[str] = typer.Option(None, help="seeds, e.g. 1,2,3"),
    seed: int = typer.Option(0, min=0, max=2**32 - 1, help="the seed when seeds are not an axis"),
    model: Optional[Path] = _inspect_model, out: Path = _inspect_out,
    threads: Optional[int] = GenerationOptions.threads,
) -> None:
    """The same seed across one or two parameters in one labelled grid (the first two axes given: X, then Y)."""
    from dapple.inspect import parameter_grid

    with user_errors():
        axes = [(name, values) for name, values in (
            ("guidance_scale", _split(scales, float)), ("steps", _split(steps, int)),
            ("sampler", _split(samplers, str)), ("seed", _split(seeds, int))) if values]
        if not 1 <= len(axes) <= 2:
            raise DappleError("give one or two of --scales, --steps, --samplers, --seeds (the grid's axes)")
        options = {} if any(name == "seed" for name, _ in axes) else {"seed": seed}
        images = len(axes[0][1]) * (len(axes[1][1]) if len(axes) > 1 else 1)
        progress = Progress()
        pipe = _ProgressPipe(_inspect_pipe(model, out, threads), progress, name="grid", images=images)
        with _closing(progress):
            inspection = parameter_grid(pipe, prompt, out, axes[0], axes[1] if len(axes) > 1 else None, **options)
        _report(inspection)


@inspect_app.command("unet")
def inspect_unet(
    image: Path = typer.Argument(..., help="a picture"), prompt: str = typer.Argument(..., help="the condition"),
    t: int = typer.Option(500, "--t", help="timestep 0..999"), seed: int = _seed,
    model: Optional[Path] = _inspect_model, out: Path = _inspect_out,
    threads: Optional[int] = GenerationOptions.threads,
) -> None:
    """One UNet call on a noised picture: noisy, predicted noise, predicted x0, true x0."""
    from dapple.inspect import unet_call

    with user_errors():
        if not 0 <= t <= 999:
            raise DappleError(f"--t: t={t} is invalid; allowed: 0..999 (a timestep)")
        picture = _open_picture(image)
        _report(unet_call(_inspect_pipe(model, out, threads), picture, prompt, t, out, seed=seed))


from dapple.interfaces.cli_control import control_app  # noqa: E402  (its commands import cli's helpers lazily)

train_app = typer.Typer(help="Train models: the built-in shapes model, from scratch or from a model folder.",
                        no_args_is_help=True)
eval_app = typer.Typer(help="Evaluate models.", no_args_is_help=True)
app.add_typer(train_app, name="train")
app.add_typer(control_app, name="control")
app.add_typer(eval_app, name="eval")


@train_app.command("builtin")
def train_builtin(
    out: Path = typer.Option(Path("runs/builtin"), help="run folder: checkpoint.pt, train.log, model/"),
    seed: int = typer.Option(0, min=0, max=2**32 - 1, help="seed of weights, data and noise"),
    vae_steps: Optional[int] = typer.Option(None, min=0, help="stage 1 steps [default: the recipe's]"),
    diffusion_steps: Optional[int] = typer.Option(None, min=1, help="stage 2 steps [default: the recipe's]"),
    vae_from: Optional[Path] = typer.Option(None, help="a model folder whose VAE to reuse (skips stage 1)"),
    init_from: Optional[Path] = typer.Option(None, help="a model folder to fine-tune: stage 2 starts from its "
                                             "VAE, text encoder and UNet"),
    settings: list[str] = typer.Option([], "--set", help="NAME=VALUE for any other TrainingConfig field, e.g. "
                                       "--set diffusion_learning_rate=3e-4 (repeatable)"),
    device: str = typer.Option("cpu", help="cpu or cuda"),
    stop_after: Optional[int] = typer.Option(None, min=0, help="train at most this many steps now, then checkpoint"),
) -> None:
    """Train the built-in model on the shapes world. Run the same command again to resume."""
    check_device(device)
    check_output_folder(out)
    check_utf8_path(out, "--out")
    for flag, folder in (("--vae-from", vae_from), ("--init-from", init_from)):
        if folder is not None and not (folder / "model_index.json").is_file():
            fail(f"{flag} {folder} is not a model folder (no model_index.json); give a diffusers model folder, "
                 "e.g. one that `dapple train export` wrote")
    _quiet_libraries()
    from dapple.train.builtin_training import BuiltinTrainer, TrainingConfig, config_overrides

    with user_errors():
        overrides = {"vae_steps": vae_steps, "diffusion_steps": diffusion_steps,
                     "vae_from": str(vae_from) if vae_from is not None else None,
                     "init_from": str(init_from) if init_from is not None else None}
        try:
            overrides.update(config_overrides(settings))
        except ValueError as error:
            raise DappleError(str(error)) from None
        config = TrainingConfig(seed=seed, **{key: value for key, value in overrides.items() if value is not None})
        try:
            trainer = BuiltinTrainer(out, config, device=device)
        except ValueError as error:  # a checkpoint from other settings
            raise DappleError(str(error)) from None
        typer.echo(f"{out}: stage {trainer.stage}, step {trainer.step}", err=True)
        model = trainer.run(stop_after=stop_after)
        if model:
            from dapple.files import normal_permissions

            normal_permissions(model)  # safetensors would leave the weights 0600
    say(str(model) if model else f"stopped; checkpoint in {trainer.checkpoint_path}")


@train_app.command("controlnet")
def train_controlnet(
    out: Path = typer.Option(Path("runs/controlnet"), help="run folder: checkpoint.pt, train.log, model/"),
    seed: int = typer.Option(0, min=0, max=2**32 - 1, help="seed of weights, data and noise"),
    steps: Optional[int] = typer.Option(None, min=1, help="training steps [default: the recipe's]"),
    batch_size: Optional[int] = typer.Option(None, min=1, max=4096, help="scenes per step [default: the recipe's]"),
    base: Optional[Path] = typer.Option(None, help="the frozen base model folder [default: the built-in model]"),
    init_from: Optional[Path] = typer.Option(None, help="a ControlNet folder to continue from (a new run with its "
                                             "own settings) [default: a copy of the base UNet's encoder]"),
    settings: list[str] = typer.Option([], "--set", help="NAME=VALUE for any other ControlNetConfig field, e.g. "
                                       "--set learning_rate=1e-4 (repeatable)"),
    device: str = typer.Option("cpu", help="cpu or cuda"),
    threads: int = typer.Option(1, min=1, max=256, help="CPU threads for training"),
    stop_after: Optional[int] = typer.Option(None, min=0, help="train at most this many steps now, then checkpoint"),
) -> None:
    """Train a canny-edge ControlNet for the built-in model on the shapes world. Run the same command again to
    resume."""
    check_device(device)
    check_output_folder(out)
    check_utf8_path(out, "--out")
    if base is not None and not (base / "model_index.json").is_file():
        fail(f"--base {base} is not a model folder (no model_index.json); give a diffusers model folder")
    if init_from is not None and not (init_from / "config.json").is_file():
        fail(f"--init-from {init_from} is not a ControlNet folder (no config.json); give the model/ folder of a "
             "`dapple train controlnet` run")
    _quiet_libraries()
    from dapple.train.controlnet_training import ControlNetConfig, ControlNetTrainer, config_overrides

    with user_errors():
        overrides = {"steps": steps, "batch_size": batch_size, "base": str(base) if base is not None else None,
                     "init_from": str(init_from) if init_from is not None else None}
        try:
            overrides.update(config_overrides(settings))
        except ValueError as error:
            raise DappleError(str(error)) from None
        config = ControlNetConfig(seed=seed, **{key: value for key, value in overrides.items() if value is not None})
        try:
            trainer = ControlNetTrainer(out, config, device=device)
        except ValueError as error:  # a checkpoint from other settings, a base that is not a model
            raise DappleError(str(error)) from None
        typer.echo(f"{out}: step {trainer.step} of {config.steps}", err=True)
        model = trainer.run(stop_after=stop_after, threads=threads)
        if model:
            from dapple.files import normal_permissions

            normal_permissions(model)  # safetensors would leave the weights 0600
    say(str(model) if model else f"stopped; checkpoint in {trainer.checkpoint_path}")


@train_app.command("export")
def train_export(
    run: Path = typer.Option(Path("runs/builtin"), help="a run folder of `dapple train builtin`"),
    out: Path = typer.Option(..., help="model folder to write"),
    evaluate: int = typer.Option(0, "--eval", min=0, max=10_000, help="also evaluate on this many held-out captions (20 "
                                 "steps) and put the table in the model card"),
    sampler: str = typer.Option("DPM++ 2M Karras", help="the sampler of that evaluation"),
    guidance: float = typer.Option(6.0, "--guidance", "--cfg", help="the guidance scale of that evaluation"),
    guidance_min_t: int = typer.Option(0, "--guidance-min-t", help="that evaluation guides only steps at "
                                       "timesteps >= this (0: all)"),
) -> None:
    """Export a run's current EMA weights as a model folder with a model card, finished or not."""
    if not (run / "checkpoint.pt").is_file():
        fail(f"--run {run} holds no checkpoint.pt; train with `dapple train builtin --out {run}` first")
    check_output_folder(out)
    check_utf8_path(out, "--out")
    if evaluate:
        _check_evaluation(sampler, guidance, guidance_min_t, steps=20)
    _quiet_libraries()
    from dapple.train.builtin_training import BuiltinTrainer, TrainingConfig, config_settings
    from dapple.train.model_card import write_model_card

    with user_errors():
        if not (run / "checkpoint.pt").is_file():
            raise DappleError(f"{run} holds no checkpoint.pt; train with `dapple train builtin --out {run}` first")
        try:
            trainer = BuiltinTrainer(run, TrainingConfig(**_run_config(run)))
        except ValueError as error:
            raise DappleError(str(error)) from None
        typer.echo(f"{run}: stage {trainer.stage}, step {trainer.step}", err=True)
        trainer.export(out)
        table, settings = None, ""
        if evaluate > 0:  # the evaluated settings become the folder's recommendation
            from dapple.models.generation_defaults import write_generation_defaults

            write_generation_defaults(out, {"sampler": sampler, "steps": 20, "guidance_scale": guidance,
                                            "guidance_min_timestep": guidance_min_t})
            import dapple
            from dapple.train.evaluate import evaluate_pipeline

            table = evaluate_pipeline(dapple.load(out), evaluate, steps=20, guidance_scale=guidance, sampler=sampler,
                                      seed=0, guidance_min_timestep=guidance_min_t)
            interval = f" --guidance-min-t {guidance_min_t}" if guidance_min_t else ""
            guided = f" at timesteps >= {guidance_min_t}" if guidance_min_t else ""
            settings = (f"`dapple eval builtin --model DIR --n {evaluate} --sampler \"{sampler}\" --cfg {guidance:g}"
                        f"{interval}`: {evaluate} held-out captions naming every attribute, 20 steps of {sampler}, "
                        f"CFG {guidance:g}{guided}, seeds 0..; graded by image analysis.")
            typer.echo(table.format(), err=True)
        config = trainer.config
        train = f"dapple train builtin --out {run} --seed {config.seed} --vae-steps {config.vae_steps} " \
                f"--diffusion-steps {config.diffusion_steps}"
        if config.vae_from is not None:
            train += f" --vae-from {config.vae_from}"
        if config.init_from is not None:
            train += f" --init-from {config.init_from}"
        train += "".join(f" --set {setting}" for setting in config_settings(config))
        if trainer.stage != "done":  # the same batches, so stopping at the same step gives the same weights
            reused = config.vae_from is not None or config.init_from is not None  # no stage 1
            vae_steps_done = config.vae_steps if trainer.stage == "diffusion" and not reused else 0
            train += f" --stop-after {trainer.step + vae_steps_done}"
        export = f"dapple train export --run {run} --out {out}"
        if evaluate:
            export += f" --eval {evaluate} --sampler \"{sampler}\" --cfg {guidance:g}"
            export += f" --guidance-min-t {guidance_min_t}" if guidance_min_t else ""
        commands = [train, export]
        write_model_card(out, config, run_dir=run, stage=trainer.stage, step=trainer.step, table=table,
                         evaluation=settings, commands=commands)
        from dapple.files import normal_permissions

        normal_permissions(out)  # safetensors would leave the weights 0600
    say(str(out))


def _check_evaluation(sampler: str, guidance: float, guidance_min_t: int, steps: int, seed: int = 0) -> None:
    """The evaluation's generation settings, checked as a request is, before any model loads."""
    from dapple.samplers import resolve_sampler

    with user_errors():
        resolve_sampler(sampler)
        make_request(prompt="x", sampler=sampler, guidance_scale=guidance, guidance_min_timestep=guidance_min_t,
                     steps=steps, seed=seed)


def _run_config(run: Path) -> dict:
    """The TrainingConfig fields a run's checkpoint was written with."""
    from dapple.train.builtin_model import Architecture
    from dapple.train.checkpoint import load_checkpoint

    state = load_checkpoint(run / "checkpoint.pt")
    fields = json.loads(state["config"])
    fields["architecture"] = Architecture(**{key: tuple(value) if isinstance(value, list) else value
                                              for key, value in fields["architecture"].items()})
    return fields


@eval_app.command("builtin")
def eval_builtin(
    model: Path = typer.Option(..., "--model", "-m", help="a model folder trained on the shapes world"),
    n: int = typer.Option(200, min=1, max=100_000, help="held-out images to generate and grade, 1..100000"),
    steps: int = typer.Option(20, help="sampling steps, 1..150"),
    guidance: float = typer.Option(6.0, "--guidance", "--cfg", help="CFG scale 0..30"),
    guidance_min_t: int = typer.Option(0, "--guidance-min-t", help="guide only steps at timesteps >= this"),
    sampler: str = typer.Option("DPM++ 2M Karras"),
    seed: int = typer.Option(0, min=0, max=2**32 - 1),
    grid: Optional[Path] = typer.Option(None, help="also save the first 64 images as a labelled-free grid PNG"),
    threads: Optional[int] = GenerationOptions.threads,
) -> None:
    """Generate held-out captions and grade colour, background, shape, size and position by image analysis."""
    import dapple
    from dapple.train.evaluate import evaluate_pipeline

    _check_evaluation(sampler, guidance, guidance_min_t, steps, seed)
    check_model_file(model)
    if grid is not None:
        check_output_file(grid, "--grid", (".png",))
    with user_errors():
        _quiet_libraries()
        with _loading_message(model):
            pipe = dapple.load(model, threads=threads)
        images = []
        with _closing(Progress()) as progress:
            progress.begin("evaluating", n, unit="image")

            def collect(index: int, caption: str, image) -> None:
                progress.advance("evaluating")
                if index < 64:
                    images.append(image)

            table = evaluate_pipeline(pipe, n, steps=steps, guidance_scale=guidance, sampler=sampler, seed=seed,
                                      guidance_min_timestep=guidance_min_t, on_image=collect)
    typer.echo(table.format())
    if grid is not None and images:
        from PIL import Image

        side = images[0].width
        columns = 8
        sheet = Image.new("RGB", (columns * side, -(-len(images) // columns) * side))
        for index, image in enumerate(images):
            sheet.paste(image, ((index % columns) * side, (index // columns) * side))
        with user_errors():
            grid.parent.mkdir(parents=True, exist_ok=True)
            sheet.save(grid)
        say(str(grid))


@eval_app.command("controlnet")
def eval_controlnet(
    model: Path = typer.Option(..., "--model", "-m", help="a ControlNet folder trained on the shapes world"),
    n: int = typer.Option(200, min=1, max=100_000, help="held-out scenes to generate and grade, 1..100000"),
    base: Optional[Path] = typer.Option(None, help="the base model folder [default: the built-in model]"),
    weight: float = typer.Option(1.0, min=0.0, max=2.0, help="the ControlNet's weight (conditioning scale)"),
    baseline: bool = typer.Option(True, help="also grade the same prompts at weight 0 (the ControlNet off)"),
    seed: int = typer.Option(0, min=0, max=2**32 - 1, help="world seed of the held-out scenes; image i uses seed+i"),
    grid: Optional[Path] = typer.Option(None, help="also save scene | control map | result for the first 16 "
                                        "scenes as a PNG"),
    run: Optional[Path] = typer.Option(None, help="with --card: the training run folder (recipe, time)"),
    card: bool = typer.Option(False, help="write the model card (README.md) into the --model folder"),
    threads: Optional[int] = GenerationOptions.threads,
) -> None:
    """Generate held-out scenes from their canny edges and a colours-only prompt, and grade colour, background,
    shape, size and position by image analysis, with the ControlNet and (baseline) without it."""
    import dapple
    from dapple.train.controlnet_eval import control_grid, evaluate_controlnet, meets_bars

    if not (model / "config.json").is_file():
        fail(f"--model {model} is not a ControlNet folder (no config.json); give a diffusers ControlNetModel folder, "
             "e.g. the model/ folder of a `dapple train controlnet` run")
    if base is not None:
        check_model_file(base, "--base")
    if grid is not None:
        check_output_file(grid, "--grid", (".png",))
    if card and run is not None and not (run / "checkpoint.pt").is_file():
        fail(f"--run {run} holds no checkpoint.pt; give the folder of a `dapple train controlnet` run")
    with user_errors():
        _quiet_libraries()
        with _loading_message(base):
            pipe = dapple.load(base, threads=threads, control_dirs=[model.resolve().parent])
        name = model.resolve().name  # control models are found by folder name too
        triples: list = []
        tables = {}
        weights = [weight] + ([0.0] if baseline and weight != 0 else [])
        with _closing(Progress()) as progress:
            for value in weights:
                label = f"weight {value:g}"
                progress.begin(label, n, unit="image")

                def collect(index: int, case, image, value=value, label=label) -> None:
                    progress.advance(label)
                    if value == weight and index < 16:
                        triples.append((case.scene.image, case.edges, image))

                tables[value] = evaluate_controlnet(pipe, name, n, weight=value, seed=seed, on_image=collect)
    for value, table in tables.items():
        typer.echo(f"ControlNet weight {value:g}:\n{table.format()}")
    missed = [attribute for attribute, ok in meets_bars(tables[weight]).items() if not ok]
    typer.echo("bars (shape 90%, position 95%, colour and background 95%): "
               + (f"missed: {', '.join(missed)}" if missed else "all met"))
    if grid is not None and triples:
        with user_errors():
            grid.parent.mkdir(parents=True, exist_ok=True)
            control_grid(triples).save(grid)
        say(str(grid))
    if card:
        _write_controlnet_card(model, run, tables, weight, n, seed)


def _write_controlnet_card(model: Path, run: Optional[Path], tables: dict, weight: float, n: int, seed: int) -> None:
    """The model card of an evaluated ControlNet folder, with the recipe of its run when one is given."""
    from dapple.train.controlnet_eval import write_model_card
    from dapple.train.controlnet_training import ControlNetConfig, config_settings, stored_config
    from dapple.train.model_card import training_minutes

    config, step, minutes, commands = ControlNetConfig(), None, None, []
    if run is not None:
        from dapple.train.checkpoint import load_checkpoint

        state = load_checkpoint(run / "checkpoint.pt")
        config, step = stored_config(json.loads(state["config"])), int(state["step"])
        if (run / "train.log").is_file():
            minutes = training_minutes(run / "train.log", "controlnet", step).get("controlnet")
        train = f"dapple train controlnet --out {run} --seed {config.seed} --steps {config.steps} " \
                f"--batch-size {config.batch_size}"
        train += f" --base {config.base}" if config.base else ""
        train += f" --init-from {config.init_from}" if config.init_from else ""
        train += "".join(f" --set {setting}" for setting in config_settings(config))
        if step < config.steps:  # the same batches, so stopping at the same step gives the same weights
            train += f" --stop-after {step}"
        commands.append(train)
        if model.resolve() != (run / "model").resolve():
            commands.append(f"cp -r {run}/model/. DIR   # the run's export (EMA weights)")
    commands.append(f"dapple eval controlnet --model DIR --n {n}" + (f" --seed {seed}" if seed else "")
                    + (f" --weight {weight:g}" if weight != 1 else "") + " --card"
                    + (f" --run {run}" if run is not None else ""))
    evaluation = (f"`dapple eval controlnet --model DIR --n {n}`: {n} scenes of the shapes world's held-out "
                  f"(colour, shape, background) combinations (`ShapesWorld(seed={seed}, split=\"held_out\")`, "
                  "scenes 0..; training draws only split \"train\", which never holds them). Control: the scene's "
                  "canny edges (module none, the map given); prompt: its colour and background only (\"a red shape "
                  "on a blue background\"); the built-in model's recommended settings (DPM++ 2M, 20 steps, CFG 5 "
                  f"at timesteps >= 600), seeds {seed}..; graded by image analysis. Weight 0 is the same prompts "
                  "with the ControlNet off: what the prompt alone gives.")
    labels = {value: (f"**ControlNet, weight {value:g}**" if value == weight else f"no control (weight {value:g})")
              for value in tables}
    with user_errors():
        path = write_model_card(model, config, commands=commands, minutes=minutes,
                                tables={labels[value]: table for value, table in tables.items()},
                                evaluation=evaluation, step=step if step is not None else config.steps)
    say(str(path))


@app.command("create-tiny-model")
def create_tiny_model(
    folder: Path = typer.Argument(..., help="where to write the model folder (new or empty)"),
    seed: Optional[int] = typer.Option(None, min=0, max=2**32 - 1, show_default=False,
                                       help="seed of the random weights, 0..4294967295 [default: a fresh random "
                                       "seed, printed]"),
) -> None:
    """Write a tiny model with random weights (SD 1.x architecture, 64x64): for trying the machinery.
    Its images are noise."""
    if folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
        what = "is a file" if not folder.is_dir() else "exists and is not empty"
        fail(f"{folder} {what}; give a new or empty folder (nothing is overwritten)")
    check_output_folder(folder, "FOLDER")
    check_utf8_path(folder, "FOLDER")
    if seed is None:
        import secrets

        seed = secrets.randbelow(2**32)
    _quiet_libraries()
    from dapple.models.tiny import save_tiny_model

    from dapple.files import normal_permissions

    with user_errors():
        path = normal_permissions(save_tiny_model(folder, seed=seed))  # safetensors would leave its files 0600
    typer.echo(f"seed {seed}", err=True)
    say(str(path))


for _commands in (app, inspect_app, train_app, eval_app):
    for _info in _commands.registered_commands:
        _info.callback = _refuse_undecodable_text(_info.callback)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
