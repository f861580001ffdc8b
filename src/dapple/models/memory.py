"""Memory options of a loaded pipeline: attention slicing, VAE slicing and tiling, model and sequential CPU offload,
A1111's --medvram / --lowvram presets, and the clear error that names them when an allocation fails.

- Attention slicing (diffusers' ``set_attention_slice``): attention computed a few heads at a time, so the score
  matrix of the largest layer never exists whole. Same image; slower. diffusers warns that it slows SDPA down, and
  torch's SDPA kernels on the CPU already compute attention in blocks without the whole score matrix.
- VAE slicing: decode (and encode) one image of a batch at a time (diffusers' ``AutoencoderKL.enable_slicing``).
  Same image; peak memory of one image instead of the batch.
- VAE tiling: decode overlapping latent tiles and blend their borders linearly (diffusers' ``tiled_decode``);
  bounded memory for any image size. By default every tile's group norms use one set of statistics estimated for
  the whole image (pkuliyi2015's Tiled VAE, fast mode: dapple.models.tiled_norms), so tiles agree in brightness
  and contrast and the blend leaves no seams; ``vae_tile_norms="per-tile"`` is diffusers' plain tiling, where each
  tile normalises by itself. Either way the image differs slightly from the untiled one: the statistics are an
  estimate and the mid-block attention sees only the tile.
- Model CPU offload (diffusers' ``enable_model_cpu_offload``; A1111's --medvram): every model rests in CPU memory
  and is lent to the GPU only while its stage runs (text encoder, then the UNet loop with its ControlNets, then
  the VAE); ``lent`` is that context manager, after InvokeAI's model-on-device one.
- Sequential CPU offload (accelerate's ``cpu_offload``; A1111's --lowvram): the UNet's and the VAE's weights move
  to the GPU submodule by submodule as each runs: the least GPU memory, and much slower.

Offload only makes sense with an accelerator (CUDA): on the CPU the models already live in CPU memory. There an
explicit offload is refused, and the presets keep only what helps on the CPU (see ``plan``).
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, fields, replace
from typing import Any

import torch

from dapple.errors import InvalidRequestError, NotEnoughMemoryError

OFFLOAD_MODES = ("model", "sequential")
TILE_NORMS = ("shared", "per-tile")
SLICE_NAMES = ("auto", "max")


@dataclass(frozen=True)
class MemoryOptions:
    """How a pipeline trades speed for memory. The defaults (all off) are the fastest.

    attention_slicing: False (off), True or "auto" (half the heads at a time), "max" (one head at a time) or a
    slice size in heads. vae_slicing: one image of a batch at a time through the VAE. vae_tiling: the VAE in
    overlapping tiles of vae_tile_size pixels (None: the VAE's own, 512 for SD 1.x, 1024 for SDXL), their group norms
    "shared" (one set of statistics for the whole image, no seams) or "per-tile" (vae_tile_norms). offload: None,
    "model" or "sequential" (CUDA only). preset: the preset these came from ("medvram", "lowvram"), if any."""

    attention_slicing: bool | str | int = False
    vae_slicing: bool = False
    vae_tiling: bool = False
    offload: str | None = None
    vae_tile_size: int | None = None
    vae_tile_norms: str = "shared"
    preset: str | None = None

    def __post_init__(self) -> None:
        slicing = self.attention_slicing
        if isinstance(slicing, str):
            if slicing not in SLICE_NAMES:
                raise InvalidRequestError(f"attention_slicing {slicing!r} is invalid; use True, False, 'auto', 'max' "
                                          "or a slice size (a whole number of heads >= 1)")
        elif not isinstance(slicing, bool) and not (isinstance(slicing, int) and slicing >= 1):
            raise InvalidRequestError(f"attention_slicing {slicing!r} is invalid; use True, False, 'auto', 'max' or "
                                      "a slice size (a whole number of heads >= 1)")
        if self.offload is not None and self.offload not in OFFLOAD_MODES:
            raise InvalidRequestError(f"offload {self.offload!r} is invalid; use None (off), 'model' or "
                                      "'sequential'")
        for name in ("vae_slicing", "vae_tiling"):
            if not isinstance(getattr(self, name), bool):
                raise InvalidRequestError(f"{name} must be True or False, not {getattr(self, name)!r}")
        tile = self.vae_tile_size
        if tile is not None and (isinstance(tile, bool) or not isinstance(tile, int) or tile < 64 or tile % 8):
            raise InvalidRequestError(f"vae_tile_size {tile!r} is invalid; use None (the VAE's own) or a multiple of "
                                      "8 pixels >= 64")
        if self.vae_tile_norms not in TILE_NORMS:
            raise InvalidRequestError(f"vae_tile_norms {self.vae_tile_norms!r} is invalid; use 'shared' (one set of "
                                      "group-norm statistics for every tile) or 'per-tile' (diffusers' plain tiling)")

    @property
    def slice_size(self) -> str | int | None:
        """What diffusers' set_attention_slice takes: None (off), "auto", "max" or a size."""
        if self.attention_slicing is False:
            return None
        return "auto" if self.attention_slicing is True else self.attention_slicing

    def describe(self) -> str:
        """The switches that are on, in words ("model offload, VAE slicing"), or "none"."""
        parts = []
        if self.offload:
            parts.append(f"{self.offload} offload")
        if self.slice_size is not None:
            parts.append("attention slicing" + ("" if self.slice_size == "auto" else f" ({self.slice_size})"))
        if self.vae_slicing:
            parts.append("VAE slicing")
        if self.vae_tiling:
            details = [f"{self.vae_tile_size} px"] if self.vae_tile_size else []
            details += ["per-tile norms"] if self.vae_tile_norms == "per-tile" else []
            parts.append("VAE tiling" + (f" ({', '.join(details)})" if details else ""))
        return ", ".join(parts) or "none"


# A1111's presets by name (modules/lowvram.py): --medvram keeps one model on the GPU at a time; --lowvram
# streams the UNet through it. diffusers' docs pair them with sliced and tiled VAE work.
PRESETS: dict[str, MemoryOptions] = {
    "none": MemoryOptions(),
    "medvram": MemoryOptions(offload="model", vae_slicing=True, preset="medvram"),
    "lowvram": MemoryOptions(offload="sequential", attention_slicing=True, vae_slicing=True, vae_tiling=True,
                             preset="lowvram"),
}


def memory_options(value: str | MemoryOptions | Mapping[str, Any] | None) -> MemoryOptions:
    """A preset name ("medvram", "lowvram", "none"), MemoryOptions, a dict of its fields, or None (all off)."""
    if value is None:
        return PRESETS["none"]
    if isinstance(value, MemoryOptions):
        return value
    if isinstance(value, str):
        key = value.strip().lower().lstrip("-")
        if key not in PRESETS:
            from dapple.errors import did_you_mean

            raise InvalidRequestError(f"memory preset {value!r} is unknown; use one of {', '.join(PRESETS)}, "
                                      f"MemoryOptions(...) or None{did_you_mean(key, PRESETS)}")
        return PRESETS[key]
    if isinstance(value, Mapping):
        known = {field.name for field in fields(MemoryOptions)}
        unknown = sorted(set(value) - known)
        if unknown:
            raise InvalidRequestError(f"memory option(s) {', '.join(map(repr, unknown))} unknown; known: "
                                      f"{', '.join(sorted(known))}")
        return MemoryOptions(**value)
    raise InvalidRequestError(f"memory={value!r} is invalid; use 'medvram', 'lowvram', MemoryOptions(...) or None")


def plan(value: str | MemoryOptions | Mapping[str, Any] | None, device: torch.device | str, *,
         offload_anywhere: bool = False) -> tuple[MemoryOptions, list[str]]:
    """The options that apply on `device`, and a note for each preset switch left out there.

    Offload needs an accelerator to offload from: on the CPU (and MPS, whose memory is the CPU's) an explicit
    offload is an error, while a preset drops it and says so. A preset also drops attention slicing there: torch's
    SDPA on the CPU already works in blocks, and slicing only makes it slower (+42% measured, issue 19).
    offload_anywhere (for tests): keep offload on any device (the models then rest and run on the CPU)."""
    options = memory_options(value)
    device = torch.device(device)
    if device.type == "cuda" or offload_anywhere:
        return options, []
    notes: list[str] = []
    preset = PRESETS.get(options.preset or "none", PRESETS["none"])  # switches the preset set, not the caller
    if options.offload is not None:
        if options.preset is None or options.offload != preset.offload:
            raise InvalidRequestError(
                f"offload={options.offload!r} moves models between CPU and GPU memory; this pipeline runs on "
                f"{device.type}, where the models already live in CPU memory. Offload works on CUDA; on the CPU use "
                "vae_tiling / vae_slicing (--vae-tiling, --vae-slicing), a smaller size or batch")
        notes.append(f"{options.preset} on {device.type}: no {options.offload} offload (the models already live in "
                     "CPU memory)")
        options = replace(options, offload=None)
    if options.preset is not None and options.slice_size is not None and options.slice_size == preset.slice_size:
        notes.append(f"{options.preset} on {device.type}: no attention slicing (torch's attention on the CPU "
                     "already works in blocks; slicing only slows it)")
        options = replace(options, attention_slicing=False)
    return options, notes


# -- lending models to the device --------------------------------------------------------------------------------

@dataclass
class _Home:
    """Where a model-offloaded module runs and where it rests, and how many stages hold it now."""

    device: torch.device
    rest: torch.device
    holders: int = 0


# Models under model CPU offload -> their home (weak: a dropped pipeline's models are not kept alive here).
_HOMES: weakref.WeakKeyDictionary[torch.nn.Module, _Home] = weakref.WeakKeyDictionary()


def offload_to_cpu(module: torch.nn.Module, device: torch.device, rest: torch.device = torch.device("cpu")) -> None:
    """Put `module` under model offload: it rests on `rest` and `lent` moves it to `device` for a stage."""
    _HOMES[module] = _Home(torch.device(device), torch.device(rest))
    module.to(rest)


def release(module: torch.nn.Module, device: torch.device | None = None) -> None:
    """Undo offload_to_cpu or sequential_offload: the module lives on `device` (default: where it ran) again."""
    home = _HOMES.pop(module, None)
    if getattr(module, "_hf_hook", None) is not None or any(hasattr(m, "_hf_hook") for m in module.modules()):
        from accelerate.hooks import remove_hook_from_module

        target = device or execution_device(module)
        remove_hook_from_module(module, recurse=True)  # puts the weights back where they were before offload
        module.to(target)
        return
    if home is not None:
        module.to(device or home.device)


def sequential_offload(module: torch.nn.Module, device: torch.device) -> None:
    """accelerate's cpu_offload: weights stay in CPU memory and go to `device` one submodule at a time, as each
    runs (diffusers' enable_sequential_cpu_offload)."""
    from accelerate import cpu_offload

    module.to("cpu")
    cpu_offload(module, execution_device=torch.device(device), offload_buffers=len(module._parameters) > 0)


def is_offloaded(module: torch.nn.Module | None) -> str | None:
    """"model", "sequential" or None: how `module` is offloaded."""
    if module is None:
        return None
    if module in _HOMES:
        return "model"
    if any(hasattr(submodule, "_hf_hook") for submodule in module.modules()):
        return "sequential"
    return None


def execution_device(module: torch.nn.Module) -> torch.device:
    """Where `module` computes: its offload home, accelerate's execution device, or where its weights are."""
    home = _HOMES.get(module)
    if home is not None:
        return home.device
    for submodule in module.modules():
        hook = getattr(submodule, "_hf_hook", None)
        if hook is not None and getattr(hook, "execution_device", None) is not None:
            return torch.device(hook.execution_device)
    return next(module.parameters()).device


def on_device(module: torch.nn.Module) -> bool:
    """True while a model-offloaded module is lent (and always for one that is not offloaded that way)."""
    home = _HOMES.get(module)
    return home is None or home.holders > 0


@contextmanager
def lent(*modules: torch.nn.Module | None) -> Iterator[None]:
    """Lend the model-offloaded ones of `modules` to their device for the block, and put them back to rest after
    it, on error too. Nested lends of one module move it once. Modules not under model offload are left alone
    (on the device already, or sequentially offloaded by accelerate's hooks)."""
    taken: list[tuple[torch.nn.Module, _Home]] = []
    try:
        for module in modules:
            home = _HOMES.get(module) if module is not None else None
            if home is None or any(module is held for held, _ in taken):
                continue
            if home.holders == 0:
                module.to(home.device)
            home.holders += 1
            taken.append((module, home))
        yield
    finally:
        for module, home in reversed(taken):
            home.holders -= 1
            if home.holders == 0:
                module.to(home.rest)
        if taken and any(home.device.type == "cuda" for _, home in taken):
            torch.cuda.empty_cache()  # return the stage's memory to the next stage (and to other processes)


def stage_models(extensions: Iterable[Any]) -> list[torch.nn.Module]:
    """The models a run's extensions call inside the UNet loop (`.model`: ControlNets, T2I-Adapters, the VAE of an
    inpainting UNet's default input channels), to be lent with the UNet."""
    return [model for extension in extensions
            if isinstance(model := getattr(extension, "model", None), torch.nn.Module)]


# -- applying options to components ------------------------------------------------------------------------------

class MemoryState:
    """The memory options in force on one set of components, and how to undo them.

    apply() turns options on (after undoing the previous ones), adopt() gives the same treatment to a model loaded
    later (a ControlNet), undo() returns the components to their plain state on their device."""

    def __init__(self, components: Any, device: torch.device | None = None) -> None:
        self.components = components
        self.device = torch.device(device) if device is not None else components.device
        self.options = PRESETS["none"]
        self.notes: list[str] = []
        self._processors: dict[int, tuple[torch.nn.Module, dict[str, Any]]] = {}
        self._adopted: weakref.WeakSet[torch.nn.Module] = weakref.WeakSet()

    def _models(self) -> list[tuple[str, torch.nn.Module]]:
        c = self.components
        named = [("text_encoder", c.text_encoder), ("text_encoder_2", c.text_encoder_2), ("unet", c.unet),
                 ("vae", c.vae)]
        return [(name, model) for name, model in named if model is not None]

    def apply(self, value: str | MemoryOptions | Mapping[str, Any] | None, *,
              offload_anywhere: bool = False) -> MemoryOptions:
        """Plan `value` for this device and apply it. Returns the options in force (self.notes: what was left
        out on this device). offload_anywhere: see plan()."""
        options, notes = plan(value, self.device, offload_anywhere=offload_anywhere)
        self.undo()
        c = self.components
        if options.offload is not None:
            c.execution_device = self.device
            for name, model in self._models():
                # Sequential offload streams the UNet and the VAE; the text encoders are lent whole, since the
                # prompt code places its token ids where the encoder's weights are.
                if options.offload == "sequential" and name in ("unet", "vae"):
                    sequential_offload(model, self.device)
                else:
                    offload_to_cpu(model, self.device)
        if options.slice_size is not None:
            self._slice_attention(c.unet, options.slice_size)
        vae = c.vae
        vae.use_slicing = options.vae_slicing
        vae.use_tiling = options.vae_tiling
        vae.shared_tile_norms = options.vae_tiling and options.vae_tile_norms == "shared"  # read by engine.latents
        if options.vae_tile_size is not None:
            set_tile_size(vae, options.vae_tile_size)
        self.options, self.notes = options, notes
        for model in list(self._adopted):
            self.adopt(model)
        if options.offload is not None and self.device.type == "cuda":
            torch.cuda.empty_cache()
        return options

    def adopt(self, model: torch.nn.Module) -> torch.nn.Module:
        """Treat a model loaded after apply() (a ControlNet) as the options say: lent with the UNet under offload,
        sliced attention under attention slicing. Returns the model."""
        self._adopted.add(model)
        if self.options.offload is not None and model not in _HOMES:
            offload_to_cpu(model, self.device)
        if self.options.slice_size is not None and hasattr(model, "set_attention_slice"):
            self._slice_attention(model, self.options.slice_size)
        return model

    def _slice_attention(self, model: torch.nn.Module, size: str | int) -> None:
        if not hasattr(model, "set_attention_slice"):
            raise InvalidRequestError(f"attention slicing needs a diffusers model; this one is "
                                      f"{type(model).__name__} (another backend?)")
        if id(model) not in self._processors:  # remember the processors to restore (another feature's, maybe)
            self._processors[id(model)] = (model, dict(model.attn_processors))
        try:
            model.set_attention_slice(size)
        except ValueError as error:  # e.g. a slice size larger than a layer's head count
            raise InvalidRequestError(f"attention_slicing {size!r} does not fit this model: {error}") from None

    def undo(self) -> None:
        """Every option off: plain attention, whole-batch untiled VAE, all models on the device."""
        for model, processors in self._processors.values():
            model.set_attn_processor(processors)
        self._processors.clear()
        c = self.components
        vae = c.vae
        vae.use_slicing = vae.use_tiling = vae.shared_tile_norms = False
        if self.options.vae_tile_size is not None:
            set_tile_size(vae, None)
        if self.options.offload is not None:
            for _, model in [*self._models(), *((None, m) for m in self._adopted)]:
                release(model, self.device)
            c.execution_device = None
        self.options, self.notes = PRESETS["none"], []


def set_tile_size(vae: torch.nn.Module, pixels: int | None) -> None:
    """The VAE's tile side in pixels for tiled decode/encode (None: its config's sample_size, diffusers' default).
    Tiles overlap by a quarter of a side (diffusers' tile_overlap_factor)."""
    if pixels is None:
        size = vae.config.sample_size
        pixels = int(size[0] if isinstance(size, (list, tuple)) else size)
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    vae.tile_sample_min_size = pixels
    vae.tile_latent_min_size = pixels // factor


# -- allocation failures -----------------------------------------------------------------------------------------

# Words of the errors torch raises when an allocation fails: CUDA's OutOfMemoryError, the CPU allocator's
# "DefaultCPUAllocator: can't allocate memory", MPS's "MPS backend out of memory".
_OOM_WORDS = ("out of memory", "can't allocate", "cannot allocate", "could not allocate", "failed to allocate",
              "not enough memory")


def is_out_of_memory(error: BaseException) -> bool:
    """An allocation failure: torch.OutOfMemoryError, MemoryError, or a RuntimeError that says it could not
    allocate."""
    if isinstance(error, (torch.OutOfMemoryError, MemoryError)):
        return True
    return isinstance(error, RuntimeError) and any(word in str(error).lower() for word in _OOM_WORDS)


def advice(options: MemoryOptions, device: torch.device, batch_size: int = 1) -> str:
    """What to try next, from what is on already: offload presets on CUDA, VAE tiling/slicing, a smaller run."""
    steps = []
    if device.type == "cuda":
        if options.offload is None:
            steps.append("--medvram (memory='medvram'), or --lowvram (memory='lowvram') for the least GPU memory")
        elif options.offload == "model":
            steps.append("--lowvram (memory='lowvram')")
        if options.slice_size is None:
            steps.append("--attention-slicing")
    if not options.vae_tiling:
        steps.append("--vae-tiling (memory=MemoryOptions(vae_tiling=True))")
    if batch_size > 1 and not options.vae_slicing:
        steps.append("--vae-slicing")
    steps.append("a smaller size or batch")
    return "; ".join(steps)


def out_of_memory_error(error: BaseException, options: MemoryOptions, device: torch.device, *,
                        what: str = "this generation", batch_size: int = 1) -> NotEnoughMemoryError:
    """The clear error for an allocation failure: what ran out, what is on, and which option to use."""
    detail = (str(error).strip().splitlines() or [type(error).__name__])[0][:200]
    where = "GPU" if device.type == "cuda" else device.type.upper()
    return NotEnoughMemoryError(
        f"not enough {where} memory for {what} on {device} ({detail}); memory options in use: {options.describe()}. "
        f"Try {advice(options, device, batch_size)}")
