"""An optional OpenVINO backend: the UNet (and the VAE decoder) as compiled OpenVINO models on the CPU.

OpenVINO's PyTorch frontend (`ov.convert_model`, which traces the module with TorchScript) turns diffusers'
UNet2DConditionModel into an OpenVINO model; the CPU plugin compiles it with INFERENCE_PRECISION_HINT "f32" or
"bf16" (the pipeline's dtype). Measured on the project's 2-core AVX-512 BF16 machine (SD 1.5 architecture, 512x512,
one UNet call, CFG batch 2): torch fp32 10.7 s, torch bf16 + channels-last 4.6 s, OpenVINO f32 5.0 s, OpenVINO
bf16 2.9 s. FastSD CPU reports the same kind of gain.

- **One converted model for every size.** The inputs are declared dynamic (batch, height, width, prompt length),
  and the trace runs at a latent size that is *not* a multiple of the UNet's total downsampling, so diffusers'
  UNet takes its `upsample_size` path (each upsampler resizes to its skip connection's size) and the graph
  serves sizes that are not multiples of 64 px too. Batch 1 (unguided steps) and 2 (guided) share it.
- **Cached on disk**, keyed by the model's sha256 (the file A1111 hashes, or a diffusers folder's UNet weights,
  dapple.models.hashing), the torch dtype the weights were loaded in, the precision, the UNet config and the
  openvino / diffusers versions: a second load reads the IR (core.read_model) and never converts again.
- **What it cannot run is refused, never silently handed to torch.** The torch UNet is freed after conversion
  (keeping it would cost its whole size again: 1.7 GB in bf16, 3.4 GB in fp32 for SD 1.5, more than the compiled
  model), so ControlNet / T2I-Adapter residuals, cross_attention_kwargs, LoRAs (they change the UNet's weights)
  and extensions that patch UNet blocks (DeepCache, token merging) raise an InvalidRequestError that names
  backend="torch". Textual-inversion embeddings and VAE swaps only touch the text encoder and the VAE: they work.

openvino is imported only when this backend is used, so Dapple runs without it.
"""

from __future__ import annotations

import gc
import hashlib
import json
import os
import shutil
import tempfile
import warnings
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dapple.errors import InvalidRequestError, ModelLoadError

BACKENDS = ("torch", "openvino")
INSTALL_HINT = 'pip install "dapple[openvino]"'
CONVERSION_FORMAT = 1  # bump when the traced graph's inputs or outputs change: old cache entries are then unused
_PRECISIONS = {torch.float32: "f32", torch.bfloat16: "bf16", torch.float16: "f16"}
TORCH_ONLY = ('load the model with backend="torch" (dapple.load(..., backend="torch"), CLI --backend torch) '
              "to use it")

STATIC_SHAPES = 4  # compiled shapes kept with static_shapes (guided and unguided batches, a hires pass's two)
conversions = 0  # models converted by this process (a cache hit converts none); the tests count with it


def check_backend(backend: str) -> str:
    """The backend name, or an error listing the allowed ones."""
    if backend not in BACKENDS:
        raise InvalidRequestError(f"backend {backend!r}: allowed are {', '.join(map(repr, BACKENDS))}")
    return backend


def import_openvino() -> Any:
    """The openvino module, or a ModelLoadError that says how to install it."""
    try:
        import openvino
    except ImportError as error:
        raise ModelLoadError(f"backend 'openvino' needs the openvino package, which is not installed: "
                             f"{INSTALL_HINT}") from error
    return openvino


def default_cache_dir() -> Path:
    """$DAPPLE_CACHE_DIR/openvino, else ~/.cache/dapple/openvino (the root hashes.json uses), read when called."""
    root = Path(os.environ.get("DAPPLE_CACHE_DIR") or Path.home() / ".cache" / "dapple")
    return root / "openvino"


