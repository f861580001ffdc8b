"""The Python API: a loaded model with `generate`, and the building blocks of the sampling loop laid open.

    pipe = dapple.load("path/to/model")
    result = pipe.generate("a red circle on a blue background", seed=42)
    result.images[0].save("circle.png")

The components are attributes (pipe.tokenizer, pipe.text_encoder, pipe.unet, pipe.vae, pipe.scheduler), and
encode_prompt / prepare_latents / decode_latents are the steps of the diffusers tutorial's loop, so a user can
write that loop by hand (examples/handwritten_loop.py) and get the same image as `generate`.
"""

from __future__ import annotations

import gc
import logging
import traceback
from collections import OrderedDict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from PIL import Image

from dapple.engine.conditioning import Conditioning, encode_prompt, encode_prompt_xl
from dapple.engine.control import control_extensions
from dapple.engine.extensions import Extension, requested_extensions
from dapple.engine.feature_cache import deep_cache_extension
from dapple.engine.hooks import CancelToken, StepContext, StepHooks
from dapple.engine.latents import decode, seeded_noise, to_pil
from dapple.engine.modes import run_request
from dapple.engine.prompt_syntax import ExtraNetwork, extract_extra_networks
from dapple.engine.token_merging import token_merging_extension
from dapple.errors import GenerationCancelled, InvalidRequestError
from dapple.models import memory as memory_options
from dapple.models import openvino_backend
from dapple.models.components import Components
from dapple.models.control_models import (
    ControlModelEntry, find_control_model, list_control_models, load_control_model, weight_file,
)
from dapple.models.embeddings import EMBEDDING_HASH_LENGTH, EMBEDDING_SUFFIXES, install, name_pattern, read_embedding
from dapple.models.generation_defaults import unset_recommendations, with_model_defaults
from dapple.models.lora import LORA_HASH_LENGTH, LoraLayer, LoraPatcher, find_in_folders, read_lora
from dapple.models.precision import BF16_MIN_PARAMETERS
from dapple.request import (
    DEFAULT_SAMPLER, ControlUnit, GenerationRequest, GenerationResult, Hires, Limits, make_request,
)
from dapple.samplers import create_scheduler

StepCallback = Callable[[StepContext], None]
logger = logging.getLogger("dapple")
CONTROL_CACHE_SIZE = 4  # loaded control models kept on the device (an SD 1.5 ControlNet is ~700 MB in fp16)


class BackendInfotext(Extension):
    """Records a non-torch backend in the image's parameters ("Backend: openvino"): its pixels differ slightly."""

    name = "backend"

    def __init__(self, entries: dict[str, str]) -> None:
        self.entries = entries

    def infotext(self) -> dict[str, str]:
        return dict(self.entries)


def backend_extensions(components: Components) -> list[Extension]:
    entries = openvino_backend.infotext(components)
    return [BackendInfotext(entries)] if entries else []


def default_speed(components: Components) -> str:
    """The speed preset a request without one gets: "fast" for SD-sized models (UNet >= 100M parameters) on the
    CPU's torch backend, where it measured 3.4x diffusers' fp32 pipeline against 1.9x for "quality" (SD 1.5
    architecture, 512x512, 20 steps; docs/performance.md), and "quality" (exact) elsewhere: on GPUs, for small
    models such as the built-in one (fast in time, exactness matters more), and on the OpenVINO backend (which
    runs neither DeepCache nor token merging, and is as fast without them)."""
    if components.device.type != "cpu" or openvino_backend.is_openvino(components):
        return "quality"
    return "fast" if components.unet.num_parameters() >= BF16_MIN_PARAMETERS else "quality"


def speed_extensions(request: GenerationRequest, default: str = "quality") -> list[Extension]:
    """The request's step reuse and token reduction (DeepCache, ToMe); none when they are off (the quality
    preset), so that the loop is then exactly what it is without them."""
    speed = request.speed_settings(default)  # the speed preset's values under the ones the request set itself
    made = [deep_cache_extension(int(speed["deep_cache_interval"])),
            token_merging_extension(speed["token_merging_ratio"], speed["token_merging_ratio_hr"],
                                    hires=request.hires_scale > 1)]
    return [extension for extension in made if extension is not None]


