"""`dapple convert`: a pickled checkpoint (.ckpt/.pt/.bin) to .safetensors, without ever executing its code; and a
diffusers model folder to one original-layout .safetensors file (what A1111, ComfyUI and `dapple merge` take).

The file is read by torch.load(weights_only=True), which unpickles only tensors and plain containers and
refuses any other global, in a separate Python process: even a bug in that restricted unpickler cannot reach the
process that then writes and loads the weights. Nested state dicts ({"state_dict": ...}, {"model": ...}) are
flattened as A1111 reads them; non-tensor entries are reported and left out.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

from dapple.errors import ModelLoadError, PickleRefusedError
from dapple.files import normal_permissions

# Runs in the child process: load with weights_only, save the tensors as safetensors, report as JSON.
_CHILD = r"""
import json, pickle, sys, torch
from safetensors.torch import save_file
source, target = sys.argv[1], sys.argv[2]
try:
    state = torch.load(source, map_location="cpu", weights_only=True)
except Exception as error:
    print(json.dumps({"refused": f"{type(error).__name__}: {error}", "pickle": isinstance(error, pickle.UnpicklingError)}))
    sys.exit(0)
for key in ("state_dict", "model", "module"):
    if isinstance(state, dict) and isinstance(state.get(key), dict):
        state = state[key]
        break
if not isinstance(state, dict):
    print(json.dumps({"refused": f"the file holds a {type(state).__name__}, not a dict of tensors"})); sys.exit(0)
tensors, skipped = {}, []
for name, value in state.items():
    if isinstance(value, torch.Tensor):
        tensors[str(name)] = value.detach().clone().contiguous()  # clone: safetensors refuses shared storage
    else:
        skipped.append(str(name))
if not tensors:
    print(json.dumps({"refused": "the file holds no tensors"})); sys.exit(0)
save_file(tensors, target, metadata={"converted_from": source.rsplit("/", 1)[-1]})
print(json.dumps({"tensors": len(tensors), "skipped": skipped}))
"""

PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")


def refusal_reason(message: str) -> str:
    """The sentence of torch's weights_only refusal that says what the file wanted ("Trying to load unsupported
    GLOBAL posix.system whose module posix is blocked"), without its advice to load with weights_only=False, which
    would run the file's code, and without its links."""
    advice = ("Weights only load failed", "weights_only", "Check the documentation", "Please file an issue")
    text = message.split("WeightsUnpickler error:", 1)[-1]
    for paragraph in re.split(r"\n\s*\n", text):
        paragraph = " ".join(paragraph.split())
        if paragraph and not any(phrase in paragraph for phrase in advice):
            return re.split(r"(?<=[a-z0-9)])\. ", paragraph)[0].rstrip(".")
    return "a global or an instruction that only running the file's code could load"


def single_file_family(components) -> str:
    """Which original layout a diffusers model folder's components are written in: SDXL (two text encoders), SD 2.x
    (an OpenCLIP text encoder: plain GELU) or SD 1.x (OpenAI CLIP: quick GELU; the built-in model is one)."""
    if getattr(components, "text_encoder_2", None) is not None:
        return "sdxl"
    return "sd2" if components.text_encoder.config.hidden_act == "gelu" else "sd1"


def folder_to_single_file(folder: Path, target: Path | None = None) -> tuple[Path, dict]:
    """Write a diffusers model folder (what `dapple create-tiny-model` and `dapple train export` write) as one
    original-layout .safetensors file; return its path and {"family", "tensors"}. The file loads in A1111 and
    diffusers' from_single_file (with the folder as config), and merges with `dapple merge`."""
    from safetensors import safe_open

    from dapple.models.loader import load_components
    from dapple.models.single_file import write_single_file

    if not (folder / "model_index.json").is_file():
        raise ModelLoadError(f"{folder} is not a diffusers model folder (no model_index.json); convert takes a "
                             f"model folder or a pickle checkpoint ({', '.join(PICKLE_SUFFIXES)})")
    target = target or folder.with_name(folder.name + ".safetensors")
    if target.suffix != ".safetensors":
        raise ModelLoadError(f"{target}: the single file is written as .safetensors; give a name ending in it")
    if target.exists():
        raise ModelLoadError(f"{target} already exists; remove it or give another output name")
    components = load_components(folder, device="cpu")
    family = single_file_family(components)
    extra = None
    if family == "sd2":
        # SD 2.x files carry one more OpenCLIP layer than SD 2 conditions on (it reads the penultimate layer's
        # output, which is the diffusers folder's last). The folder no longer has that layer; a copy of the last
        # one stands in, so that readers find the layer count they expect. It never affects the conditioning.
        layers = components.text_encoder.config.num_hidden_layers
        last = f"encoder.layers.{layers - 1}."
        extra = {key.replace(last, f"encoder.layers.{layers}."): value
                 for key, value in components.text_encoder.state_dict().items() if key.startswith(last)}
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ModelLoadError(f"cannot write {target}: {error.strerror or error}") from None
    write_single_file(components, target, family, extra_text_layer=extra)
    with safe_open(str(target), framework="pt") as handle:
        tensors = len(list(handle.keys()))
    return normal_permissions(target), {"family": family, "tensors": tensors}


def convert_to_safetensors(source: Path, target: Path | None = None, *, timeout: float = 600.0) -> tuple[Path, dict]:
    """Convert `source` to `target` (default: the same name with .safetensors); return the path and a report
    {"tensors": N, "skipped": [names]}. Raises PickleRefusedError for anything weights_only rejects."""
    if not source.is_file():
        raise PickleRefusedError(f"{source} does not exist")
    if source.suffix not in PICKLE_SUFFIXES:
        raise PickleRefusedError(f"{source} is not a pickle checkpoint or a model folder; allowed: a diffusers "
                                 f"model folder or a {', '.join(PICKLE_SUFFIXES)} file")
    target = target or source.with_suffix(".safetensors")
    if target.exists():
        raise PickleRefusedError(f"{target} already exists; remove it or give another output name")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise PickleRefusedError(f"cannot write {target}: {error.strerror or error}") from None
    completed = subprocess.run([sys.executable, "-c", _CHILD, str(source), str(target)], capture_output=True,
                               text=True, timeout=timeout)
    lines = [line for line in completed.stdout.splitlines() if line.startswith("{")]
    if completed.returncode != 0 or not lines:
        raise PickleRefusedError(f"converting {source} failed: {completed.stderr.strip().splitlines()[-1:]}")
    report = json.loads(lines[-1])
    if "refused" in report:
        if report.get("pickle"):
            raise PickleRefusedError(f"{source} was refused by torch's weights_only loader (it would have to run "
                                     f"code to load): {refusal_reason(report['refused'])}")
        raise PickleRefusedError(f"{source} could not be read as a checkpoint: {refusal_reason(report['refused'])}")
    normal_permissions(target)  # safetensors leaves its temporary file's 0600
    return target, report
