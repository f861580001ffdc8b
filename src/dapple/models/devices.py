"""Pick the device and dtype a model runs in: CUDA with fp16 where there is a GPU, float32 on the CPU."""

from __future__ import annotations

import torch

from dapple.errors import ModelLoadError

_DTYPES = {
    "fp16": torch.float16, "float16": torch.float16, "half": torch.float16,
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
    "fp32": torch.float32, "float32": torch.float32, "float": torch.float32,
}


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """None picks CUDA, then Apple's MPS, then the CPU."""
    if device is not None:
        try:
            return torch.device(device)
        except RuntimeError as error:
            raise ModelLoadError(f"unknown device {device!r}; use cpu, cuda, cuda:N or mps") from error
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """None picks float16 on accelerators and float32 on the CPU (where half precision is slow)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype is None:
        return torch.float32 if device.type == "cpu" else torch.float16
    try:
        return _DTYPES[dtype.lower()]
    except KeyError:
        raise ModelLoadError(f"unknown dtype {dtype!r}; use one of {', '.join(_DTYPES)}") from None


def to_owned_channels_last(module: torch.nn.Module) -> torch.nn.Module:
    """Copy every weight into memory the module owns, 4-D convolution weights in channels-last (NHWC) layout.

    NHWC lets oneDNN and cuDNN pick faster convolution kernels (the SD VAE decoder runs about a quarter
    faster on 2 CPU cores). Copying *every* tensor, not only the converted ones, matters: weights loaded from
    safetensors are views of a memory-mapped file, and one view left behind keeps the whole file mapped, so the
    file's pages and the converted copies would both count against memory.
    """
    with torch.no_grad():
        for tensor in [*module.parameters(), *module.buffers()]:
            layout = torch.channels_last if tensor.dim() == 4 else torch.contiguous_format
            owned = torch.empty_like(tensor, memory_format=layout)
            owned.copy_(tensor)
            tensor.data = owned
    return module
