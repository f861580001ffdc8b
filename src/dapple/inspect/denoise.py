"""Every denoising step of a generation as a picture: the sampler's prediction of the clean image (x0) and the
current noisy latents, as an animated GIF (and MP4 where ffmpeg is installed), a contact sheet, and a plot of
the latents' statistics per step."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from dapple.engine.latents import approximate_rgb, to_pil
from dapple.inspect.figures import labelled_grid, new_figure, save_figure, save_image
from dapple.inspect.result import Inspection


def _side_by_side(left: Image.Image, right: Image.Image, size: int) -> Image.Image:
    frame = Image.new("RGB", (2 * size + 4, size), "white")
    frame.paste(left.resize((size, size), Image.NEAREST), (0, 0))
    frame.paste(right.resize((size, size), Image.NEAREST), (size + 4, 0))
    return frame


def _write_mp4(frames: list[Image.Image], path: Path, fps: int) -> Path | None:
    """Encode frames with ffmpeg when it is installed; None otherwise."""
    ffmpeg = shutil.which("ffmpeg")
    if ffmpeg is None:
        return None
    with tempfile.TemporaryDirectory() as folder:
        for index, frame in enumerate(frames):
            frame.save(Path(folder) / f"{index:04d}.png")
        subprocess.run([ffmpeg, "-y", "-loglevel", "error", "-framerate", str(fps), "-i", f"{folder}/%04d.png",
                        "-pix_fmt", "yuv420p", "-vf", "pad=ceil(iw/2)*2:ceil(ih/2)*2", str(path)], check=True)
    return path


def denoise_steps(pipe, prompt: str, out: Path, *, frame_size: int = 256, fps: int = 4, **options: Any
                  ) -> Inspection:
    """Generate one image (options: any generate() argument) while keeping every step's previews."""
    predictions: list[Image.Image] = []
    currents: list[Image.Image] = []
    stats: list[tuple[float, float, float, float]] = []

    def keep(context) -> None:
        latents = context.latents.float()
        stats.append((latents.mean().item(), latents.std().item(), latents.min().item(), latents.max().item()))
        predictions.append(context.preview("full")[0])
        currents.append(_cheap_current(pipe, context.latents))

    options.setdefault("seed", 0)
    result = pipe.generate(prompt, batch_size=1, callback=keep, **options)
    steps = len(predictions)
    frames = [_side_by_side(p, c, frame_size) for p, c in zip(predictions, currents)]
    frames.append(_side_by_side(result.images[0], result.images[0], frame_size))
    out.mkdir(parents=True, exist_ok=True)
    gif = out / "denoise.gif"
    frames[0].save(gif, save_all=True, append_images=frames[1:], duration=int(1000 / fps), loop=0)
    files = [gif]
    mp4 = _write_mp4(frames, out / "denoise.mp4", fps)
    if mp4 is not None:
        files.append(mp4)

    columns = min(steps, 10)
    rows = [predictions[i : i + columns] for i in range(0, steps, columns)]
    sheet = labelled_grid(rows, [f"+{c}" for c in range(columns)],
                          [f"step {i + 1}" for i in range(0, steps, columns)],
                          title=f"predicted x0 after each step: {prompt!r}, {result.request.sampler}")
    files.append(save_image(sheet, out / "denoise-steps.png"))

    figure, axes = new_figure(7, 4)
    x = range(1, steps + 1)
    for column, label in enumerate(("mean", "std", "min", "max")):
        axes.plot(x, [row[column] for row in stats], marker="o", markersize=3, label=label)
    axes.set(title="latents after each step", xlabel="step", ylabel="value")
    axes.legend()
    files.append(save_figure(figure, out / "denoise-stats.png"))
    return Inspection(files=files, numbers={"steps": steps, "frames": len(frames)},
                      lines=[f"{steps} steps, {len(frames)} frames (x0 prediction | current latents), "
                             f"seed {result.seeds[0]}" + ("" if mp4 else "; no ffmpeg: GIF only")])


def _cheap_current(pipe, latents: torch.Tensor) -> Image.Image:
    """The current noisy latents through the linear latent -> RGB map (no VAE)."""
    return to_pil(approximate_rgb(latents[:1], pipe.components.latent_rgb_factors))[0]
