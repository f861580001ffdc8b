"""The noise schedule: how much signal is left at each training timestep (alphas_cumprod, Ho et al., 2020), and
which timesteps and noise levels a sampler visits for a given number of steps."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from dapple.inspect.figures import new_figure, save_figure
from dapple.inspect.result import Inspection
from dapple.samplers import ZERO_SNR_LAST_ALPHA_BAR, create_scheduler


def noise_schedule(scheduler_config: Mapping[str, Any], out: Path, samplers: Sequence[str] = ("DPM++ 2M Karras",),
                   steps: int = 20) -> Inspection:
    """Plot alphas_cumprod over the training timesteps, and each sampler's timesteps and sigmas for `steps`."""
    result = Inspection()
    figure, (left, middle, right) = new_figure(15, 4.5, columns=3)
    reference = create_scheduler("DDPM", scheduler_config)
    alphas = reference.alphas_cumprod.numpy()
    left.plot(alphas, label="alphas_cumprod (signal)")
    left.plot(1 - alphas, label="1 - alphas_cumprod (noise)")
    left.set(title="training noise schedule", xlabel="timestep t", ylabel="variance share")
    left.legend()
    result.numbers["alphas_cumprod_first"] = float(alphas[0])
    result.numbers["alphas_cumprod_last"] = float(alphas[-1])
    result.lines.append(f"alphas_cumprod: {alphas[0]:.5f} at t=0 -> {alphas[-1]:.5f} at t={len(alphas) - 1}")
    for name in samplers:
        scheduler = create_scheduler(name, scheduler_config)
        scheduler.set_timesteps(steps)
        timesteps = scheduler.timesteps.float().numpy()
        middle.plot(range(len(timesteps)), timesteps, marker="o", markersize=3, label=name)
        sigmas = getattr(scheduler, "sigmas", None)
        if sigmas is None:  # DDIM-like samplers: the noise level of each timestep from the training schedule
            # A zero-terminal-SNR schedule ends at alpha_bar 0 (sigma infinite); show it as the samplers do.
            visited = np.maximum(alphas[timesteps.astype(int)], ZERO_SNR_LAST_ALPHA_BAR)
            sigmas_shown = np.sqrt((1 - visited) / visited)
        else:
            sigmas_shown = sigmas.float().numpy()
        right.plot(range(len(sigmas_shown)), sigmas_shown, marker="o", markersize=3, label=name)
        result.lines.append(f"{name}: {len(timesteps)} timesteps " + " ".join(str(int(t)) for t in timesteps))
    middle.set(title=f"timesteps visited ({steps} steps)", xlabel="model call", ylabel="timestep")
    right.set(title="noise level sigma", xlabel="model call", ylabel="sigma", yscale="log")
    middle.legend(fontsize=8)
    right.legend(fontsize=8)
    result.files.append(save_figure(figure, out / "schedule.png"))
    return result
