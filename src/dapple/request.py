"""The typed generation request and result shared by the Python API, the CLI and (later) the HTTP API.

Defaults and bounds live here and nowhere else. Static bounds are pydantic field constraints (so they double as
the API schema); a deployment can tighten them further with `Limits`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from collections.abc import Mapping, Sequence
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from dapple.errors import InvalidRequestError

DEFAULT_SAMPLER = "DPM++ 2M Karras"
MAX_SEED = 2**32 - 1

RESIZE_MODES = ("just resize", "crop and resize", "resize and fill")  # A1111's resize_mode 0, 1, 2
INPAINTING_FILLS = ("fill", "original", "latent noise", "latent nothing")  # A1111's inpainting_fill 0..3
# A1111's hires upscaler names: latent-space interpolations, and pixel-space resampling.
LATENT_UPSCALERS = {
    "Latent": ("bilinear", False),
    "Latent (antialiased)": ("bilinear", True),
    "Latent (bicubic)": ("bicubic", False),
    "Latent (bicubic antialiased)": ("bicubic", True),
    "Latent (nearest)": ("nearest", False),
    "Latent (nearest-exact)": ("nearest-exact", False),
}
PIXEL_UPSCALERS = ("Lanczos", "Nearest")
HIRES_UPSCALERS = (*LATENT_UPSCALERS, *PIXEL_UPSCALERS)


def _choose(value: Any, allowed: tuple[str, ...], name: str) -> str:
    """Accept a choice by name (any case) or by A1111's index."""
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < len(allowed):
        return allowed[value]
    if isinstance(value, str):
        for option in allowed:
            if option.lower() == value.strip().lower():
                return option
    raise ValueError(f"{name} must be one of {', '.join(repr(a) for a in allowed)} (or its index)")


# sd-webui-controlnet's control modes (ControlMode 0, 1, 2) and resize modes (ResizeMode 0, 1, 2).
CONTROL_MODES = ("Balanced", "My prompt is more important", "ControlNet is more important")
CONTROL_RESIZE_MODES = ("Just Resize", "Crop and Resize", "Resize and Fill")
MAX_CONTROL_UNITS = 8


# Speed presets: the step reuse and token merging each turns on. "quality" is exact (the image is the plain loop's);
# "fast" was chosen from benchmarks/quality_presets.py and benchmarks/txt2img_vs_diffusers.py (docs/performance.md).
SPEED_PRESETS: dict[str, dict[str, float]] = {
    "quality": {},
    "fast": {"deep_cache_interval": 2, "token_merging_ratio": 0.5},
}


