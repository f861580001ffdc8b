"""Give a VAE a posterior whose samples decode like its mean.

SD's AutoencoderKL encodes an image into a diagonal Gaussian (Kingma & Welling, 2014): the encoder's last 1x1
convolution (quant_conv) gives a mean and a log-variance per latent cell, and img2img and inpainting encode by
*sampling* it (diffusers' latent_dist.sample, which Dapple follows for peer equivalence). A VAE whose decoder
was trained on the mean alone, with a KL term too weak to matter, keeps whatever log-variance the KL pulls it
to: the built-in model's came out near 0 (std ~1.0 against a latent spread of ~0.27), so a sampled latent is
mostly noise and decodes at 11 dB.

The fix here is an exactly equivalent export for everything that reads the mean: the log-variance rows of
quant_conv get zero weights and a constant bias, so every cell's posterior std is one calibrated value, and the
mean rows are not touched (decoding the mean, and so txt2img, stays bit for bit the same). The value is the
largest std whose samples still decode within `tolerance_db` of the mean's PSNR: what this decoder tolerates.
"""

from __future__ import annotations

import math

import torch
from diffusers import AutoencoderKL

# Candidate stds, coarse to fine on a log grid; the calibration keeps the largest that passes.
CANDIDATE_STDS = (0.1, 0.05, 0.03, 0.02, 0.01, 0.005, 0.002, 0.001)


def _moments_conv(vae: AutoencoderKL) -> torch.nn.Conv2d:
    """The convolution whose output channels are [mean | log-variance]."""
    return vae.quant_conv if vae.quant_conv is not None else vae.encoder.conv_out


@torch.no_grad()
def set_posterior_std(vae: AutoencoderKL, std: float) -> None:
    """Make every latent cell's posterior std `std`, leaving the mean untouched."""
    conv = _moments_conv(vae)
    channels = conv.out_channels // 2
    conv.weight[channels:] = 0
    conv.bias[channels:] = 2 * math.log(std)  # log-variance


def _psnr(decoded: torch.Tensor, images: torch.Tensor) -> float:
    """Mean PSNR in dB of images in [-1, 1]."""
    mse = ((decoded.clamp(-1, 1) - images) ** 2).mean(dim=(1, 2, 3)) / 4
    return float((10 * torch.log10(1 / mse.clamp_min(1e-10))).mean())


@torch.no_grad()
def calibrate_posterior_std(vae: AutoencoderKL, images: torch.Tensor, tolerance_db: float = 0.1,
                            seed: int = 0) -> tuple[float, float, float]:
    """Set the largest candidate std whose sampled latents decode within `tolerance_db` of the mean's PSNR.

    images: a batch in [-1, 1]. Returns (std, PSNR of the mean, PSNR of a sample at that std)."""
    mean = vae.encode(images).latent_dist.mean
    mean_psnr = _psnr(vae.decode(mean).sample, images)
    noise = torch.randn(mean.shape, generator=torch.Generator().manual_seed(seed)).to(mean)
    for std in CANDIDATE_STDS:
        sampled_psnr = _psnr(vae.decode(mean + std * noise).sample, images)
        if sampled_psnr >= mean_psnr - tolerance_db:
            set_posterior_std(vae, std)
            return std, mean_psnr, sampled_psnr
    raise ValueError(f"even a posterior std of {CANDIDATE_STDS[-1]} costs more than {tolerance_db} dB")