def precision_hint(dtype: torch.dtype) -> str:
    """OpenVINO's INFERENCE_PRECISION_HINT for a pipeline dtype: bf16 -> "bf16", fp32 -> "f32"."""
    if dtype not in _PRECISIONS:
        raise ModelLoadError(f"the OpenVINO backend runs float32, bfloat16 or float16 pipelines, not {dtype}")
    return _PRECISIONS[dtype]


def _weights_digest(module: torch.nn.Module) -> str:
    """sha256 of a module's weights, for components that were not loaded from a file (no model hash)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().float().contiguous().numpy().tobytes())
    return digest.hexdigest()


def cache_key(part: str, module: torch.nn.Module, source: str | None, precision: str,
              extra: Mapping[str, Any] | None = None) -> str:
    """The cache entry's name: everything that changes the converted graph or its weights."""
    import diffusers

    from dapple.models.hashing import model_sha256

    ov = import_openvino()
    weights = model_sha256(source) if source is not None and Path(source).exists() else _weights_digest(module)
    config = {key: value for key, value in dict(module.config).items() if not key.startswith("_")}
    fields = {
        "part": part, "format": CONVERSION_FORMAT, "weights": weights, "dtype": str(module.dtype),
        "precision": precision, "openvino": ov.__version__, "diffusers": diffusers.__version__,
        "config": config, **(extra or {}),
    }
    text = json.dumps(fields, sort_keys=True, default=str)
    return f"{part}-{precision}-{hashlib.sha256(text.encode()).hexdigest()[:24]}"


# -- conversion ------------------------------------------------------------------------------------------------


class _UNetGraph(torch.nn.Module):
    """The UNet with plain tensor inputs in a fixed order, as OpenVINO's frontend traces it."""

    def __init__(self, unet: torch.nn.Module, xl: bool) -> None:
        super().__init__()
        self.unet, self.xl = unet, xl

    def forward(self, sample, timestep, encoder_hidden_states, text_embeds=None, time_ids=None):
        added = {"text_embeds": text_embeds, "time_ids": time_ids} if self.xl else None
        return self.unet(sample, timestep, encoder_hidden_states=encoder_hidden_states, added_cond_kwargs=added,
                         return_dict=False)[0]


class _DecoderGraph(torch.nn.Module):
    """The VAE decoder (post-quant conv + decoder): scaled-back latents -> images in [-1, 1]."""

    def __init__(self, vae: torch.nn.Module) -> None:
        super().__init__()
        self.vae = vae

    def forward(self, latents):
        return self.vae.decode(latents, return_dict=False)[0]


def _odd_size(factor: int) -> int:
    """A latent side that is not a multiple of the total downsampling, so the traced upsamplers follow their skip
    connections' sizes (diffusers' forward_upsample_size) and the graph serves every size."""
    return factor + 1


def _unet_example(unet: torch.nn.Module, xl: bool) -> tuple[dict[str, torch.Tensor], list[tuple]]:
    """Example inputs for the trace and the dynamic input shapes (batch, height, width, tokens)."""
    import openvino as ov

    config = unet.config
    factor = 2 ** (len(config.block_out_channels) - 1)
    side = _odd_size(factor)
    example = {
        "sample": torch.randn(2, config.in_channels, side, side + 2),
        "timestep": torch.tensor([500.0, 500.0]),
        "encoder_hidden_states": torch.randn(2, 77, config.cross_attention_dim),
    }
    shapes = [("sample", [-1, config.in_channels, -1, -1]), ("timestep", [-1]),
              ("encoder_hidden_states", [-1, -1, config.cross_attention_dim])]
    if xl:
        pooled = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
        example["text_embeds"] = torch.randn(2, pooled)
        example["time_ids"] = torch.tensor([[64.0, 64.0, 0.0, 0.0, 64.0, 64.0]] * 2)
        shapes += [("text_embeds", [-1, pooled]), ("time_ids", [-1, 6])]
    return example, [(name, ov.PartialShape(shape), ov.Type.f32) for name, shape in shapes]