class ControlUnit(BaseModel):
    """One ControlNet or T2I-Adapter unit: a control model, its image and how strongly and when it steers.

    The fields follow sd-webui-controlnet's units (ControlNetUnit in its external_code.py), so that a unit reads
    the same in Python, on the command line and over the A1111 API."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    model: str = Field(..., min_length=1, max_length=512, description="a ControlNet or T2I-Adapter by name (a "
                       "folder or file in the control-model folders, or 'builtin-canny'); an A1111 ' [hash]' "
                       "suffix is allowed")
    image: Any = Field(None, description="the control image (a PIL image, array, path or bytes); None: the init "
                       "image, in modes that have one")
    module: str = Field("none", min_length=1, max_length=64, description="the preprocessor that turns image into "
                        "the control map ('none': image already is the map); see `dapple control modules`")
    weight: float = Field(1.0, ge=0.0, le=2.0, description="conditioning scale; 0 is the same as no unit")
    guidance_start: float = Field(0.0, ge=0.0, le=1.0, description="the fraction of steps where control begins")
    guidance_end: float = Field(1.0, ge=0.0, le=1.0, description="the fraction of steps where control ends "
                                "(T2I-Adapter: its conditioning factor)")
    control_mode: str = Field("Balanced", description="one of " + ", ".join(CONTROL_MODES) + " (or its index)")
    resize_mode: str = Field("Crop and Resize", description="fitting the image to the output: "
                             + ", ".join(CONTROL_RESIZE_MODES) + " (or its index)")
    processor_res: int | None = Field(None, ge=64, le=2048, description="the preprocessor's resolution (short "
                                      "side); None: pixel perfect, the output's short side")
    pixel_perfect: bool = Field(False, description="A1111's pixel perfect: processor_res from the output size")
    threshold_a: float | None = Field(None, ge=-1e6, le=1e6, description="the module's first parameter (canny: "
                                      "low threshold); None: the module's default")
    threshold_b: float | None = Field(None, ge=-1e6, le=1e6, description="the module's second parameter (canny: "
                                      "high threshold); None: the module's default")

    @field_validator("control_mode", mode="before")
    @classmethod
    def _control_mode(cls, value: Any) -> str:
        return _choose(value, CONTROL_MODES, "control_mode")

    @field_validator("resize_mode", mode="before")
    @classmethod
    def _resize_mode(cls, value: Any) -> str:
        return _choose(value, CONTROL_RESIZE_MODES, "resize_mode")

    @model_validator(mode="after")
    def _window(self) -> "ControlUnit":
        if self.guidance_start > self.guidance_end:
            raise ValueError(f"guidance_start ({self.guidance_start:g}) is after guidance_end "
                             f"({self.guidance_end:g}); allowed: 0 <= guidance_start <= guidance_end <= 1")
        return self

    @property
    def model_name(self) -> str:
        """The model's name without A1111's " [hash]" suffix."""
        name = self.model.strip()
        if name.endswith("]") and " [" in name:
            name = name[: name.rindex(" [")]
        return name


# A prompt longer than this is refused before it reaches the tokenizer (a 50 MB prompt once made the server's
# tokenizer panic after exhausting memory); 20 000 characters is ~60 of CLIP's 75-token chunks.
MAX_PROMPT_CHARACTERS = 20_000


class GenerationRequest(BaseModel):
    """Everything that decides a text-to-image generation."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    prompt: str = Field("", max_length=MAX_PROMPT_CHARACTERS, description="A1111 prompt syntax, any length in "
                        "75-token chunks up to the limits")
    negative_prompt: str = Field("", max_length=MAX_PROMPT_CHARACTERS)
    width: int | None = Field(None, ge=64, le=2048, multiple_of=8, description="None: the model's native size")
    height: int | None = Field(None, ge=64, le=2048, multiple_of=8, description="None: the model's native size")
    steps: int = Field(20, ge=1, le=150)
    guidance_scale: float = Field(7.0, ge=0.0, le=30.0, description="classifier-free guidance; <= 1 skips uncond")
    guidance_min_timestep: int = Field(
        0, ge=0, le=1000, description="guide only the steps at timesteps t >= this (a guidance interval, "
        "Kynkaanniemi et al. 2024); later steps use the prompt alone and skip the unconditional pass. 0: every step")
    seed: int = Field(-1, ge=-1, le=MAX_SEED, description="-1 picks a random seed; image i uses seed + i")
    sampler: str = Field(DEFAULT_SAMPLER, min_length=1, description="A1111 name, e.g. 'Euler a', 'DPM++ 2M Karras'")
    batch_size: int = Field(1, ge=1, le=16)
    model: str | None = Field(None, description="a server's model by name (GET /api/v1/models); None: its "
                                 "default. Python callers choose the model with dapple.load instead")

    # -- image modes (img2img, inpaint, outpaint, depth2img): images are PIL images, arrays, paths or bytes --
    init_image: Any = Field(None, description="img2img/inpaint/outpaint/depth2img: the image to start from")
    strength: float = Field(0.75, ge=0.0, le=1.0, description="denoising strength: 0 keeps the image, 1 ignores it")
    resize_mode: str = Field("just resize", description="fitting an init image of another size: " + ", ".join(RESIZE_MODES))
    mask: Any = Field(None, description="inpaint: white = repaint, black = keep (or an alpha channel)")
    mask_blur: int = Field(4, ge=0, le=64, description="pixels of soft edge where the repainted area is pasted back")
    invert_mask: bool = False
    inpainting_fill: str = Field("original", description="masked content: " + ", ".join(INPAINTING_FILLS))
    paste_back: bool = Field(True, description="inpaint: keep the original pixels outside the mask exactly")
    outpaint_left: int = Field(0, ge=0, le=1024, multiple_of=8)
    outpaint_right: int = Field(0, ge=0, le=1024, multiple_of=8)
    outpaint_top: int = Field(0, ge=0, le=1024, multiple_of=8)
    outpaint_bottom: int = Field(0, ge=0, le=1024, multiple_of=8)
    depth_map: Any = Field(None, description="depth2img: image or (H, W) array, brighter/larger = nearer")

    # -- hires fix (txt2img only) ------------------------------------------------------------------------
    hires_scale: float = Field(1.0, ge=1.0, le=4.0, description="> 1 turns on hires fix: final size = size x scale")
    hires_upscaler: str = Field("Latent", description="one of " + ", ".join(HIRES_UPSCALERS))
    hires_steps: int = Field(0, ge=0, le=150, description="second-pass steps; 0: the same as steps")
    hires_strength: float = Field(0.7, ge=0.0, le=1.0, description="second-pass denoising strength")

    # -- speed: step reuse and token reduction (loop extensions; the defaults are off, and off is exact) -------
    speed: str | None = Field(None, description="a speed preset: " + ", ".join(
        f"{name} ({', '.join(f'{k}={v}' for k, v in values.items()) or 'exact: nothing approximated'})"
        for name, values in SPEED_PRESETS.items()) + "; fields set explicitly win over the preset. None: fast for "
        "SD-sized models (UNet >= 100M parameters) on the CPU's torch backend, quality elsewhere")
    deep_cache_interval: int = Field(
        1, ge=1, le=10, description="DeepCache (Ma et al. 2024): run the full UNet on every N-th step and only "
        "its shallow blocks, with the cached deep features, on the steps between. 1: off (every step is full)")
    token_merging_ratio: float = Field(
        0.0, ge=0.0, le=0.9, description="ToMe for SD (Bolya & Hoffman 2023): the fraction of tokens merged "
        "before self-attention in the highest-resolution transformer blocks (A1111's token_merging_ratio). 0: off")
    token_merging_ratio_hr: float = Field(
        0.0, ge=0.0, le=0.9, description="the hires pass's token merging ratio; 0: the same as token_merging_ratio")

    # -- control and extensions ------------------------------------------------------------------------------
    controls: list[ControlUnit] = Field(default_factory=list, max_length=MAX_CONTROL_UNITS,
                                        description="ControlNet / T2I-Adapter units, applied together")
    extensions: dict[str, dict[str, Any]] = Field(
        default_factory=dict, max_length=16, description="installed extensions to turn on (entry points in "
        "'dapple.extensions'), each with its arguments: {name: {argument: value}}")

    @field_validator("resize_mode", mode="before")
    @classmethod
    def _resize_mode(cls, value: Any) -> str:
        return _choose(value, RESIZE_MODES, "resize_mode")

    @field_validator("inpainting_fill", mode="before")
    @classmethod
    def _inpainting_fill(cls, value: Any) -> str:
        return _choose(value, INPAINTING_FILLS, "inpainting_fill")

    @field_validator("hires_upscaler", mode="before")
    @classmethod
    def _hires_upscaler(cls, value: Any) -> str:
        return _choose(value, HIRES_UPSCALERS, "hires_upscaler")

    @field_validator("speed", mode="before")
    @classmethod
    def _known_speed(cls, value: Any) -> Any:
        return None if value is None else _choose(value, tuple(SPEED_PRESETS), "speed")

    def speed_settings(self, default: str = "quality") -> dict[str, float]:
        """The effective deep_cache_interval, token_merging_ratio and token_merging_ratio_hr: the preset's values
        (speed, or `default`, the model and device's preset, when speed is None) for the ones the request did not
        set itself."""
        names = ("deep_cache_interval", "token_merging_ratio", "token_merging_ratio_hr")
        preset = SPEED_PRESETS[self.speed or default]
        return {name: getattr(self, name) if name in self.model_fields_set or name not in preset else preset[name]
                for name in names}

    @model_validator(mode="after")
    def _inputs_fit_the_mode(self) -> "GenerationRequest":
        if self.init_image is None:
            for name in ("mask", "depth_map"):
                if getattr(self, name) is not None:
                    raise ValueError(f"{name} needs init_image, the image it applies to")
            if self.outpaints:
                raise ValueError("outpainting needs init_image, the image to extend")
        elif self.hires_scale > 1:
            raise ValueError("hires fix (hires_scale > 1) is for text-to-image; leave init_image empty")
        if self.mask is not None and self.outpaints:
            raise ValueError("give either a mask (inpaint) or outpaint sides; outpainting makes its own mask")
        if self.depth_map is not None and (self.mask is not None or self.outpaints):
            raise ValueError("depth_map cannot be combined with inpainting or outpainting")
        return self

    @property
    def outpaints(self) -> bool:
        return any((self.outpaint_left, self.outpaint_right, self.outpaint_top, self.outpaint_bottom))

    @property
    def mode(self) -> str:
        """txt2img, img2img, inpaint, outpaint or depth2img, from the inputs given."""
        if self.init_image is None:
            return "txt2img"
        if self.outpaints:
            return "outpaint"
        if self.mask is not None:
            return "inpaint"
        if self.depth_map is not None:
            return "depth2img"
        return "img2img"


