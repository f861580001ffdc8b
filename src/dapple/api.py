"""dapple.load(): the front door of the Python API."""

from __future__ import annotations

import gc
from collections.abc import Sequence
from pathlib import Path

import torch

from dapple.engine.pipeline import Pipeline
from dapple.errors import ModelLoadError
from dapple.models.components import Components
from dapple.models.devices import choose_threads, resolve_device, resolve_dtype
from dapple.models.memory import MemoryOptions, is_out_of_memory, plan
from dapple.models import openvino_backend
from dapple.models.loader import load_components
from dapple.models.precision import load_weights_into, vae_dtype
from dapple.models.quiet import quiet_libraries

from dapple.models.single_file import CHECKPOINT_SUFFIXES, load_single_file, load_vae
from dapple.request import Limits

# Where the built-in model's diffusers folder ships inside the package (once its weights meet their bar).
BUILTIN_MODEL_DIR = Path(__file__).parent / "models" / "assets" / "builtin"


def load(
    path: str | Path | None = None,
    *,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    allow_pickle: bool = False,
    limits: Limits | None = None,
    prediction_type: str | None = None,
    vae: str | Path | None = None,
    lora_dirs: Sequence[str | Path] = (),
    embedding_dirs: Sequence[str | Path] = (),
    threads: int | None = None,
    control_dirs: Sequence[str | Path] = (),
    backend: str = "torch",
    openvino_cache_dir: str | Path | None = None,
    memory: str | MemoryOptions | dict | None = None,
) -> Pipeline:
    """Load a diffusers model folder, a single-file SD 1.x / 2.x checkpoint (.safetensors, as A1111 and ComfyUI
    use), or, online, a hub id; with no path, the built-in model.

    device: None picks CUDA, then MPS, then CPU. dtype: None picks float16 on GPUs; on the CPU bfloat16 for large
    models (SD's 860M-parameter UNet and up) where the CPU has native bf16, else float32. "fp32" reproduces bit
    for bit across machines.
    allow_pickle: permit .bin/.ckpt weights (loaded with torch's weights_only mode); off by default.
    prediction_type: "epsilon" or "v_prediction" for a single file whose own markers should be overridden.
    vae: a VAE to use instead of the model's own (a .safetensors file as in A1111's models/VAE, or a folder).
    lora_dirs: folders where `<lora:name:weight>` in a prompt finds name.safetensors.
    embedding_dirs: folders of textual-inversion embeddings, used when a prompt names one.
    threads: torch's CPU thread count (a process-wide setting). None picks 1 for small models such as the
    built-in one (a second thread gains ~10% when the machine is idle and costs up to 9x when another process
    holds a core), else the physical cores this process may use.
    control_dirs: folders of ControlNets and T2I-Adapters (as A1111's models/ControlNet), which request units
    name; the built-in "builtin-canny" is always there.
    backend: "torch" (default) or "openvino": the UNet and the VAE decoder run as compiled OpenVINO models on the
    CPU (`pip install "dapple[openvino]"`; precision follows dtype: bf16 or f32), converted once and cached in
    openvino_cache_dir (default ~/.cache/dapple/openvino). It refuses ControlNets, T2I-Adapters and LoRAs
    (see dapple.models.openvino_backend).
    memory: "medvram" (model CPU offload + VAE slicing), "lowvram" (sequential offload + attention slicing + VAE
    slicing + VAE tiling), MemoryOptions(...) for single switches, or None (all off, the fastest). Offload works on
    CUDA; on the CPU the presets keep only what helps there (pipe.memory_notes says what was left out). Change it
    later with pipe.set_memory(...). See docs/memory.md.
    """
    if openvino_backend.check_backend(backend) == "openvino":
        openvino_backend.import_openvino()  # the install hint before the model loads
        device = "cpu" if device is None else device  # OpenVINO's CPU plugin; a GPU is refused below
    if path is None:
        if not (BUILTIN_MODEL_DIR / "model_index.json").is_file():
            raise ModelLoadError(
                "no model given: pass a diffusers model folder (--model DIR); Dapple's built-in model is not "
                "shipped yet"
            )
        path = BUILTIN_MODEL_DIR
    target = resolve_device(device)
    options, _ = plan(memory, target)  # bad memory options fail before anything loads
    if options.offload is not None:
        # Offloaded models rest in CPU memory: load them there, in the dtype the GPU runs (the whole model never
        # has to fit in GPU memory at once).
        device, dtype = "cpu", resolve_dtype(dtype, target)
    try:
        components = _load(path, device, dtype, allow_pickle, prediction_type, vae)
    except Exception as error:
        if not is_out_of_memory(error):
            raise
        from dapple.errors import NotEnoughMemoryError

        raise NotEnoughMemoryError(
            f"not enough memory to load {path} on {target} ({str(error).splitlines()[0][:200]}); try "
            + ("memory='lowvram' (--lowvram), " if target.type == "cuda" else "")
            + "a smaller dtype (--dtype fp16 / bf16) or a smaller model") from None
    if options.offload is not None:
        components.execution_device = target  # where the pipeline's memory options put the models to work
    torch.set_num_threads(choose_threads(threads, components.unet.num_parameters()))
    if backend == "openvino":
        openvino_backend.use_openvino(components, cache_dir=openvino_cache_dir, threads=torch.get_num_threads())
        gc.collect()  # the torch UNet's weights go back now, before the first run
    return Pipeline(components, limits=limits, lora_dirs=lora_dirs, embedding_dirs=embedding_dirs,
                    allow_pickle=allow_pickle, control_dirs=control_dirs, memory=memory)


def _load(path: str | Path, device: str | torch.device | None, dtype: str | torch.dtype | None, allow_pickle: bool,
          prediction_type: str | None, vae: str | Path | None) -> Components:
    """The components of a single file or a folder (with `vae` swapped in) on `device`."""
    with quiet_libraries():
        if Path(path).expanduser().is_file() and Path(path).suffix.lower() in CHECKPOINT_SUFFIXES:
            components = load_single_file(path, device=device, dtype=dtype, allow_pickle=allow_pickle,
                                          prediction_type=prediction_type)
        else:
            components = load_components(path, device=device, dtype=dtype, allow_pickle=allow_pickle)
        if vae is not None:
            swap_vae(components, vae, allow_pickle=allow_pickle)
    return components


def swap_vae(components: Components, vae: str | Path, *, allow_pickle: bool = False) -> None:
    """Replace the components' VAE with the one at `vae` (see load_vae), on the same device and dtype."""
    loaded = load_vae(vae, scaling_factor=components.latent_scaling_factor, allow_pickle=allow_pickle)
    if int(loaded.config.latent_channels) != components.latent_channels:
        raise ModelLoadError(f"VAE {vae} has {loaded.config.latent_channels} latent channels; this model's UNet "
                             f"works on {components.latent_channels}")
    dtype = vae_dtype(components.dtype, components.device, bool(loaded.config.force_upcast))
    components.vae = load_weights_into(loaded, [], dtype, channels_last=True).to(components.device).eval() \
        .requires_grad_(False)
    components.vae_source = str(Path(vae).expanduser())
    components.__dict__.pop("vae_short_hash", None)  # a cached_property of the previous VAE
