"""ControlNet and T2I-Adapter units as loop extensions (engine/extensions.py), one extension per unit.

ControlNet (Zhang, Rao & Agrawala, 2023): a trainable copy of the UNet's encoder reads the control map and adds
its zero-convolution outputs to the UNet's skip connections and middle block. T2I-Adapter (Mou et al., 2023): a
small network turns the map into features added inside the UNet's down blocks once per pass. Both run in
`before_model`, exactly as diffusers' StableDiffusion(XL)ControlNet(Img2Img/Inpaint)Pipeline and
StableDiffusion(XL)AdapterPipeline call them, so a unit's output matches those pipelines:

- window: a unit acts on step i of a pass of n steps when not (i / n < start or (i + 1) / n > end)
  (diffusers' controlnet_keep); a T2I-Adapter's guidance_end is its adapter_conditioning_factor
  (diffusers: i < int(n * factor), the same rule);
  diffusers' SD (non-XL) adapter pipeline has no factor and acts on every step, Dapple honours the window for
  both; for second-order samplers (Heun, DPM2) the window counts the pass's model calls, as the ControlNet
  pipelines do (the XL adapter pipeline counts its steps instead);
- weight: the ControlNet's conditioning_scale, the adapter's adapter_conditioning_scale; 0 adds nothing;
- control mode (sd-webui-controlnet's names): "Balanced" runs the ControlNet on both halves of the CFG batch;
  "ControlNet is more important" is diffusers' guess mode: the ControlNet sees the conditional half only, its
  residuals are scaled by logspace(-1, 0) (sd-webui-controlnet's soft injection, 0.825 ** (12 - i), since
  10 ** (-1/12) = 0.825) and the unconditional half gets none (its cfg injection); "My prompt is more
  important" is the same soft weighting on both halves. A ControlNet with global_pool_conditions (shuffle) always
  runs in guess mode, as diffusers runs it. T2I-Adapters know only "Balanced".
- the control map is made at the size of each pass (the latent size times the VAE factor), so hires fix's second
  pass sees a map at its own size, as A1111 detects again at the hires size; several units sum their residuals
  (diffusers' MultiControlNetModel / MultiAdapter).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from PIL import Image

from dapple.engine.control_maps import check_module, control_map
from dapple.engine.extensions import ORDER_CONTROL, Extension, ModelInputs
from dapple.engine.images import mask_from_image, open_image
from dapple.errors import InvalidRequestError
from dapple.models.components import Components
from dapple.models.control_models import ControlModelEntry, check_fits
from dapple.request import GenerationRequest, Limits

if TYPE_CHECKING:
    from dapple.engine.hooks import StepContext
    from dapple.request import ControlUnit

BALANCED, PROMPT_MORE, CONTROLNET_MORE = "Balanced", "My prompt is more important", "ControlNet is more important"
INPAINT_MODULE = "inpaint_only"  # check_module's name for inpaint, inpaint_only, inpaint_global_harmonious

# Union ControlNets (xinsir's ControlNet++, diffusers' ControlNetUnionModel) are told which kind of map they get;
# the kind follows from the module that made the map: (words in the module name, control type).
UNION_CONTROL_TYPES = (
    (("openpose", "pose"), 0), (("depth",), 1), (("softedge", "hed", "pidi", "scribble", "sketch"), 2),
    (("canny", "lineart", "mlsd", "invert"), 3), (("normal",), 4), (("seg",), 5), (("tile", "blur"), 6),
    (("inpaint",), 7),
)


def in_window(index: int, total: int, start: float, end: float) -> bool:
    """Whether step `index` of `total` lies in the unit's window (diffusers' controlnet_keep)."""
    return not (index / total < start or (index + 1) / total > end)


def map_tensor(image: Image.Image, channels: int = 3) -> torch.Tensor:
    """A control map -> (1, C, H, W) float32 in [0, 1], as diffusers' control_image_processor (no
    normalisation) and the adapters' _preprocess_adapter_image make it; one channel for adapters that take one."""
    image = image.convert("L" if channels == 1 else "RGB")
    array = np.array(image).astype(np.float32) / 255.0
    if array.ndim == 2:
        array = array[..., None]
    return torch.from_numpy(array).permute(2, 0, 1)[None]