@dataclass(frozen=True)
class Limits:
    """Deployment limits, at most as wide as the request's static bounds."""

    max_width: int = 2048
    max_height: int = 2048
    max_steps: int = 150
    max_batch_size: int = 16
    max_image_pixels: int = 4096 * 4096  # input images larger than this are refused before decoding
    max_prompt_tokens: int = 1500  # CLIP tokens per prompt (20 chunks of 75): each chunk is a text-encoder pass

    def check(self, request: GenerationRequest) -> None:
        """Raise InvalidRequestError for the first field that exceeds these limits (hires fix's final size
        included; sizes that depend on an input image are checked once it is open)."""
        scale = request.hires_scale
        for name, value, limit in (
            ("width", request.width, self.max_width),
            ("height", request.height, self.max_height),
            ("steps", request.steps, self.max_steps),
            ("hires_steps", request.hires_steps, self.max_steps),
            ("batch_size", request.batch_size, self.max_batch_size),
            ("width x hires_scale", request.width and int(request.width * scale), self.max_width),
            ("height x hires_scale", request.height and int(request.height * scale), self.max_height),
        ):
            if value is not None and value > limit:
                raise InvalidRequestError(f"{name}={value} exceeds this server's limit; allowed: at most {limit}")

    def check_prompt_tokens(self, count: int, what: str = "prompt") -> None:
        if count > self.max_prompt_tokens:
            raise InvalidRequestError(f"{what} is {count} tokens long; allowed: at most {self.max_prompt_tokens} "
                                      "tokens")

    def check_size(self, width: int, height: int, what: str = "output") -> None:
        """Refuse an output size (an outpainted canvas, an init image's size) beyond the limits."""
        if width > self.max_width or height > self.max_height:
            raise InvalidRequestError(
                f"{what} size {width}x{height} exceeds this server's limit; allowed: at most "
                f"{self.max_width}x{self.max_height}"
            )