def _decoder_example(vae: torch.nn.Module) -> tuple[dict[str, torch.Tensor], list[tuple]]:
    import openvino as ov

    channels = vae.config.latent_channels
    return ({"latents": torch.randn(1, channels, 9, 11)},
            [("latents", ov.PartialShape([-1, channels, -1, -1]), ov.Type.f32)])


def _convert(graph: torch.nn.Module, example: dict[str, torch.Tensor], inputs: list[tuple]) -> Any:
    """Trace `graph` in float32 (the weights as loaded, upcast exactly) and convert it with dynamic inputs."""
    global conversions
    ov = import_openvino()
    dtype = next(graph.parameters()).dtype
    graph.float()  # bf16 -> fp32 is exact; the precision hint brings bf16 back at compile time
    try:
        with torch.no_grad(), warnings.catch_warnings():
            # The trace records shapes as constants where diffusers branches on them (asserts, a contiguous()
            # for large batches); none of those branches changes the result, so the warnings are noise here.
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            model = ov.convert_model(graph, example_input=example, input=inputs)
    finally:
        graph.to(dtype)
    conversions += 1
    return model


def _cached_model(folder: Path, key: str, convert: Callable[[], Any], compress: bool) -> Any:
    """The path of folder/key/model.xml, converting and saving the model first when it is not there (the entry
    is written to a temporary folder and renamed into place, so a crash never leaves half an entry); the model
    itself where the folder cannot be written."""
    ov = import_openvino()
    entry = folder / key
    if (entry / "model.xml").is_file():
        return entry / "model.xml"
    model = convert()
    try:
        folder.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{key}.", dir=folder))
        # compress_to_fp16 halves the file; only for reduced precision (bf16 weights fit fp16 exactly in its
        # normal range, and OpenVINO leaves out-of-range constants in f32). f32 keeps f32 weights.
        ov.save_model(model, staging / "model.xml", compress_to_fp16=compress)
        try:
            staging.rename(entry)
        except OSError:  # another process saved the same entry meanwhile: keep theirs
            shutil.rmtree(staging, ignore_errors=True)
    except OSError:
        return model  # a read-only cache folder only costs a conversion next time
    return entry / "model.xml"


def _compile_config(precision: str, threads: int | None) -> dict[str, Any]:
    config: dict[str, Any] = {"INFERENCE_PRECISION_HINT": precision, "PERFORMANCE_HINT": "LATENCY"}
    if threads is not None:
        config["INFERENCE_NUM_THREADS"] = int(threads)  # OpenVINO keeps its own pool: follow torch's choice
    return config


def _compile(model: Any, precision: str, threads: int | None) -> Any:
    """Compile for the CPU. From a cached file, OpenVINO also keeps the compiled blob beside it (CACHE_DIR), so
    a second load skips most of the compilation."""
    ov = import_openvino()
    core = ov.Core()
    if isinstance(model, Path):
        core.set_property({"CACHE_DIR": str(model.parent / "compiled")})
        model = str(model)
    return core.compile_model(model, "CPU", _compile_config(precision, threads))


class _StaticCompiler:
    """Static shapes: one compiled model per input shape (the IR reshaped), the STATIC_SHAPES most recent kept.
    Faster per call than the dynamic model (19% on a 6.5M-parameter 4-level UNet, 1 thread), but each compiled
    model holds its own weights, and every new size compiles again."""

    def __init__(self, model: Any, precision: str, threads: int | None) -> None:
        ov = import_openvino()
        self._core = ov.Core()
        self._model = self._core.read_model(str(model)) if isinstance(model, Path) else model
        self._config = _compile_config(precision, threads)
        self._requests: OrderedDict[tuple, Any] = OrderedDict()

    def request(self, arrays: Mapping[str, np.ndarray]) -> Any:
        key = tuple((name, array.shape) for name, array in arrays.items())
        if key not in self._requests:
            model = self._model.clone()
            model.reshape({name: list(shape) for name, shape in key})
            self._requests[key] = self._core.compile_model(model, "CPU", self._config).create_infer_request()
            while len(self._requests) > STATIC_SHAPES:
                self._requests.popitem(last=False)
        self._requests.move_to_end(key)
        return self._requests[key]


