"""Dapple: Stable Diffusion for people who generate images with Python.

    import dapple
    pipe = dapple.load("path/to/model")
    result = pipe.generate("a red circle on a blue background", seed=42)

Names are imported on first use (PEP 562), so `import dapple` and light commands such as `dapple info` do not
pay for importing torch, diffusers and transformers.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from dapple._version import __version__

_EXPORTS = {
    "load": "dapple.api",
    "Pipeline": "dapple.engine.pipeline",
    "CancelToken": "dapple.engine.hooks",
    "StepContext": "dapple.engine.hooks",
    "StepHooks": "dapple.engine.hooks",
    "GenerationRequest": "dapple.request",
    "GenerationResult": "dapple.request",
    "Hires": "dapple.request",
    "Limits": "dapple.request",
    "DappleError": "dapple.errors",
    "DappleWarning": "dapple.errors",
    "GenerationCancelled": "dapple.errors",
    "InvalidRequestError": "dapple.errors",
    "ModelLoadError": "dapple.errors",
    "PickleRefusedError": "dapple.errors",
    "UnknownSamplerError": "dapple.errors",
    "resolve_sampler": "dapple.samplers",
    "sampler_names": "dapple.samplers",
}
__all__ = ["__version__", *_EXPORTS]

if TYPE_CHECKING:
    from dapple.api import load
    from dapple.engine.hooks import CancelToken, StepContext, StepHooks
    from dapple.engine.pipeline import Pipeline
    from dapple.errors import (DappleError, DappleWarning, GenerationCancelled, InvalidRequestError, ModelLoadError,
                               PickleRefusedError, UnknownSamplerError)
    from dapple.request import GenerationRequest, GenerationResult, Hires, Limits
    from dapple.samplers import resolve_sampler, sampler_names


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'dapple' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
