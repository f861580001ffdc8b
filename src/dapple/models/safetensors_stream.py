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


TORCH_DTYPES = {name: dtype for dtype, name in DTYPE_NAMES.items()}


class StreamingReader:
    """Read tensors of a .safetensors file one at a time with plain file reads.

    safetensors' safe_open memory-maps the file, and every page read stays in the process's resident set until
    the file is closed; reading with seek/read keeps only the tensor being used in memory."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._file = open(self.path, "rb")
        try:
            (length,) = struct.unpack("<Q", self._file.read(8))
            if length > 100 * 2**20:
                raise ValueError("header too large")
            header = json.loads(self._file.read(length))
        except (struct.error, ValueError) as error:
            self._file.close()
            raise ValueError(f"{self.path} is not a valid .safetensors file ({error})") from None
        self.metadata: dict[str, str] = header.pop("__metadata__", None) or {}
        self._entries = header
        self._data_start = 8 + length

    def keys(self) -> list[str]:
        return list(self._entries)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._entries[name]["shape"])

    def dtype(self, name: str) -> torch.dtype:
        code = self._entries[name]["dtype"]
        if code not in TORCH_DTYPES:
            raise ValueError(f"{self.path}: tensor {name} has dtype {code}, which Dapple does not read")
        return TORCH_DTYPES[code]

    def tensor(self, name: str) -> torch.Tensor:
        start, end = self._entries[name]["data_offsets"]
        self._file.seek(self._data_start + start)
        data = bytearray(self._file.read(end - start))
        flat = torch.frombuffer(data, dtype=self.dtype(name)) if data else torch.empty(0, dtype=self.dtype(name))
        return flat.reshape(self.shape(name))

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> StreamingReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