# -- the stand-ins -----------------------------------------------------------------------------------------------


class _Output:
    """diffusers' UNet2DConditionOutput / DecoderOutput shape: `.sample`, and a tuple view."""

    def __init__(self, sample: torch.Tensor) -> None:
        self.sample = sample

    def __getitem__(self, index: int) -> torch.Tensor:
        return (self.sample,)[index]


_UNSUPPORTED_CALL = {
    "down_block_additional_residuals": "ControlNet residuals",
    "mid_block_additional_residual": "ControlNet residuals",
    "down_intrablock_additional_residuals": "T2I-Adapter residuals",
    "cross_attention_kwargs": "cross_attention_kwargs (attention processors' arguments)",
}


class OpenVINOUNet:
    """A compiled OpenVINO UNet, called exactly like diffusers' UNet2DConditionModel:
    `unet(sample, t, encoder_hidden_states=..., added_cond_kwargs=..., return_dict=False)[0]`.

    It exposes what the engine reads from a UNet (config, dtype, device, num_parameters()). It has no torch
    modules: asking for one (down_blocks, attn_processors, ...) raises an AttributeError that names the torch
    backend, so an extension that patches UNet blocks fails clearly instead of patching nothing."""

    backend = "openvino"

    def __init__(self, compiled: Any, config: Any, dtype: torch.dtype, parameters: int, xl: bool, key: str) -> None:
        # compiled: a dynamic-shape compiled model, or a _StaticCompiler (one per shape)
        self._static = compiled if isinstance(compiled, _StaticCompiler) else None
        self._request = None if self._static is not None else compiled.create_infer_request()
        self.config = config
        self.dtype = dtype  # the pipeline's dtype: inputs are cast to it (bf16 rounding as in torch), then f32
        self.device = torch.device("cpu")
        self._parameters = parameters
        self._xl = xl
        self.cache_key = key

    def num_parameters(self) -> int:
        return self._parameters

    def __call__(self, sample: torch.Tensor, timestep: torch.Tensor | float, encoder_hidden_states: torch.Tensor,
                 added_cond_kwargs: Mapping[str, torch.Tensor] | None = None, return_dict: bool = True,
                 **kwargs: Any):
        for name, value in kwargs.items():
            if value is None:
                continue
            what = _UNSUPPORTED_CALL.get(name, name)
            raise InvalidRequestError(f"the OpenVINO UNet cannot take {what}: {TORCH_ONLY}")
        batch = sample.shape[0]
        timestep = torch.as_tensor(timestep, dtype=torch.float32).reshape(-1).expand(batch)
        inputs = {"sample": sample, "timestep": timestep, "encoder_hidden_states": encoder_hidden_states}
        if self._xl:
            if not added_cond_kwargs:
                raise ValueError("an SDXL UNet needs added_cond_kwargs (text_embeds, time_ids)")
            inputs["text_embeds"] = added_cond_kwargs["text_embeds"]
            inputs["time_ids"] = added_cond_kwargs["time_ids"]
        arrays = {name: _array(value) for name, value in inputs.items()}
        request = self._static.request(arrays) if self._static is not None else self._request
        result = request.infer(arrays)
        prediction = torch.from_numpy(np.array(result[0])).to(sample.dtype)
        return (prediction,) if not return_dict else _Output(prediction)

    # nn.Module's no-op calls the engine and users make on a UNet
    def eval(self) -> "OpenVINOUNet":
        return self

    def requires_grad_(self, requires_grad: bool = True) -> "OpenVINOUNet":
        return self

    def to(self, *args: Any, **kwargs: Any) -> "OpenVINOUNet":
        for value in [*args, *kwargs.values()]:
            if isinstance(value, torch.dtype) and value != self.dtype:
                raise ModelLoadError(f"the OpenVINO UNet was compiled for {self.dtype}; load the model again with "
                                     f"dtype={value}")
            if isinstance(value, (str, torch.device)) and torch.device(value).type != "cpu":
                raise ModelLoadError(f"the OpenVINO backend runs on the CPU, not {value}; use backend='torch'")
        return self

    def __getattr__(self, name: str) -> Any:
        # Only reached for attributes this class does not have: torch modules, processors, weights.
        raise AttributeError(f"the OpenVINO UNet has no {name!r} (it is a compiled graph without torch modules); "
                             f"features that patch the UNet (DeepCache, token merging, LoRA) need the torch "
                             f"backend: {TORCH_ONLY}")

    def __repr__(self) -> str:
        return f"OpenVINOUNet(precision={precision_hint(self.dtype)!r}, key={self.cache_key!r})"