class Pipeline:
    """A Stable Diffusion model ready to generate. Built by dapple.load(); holds no per-run state."""

    def __init__(self, components: Components, *, limits: Limits | None = None,
                 lora_dirs: Sequence[str | Path] = (), embedding_dirs: Sequence[str | Path] = (),
                 allow_pickle: bool = False, control_dirs: Sequence[str | Path] = (),
                 memory: str | memory_options.MemoryOptions | None = None) -> None:
        self.components = components
        self._memory = memory_options.MemoryState(components)
        if memory is not None:
            self.set_memory(memory)
        self.limits = limits or Limits()
        self._scheduler: SchedulerMixin | None = None
        self.lora_dirs: list[Path] = [Path(folder) for folder in lora_dirs]  # where <lora:name:w> looks
        self._patcher = LoraPatcher(components.unet, components.text_encoder, components.text_encoder_2)
        self._lora_layers: dict[tuple[str, int, int], list[LoraLayer]] = {}
        self.embedding_dirs: list[Path] = [Path(folder) for folder in embedding_dirs]  # textual inversion
        self._installed_embeddings: set[tuple[str, int, int]] = set()
        self._allow_pickle = allow_pickle
        self.control_dirs: list[Path] = [Path(folder) for folder in control_dirs]  # ControlNets, T2I-Adapters
        self._control_cache: OrderedDict[tuple[str, int, int], torch.nn.Module] = OrderedDict()

    @property
    def recommended_settings(self) -> dict[str, Any]:
        """The model folder's recommended sampler, steps, CFG and guidance interval (generation_defaults.json):
        what generate() uses for the ones a request leaves unset. {} for models that recommend nothing."""
        return dict(self.components.generation_defaults)

    # -- the components, as diffusers users know them ------------------------------------------------------
    @property
    def tokenizer(self):
        return self.components.tokenizer

    @property
    def text_encoder(self):
        return self.components.text_encoder

    @property
    def unet(self):
        return self.components.unet

    @property
    def vae(self):
        return self.components.vae

    @property
    def scheduler(self) -> SchedulerMixin:
        """A scheduler for hand-written loops (the default sampler on the model's noise schedule).

        generate() never uses this object; it makes a fresh scheduler per run.
        """
        if self._scheduler is None:
            self._scheduler = self.make_scheduler(self.components.generation_defaults.get("sampler", DEFAULT_SAMPLER))
        return self._scheduler

    @property
    def device(self) -> torch.device:
        return self.components.device

    @property
    def dtype(self) -> torch.dtype:
        return self.components.dtype

    @property
    def memory(self) -> memory_options.MemoryOptions:
        """The memory options in force (dapple.models.memory.MemoryOptions); change them with set_memory."""
        return self._memory.options

    def set_memory(self, memory: str | memory_options.MemoryOptions | dict | None) -> memory_options.MemoryOptions:
        """Change the memory options of this loaded pipeline: "medvram", "lowvram", MemoryOptions(...), a dict of
        its fields, or None (all off). Returns the options in force on this device; switches a preset leaves out
        here (offload on the CPU) are in `memory_notes`. Images are unchanged, except with VAE tiling."""
        return self._memory.apply(memory)

    @property
    def memory_notes(self) -> list[str]:
        """What the last set_memory left out on this device, and why (e.g. no offload on the CPU)."""
        return list(self._memory.notes)

    def make_scheduler(self, sampler: str, seeds: Sequence[int] | None = None) -> SchedulerMixin:
        """A fresh scheduler for a sampler name such as "Euler a" or "DPM++ 2M Karras"."""
        return create_scheduler(sampler, self.components.scheduler_config, seeds=seeds)

    # -- the tutorial's building blocks ---------------------------------------------------------------------
    @torch.inference_mode()
    def encode_prompt(
        self, prompt: str, negative_prompt: str = "", *, guidance_scale: float = 7.0, batch_size: int = 1
    ) -> Conditioning:
        """Text embeddings; `.unet_batch` is what the UNet's encoder_hidden_states takes ([uncond; cond]) and,
        for SDXL, `.added_cond_kwargs` its pooled text and size conditioning (at the native size)."""
        c = self.components
        with memory_options.lent(c.text_encoder, c.text_encoder_2):
            if c.is_xl:
                return encode_prompt_xl(
                    (c.tokenizer, c.tokenizer_2), (c.text_encoder, c.text_encoder_2), prompt, negative_prompt,
                    guidance_scale=guidance_scale, batch_size=batch_size,
                ).with_time_ids(c.native_size, c.native_size)
            return encode_prompt(
                self.tokenizer, self.text_encoder, prompt, negative_prompt,
                guidance_scale=guidance_scale, batch_size=batch_size,
            )

    def prepare_latents(
        self, seeds: int | Sequence[int], width: int | None = None, height: int | None = None
    ) -> torch.Tensor:
        """Unit-variance seeded noise in latent space; multiply by scheduler.init_noise_sigma to start."""
        seeds = [seeds] if isinstance(seeds, int) else list(seeds)
        native = self.components.native_size
        shape = self.components.latent_shape(width or native, height or native)
        noise, _ = seeded_noise(seeds, shape, device=self.device, dtype=self.dtype)
        return noise

    @torch.inference_mode()
    def decode_latents(self, latents: torch.Tensor) -> list[Image.Image]:
        """VAE-decode final latents to PIL images."""
        return to_pil(decode(self.vae, latents, self.components.latent_scaling_factor))

    # -- generation -------------------------------------------------------------------------------------------
    def generate(
        self,
        prompt: str = "",
        negative_prompt: str | None = None,
        width: int | None = None,
        height: int | None = None,
        steps: int | None = None,
        guidance_scale: float | None = None,
        seed: int | None = None,
        sampler: str | None = None,
        batch_size: int | None = None,
        *,
        hires: Hires | float | dict | None = None,
        guidance_min_timestep: int | None = None,
        deep_cache_interval: int | None = None,
        token_merging_ratio: float | None = None,
        token_merging_ratio_hr: float | None = None,
        speed: str | None = None,
        controls: Sequence[ControlUnit | dict] | None = None,
        callback: StepCallback | None = None,
        cancel: CancelToken | None = None,
    ) -> GenerationResult:
        """Text-to-image. Arguments left as None take the model folder's recommendation where it has one
        (generation_defaults.json), else GenerationRequest's defaults (20 steps, CFG 7, "DPM++ 2M Karras",
        random seed, the model's native size). `hires` turns on hires fix: a scale (2.0), a
        Hires(scale, upscaler, steps, strength) or a dict of those. guidance_min_timestep: guide only the steps
        at t >= this (a guidance interval; default 0, every step). controls: ControlNet / T2I-Adapter units
        (ControlUnit or dicts of its fields; img2img, inpaint and outpaint take `controls=` too). `callback` is
        called after every step with a StepContext (step, total, latents, denoised, preview(), phase); `cancel`
        stops the run between steps. deep_cache_interval (DeepCache, 1 = off) and token_merging_ratio (ToMe, 0 = off;
        token_merging_ratio_hr for the hires pass) trade exactness for speed; speed="fast" turns on the fast
        preset's values (request.SPEED_PRESETS) for those left unset."""
        fields: dict[str, Any] = {
            "negative_prompt": negative_prompt, "width": width, "height": height, "steps": steps,
            "guidance_scale": guidance_scale, "seed": seed, "sampler": sampler, "batch_size": batch_size,
            "guidance_min_timestep": guidance_min_timestep, "controls": controls,
            "deep_cache_interval": deep_cache_interval, "token_merging_ratio": token_merging_ratio,
            "token_merging_ratio_hr": token_merging_ratio_hr, "speed": speed,
        }
        if hires is not None:
            fields.update(Hires.coerce(hires).request_fields())
        return self._request(prompt, fields, callback, cancel)

    def img2img(
        self, image: Any, prompt: str = "", *, strength: float | None = None, resize_mode: str | None = None,
        callback: StepCallback | None = None, cancel: CancelToken | None = None, **options: Any,
    ) -> GenerationResult:
        """Redraw `image` (PIL image, array, path or bytes) after the prompt. strength 0..1 (default 0.75) is how
        much changes: int(steps * strength) steps run. Other options are GenerationRequest fields."""
        fields = {"init_image": image, "strength": strength, "resize_mode": resize_mode, **options}
        return self._request(prompt, fields, callback, cancel)

    def inpaint(
        self, image: Any, mask: Any, prompt: str = "", *, strength: float | None = None,
        mask_blur: int | None = None, inpainting_fill: str | None = None, invert_mask: bool | None = None,
        paste_back: bool | None = None, callback: StepCallback | None = None, cancel: CancelToken | None = None,
        **options: Any,
    ) -> GenerationResult:
        """Repaint the white area of `mask` (or its opaque area, for a mask with transparency)."""
        fields = {"init_image": image, "mask": mask, "strength": strength, "mask_blur": mask_blur,
                  "inpainting_fill": inpainting_fill, "invert_mask": invert_mask, "paste_back": paste_back,
                  **options}
        return self._request(prompt, fields, callback, cancel)

    def outpaint(
        self, image: Any, prompt: str = "", *, left: int = 0, right: int = 0, top: int = 0, bottom: int = 0,
        strength: float | None = None, callback: StepCallback | None = None, cancel: CancelToken | None = None,
        **options: Any,
    ) -> GenerationResult:
        """Extend `image` by the given pixels (multiples of 8) on each side and draw the new area."""
        fields = {"init_image": image, "outpaint_left": left, "outpaint_right": right, "outpaint_top": top,
                  "outpaint_bottom": bottom, "strength": strength, **options}
        return self._request(prompt, fields, callback, cancel)

    def depth2img(
        self, image: Any, depth_map: Any = None, prompt: str = "", *, strength: float | None = None,
        callback: StepCallback | None = None, cancel: CancelToken | None = None, **options: Any,
    ) -> GenerationResult:
        """Depth-guided img2img for depth models (5-channel UNet): depth_map is an image or (H, W) array,
        brighter/larger = nearer. Without one, components.depth_estimator is asked, if one is plugged in."""
        fields = {"init_image": image, "depth_map": depth_map, "strength": strength, **options}
        return self._request(prompt, fields, callback, cancel)

    def _request(self, prompt: str, fields: dict[str, Any], callback: StepCallback | None,
                 cancel: CancelToken | None) -> GenerationResult:
        request = make_request(prompt=prompt, **{k: v for k, v in fields.items() if v is not None})
        return self.run(request, callback=callback, cancel=cancel)

    def run(
        self,
        request: GenerationRequest,
        *,
        callback: StepCallback | None = None,
        cancel: CancelToken | None = None,
        hooks: StepHooks | None = None,
        extensions: Sequence[Extension] = (),
    ) -> GenerationResult:
        """Run a prepared request (the entry point the CLI and servers use). Fields the request leaves unset take
        the model folder's recommended settings, where it has some (generation_defaults.json).

        extensions: your own loop extensions (dapple.engine.extensions.Extension) for this run, after the
        request's plugins (request.extensions, from installed entry points)."""
        recommended = unset_recommendations(request, self.components.generation_defaults)
        if recommended:
            logger.info("%s: the model's recommended settings for what the request left unset: %s",
                        self.components.name, ", ".join(f"{name}={value}" for name, value in recommended.items()))
        request = with_model_defaults(request, self.components.generation_defaults)
        self.limits.check(request)
        for what in ("prompt", "negative_prompt"):
            text = getattr(request, what)
            if len(text) > self.limits.max_prompt_tokens:  # short texts cannot exceed it: skip tokenizing
                self.limits.check_prompt_tokens(len(self.tokenizer(text).input_ids) - 2, what)
        if request.model is not None and request.model != self.components.name:
            raise InvalidRequestError(f"model {request.model!r}: this pipeline runs {self.components.name!r} "
                                      "(choose models with dapple.load; servers pick them by name)")
        networks = extract_extra_networks(request.prompt)[1]
        openvino_backend.refuse_unsupported(self.components, request, loras=networks)  # before any work
        self.apply_loras(networks)
        self.install_embeddings(f"{request.prompt} {request.negative_prompt}")
        hooks = hooks or StepHooks()
        if cancel is not None:
            hooks.before_step.setdefault("cancel", cancel.hook)
        if callback is not None:
            hooks.after_step.setdefault("callback", callback)
        # Control units first (their modules, images and models are checked here, before any step), then the
        # request's plugins and the caller's own extensions.
        run_extensions = [*control_extensions(request, self.components, self._control_model, self.limits),
                          *speed_extensions(request, default_speed(self.components)),
                          *requested_extensions(request.extensions, self.components), *extensions,
                          *backend_extensions(self.components)]
        openvino_backend.refuse_unsupported(self.components, request, extensions=run_extensions)
        try:
            with torch.inference_mode():
                result = run_request(self.components, request, hooks, self.limits, run_extensions)
            result.recommended = recommended
            return result
        except GenerationCancelled as error:
            # The traceback's frames still hold the run's latents; clear them so the memory is returned now,
            # even while the caller keeps the exception.
            traceback.clear_frames(error.__traceback__)
            gc.collect()
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            raise
        except Exception as error:
            if not memory_options.is_out_of_memory(error):
                raise
            # An allocation failed: free what the run held, then say which memory option to use.
            logger.debug("allocation failure", exc_info=error)
            replacement = memory_options.out_of_memory_error(
                error, self.memory, self.device, batch_size=request.batch_size,
                what=request.mode + (f" at {request.width}x{request.height}" if request.width and request.height
                                     else "") + f", batch {request.batch_size}")
            traceback.clear_frames(error.__traceback__)
            del error
            gc.collect()
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            raise replacement from None

    def control_models(self) -> list[ControlModelEntry]:
        """The ControlNets and T2I-Adapters a request can name: the built-in one and those in control_dirs."""
        return list_control_models(self.control_dirs)

    def _control_model(self, name: str) -> tuple[ControlModelEntry, torch.nn.Module]:
        """The control model called `name`, loaded once per file version onto this pipeline's device and dtype
        (the CONTROL_CACHE_SIZE most recently used stay loaded)."""
        entry = find_control_model(name, self.control_dirs)
        stat = weight_file(entry.path).stat()
        key = (str(entry.path), stat.st_size, stat.st_mtime_ns)
        if key not in self._control_cache:
            model = load_control_model(entry.path, allow_pickle=self._allow_pickle, base=self.components.unet.config)
            model = model.to("cpu" if self.memory.offload else self.device)  # offloaded: it rests on the CPU
            if model.dtype != self.dtype:  # (diffusers warns about any dtype cast, even a no-op one)
                model = model.to(self.dtype)
            self._control_cache[key] = self._memory.adopt(model.eval().requires_grad_(False))
            while len(self._control_cache) > CONTROL_CACHE_SIZE:
                self._control_cache.popitem(last=False)
        self._control_cache.move_to_end(key)
        return entry, self._control_cache[key]

    def apply_loras(self, networks: Sequence[ExtraNetwork]) -> None:
        """Merge exactly these LoRAs into the weights (none: the plain model), found by name in lora_dirs.
        Each request sets its own; the previous set is undone first, restoring the loaded weights exactly."""
        from dapple.models.hashing import model_sha256

        if networks and memory_options.is_offloaded(self.components.unet) == "sequential":
            raise InvalidRequestError("LoRAs cannot be merged into sequentially offloaded weights (lowvram); use "
                                      "memory='medvram' (--medvram) or offload='model' with LoRAs")
        loras, hashes = [], {}
        for network in networks:
            path = find_in_folders(network.name, self.lora_dirs)
            stat = path.stat()
            key = (str(path), stat.st_size, stat.st_mtime_ns)
            if key not in self._lora_layers:
                self._lora_layers[key] = read_lora(path, self.components.unet, self.components.text_encoder,
                                                   self.components.text_encoder_2)
            loras.append((str(key), self._lora_layers[key], network.weight))
            hashes[network.name] = model_sha256(path)[:LORA_HASH_LENGTH]
        self._patcher.apply(loras)
        self.components.lora_hashes = hashes

    def install_embeddings(self, text: str) -> None:
        """Install the embeddings from embedding_dirs whose names `text` uses (once per file version)."""
        from dapple.models.hashing import model_sha256

        for folder in self.embedding_dirs:
            root = folder.expanduser().resolve()
            if not root.is_dir():
                continue
            for path in sorted(root.rglob("*")):
                if path.suffix not in EMBEDDING_SUFFIXES or not path.is_file():
                    continue
                if not path.resolve().is_relative_to(root) or not name_pattern(path.stem).search(text):
                    continue
                stat = path.stat()
                key = (str(path), stat.st_size, stat.st_mtime_ns)
                if key in self._installed_embeddings:
                    continue
                embedding = read_embedding(path, allow_pickle=self._allow_pickle)
                self.components.embedding_triggers[embedding.name] = install(self.components, embedding)
                self.components.embedding_hashes[embedding.name] = model_sha256(path)[:EMBEDDING_HASH_LENGTH]
                self._installed_embeddings.add(key)

    def __repr__(self) -> str:
        c = self.components
        return f"Pipeline(model={c.name!r}, device={c.device}, dtype={c.dtype}, native_size={c.native_size})"
