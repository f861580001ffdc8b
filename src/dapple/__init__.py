"""Dapple: Stable Diffusion for people who generate images with Python.

    import dapple
    pipe = dapple.load("path/to/model")
    result = pipe.generate("a red circle on a blue background", seed=42)
"""

from dapple._version import __version__
from dapple.api import load
from dapple.engine.hooks import CancelToken, StepContext, StepHooks
from dapple.engine.pipeline import Pipeline
from dapple.errors import (
    DappleError,
    GenerationCancelled,
    InvalidRequestError,
    ModelLoadError,
    PickleRefusedError,
    UnknownSamplerError,
)
from dapple.request import GenerationRequest, GenerationResult, Limits
from dapple.samplers import resolve_sampler, sampler_names

__all__ = [
    "__version__", "load", "Pipeline", "CancelToken", "StepContext", "StepHooks", "GenerationRequest",
    "GenerationResult", "Limits", "DappleError", "GenerationCancelled", "InvalidRequestError", "ModelLoadError",
    "PickleRefusedError", "UnknownSamplerError", "resolve_sampler", "sampler_names",
]