class OpenVINODecoder:
    """The VAE's decode() as a compiled OpenVINO model, installed on the torch VAE (`vae.decode = ...`). The torch
    VAE stays whole: its encoder serves img2img and inpainting, and its decoder the tiled decode (enable_tiling),
    whose bounded memory is what a user who turns tiling on asks for. VAE slicing decodes one image at a time."""

    def __init__(self, compiled: Any, vae: torch.nn.Module, key: str) -> None:
        self._request = compiled.create_infer_request()
        self._torch_decode = type(vae).decode.__get__(vae)
        self._vae = vae
        self.cache_key = key

    def __call__(self, latents: torch.Tensor, return_dict: bool = True, **kwargs: Any):
        if getattr(self._vae, "use_tiling", False) or any(value is not None for value in kwargs.values()):
            return self._torch_decode(latents, return_dict=return_dict, **kwargs)
        rows = latents.split(1) if getattr(self._vae, "use_slicing", False) else [latents]
        images = torch.cat([torch.from_numpy(np.array(self._request.infer({"latents": _array(row)})[0]))
                            for row in rows]).to(latents.dtype)
        return (images,) if not return_dict else _Output(images)


def _array(tensor: torch.Tensor) -> np.ndarray:
    return tensor.detach().to(device="cpu", dtype=torch.float32).contiguous().numpy()


# -- building --------------------------------------------------------------------------------------------------


def compile_unet(unet: torch.nn.Module, *, source: str | None, xl: bool, cache_dir: str | Path | None = None,
                 threads: int | None = None, static_shapes: bool = False,
                 release: Callable[[], None] | None = None) -> OpenVINOUNet:
    """The OpenVINO stand-in for a torch UNet (from the cache, else converted and cached). Precision follows the
    UNet's dtype. static_shapes: compile per input shape (_StaticCompiler) instead of once for all shapes.
    release: called as soon as the torch UNet is no longer needed (once the cache entry exists, before
    compiling), so that a caller who drops its last reference there never holds both models at once."""
    if unet.device.type != "cpu":
        raise ModelLoadError(f"the OpenVINO backend runs on the CPU; this model is on {unet.device} "
                             "(load it with device='cpu', or keep backend='torch' on a GPU)")
    config, dtype, parameters = unet.config, unet.dtype, unet.num_parameters()
    precision = precision_hint(dtype)
    folder = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    key = cache_key("unet", unet, source, precision, {"xl": xl})
    holder = [unet]  # the closure's reference, dropped below
    del unet

    def convert() -> Any:
        example, inputs = _unet_example(holder[0], xl)
        return _convert(_UNetGraph(holder[0], xl), example, inputs)

    model = _cached_model(folder, key, convert, compress=precision != "f32")
    if release is not None:
        holder.clear()
        release()
        gc.collect()  # the torch weights go back before OpenVINO allocates its own
    compiled = _StaticCompiler(model, precision, threads) if static_shapes else _compile(model, precision, threads)
    return OpenVINOUNet(compiled, config, dtype, parameters, xl, key)


