"""The dtype a model runs in, chosen per device, and weights loaded straight into it.

Measured on a 2-core AVX-512 BF16 CPU (SD 1.5 architecture, 512x512, one UNet call with CFG): fp32 10.7 s,
bf16 5.7 s, bf16 with channels-last convolution weights 4.6 s; the VAE decode 8.6 s against 4.3 s. So the CPU
default is bf16 where the CPU computes bf16 natively (AVX-512 BF16 or AMX on x86, the BF16 extension on Arm) and
fp32 elsewhere (emulated bf16 is slower than fp32). Small models such as the built-in one stay fp32: bf16 gains
them little (0.36 s -> 0.31 s an image) and fp32 results are the ones that reproduce bit for bit across machines.

Loading: diffusers' from_pretrained in fp32 leaves the weights as views of the memory-mapped file, so loading
costs almost nothing until the weights are read. Converting those views to bf16 reads every page of the mapping,
and the pages stay resident until the last view is gone: the fp32 file and its bf16 copy would be in memory
together (5.3 GB peak for the SD 1.5 UNet, 2.1 GB after). `load_weights_into` instead reads each tensor with plain
file reads, converts it and drops the fp32 bytes at once, so the peak is the bf16 model plus one tensor.
"""

from __future__ import annotations

import platform
from collections.abc import Iterable
from pathlib import Path

import torch

from dapple.models.safetensors_stream import StreamingReader

# Below this many UNet parameters a model stays fp32 on the CPU (see the module docstring); SD 1.5's UNet has 860M.
BF16_MIN_PARAMETERS = 100_000_000

_BF16_CPU_FLAGS = {"avx512_bf16", "amx_bf16", "bf16"}  # x86 flags; "bf16" is Arm's Features entry


def cpu_has_native_bf16(cpuinfo: Path = Path("/proc/cpuinfo")) -> bool:
    """Whether this CPU has bf16 arithmetic in hardware, read from the kernel's CPU flags (not guessed).

    Apple's M2 and later have it too, but torch's CPU kernels there gain little from it, so macOS says no."""
    if platform.system() != "Linux":
        return False
    try:
        text = cpuinfo.read_text()
    except OSError:
        return False
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return bool(_BF16_CPU_FLAGS & set(value.split()))
    return False


def default_dtype(device: torch.device, unet_parameters: int | None = None) -> torch.dtype:
    """fp16 on CUDA and MPS; on the CPU bf16 for large models where the CPU has native bf16, else fp32.

    unet_parameters None (not known) keeps fp32 on the CPU."""
    if device.type in ("cuda", "mps"):
        return torch.float16
    if unet_parameters is not None and unet_parameters >= BF16_MIN_PARAMETERS and cpu_has_native_bf16():
        return torch.bfloat16
    return torch.float32


def vae_dtype(dtype: torch.dtype, device: torch.device, force_upcast: bool) -> torch.dtype:
    """The VAE's dtype: the model's, except fp16 with a VAE whose config says force_upcast (SD 1.x/2.x/XL's VAEs
    overflow fp16 and decode black or NaN images, the reason for A1111's --no-half-vae): then bf16 where the GPU has
    it (the range of fp32 at half the memory), else fp32."""
    if dtype != torch.float16 or not force_upcast:
        return dtype
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def safetensors_files(folder: Path) -> list[Path]:
    """The .safetensors weight files of one component folder (one file or the shards of one)."""
    return sorted(Path(folder).glob("*.safetensors")) if Path(folder).is_dir() else []


def parameter_count(files: Iterable[Path]) -> int:
    """Elements in the floating-point tensors of these .safetensors files, from their headers alone."""
    total = 0
    for path in files:
        with StreamingReader(path) as reader:
            for name in reader.keys():
                if reader.dtype(name).is_floating_point:
                    total += int(torch.Size(reader.shape(name)).numel())
    return total


def stored_dtype(files: Iterable[Path]) -> torch.dtype | None:
    """The dtype most floating-point elements of these files are stored in (None: no floats, or no files)."""
    counts: dict[torch.dtype, int] = {}
    for path in files:
        with StreamingReader(path) as reader:
            for name in reader.keys():
                dtype = reader.dtype(name)
                if dtype.is_floating_point:
                    counts[dtype] = counts.get(dtype, 0) + int(torch.Size(reader.shape(name)).numel())
    return max(counts, key=counts.get) if counts else None


def _owned(tensor: torch.Tensor, dtype: torch.dtype | None, channels_last: bool) -> torch.Tensor:
    """A copy in memory of its own, floats in `dtype`, 4-D tensors channels-last when asked."""
    target = dtype if dtype is not None and tensor.is_floating_point() else tensor.dtype
    layout = torch.channels_last if channels_last and tensor.dim() == 4 else torch.contiguous_format
    owned = torch.empty_like(tensor, dtype=target, memory_format=layout)
    owned.copy_(tensor)
    return owned


@torch.no_grad()
def load_weights_into(module: torch.nn.Module, files: Iterable[Path], dtype: torch.dtype | None = None, *,
                      channels_last: bool = False) -> torch.nn.Module:
    """Give every parameter and buffer of `module` memory of its own in `dtype` (floats only), reading tensors
    the files hold by name with plain reads; the rest (renamed or computed ones) are copied from the module.

    Every tensor is replaced, not only the converted ones: one view of a memory-mapped file left behind keeps the
    whole file mapped. channels_last lays 4-D (convolution) weights out NHWC, which oneDNN and cuDNN run faster.
    """
    readers = [StreamingReader(path) for path in files]
    try:
        where = {name: reader for reader in readers for name in reader.keys()}
        state = module.state_dict(keep_vars=True)
        for name, tensor in state.items():
            reader = where.get(name)
            source = reader.tensor(name) if reader is not None and reader.shape(name) == tuple(tensor.shape) \
                else tensor
            tensor.data = _owned(source, dtype, channels_last)
    finally:
        for reader in readers:
            reader.close()
    return module
