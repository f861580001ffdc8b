"""Pick the device, dtype and CPU thread count a model runs with: CUDA with fp16 where there is a GPU; on the CPU
bf16 for large models where the CPU has native bf16, else float32 (dapple.models.precision says why)."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from dapple.errors import ModelLoadError
from dapple.models.precision import BF16_MIN_PARAMETERS, default_dtype

_DTYPES = {
    "fp16": torch.float16, "float16": torch.float16, "half": torch.float16,
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
    "fp32": torch.float32, "float32": torch.float32, "float": torch.float32,
}


def check_available(device: torch.device, name: str = "device") -> torch.device:
    """Refuse a device this machine does not have, before anything loads (torch would fail deep inside .to())."""
    if device.type == "cuda":
        if not torch.cuda.is_available():
            build = "a CPU-only torch build" if torch.version.cuda is None else "no CUDA GPU visible"
            raise ModelLoadError(f"{name} {device}: CUDA is not available here ({build}, torch {torch.__version__}); "
                                 "use cpu, or leave the device unset to pick the best available")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ModelLoadError(f"{name} {device}: this machine has {torch.cuda.device_count()} CUDA device(s); "
                                 f"allowed: cuda:0..cuda:{torch.cuda.device_count() - 1}")
    elif device.type == "mps":
        if not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
            raise ModelLoadError(f"{name} {device}: Apple's MPS is not available here; use cpu")
    elif device.type != "cpu":
        raise ModelLoadError(f"{name} {str(device)!r} is not supported; allowed: cpu, cuda, cuda:N, mps")
    return device


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """None picks CUDA, then Apple's MPS, then the CPU; a named device must exist on this machine."""
    if device is not None:
        try:
            parsed = torch.device(device)
        except (RuntimeError, ValueError, TypeError) as error:
            raise ModelLoadError(f"unknown device {device!r}; use cpu, cuda, cuda:N or mps") from error
        return check_available(parsed)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device,
                  unet_parameters: int | None = None) -> torch.dtype:
    """A named dtype, or for None the device's default (precision.default_dtype: float16 on accelerators; on the
    CPU bf16 for models of unet_parameters >= 100M where the CPU has native bf16, else float32)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype is None:
        return default_dtype(device, unet_parameters)
    try:
        return _DTYPES[dtype.lower()]
    except KeyError:
        raise ModelLoadError(f"unknown dtype {dtype!r}; use one of {', '.join(_DTYPES)}") from None


# Below this many UNet parameters a model gains little from a second thread (the built-in model: 0.25 s an image on
# 2 threads, 0.28 s on 1) and loses most when another process holds a core: OpenMP's threads wait on each other at
# every operator, and one descheduled thread stalls them all (2.3 s on 2 threads against 0.27 s on 1 with one core
# busy, measured on a 2-core machine). The same cutoff keeps such models in fp32 on the CPU (precision.py).
SMALL_MODEL_PARAMETERS = BF16_MIN_PARAMETERS
_torch_default_threads: int | None = None  # torch's own choice, remembered before Dapple first changes it


def _cgroup_cpu_limit(cpu_max: Path = Path("/sys/fs/cgroup/cpu.max")) -> int | None:
    """The CPU quota of this process's cgroup (v2) in whole cores, or None when it has none."""
    try:
        quota, period = cpu_max.read_text().split()[:2]
    except (OSError, ValueError):
        return None
    if quota == "max":
        return None
    return max(1, int(quota) // int(period))


def available_cores() -> int:
    """The cores this process may run on: its CPU affinity, capped by a container's CPU quota."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    limit = _cgroup_cpu_limit()
    return max(1, min(cores, limit) if limit else cores)


def choose_threads(requested: int | None, unet_parameters: int) -> int:
    """The intra-op thread count for torch: `requested` when given, else 1 for small models and, for the rest,
    torch's own default (the physical cores) capped by the cores this process may use."""
    if requested is not None:
        if isinstance(requested, bool) or not isinstance(requested, int) or requested < 1:
            raise ModelLoadError(f"threads must be a whole number >= 1, got {requested!r}")
        return requested
    global _torch_default_threads
    if _torch_default_threads is None:
        _torch_default_threads = torch.get_num_threads()
    if unet_parameters < SMALL_MODEL_PARAMETERS:
        return 1
    return max(1, min(_torch_default_threads, available_cores()))
