"""Checkpoint merging as in A1111's checkpoint merger, streamed tensor by tensor.

weighted-sum:   A * (1 - alpha) + B * alpha
add-difference: A + (B - C) * alpha      (e.g. add what an inpainting model learned to another model)

Inputs are read one tensor at a time (StreamingReader: plain reads, no memory map whose pages would pile up in the
resident set) and the output is written with write_streaming, so memory stays near one tensor, not three models. Mismatched architectures (different names or shapes) are refused before
anything is written.
"""

from __future__ import annotations

from contextlib import ExitStack
from pathlib import Path

import torch
from dapple.errors import DappleError, did_you_mean
from dapple.models.safetensors_stream import StreamingReader, write_streaming

MODES = ("weighted-sum", "add-difference")


def _open(stack: ExitStack, path: Path) -> StreamingReader:
    if path.is_dir():
        raise DappleError(f"{path} is a folder; merge takes single-file checkpoints (.safetensors). A diffusers "
                          f"model folder becomes one with `dapple convert {path} --out {path.name}.safetensors`")
    if path.suffix.lower() in (".ckpt", ".pt", ".pth", ".bin"):
        raise DappleError(f"{path} is a pickle checkpoint; convert it first with `dapple convert {path}` (which "
                          "never runs its code)")
    if path.suffix != ".safetensors":
        raise DappleError(f"{path} is not a .safetensors file; merge takes single-file checkpoints (.safetensors)")
    if not path.is_file():
        raise DappleError(f"{path} does not exist")
    try:
        return stack.enter_context(StreamingReader(path))
    except ValueError as error:
        raise DappleError(str(error)) from None


def _shapes(handle: StreamingReader) -> dict[str, tuple[int, ...]]:
    return {name: handle.shape(name) for name in handle.keys()}


def merge_checkpoints(a: Path, b: Path, out: Path, *, mode: str = "weighted-sum", alpha: float = 0.5,
                      c: Path | None = None) -> Path:
    """Merge single-file checkpoints A and B (and C for add-difference) into `out`."""
    if mode not in MODES:
        raise DappleError(f"merge mode {mode!r} is unknown; allowed: {', '.join(MODES)}{did_you_mean(mode, MODES)}")
    if mode == "add-difference" and c is None:
        raise DappleError("add-difference needs a third model C: A + (B - C) * alpha")
    if mode == "weighted-sum" and c is not None:
        raise DappleError("weighted-sum takes two models; give a third only with --mode add-difference")
    if not 0.0 <= alpha <= 1.0 and mode == "weighted-sum":
        raise DappleError(f"alpha={alpha} is invalid; allowed: 0..1")
    if out.resolve() in {p.resolve() for p in (a, b, c) if p is not None}:
        raise DappleError(f"the output {out} would overwrite an input; choose another name")
    with ExitStack() as stack:
        inputs = [_open(stack, path) for path in (a, b, c) if path is not None]
        shapes = [_shapes(handle) for handle in inputs]
        for path, other in zip((b, c), shapes[1:]):
            if other != shapes[0]:
                missing, extra = sorted(set(shapes[0]) - set(other)), sorted(set(other) - set(shapes[0]))
                differ = sorted(n for n in set(other) & set(shapes[0]) if other[n] != shapes[0][n])
                raise DappleError(
                    f"{path} does not match {a}: {len(missing)} tensors missing (e.g. {missing[:2]}), "
                    f"{len(extra)} extra (e.g. {extra[:2]}), {len(differ)} of another shape (e.g. {differ[:2]}); "
                    "only models of the same architecture can be merged"
                )
        dtypes = {name: inputs[0].dtype(name) for name in shapes[0]}

        def merged(name: str) -> torch.Tensor:
            tensors = [handle.tensor(name) for handle in inputs]
            if not tensors[0].is_floating_point():  # integer buffers (position ids): keep A's
                return tensors[0]
            work = [t.float() for t in tensors]
            if mode == "weighted-sum":
                result = work[0] * (1 - alpha) + work[1] * alpha
            else:
                result = work[0] + (work[1] - work[2]) * alpha
            return result.to(tensors[0].dtype)

        try:
            out.parent.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise DappleError(f"cannot write {out}: {error.strerror or error}") from None
        layout = [(name, shape, dtypes[name]) for name, shape in shapes[0].items()]
        metadata = {"dapple_merge": f"{mode} alpha={alpha:g}: {a.name}, {b.name}" + (f", {c.name}" if c else "")}
        return write_streaming(out, layout, merged, metadata)