def _field_info(location: Sequence[Any]) -> tuple[Any, type[BaseModel]]:
    """The pydantic field a location names, following nested units (("controls", 0, "weight") -> ControlUnit's
    weight), and the model that holds it."""
    model: type[BaseModel] = GenerationRequest
    info = model.model_fields.get(str(location[0])) if location else None
    if location and location[0] == "controls" and len(location) >= 3 and isinstance(location[1], int):
        model = ControlUnit
        info = model.model_fields.get(str(location[2]))
    return info, model


def _allowed(location: Sequence[Any] | str) -> str:
    """Describe a field's static bounds in words, from its pydantic constraints."""
    info, model = _field_info((location,) if isinstance(location, str) else location)
    if info is None:
        return "known fields: " + ", ".join(model.model_fields)
    parts = {type(m).__name__: m for m in info.metadata}
    words = []
    if "MultipleOf" in parts:
        words.append(f"multiples of {parts['MultipleOf'].multiple_of}")
    if "Ge" in parts and "Le" in parts:
        words.append(f"in {parts['Ge'].ge}..{parts['Le'].le}")
    if "MinLen" in parts:
        words.append("a non-empty string")
    if "MaxLen" in parts:
        words.append(f"text of at most {parts['MaxLen'].max_length} characters")
    if not words and info.annotation is str:
        words.append("valid Unicode text")
    return " ".join(words) or str(info.annotation)


