"""The diffusion loss the shapes-world recipes share (the built-in model and its ControlNet).

- Target: epsilon or v (Salimans & Ho, 2022, "Progressive Distillation"), as the noise schedule says.
- Weight: min-SNR-gamma (Hang et al., 2023, "Efficient Diffusion Training via Min-SNR Weighting Strategy") in x0
  terms with a floor, so that t=999 (SNR 0 on a zero-terminal-SNR schedule) still counts; converted to the
  network's target: eps error^2 = SNR * x0 error^2, v error^2 = (SNR + 1) * x0 error^2 (section 3.4).
- Per-cell weights: more weight on the latent cells a scene's shape touches (see TrainingConfig.object_loss_weight).
- Timesteps: uniform, a share of them from the top of the schedule instead, where a shape's position is decided.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler
from diffusers.training_utils import compute_snr


def object_cell_weights(masks: list[np.ndarray], latent_side: int, extra_weight: float) -> torch.Tensor:
    """(n, 1, side, side) loss weights: 1 + extra_weight on the latent cells the shape touches, grown by one cell
    so that both sides of its outline count."""
    pixels = torch.from_numpy(np.stack(masks)).float()[:, None]
    cells = F.max_pool2d(pixels, pixels.shape[-1] // latent_side)
    grown = F.max_pool2d(cells, 3, stride=1, padding=1)
    return 1 + extra_weight * grown


def sample_timesteps(count: int, generator: torch.Generator, total: int, high_from: int,
                     high_share: float) -> torch.Tensor:
    """Uniform timesteps in [0, total), a high_share of them drawn from [high_from, total) instead."""
    uniform = torch.randint(0, total, (count,), generator=generator)
    high = torch.randint(high_from, total, (count,), generator=generator)
    pick_high = torch.rand(count, generator=generator) < high_share
    return torch.where(pick_high, high, uniform)


def diffusion_target(schedule: DDPMScheduler, latents: torch.Tensor, noise: torch.Tensor,
                     timesteps: torch.Tensor) -> torch.Tensor:
    """What the network predicts at these timesteps: v for a v-prediction schedule, else the noise."""
    if schedule.config.prediction_type == "v_prediction":
        return schedule.get_velocity(latents, noise, timesteps)
    return noise


def min_snr_loss(
    schedule: DDPMScheduler, prediction: torch.Tensor, target: torch.Tensor, timesteps: torch.Tensor,
    cell_weights: torch.Tensor, *, gamma: float, floor: float,
) -> torch.Tensor:
    """The batch's loss: per image, the cell-weighted mean squared error, weighted by max(min(SNR, gamma), floor)
    in x0 terms (converted to the schedule's target), averaged over the batch."""
    squared_error = F.mse_loss(prediction, target, reduction="none").mean(dim=1, keepdim=True)
    per_sample = (cell_weights * squared_error).sum(dim=(1, 2, 3)) / cell_weights.sum(dim=(1, 2, 3))
    snr = compute_snr(schedule, timesteps)
    x0_weight = torch.clamp(torch.clamp(snr, max=gamma), min=floor)
    weights = x0_weight / (snr + 1 if schedule.config.prediction_type == "v_prediction" else snr)
    return (weights * per_sample).mean()
