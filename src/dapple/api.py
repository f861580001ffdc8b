"""dapple.load(): the front door of the Python API."""

from __future__ import annotations

from pathlib import Path

import torch

from dapple.engine.pipeline import Pipeline
from dapple.errors import ModelLoadError
from dapple.models.loader import load_components

# Where the built-in model's diffusers folder ships inside the package (once its weights meet their bar).
BUILTIN_MODEL_DIR = Path(__file__).parent / "models" / "assets" / "builtin"
from dapple.request import Limits


def load(
    path: str | Path | None = None,
    *,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    allow_pickle: bool = False,
    limits: Limits | None = None,
) -> Pipeline:
    """Load a diffusers model folder (or, online, a hub id; or with no path, the built-in model).

    device: None picks CUDA, then MPS, then CPU. dtype: None picks float16 on GPUs and float32 on the CPU.
    allow_pickle: permit .bin/.ckpt weights (loaded with torch's weights_only mode); off by default.
    """
    if path is None:
        if not (BUILTIN_MODEL_DIR / "model_index.json").is_file():
            raise ModelLoadError(
                "no model given: pass a diffusers model folder (--model DIR); Dapple's built-in model is not "
                "shipped yet"
            )
        path = BUILTIN_MODEL_DIR
    components = load_components(path, device=device, dtype=dtype, allow_pickle=allow_pickle)
    return Pipeline(components, limits=limits)