def describe_validation_error(error: ValidationError) -> str:
    """One line per bad field: the field, the value, what was wrong and what is allowed."""
    return describe_errors(error.errors())


def describe_errors(errors: Sequence[Mapping[str, Any]], skip: tuple[str, ...] = ()) -> str:
    """pydantic's error list in words, as describe_validation_error; `skip` drops location prefixes such as
    FastAPI's "body"."""
    lines = []
    for item in errors:
        message = str(item["msg"]).removeprefix("Value error, ")
        location = [part for part in item["loc"] if part not in skip]
        if not location:  # a rule across fields (e.g. a mask without an image), or the body as a whole
            lines.append(f"invalid request: {message}")
            continue
        item = {**item, "loc": tuple(location)}
        name = ".".join(str(part) for part in item["loc"])
        value = repr(item.get("input"))
        value = value if len(value) <= 60 else value[:57] + "..."
        if item["type"] == "value_error":  # our own validators already say what is allowed
            lines.append(f"{name}={value} is invalid: {message}")
        else:
            lines.append(f"{name}={value} is invalid ({message}); allowed: {_allowed(item['loc'])}")
    return "; ".join(lines)


def make_request(**fields: Any) -> GenerationRequest:
    """Build a request, turning pydantic's error into InvalidRequestError with a readable message."""
    try:
        return GenerationRequest(**fields)
    except ValidationError as error:
        raise InvalidRequestError(describe_validation_error(error)) from None


@dataclass(frozen=True)
class Hires:
    """Hires fix settings for Pipeline.generate(hires=...): A1111's hr_scale, hr_upscaler, hr_second_pass_steps
    and denoising_strength."""

    scale: float = 2.0
    upscaler: str = "Latent"
    steps: int = 0  # 0: the same as the first pass
    strength: float = 0.7

    @classmethod
    def coerce(cls, value: "Hires | float | dict") -> "Hires":
        if isinstance(value, Hires):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return cls(scale=float(value))
        if isinstance(value, dict):
            unknown = set(value) - {"scale", "upscaler", "steps", "strength"}
            if unknown:
                raise InvalidRequestError(f"hires has unknown keys {sorted(unknown)}; allowed: scale, upscaler, "
                                          "steps, strength")
            return cls(**value)
        raise InvalidRequestError(f"hires={value!r} is invalid; allowed: a scale, a dict or dapple.Hires")

    def request_fields(self) -> dict[str, Any]:
        return {"hires_scale": self.scale, "hires_upscaler": self.upscaler, "hires_steps": self.steps,
                "hires_strength": self.strength}


@dataclass
class GenerationResult:
    """What a generation returns: one entry per image in every list, and where the time went."""

    images: list  # list[PIL.Image.Image]
    seeds: list[int]
    infotexts: list[str]
    request: GenerationRequest
    timings: dict[str, float] = field(default_factory=dict)
    pixels: Any = None  # torch.Tensor (batch, 3, H, W), float32 in [0, 1]: the images before 8-bit rounding
    # The model folder's recommended settings that filled fields the caller left unset (generation_defaults.json):
    # {"sampler": "DPM++ 2M", ...}; empty when the request set them all or the model recommends nothing.
    recommended: dict[str, Any] = field(default_factory=dict)
