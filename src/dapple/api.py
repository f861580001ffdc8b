"""dapple.load(): the front door of the Python API."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from dapple.engine.pipeline import Pipeline
from dapple.errors import ModelLoadError
from dapple.models.components import Components
from dapple.models.devices import choose_threads
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
    """
    if path is None:
        if not (BUILTIN_MODEL_DIR / "model_index.json").is_file():
            raise ModelLoadError(
                "no model given: pass a diffusers model folder (--model DIR); Dapple's built-in model is not "
                "shipped yet"
            )
        path = BUILTIN_MODEL_DIR
    with quiet_libraries():
        if Path(path).expanduser().is_file() and Path(path).suffix.lower() in CHECKPOINT_SUFFIXES:
            components = load_single_file(path, device=device, dtype=dtype, allow_pickle=allow_pickle,
                                          prediction_type=prediction_type)
        else:
            components = load_components(path, device=device, dtype=dtype, allow_pickle=allow_pickle)
        if vae is not None:
            swap_vae(components, vae, allow_pickle=allow_pickle)
    torch.set_num_threads(choose_threads(threads, components.unet.num_parameters()))
    return Pipeline(components, limits=limits, lora_dirs=lora_dirs, embedding_dirs=embedding_dirs,
                    allow_pickle=allow_pickle, control_dirs=control_dirs)


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