@dataclass
class ControlSource:
    """What a unit's map is made from: the opened image, and the inpainting mask for the inpaint modules."""

    unit: "ControlUnit"
    image: Image.Image
    mask: Image.Image | None = None

    def tensor(self, width: int, height: int, channels: int = 3) -> torch.Tensor:
        """The map the control model sees at width x height, as a (1, C, H, W) tensor (the inpaint module's
        comes as one already, with its -1 marks)."""
        unit = self.unit
        made = control_map(self.image, unit.module, width, height, resize_mode=unit.resize_mode,
                           processor_res=unit.processor_res, pixel_perfect=unit.pixel_perfect,
                           threshold_a=unit.threshold_a, threshold_b=unit.threshold_b, mask=self.mask)
        return made.float() if isinstance(made, torch.Tensor) else map_tensor(made, channels)


def inpaint_condition(image: Image.Image, mask: Image.Image) -> torch.Tensor:
    """The inpaint ControlNet's map (control_v11p_sd15_inpaint): the image in [0, 1] with the masked pixels set
    to -1, as diffusers' make_inpaint_condition builds it."""
    pixels = map_tensor(image)
    masked = torch.from_numpy(np.array(mask.convert("L")).astype(np.float32) / 255.0 > 0.5)
    return pixels.masked_fill(masked[None, None], -1.0)


class _Unit(Extension):
    """What ControlNet and T2I-Adapter units share: the window, the map per pass size, the infotext."""

    order = ORDER_CONTROL
    kind = "control"

    def __init__(self, index: int, source: ControlSource, model: torch.nn.Module, components: Components,
                 infotext: tuple[str, str] | None = None) -> None:
        self.index = index
        self.name = f"{self.kind} {index}"
        self.source = source
        self.unit = source.unit
        self.model = model
        self.components = components
        self._infotext = infotext
        self._maps: dict[tuple[int, int], torch.Tensor] = {}
        self.calls = 0  # how often the model ran (tests, diagnostics)

    def active(self, step: "StepContext") -> bool:
        return self.unit.weight > 0 and in_window(step.index, step.total, self.unit.guidance_start,
                                                  self.unit.guidance_end)

    def map_at(self, inputs: ModelInputs, channels: int = 3) -> torch.Tensor:
        """The control map (1, C, H, W) at the size of this pass, made once per size."""
        factor = self.components.vae_scale_factor
        height, width = (side * factor for side in inputs.sample.shape[-2:])
        if (width, height) not in self._maps:
            self._maps[(width, height)] = self.source.tensor(width, height, channels).to(
                self.model.device, self.model.dtype)
        return self._maps[(width, height)]

    def infotext(self) -> dict[str, Any]:
        return dict([self._infotext]) if self._infotext else {}