def compile_decoder(vae: torch.nn.Module, *, source: str | None, cache_dir: str | Path | None = None,
                    threads: int | None = None) -> OpenVINODecoder:
    """The OpenVINO VAE decoder for a torch VAE (cached like the UNet); install it with install_decoder."""
    precision = precision_hint(vae.dtype)
    folder = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    key = cache_key("vae-decoder", vae, source, precision)
    model = _cached_model(folder, key, lambda: _convert(_DecoderGraph(vae), *_decoder_example(vae)),
                          compress=precision != "f32")
    return OpenVINODecoder(_compile(model, precision, threads), vae, key)


def install_decoder(vae: torch.nn.Module, decoder: OpenVINODecoder) -> None:
    """Make vae.decode run the compiled decoder (an instance attribute shadows AutoencoderKL.decode)."""
    vae.decode = decoder


def _vae_weights(components: Any) -> str | None:
    """The file that identifies the VAE's weights: a swapped-in VAE, a diffusers folder's vae/ weights, or the
    single checkpoint file that holds them."""
    if components.vae_source is not None:
        return components.vae_source
    source = components.source
    if source is not None and Path(source).is_dir():
        files = sorted((Path(source) / "vae").glob("*.safetensors")) or sorted((Path(source) / "vae").glob("*.bin"))
        return str(files[0]) if files else None
    return source


def use_openvino(components: Any, *, cache_dir: str | Path | None = None, threads: int | None = None,
                 decoder: bool = True, static_shapes: bool = False) -> None:
    """Swap the components' UNet (and the VAE's decoder) for compiled OpenVINO models, freeing the torch UNet."""
    import_openvino()  # the install hint before any work
    source = components.source

    def release() -> None:
        components.unet = None  # the last reference to the torch UNet (dapple.load holds no other)

    components.unet = compile_unet(components.unet, source=source, xl=components.is_xl, cache_dir=cache_dir,
                                   threads=threads, static_shapes=static_shapes, release=release)
    if decoder:
        vae_source = _vae_weights(components)
        install_decoder(components.vae, compile_decoder(components.vae, source=vae_source, cache_dir=cache_dir,
                                                        threads=threads))


def is_openvino(components: Any) -> bool:
    return isinstance(components.unet, OpenVINOUNet)


def refuse_request(request: Any, loras: Iterable[Any] = ()) -> None:
    """Refuse the request fields the OpenVINO backend cannot run (also before a model loads, as the CLI does)."""
    if getattr(request, "controls", None):
        raise InvalidRequestError(f"controls (ControlNet / T2I-Adapter) add residuals inside the UNet, which the "
                                  f"OpenVINO backend has compiled: {TORCH_ONLY}")
    names = [getattr(network, "name", str(network)) for network in loras]
    if names:
        raise InvalidRequestError(f"LoRA {', '.join(names)} would change the UNet's weights, which the OpenVINO "
                                  f"backend has compiled: {TORCH_ONLY}")


def refuse_unsupported(components: Any, request: Any, loras: Iterable[Any] = (),
                       extensions: Iterable[Any] = ()) -> None:
    """Before a run on the OpenVINO backend: refuse what it cannot run, naming the option (nothing on torch)."""
    if not is_openvino(components):
        return
    refuse_request(request, loras)
    for extension in extensions:
        if getattr(extension, "needs_torch_unet", False):
            raise InvalidRequestError(f"extension {extension.name!r} patches the torch UNet, which the OpenVINO "
                                      f"backend does not have: {TORCH_ONLY}")


def infotext(components: Any) -> dict[str, str]:
    """The image's parameters entry: its pixels differ slightly from the torch backend's."""
    return {"Backend": "openvino"} if is_openvino(components) else {}
