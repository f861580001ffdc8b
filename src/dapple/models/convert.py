"""`dapple convert`: a pickled checkpoint (.ckpt/.pt/.bin) to .safetensors, without ever executing its code.

The file is read by torch.load(weights_only=True), which unpickles only tensors and plain containers and
refuses any other global, in a separate Python process: even a bug in that restricted unpickler cannot reach the
process that then writes and loads the weights. Nested state dicts ({"state_dict": ...}, {"model": ...}) are
flattened as A1111 reads them; non-tensor entries are reported and left out.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from dapple.errors import PickleRefusedError

# Runs in the child process: load with weights_only, save the tensors as safetensors, report as JSON.
_CHILD = r"""
import json, sys, torch
from safetensors.torch import save_file
source, target = sys.argv[1], sys.argv[2]
try:
    state = torch.load(source, map_location="cpu", weights_only=True)
except Exception as error:
    print(json.dumps({"refused": f"{type(error).__name__}: {error}"})); sys.exit(0)
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


def convert_to_safetensors(source: Path, target: Path | None = None, *, timeout: float = 600.0) -> tuple[Path, dict]:
    """Convert `source` to `target` (default: the same name with .safetensors); return the path and a report
    {"tensors": N, "skipped": [names]}. Raises PickleRefusedError for anything weights_only rejects."""
    if not source.is_file():
        raise PickleRefusedError(f"{source} does not exist")
    if source.suffix not in PICKLE_SUFFIXES:
        raise PickleRefusedError(f"{source} is not a pickle checkpoint; allowed: {', '.join(PICKLE_SUFFIXES)}")
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
        raise PickleRefusedError(f"{source} was refused by torch's weights_only loader (it would have to run "
                                 f"code to load): {report['refused']}")
    return target, report
