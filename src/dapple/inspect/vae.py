"""Latent space: what the VAE keeps (Kingma & Welling, 2014; Rombach et al., 2022), the forward diffusion process
(Ho et al., 2020: x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps), and what one UNet call predicts."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from dapple.engine.images import resize_to, to_vae_tensor
from dapple.engine.latents import to_pil
from dapple.errors import InvalidRequestError
from dapple.inspect.figures import labelled_grid, save_image
from dapple.inspect.result import Inspection
from dapple.samplers import create_scheduler
from dapple.train.data.shapes import images_psnr


def compression_ratio(image_shape: Sequence[int], latent_shape: Sequence[int]) -> float:
    """Numbers in the image over numbers in its latents: 3x512x512 -> 4x64x64 is 48 for SD."""
    return float(np.prod(image_shape) / np.prod(latent_shape))


def _fit(pipe, image: Image.Image) -> Image.Image:
    """The image at a size the VAE takes: the model's native size for small inputs, else multiples of 8."""
    native = pipe.components.native_size
    width = max(native, image.width // 8 * 8) if image.width >= native else native
    height = max(native, image.height // 8 * 8) if image.height >= native else native
    return resize_to(image.convert("RGB"), width, height, "crop and resize")


@torch.inference_mode()
def _encode(pipe, image: Image.Image, seed: int | None = None) -> torch.Tensor:
    """Scaled latents of one image: the posterior mean, or with a seed a sample of the posterior (what img2img
    and inpainting encode with, as diffusers does)."""
    pixels = to_vae_tensor([image]).to(pipe.device, pipe.vae.dtype)
    posterior = pipe.vae.encode(pixels).latent_dist
    if seed is None:
        return posterior.mean * pipe.components.latent_scaling_factor
    noise = torch.randn(posterior.mean.shape, generator=torch.Generator().manual_seed(seed)).to(posterior.mean)
    return (posterior.mean + posterior.std * noise) * pipe.components.latent_scaling_factor


@torch.inference_mode()
def _decode(pipe, latents: torch.Tensor) -> list[Image.Image]:
    return pipe.decode_latents(latents.to(pipe.dtype))


def _channel_tiles(latents: torch.Tensor) -> list[Image.Image]:
    """Each latent channel as a greyscale picture, stretched to its own min..max."""
    tiles = []
    for channel in latents[0].float().cpu():
        span = (channel.max() - channel.min()).clamp(min=1e-8)
        tiles.append(Image.fromarray(((channel - channel.min()) / span * 255).byte().numpy()).convert("RGB"))
    return tiles


def vae_round_trip(pipe, image: Image.Image, out: Path) -> Inspection:
    """Encode and decode an image: original, reconstruction from the posterior mean, absolute error (x4), the
    reconstruction from a posterior sample (img2img's and inpainting's encoding: a VAE whose posterior std is too
    wide decodes noise there) and the latent channels."""
    image = _fit(pipe, image)
    latents = _encode(pipe, image)
    reconstruction = _decode(pipe, latents)[0]
    sampled = _decode(pipe, _encode(pipe, image, seed=0))[0]
    error = np.abs(np.asarray(image, np.int16) - np.asarray(reconstruction, np.int16))
    error_image = Image.fromarray(np.clip(error * 4, 0, 255).astype(np.uint8))
    psnr, sampled_psnr = images_psnr(image, reconstruction), images_psnr(image, sampled)
    ratio = compression_ratio((3, image.height, image.width), latents.shape[1:])
    channels = latents.shape[1]
    cells = [[image, reconstruction, error_image, sampled, *_channel_tiles(latents)]]
    labels = ["original", "decoded", "|error| x4", "from a sample", *[f"latent {c}" for c in range(channels)]]
    title = (f"VAE: 3x{image.height}x{image.width} -> {channels}x{latents.shape[2]}x{latents.shape[3]}, "
             f"compression {ratio:g}x, PSNR {psnr:.2f} dB (sampled {sampled_psnr:.2f})")
    sheet = labelled_grid(cells, labels, title=title, cell_size=image.width)
    return Inspection(files=[save_image(sheet, out / "vae.png")],
                      numbers={"psnr": psnr, "psnr_sampled": sampled_psnr, "compression": ratio},
                      lines=[f"compression ratio: {ratio:g} (3x{image.height}x{image.width} pixels -> "
                             f"{channels}x{latents.shape[2]}x{latents.shape[3]} latents)",
                             f"PSNR: {psnr:.2f} dB from the posterior mean, {sampled_psnr:.2f} dB from a sample "
                             "(img2img and inpainting encode by sampling)"])


def forward_noise(pipe, image: Image.Image, out: Path, timesteps: Sequence[int] = (0, 50, 150, 300, 500, 750, 999),
                  seed: int = 0, constant_beta: float = 0.02) -> Inspection:
    """The image noised to a row of timesteps: in latent space with the model's schedule (decoded through the
    VAE), and in pixel space with a constant beta (the tutorial example: abar_t = (1 - beta)^(t+1))."""
    image = _fit(pipe, image)
    latents = _encode(pipe, image)
    schedule = create_scheduler("DDPM", pipe.components.scheduler_config)
    generator = torch.Generator().manual_seed(seed)
    latent_noise = torch.randn(latents.shape, generator=generator).to(latents.device, latents.dtype)
    pixels = to_vae_tensor([image])
    pixel_noise = torch.randn(pixels.shape, generator=generator)
    latent_row, pixel_row = [], []
    for t in timesteps:
        noisy = schedule.add_noise(latents, latent_noise, torch.tensor([t]))
        latent_row.append(_decode(pipe, noisy)[0])
        keep = (1 - constant_beta) ** (t + 1)
        noisy_pixels = keep**0.5 * pixels + (1 - keep) ** 0.5 * pixel_noise
        pixel_row.append(to_pil((noisy_pixels / 2 + 0.5).clamp(0, 1))[0])
    sheet = labelled_grid([latent_row, pixel_row], [f"t={t}" for t in timesteps],
                          ["latents (model schedule), decoded", f"pixels, constant beta {constant_beta}"],
                          title="forward diffusion: the same image noised to each timestep", cell_size=image.width)
    return Inspection(files=[save_image(sheet, out / "noise.png")],
                      lines=[f"timesteps: {', '.join(map(str, timesteps))}"])


def unet_call(pipe, image: Image.Image, prompt: str, t: int, out: Path, seed: int = 0) -> Inspection:
    """Noise an image's latents to timestep t, call the UNet once (conditioned on the prompt), and show the noisy
    latents, the predicted noise, the predicted x0 = (x_t - sqrt(1 - abar) eps) / sqrt(abar) and the true x0.
    A v-prediction UNet (Salimans & Ho, 2022) predicts v = sqrt(abar) eps - sqrt(1 - abar) x0; its noise and x0
    are read back from v (x0 = sqrt(abar) x_t - sqrt(1 - abar) v), which also holds at abar = 0."""
    image = _fit(pipe, image)
    latents = _encode(pipe, image)
    schedule = create_scheduler("DDPM", pipe.components.scheduler_config)
    if pipe.components.unet_kind != "standard":
        raise InvalidRequestError("inspect unet needs a standard (4-channel) UNet")
    if not 0 <= t < schedule.config.num_train_timesteps:
        raise InvalidRequestError(f"t={t} is invalid; allowed: 0..{schedule.config.num_train_timesteps - 1}")
    noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(seed)).to(latents.device, latents.dtype)
    timestep = torch.tensor([t])
    noisy = schedule.add_noise(latents, noise, timestep)
    with torch.inference_mode():
        conditioning = pipe.encode_prompt(prompt, guidance_scale=1.0)
        predicted = pipe.unet(noisy, timestep.to(pipe.device), encoder_hidden_states=conditioning.unet_batch
                              ).sample
    abar = schedule.alphas_cumprod[t].to(latents.dtype)
    if pipe.components.prediction_type == "v_prediction":
        x0 = abar.sqrt() * noisy - (1 - abar).sqrt() * predicted
        predicted = abar.sqrt() * predicted + (1 - abar).sqrt() * noisy  # the noise it implies
    else:
        x0 = (noisy - (1 - abar).sqrt() * predicted) / abar.sqrt()
    mse = float(torch.mean((predicted.float() - noise.float()) ** 2))
    cells = [[_decode(pipe, noisy)[0], *_channel_tiles(predicted)[:1], _decode(pipe, x0)[0], image]]
    labels = ["noisy x_t (decoded)", "predicted noise (ch 0)", "predicted x0", "true x0"]
    sheet = labelled_grid(cells, labels, title=f"one UNet call at t={t}: {prompt!r} (noise MSE {mse:.3f})",
                          cell_size=image.width)
    return Inspection(files=[save_image(sheet, out / f"unet-t{t}.png")], numbers={"noise_mse": mse},
                      lines=[f"t={t}: abar={float(abar):.4f}, predicted-noise MSE {mse:.4f}"])
