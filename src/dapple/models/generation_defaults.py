"""A model's recommended generation settings, stored as generation_defaults.json in its folder.

Some models draw best with settings other than Dapple's defaults (the built-in shapes model wants DPM++ 2M, CFG 5
and guidance only at t >= 600). A request that leaves such a field unset gets the model's value; a field the
caller sets always wins. Folders without the file (every ordinary checkpoint) use GenerationRequest's defaults.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from dapple.errors import DappleError, ModelLoadError
from dapple.request import GenerationRequest, make_request
from dapple.samplers import resolve_sampler

GENERATION_DEFAULTS_FILE = "generation_defaults.json"
# The fields a model may recommend: how to sample it, not what to draw.
RECOMMENDABLE = ("sampler", "steps", "guidance_scale", "guidance_min_timestep")


def _checked(settings: Mapping[str, Any], where: str) -> dict[str, Any]:
    unknown = sorted(set(settings) - set(RECOMMENDABLE))
    if unknown:
        raise ModelLoadError(f"{where}: cannot recommend {', '.join(unknown)}; allowed: {', '.join(RECOMMENDABLE)}")
    try:
        request = make_request(**settings)
        resolve_sampler(request.sampler)
    except DappleError as error:
        raise ModelLoadError(f"{where}: {error}") from None
    return {name: getattr(request, name) for name in settings}


def write_generation_defaults(folder: Path, settings: Mapping[str, Any]) -> Path:
    path = Path(folder) / GENERATION_DEFAULTS_FILE
    path.write_text(json.dumps(_checked(settings, str(path)), indent=1) + "\n")
    return path


def read_generation_defaults(folder: Path) -> dict[str, Any]:
    """The folder's recommended settings ({} when it has no generation_defaults.json)."""
    path = Path(folder) / GENERATION_DEFAULTS_FILE
    if not path.is_file():
        return {}
    try:
        settings = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ModelLoadError(f"{path}: not valid JSON ({error})") from None
    if not isinstance(settings, dict):
        raise ModelLoadError(f"{path}: expected a JSON object of settings")
    return _checked(settings, str(path))


def unset_recommendations(request: GenerationRequest, defaults: Mapping[str, Any]) -> dict[str, Any]:
    """The model's recommendations for the fields the request leaves unset: what with_model_defaults changes."""
    return {name: value for name, value in defaults.items() if name not in request.model_fields_set}


def with_model_defaults(request: GenerationRequest, defaults: Mapping[str, Any]) -> GenerationRequest:
    """The request with the model's recommendation in every field the caller left unset."""
    update = unset_recommendations(request, defaults)
    return request.model_copy(update=update) if update else request
