"""The built-in model's card (README.md in its folder): how to reproduce the weights, what training cost, how
well the model does on held-out combinations, and the words it knows."""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path

import torch

from dapple.models.generation_defaults import read_generation_defaults
from dapple.models.vocabulary import read_vocabulary
from dapple.train.builtin_training import TrainingConfig
from dapple.train.scorer import AccuracyTable

GAP = 600.0  # seconds between log records beyond which the run was stopped (not counted as training time)


def training_minutes(log_path: Path, stage: str = "done", step: int = 0) -> dict[str, float]:
    """Minutes spent in each stage up to (stage, step), from the log's timestamps, leaving out the pauses of a
    resumed run."""
    minutes: dict[str, float] = {}
    previous: dict | None = None
    for line in log_path.read_text().splitlines():
        record = json.loads(line)
        if record["stage"] == stage and record.get("step", 0) > step:
            break  # the log runs ahead of the checkpoint that was exported
        if previous is not None and previous["stage"] == record["stage"]:
            elapsed = record["time"] - previous["time"]
            if elapsed < GAP:
                minutes[record["stage"]] = minutes.get(record["stage"], 0.0) + elapsed / 60
        previous = record
    return minutes


def _parent_recipe(init_from: str | None) -> list[str]:
    """Card lines giving the recipe of the model a run continued from, copied from that folder's own card."""
    if init_from is None:
        return []
    card = Path(init_from) / "README.md"
    text = card.read_text() if card.is_file() else ""
    start = text.find("```bash\n")
    end = text.find("```", start + 8) if start >= 0 else -1
    if start < 0 or end < 0:
        return [f"It continues `{init_from}`, a model folder with no recipe on its card.", ""]
    return [f"It continues `{init_from}`, whose own card gives this recipe:", "", "```bash",
            *text[start + 8:end].rstrip("\n").splitlines(), "```", ""]


def write_model_card(
    folder: Path, config: TrainingConfig, *, run_dir: Path, stage: str, step: int, table: AccuracyTable | None,
    evaluation: str = "", commands: list[str] | None = None,
) -> Path:
    """Write folder/README.md."""
    minutes = training_minutes(run_dir / "train.log", stage, step) if (run_dir / "train.log").is_file() else {}
    finished = stage == "done"
    progress = "finished" if finished else f"stopped in stage {stage} at step {step} of {config.diffusion_steps}"
    arch = config.architecture
    lines = [
        "# Dapple built-in shapes model",
        "",
        "A Stable Diffusion-architecture model (AutoencoderKL, CLIP text encoder with the real CLIP tokenizer,",
        "UNet2DConditionModel) trained from scratch by Dapple on its procedurally drawn shapes world: 64x64 images",
        "of one circle, square or triangle in one of 8 colours on a plain background of another.",
        "",
        "Its noise schedule is SD 1.x's scaled_linear betas rescaled to zero terminal SNR, with v-prediction",
        "(Lin et al. 2023, \"Common Diffusion Noise Schedules and Sample Steps are Flawed\"): on SD's own schedule",
        "the last noisy latent keeps enough of the image for a 16x16-latent UNet to read the shape's position from",
        "the noise and ignore the caption's position words. The scheduler config in this folder says so",
        "(`rescale_betas_zero_snr`, `prediction_type: v_prediction`, trailing timesteps); Dapple's samplers honour it.",
        "",
        "## Recipe",
        "",
        f"Training run: {progress}.",
        "",
        "```bash",
        *(commands or [f"dapple train builtin --seed {config.seed}"]),
        "```",
        "",
        *_parent_recipe(config.init_from),
        "The full training config (TrainingConfig):",
        "",
        "```text",
        *[f"{key} = {json.dumps(value)}" for key, value in config.as_dict().items()],
        "```",
        "",
        "Architecture: VAE " + "/".join(map(str, arch.vae_channels)) + f" channels to {arch.latent_channels}-channel "
        f"latents (64 px -> {64 // 2 ** (len(arch.vae_channels) - 1)}), text encoder {arch.text_hidden} wide x "
        f"{arch.text_layers} layers, UNet " + "/".join(map(str, arch.unet_channels)) + ".",
        "",
        "## Training time and hardware",
        "",
        *([f"- vae: not trained in this run; reused from `{config.vae_from}` (`--vae-from`)"]
          if config.vae_from else []),
        *([f"- every network starts from `{config.init_from}` (`--init-from`); its training time is on its card"]
          if config.init_from else []),
        *[f"- {name}: {value:.0f} minutes" for name, value in minutes.items()],
        f"- machine: {platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}, no GPU",
        "",
        "## Evaluation on held-out combinations",
        "",
        evaluation or "(not evaluated)",
        "",
    ]
    if table is not None:
        lines += ["| attribute | accuracy | images |", "|---|---:|---:|"]
        lines += [f"| {name} | {value:.1%} | {count} |" for name, value, count in table.rows()]
        lines.append("")
    recommended = read_generation_defaults(folder)
    if recommended:
        lines += ["`generation_defaults.json` makes these the settings of every request that leaves them unset: "
                  + ", ".join(f"{name} = {json.dumps(value)}" for name, value in recommended.items()) + ".", ""]
    words = sorted(read_vocabulary(folder) or [])
    lines += ["## Vocabulary", "", "The words of its training captions (prompts with other words still generate,",
              "with a warning):", "", ", ".join(words), ""]
    path = folder / "README.md"
    path.write_text("\n".join(lines))
    return path
