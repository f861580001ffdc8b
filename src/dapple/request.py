"""The typed generation request and result shared by the Python API, the CLI and (later) the HTTP API.

Defaults and bounds live here and nowhere else. Static bounds are pydantic field constraints (so they double as
the API schema); a deployment can tighten them further with `Limits`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from dapple.errors import InvalidRequestError

DEFAULT_SAMPLER = "DPM++ 2M Karras"
MAX_SEED = 2**32 - 1


class GenerationRequest(BaseModel):
    """Everything that decides a text-to-image generation."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    prompt: str = ""
    negative_prompt: str = ""
    width: int | None = Field(None, ge=64, le=2048, multiple_of=8, description="None: the model's native size")
    height: int | None = Field(None, ge=64, le=2048, multiple_of=8, description="None: the model's native size")
    steps: int = Field(20, ge=1, le=150)
    guidance_scale: float = Field(7.0, ge=0.0, le=30.0, description="classifier-free guidance; <= 1 skips uncond")
    seed: int = Field(-1, ge=-1, le=MAX_SEED, description="-1 picks a random seed; image i uses seed + i")
    sampler: str = Field(DEFAULT_SAMPLER, min_length=1, description="A1111 name, e.g. 'Euler a', 'DPM++ 2M Karras'")
    batch_size: int = Field(1, ge=1, le=16)


@dataclass(frozen=True)
class Limits:
    """Deployment limits, at most as wide as the request's static bounds."""

    max_width: int = 2048
    max_height: int = 2048
    max_steps: int = 150
    max_batch_size: int = 16

    def check(self, request: GenerationRequest) -> None:
        """Raise InvalidRequestError for the first field that exceeds these limits."""
        for name, value, limit in (
            ("width", request.width, self.max_width),
            ("height", request.height, self.max_height),
            ("steps", request.steps, self.max_steps),
            ("batch_size", request.batch_size, self.max_batch_size),
        ):
            if value is not None and value > limit:
                raise InvalidRequestError(f"{name}={value} exceeds this server's limit; allowed: at most {limit}")


def _allowed(field_name: str) -> str:
    """Describe a field's static bounds in words, from its pydantic constraints."""
    info = GenerationRequest.model_fields.get(field_name)
    if info is None:
        return "known fields: " + ", ".join(GenerationRequest.model_fields)
    parts = {type(m).__name__: m for m in info.metadata}
    words = []
    if "MultipleOf" in parts:
        words.append(f"multiples of {parts['MultipleOf'].multiple_of}")
    if "Ge" in parts and "Le" in parts:
        words.append(f"in {parts['Ge'].ge}..{parts['Le'].le}")
    if "MinLen" in parts:
        words.append("a non-empty string")
    return " ".join(words) or str(info.annotation)


def describe_validation_error(error: ValidationError) -> str:
    """One line per bad field: the field, the value, what was wrong and what is allowed."""
    lines = []
    for item in error.errors():
        name = ".".join(str(part) for part in item["loc"]) or "request"
        value = item.get("input")
        lines.append(f"{name}={value!r} is invalid ({item['msg']}); allowed: {_allowed(str(item['loc'][0]))}")
    return "; ".join(lines)


def make_request(**fields: Any) -> GenerationRequest:
    """Build a request, turning pydantic's error into InvalidRequestError with a readable message."""
    try:
        return GenerationRequest(**fields)
    except ValidationError as error:
        raise InvalidRequestError(describe_validation_error(error)) from None


@dataclass
class GenerationResult:
    """What a generation returns: one entry per image in every list, and where the time went."""

    images: list  # list[PIL.Image.Image]
    seeds: list[int]
    infotexts: list[str]
    request: GenerationRequest
    timings: dict[str, float] = field(default_factory=dict)
    pixels: Any = None  # torch.Tensor (batch, 3, H, W), float32 in [0, 1]: the images before 8-bit rounding
