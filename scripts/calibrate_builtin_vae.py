"""Give the shipped built-in VAE a calibrated posterior std in place (dapple.train.vae_posterior).

builtin-v7 was exported before the recipe's export calibrated the posterior: its log-variance sat near 0, so
img2img and inpainting (which sample the posterior, as diffusers does) decoded noise. This rewrites only the
log-variance rows of vae/quant_conv; every other tensor of the folder keeps its bytes. Run once:
    python scripts/calibrate_builtin_vae.py [--folder src/dapple/models/assets/builtin]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from diffusers import AutoencoderKL
from safetensors.torch import load_file, save_file

from dapple.api import BUILTIN_MODEL_DIR
from dapple.train.builtin_training import images_to_tensor
from dapple.train.data.shapes import ShapesWorld
from dapple.train.vae_posterior import calibrate_posterior_std


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--folder", type=Path, default=BUILTIN_MODEL_DIR)
    folder = parser.parse_args().folder / "vae"
    weights_file = folder / "diffusion_pytorch_model.safetensors"
    tensors = load_file(weights_file)
    vae = AutoencoderKL.from_pretrained(str(folder), torch_dtype=torch.float32).eval()
    images = images_to_tensor([s.image for s in ShapesWorld(seed=2, split="train").scenes(0, 256)])
    std, mean_psnr, sampled_psnr = calibrate_posterior_std(vae, images)
    for name in ("quant_conv.weight", "quant_conv.bias"):
        tensors[name] = getattr(vae.quant_conv, name.split(".")[1]).detach().to(tensors[name].dtype).contiguous()
    save_file(tensors, weights_file, metadata={"format": "pt"})
    print(f"posterior std {std}: the mean decodes at {mean_psnr:.2f} dB, a sample at {sampled_psnr:.2f} dB")


if __name__ == "__main__":
    main()