class ControlNetUnit(_Unit):
    """One ControlNet unit: a diffusers ControlNetModel (SD 1.x, 2.x or XL) or ControlNetUnionModel."""

    kind = "controlnet"

    def __init__(self, index: int, source: ControlSource, model: torch.nn.Module, components: Components,
                 infotext: tuple[str, str] | None = None) -> None:
        super().__init__(index, source, model, components, infotext)
        self.guess = self.unit.control_mode == CONTROLNET_MORE or bool(model.config.get("global_pool_conditions"))
        self.soft = self.guess or self.unit.control_mode == PROMPT_MORE
        self.union_type = union_control_type(self.unit.module, model) if is_union(model) else None

    def before_model(self, step: "StepContext", inputs: ModelInputs) -> None:
        if not self.active(step):
            return  # off: exactly as without the unit (diffusers adds residuals times 0)
        control = self.map_at(inputs)
        guess_half = self.guess and inputs.guided
        # the ControlNet runs in its own dtype (bf16/fp16 with such a UNet; the latents stay float32)
        sample = inputs.sample.to(self.model.dtype)
        text, added = inputs.encoder_hidden_states, inputs.added_cond_kwargs
        if guess_half:  # the conditional half only (the batch is [uncond, cond])
            sample, text = sample.chunk(2)[1], text.chunk(2)[1]
            added = {key: value.chunk(2)[1] for key, value in added.items()} if added else added
        images = len(sample)
        extra: dict[str, Any] = {"added_cond_kwargs": added} if added else {}
        condition: Any = control.repeat(images, 1, 1, 1)
        if self.union_type is not None:
            control_type = torch.zeros(self.model.config.num_control_type, device=sample.device,
                                       dtype=sample.dtype)
            control_type[self.union_type] = 1
            condition = [condition]
            extra.update(control_type=control_type.repeat(images, 1), control_type_idx=[self.union_type])
        down, mid = self.model(sample, inputs.timestep, encoder_hidden_states=text, controlnet_cond=condition,
                               conditioning_scale=self.unit.weight, guess_mode=self.soft, return_dict=False,
                               **extra)
        self.calls += 1
        if guess_half:  # nothing for the unconditional half
            down = [torch.cat([torch.zeros_like(d), d]) for d in down]
            mid = torch.cat([torch.zeros_like(mid), mid])
        inputs.add_residuals(down=down, mid=mid)


class T2IAdapterUnit(_Unit):
    """One T2I-Adapter unit (full or light, SD or XL): its features are computed once per pass size."""

    kind = "t2i_adapter"

    def __init__(self, index: int, source: ControlSource, model: torch.nn.Module, components: Components,
                 infotext: tuple[str, str] | None = None) -> None:
        if source.unit.control_mode != BALANCED:
            raise InvalidRequestError(
                f"controls[{index}]: a T2I-Adapter has no control modes (its features are added to both halves of "
                f"the batch); allowed: control_mode 'Balanced', not {source.unit.control_mode!r}")
        super().__init__(index, source, model, components, infotext)
        self._states: dict[tuple[int, int], list[torch.Tensor]] = {}

    def states(self, inputs: ModelInputs) -> list[torch.Tensor]:
        """The adapter's features for one image, times the weight (diffusers: adapter_state * scale)."""
        key = tuple(inputs.sample.shape[-2:])
        if key not in self._states:
            control = self.map_at(inputs, int(self.model.config.in_channels))
            self._states[key] = [state * self.unit.weight for state in self.model(control)]
            self.calls += 1
        return self._states[key]

    def before_model(self, step: "StepContext", inputs: ModelInputs) -> None:
        if not self.active(step):
            return
        images = inputs.images
        inputs.add_residuals(intrablock=[inputs.per_image(state.repeat(images, 1, 1, 1)).clone()
                                         for state in self.states(inputs)])


def is_union(model: torch.nn.Module) -> bool:
    return "num_control_type" in model.config


def union_control_type(module: str, model: torch.nn.Module) -> int:
    """A union ControlNet's control type from the module that made the map (canny -> 3, depth -> 1, ...)."""
    name = module.lower()
    for words, control_type in UNION_CONTROL_TYPES:
        if any(word in name for word in words):
            if control_type >= model.config.num_control_type:
                break
            return control_type
    kinds = ", ".join(f"{'/'.join(words)} ({value})" for words, value in UNION_CONTROL_TYPES
                      if value < model.config.num_control_type)
    raise InvalidRequestError(f"a union ControlNet needs to know what kind of map it gets, which Dapple reads from "
                              f"the module; module {module!r} names none of: {kinds}")


# -- building the units of a request -----------------------------------------------------------------------------------
ModelFinder = Callable[[str], tuple[ControlModelEntry, torch.nn.Module]]


def check_units(request: GenerationRequest) -> list[str]:
    """Each unit's canonical module name (an unknown module is an InvalidRequestError that lists them); the
    images a unit needs are checked as they are opened."""
    modules = []
    for index, unit in enumerate(request.controls):
        try:
            modules.append(check_module(unit.module))
        except InvalidRequestError as error:
            raise InvalidRequestError(f"controls[{index}].{error}") from None
    return modules


