"""Writing a .safetensors file one tensor at a time.

The safetensors library's save_file needs every tensor in memory at once. The format is simple enough to
stream (https://github.com/huggingface/safetensors: an 8-byte little-endian header length, a JSON header giving
each tensor's dtype, shape and byte range, then the raw bytes), so a merge or conversion whose shapes are known
up front writes each tensor as soon as it is computed and holds one tensor at a time.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

import torch

DTYPE_NAMES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL",
}


def write_streaming(
    path: Path, layout: Iterable[tuple[str, tuple[int, ...], torch.dtype]],
    produce: Callable[[str], torch.Tensor], metadata: Mapping[str, str] | None = None,
) -> Path:
    """Write tensors named in `layout` (name, shape, dtype), calling produce(name) for each in turn.

    Written to a temporary name and renamed, so a failed merge leaves no half file behind."""
    layout = list(layout)
    header: dict[str, dict] = {"__metadata__": dict(metadata or {})} if metadata else {}
    offset = 0
    for name, shape, dtype in layout:
        size = int(torch.Size(shape).numel()) * torch.empty((), dtype=dtype).element_size()
        header[name] = {"dtype": DTYPE_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # the data starts 8-byte aligned
    temporary = path.with_name(path.name + ".partial")
    try:
        with open(temporary, "wb") as handle:
            handle.write(struct.pack("<Q", len(encoded)))
            handle.write(encoded)
            for name, shape, dtype in layout:
                tensor = produce(name)
                if tuple(tensor.shape) != tuple(shape) or tensor.dtype != dtype:
                    raise ValueError(f"{name}: produced {tuple(tensor.shape)} {tensor.dtype}, "
                                     f"expected {tuple(shape)} {dtype}")
                handle.write(tensor.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy().tobytes())
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)
    return path