def open_sources(request: GenerationRequest, limits: Limits) -> list[ControlSource]:
    """Open every unit's image (the init image for a unit without one) within the pixel limit, and the request's
    mask for the inpaint modules, before any denoising."""
    sources = []
    init_image = None
    modules = check_units(request)
    for index, (unit, module) in enumerate(zip(request.controls, modules)):
        if module != unit.module:
            unit = unit.model_copy(update={"module": module})
        if unit.image is not None:
            image = open_image(unit.image, max_pixels=limits.max_image_pixels, what=f"controls[{index}].image")
        elif request.init_image is not None:
            if init_image is None:
                init_image = open_image(request.init_image, max_pixels=limits.max_image_pixels, what="init_image")
            image = init_image
        else:
            raise InvalidRequestError(
                f"controls[{index}] has no image: give the unit an image (the control map, or a picture for its "
                f"module {unit.module!r}); only img2img and inpainting use the init image for a unit without one")
        mask = None
        if module == INPAINT_MODULE:
            mask = inpaint_mask(request, limits, index)
        sources.append(ControlSource(unit, image, mask))
    return sources


def inpaint_mask(request: GenerationRequest, limits: Limits, index: int) -> Image.Image:
    """The request's mask as the inpaint modules need it: "L", white = repaint, inverted when asked."""
    if request.mask is None:
        raise InvalidRequestError(f"controls[{index}].module {request.controls[index].module!r} needs the "
                                  "inpainting mask: give mask (inpaint mode) or use another module")
    mask = mask_from_image(open_image(request.mask, max_pixels=limits.max_image_pixels, what="mask"))
    return Image.eval(mask, lambda value: 255 - value) if request.invert_mask else mask


def control_extensions(request: GenerationRequest, components: Components, find_model: ModelFinder,
                       limits: Limits | None = None) -> list[Extension]:
    """The request's control units as extensions, everything checked before the first step: modules, images
    (pixel limit), models (known, loadable, made for this model's family)."""
    if not request.controls:
        return []
    sources = open_sources(request, limits or Limits())
    units: list[Extension] = []
    for index, source in enumerate(sources):
        entry, model = find_model(source.unit.model)
        check_fits(model, components.unet.config, entry.name)
        unit_class = T2IAdapterUnit if entry.kind == "t2i_adapter" else ControlNetUnit
        units.append(unit_class(index, source, model, components, infotext_entry(index, source.unit, entry)))
    return units


def infotext_entry(index: int, unit: "ControlUnit", entry: ControlModelEntry) -> tuple[str, str]:
    """("ControlNet N", "Module: ..., Model: name [hash], ...") as sd-webui-controlnet writes a unit into the
    parameters text; the value goes in unquoted (format_infotext quotes it, as A1111's quote() does)."""
    unit = unit.model_copy(update={"model": entry.name})
    try:
        from dapple.infotext import format_control_unit
    except ImportError:
        return _format_unit(index, unit, entry.short_hash)
    key, value = format_control_unit(index, unit, entry.short_hash)
    if len(value) >= 2 and value[0] == value[-1] == '"':
        value = value[1:-1]
    return key, value


def _format_unit(index: int, unit: "ControlUnit", model_hash: str) -> tuple[str, str]:
    fields = {
        "Module": unit.module, "Model": f"{unit.model_name} [{model_hash}]", "Weight": unit.weight,
        "Resize Mode": unit.resize_mode, "Processor Res": unit.processor_res or -1,
        "Threshold A": unit.threshold_a if unit.threshold_a is not None else -1,
        "Threshold B": unit.threshold_b if unit.threshold_b is not None else -1,
        "Guidance Start": unit.guidance_start, "Guidance End": unit.guidance_end,
        "Pixel Perfect": unit.pixel_perfect, "Control Mode": unit.control_mode,
    }
    return f"ControlNet {index}", ", ".join(f"{key}: {value}" for key, value in fields.items())

