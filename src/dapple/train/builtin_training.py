"""Train the built-in model from scratch on the shapes world: the VAE first, then text encoder and UNet jointly.

Stage 1, VAE (Kingma & Welling, 2014; SD's AutoencoderKL): reconstruction MSE plus a small KL term, decoding the
posterior mean. Its latents' standard deviation sets the scaling factor, as in Rombach et al. (2022). Export
gives the posterior the std its decoder tolerates (vae_posterior.py), so img2img's sampled latents decode cleanly.
Stage 2, diffusion (Ho et al., 2020) on SD's scaled_linear betas rescaled to zero terminal SNR, with
v-prediction (Salimans & Ho, 2022; Lin et al., 2024, "Common Diffusion Noise Schedules and Sample Steps are
Flawed"): the text encoder and UNet learn together; ~10% of captions are emptied so that classifier-free guidance
works (Ho & Salimans, 2022); the loss is weighted by min-SNR-gamma (Hang et al., 2023) with a floor, and more in
the latent cells the shape covers; a share of every batch's timesteps (half at first, falling over the run) comes
from the top of the schedule, where a shape's position is decided (see TrainingConfig for the measurements behind
these choices); EMA weights are what gets exported.

Every batch is a pure function of (seed, stage, step), so a run stopped at any point and resumed from its last
checkpoint continues with exactly the data it would have seen.
"""

from __future__ import annotations

import copy
import json
import math
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDPMScheduler
from diffusers.training_utils import EMAModel
from PIL import Image
from tqdm import tqdm

from dapple.models.tiny import SD15_SCHEDULER_CONFIG
from dapple.models.tokenizer import bundled_clip_tokenizer
from dapple.train.builtin_model import Architecture, export_diffusers_folder
from dapple.train.checkpoint import load_checkpoint, save_checkpoint
from dapple.train.data.captions import caption_for
from dapple.train.data.shapes import ShapesWorld
from dapple.train.diffusion_loss import diffusion_target, min_snr_loss, object_cell_weights, sample_timesteps
from dapple.train.evaluate import evaluate_reconstructions
from dapple.train.noise import multires_noise
from dapple.train.vae_posterior import calibrate_posterior_std


@dataclass(frozen=True)
class TrainingConfig:
    """Every number that decides the weights. The defaults are the shipped recipe."""

    seed: int = 0
    architecture: Architecture = field(default_factory=Architecture)
    # 1500 steps at a constant 1e-3 without clipping spiked at step ~1100 (loss 0.006 -> 0.19) and ended at
    # 27.2 dB, its reconstructions' shapes graded 88.5%: below the 90% bar before any diffusion. So: warm-up,
    # cosine decay to a tenth, gradients clipped, twice the steps.
    vae_steps: int = 3000
    vae_batch_size: int = 32
    vae_learning_rate: float = 1e-3
    vae_warmup_steps: int = 100
    vae_kl_weight: float = 1e-6
    diffusion_steps: int = 3000
    diffusion_batch_size: int = 64
    diffusion_learning_rate: float = 1e-3
    warmup_steps: int = 300
    empty_caption_rate: float = 0.1
    min_snr_gamma: float = 5.0
    # Position is decided at the top of the noise schedule, and is learned from the caption only if nothing else
    # tells it there. Measured on a position-only probe (runs of 400-600 steps, fixed colour and shape):
    # - SD's schedule leaks: x_T keeps sqrt(alpha_bar_T) ~ 0.07 of the latents, and on 16x16 latents that is enough
    #   for the UNet to find the shape (x0 predicted from t=900 put it exactly where the training image had it).
    #   Epsilon or v targets, white or multi-resolution noise, an x0-weight floor: the sampled position always
    #   followed the seed, whatever the caption said (full runs of 4000-5000 steps: position 11%, chance).
    # - Zero terminal SNR (Lin et al., 2024, "Common Diffusion Noise Schedules and Sample Steps are Flawed": SD's
    #   betas rescaled so that x_T is pure noise) with v-prediction removes the leak, but timesteps drawn uniformly
    #   give the top of the schedule too few samples: after 600 steps x0 at t=999 was the same centred blob for
    #   every position word. Trained on t >= 990 alone, the same UNet moved x0's centroid toward each word's
    #   quadrant within 400 steps.
    # So: zero-terminal-SNR betas, v-prediction, and a share of every batch drawn from the top of the schedule.
    prediction_type: str = "v_prediction"
    zero_terminal_snr: bool = True
    high_timestep_share: float = 0.5  # of each batch, timesteps drawn from [high_timestep_from, 1000) at step 0
    high_timestep_from: int = 850
    # ...falling linearly to this share at the last step. Once the layout is learned, the detail (corners) is made at
    # lower t: builtin-v6 continued 1000 steps at share 0.1 gained on every attribute (shape 54 -> 57.5%).
    high_timestep_share_end: float = 0.2
    # Extra loss weight on the latent cells a scene's shape touches (its mask, grown by one cell). A small shape
    # is ~25 of 256 latent cells and a circle differs from a square in a few of them, so with a plain mean the
    # shape word earns almost nothing: builtin-v6 drew most small squares as round blobs, at any CFG.
    object_loss_weight: float = 3.0
    # The loss weight in x0 terms is min(SNR, gamma) (min-SNR-gamma) but never below x0_weight_floor: min-SNR
    # alone weights t=999 by SNR = 0, where the layout is decided.
    x0_weight_floor: float = 1.0
    multires_noise_discount: float = 0.0  # multi-resolution noise (dapple.train.noise); off: white noise
    multires_noise_from_step: int = 0
    # A model folder whose VAE (weights and scaling factor) stage 2 trains on, skipping stage 1. The VAE is the
    # slow half of a CPU run; one trained with the same architecture by this recipe can be reused.
    vae_from: str | None = None
    # A model folder whose VAE, text encoder and UNet stage 2 starts from (fine-tuning: a continuation with its
    # own learning-rate schedule and loss settings). Exclusive with vae_from, which it includes.
    init_from: str | None = None
    ema_power: float = 0.75  # EMA warm-up: decay reaches 0.999 after ~10k steps
    scene_pool: int = 20000  # training scenes encoded once to latents for stage 2
    checkpoint_every: int = 250
    log_every: int = 50

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


# Fields the `dapple train builtin` command sets with options of their own, not with --set NAME=VALUE.
_OWN_OPTIONS = ("seed", "architecture", "vae_steps", "diffusion_steps", "vae_from", "init_from")


def config_overrides(settings: list[str]) -> dict[str, Any]:
    """Parse NAME=VALUE strings (the CLI's --set) into TrainingConfig fields, each value of its field's type."""
    defaults = TrainingConfig().as_dict()
    allowed = [name for name in defaults if name not in _OWN_OPTIONS]
    overrides: dict[str, Any] = {}
    for setting in settings:
        name, equals, text = setting.partition("=")
        name = name.strip()
        if not equals or name not in allowed:
            raise ValueError(f"--set {setting!r}: expected NAME=VALUE with NAME one of: {', '.join(allowed)}")
        kind = type(defaults[name])
        try:
            value = text if kind is str else json.loads(text)
            if kind is float and type(value) is int:
                value = float(value)
            if type(value) is not kind:
                raise ValueError
        except ValueError:
            raise ValueError(f"--set {setting!r}: {name} takes {kind.__name__} values, not {text!r}") from None
        overrides[name] = value
    return overrides


def config_settings(config: TrainingConfig) -> list[str]:
    """The --set NAME=VALUE strings that, with the command's own options, recreate `config` from the defaults."""
    defaults = TrainingConfig().as_dict()
    return [f"{name}={value if isinstance(value, str) else json.dumps(value)}"
            for name, value in config.as_dict().items() if name not in _OWN_OPTIONS and value != defaults[name]]


def builtin_schedule_config(config: TrainingConfig, training: bool = False) -> dict[str, Any]:
    """The noise schedule of a run: SD 1.x's scaled_linear betas, rescaled to zero terminal SNR when the config
    says so, with its prediction type. training=False adds what samplers need: trailing timestep spacing, so that
    sampling starts at t=999 where x_T is pure noise (Lin et al., 2024, section 3.3)."""
    keys = ("beta_start", "beta_end", "beta_schedule", "num_train_timesteps")
    schedule = {key: SD15_SCHEDULER_CONFIG[key] for key in keys}
    schedule["prediction_type"] = config.prediction_type
    if config.zero_terminal_snr:
        schedule["rescale_betas_zero_snr"] = True
    if not training:
        schedule = {**SD15_SCHEDULER_CONFIG, **schedule, "clip_sample": False}
        if config.zero_terminal_snr:
            schedule["timestep_spacing"] = "trailing"  # (steps_offset only shifts "leading" spacing)
    return schedule


def images_to_tensor(images: list) -> torch.Tensor:
    """PIL images -> (batch, 3, 64, 64) floats in [-1, 1]."""
    array = np.stack([np.asarray(image, dtype=np.float32) for image in images]) / 127.5 - 1
    return torch.from_numpy(array).permute(0, 3, 1, 2)


def tensor_to_images(batch: torch.Tensor) -> list[Image.Image]:
    """(batch, 3, H, W) floats in [-1, 1] -> PIL images."""
    array = ((batch.detach().cpu().float() / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8)
    return [Image.fromarray(image) for image in array.permute(0, 2, 3, 1).numpy()]


def _lr_factor(step: int, warmup: int, total: int) -> float:
    """Linear warm-up, then cosine decay to a tenth."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


class BuiltinTrainer:
    """Runs (or resumes) the two stages in `out_dir` and exports the diffusers folder to out_dir/model."""

    def __init__(self, out_dir: str | Path, config: TrainingConfig | None = None, device: str = "cpu") -> None:
        self.out_dir = Path(out_dir)
        self.config = config or TrainingConfig()
        self.device = torch.device(device)
        self.checkpoint_path = self.out_dir / "checkpoint.pt"
        self.log_path = self.out_dir / "train.log"
        arch = self.config.architecture
        torch.manual_seed(self.config.seed)
        self.vae = arch.build_vae().to(self.device)
        self.text_encoder = arch.build_text_encoder().to(self.device)
        self.unet = arch.build_unet().to(self.device)
        self.tokenizer = bundled_clip_tokenizer()
        self.noise_schedule = DDPMScheduler(**builtin_schedule_config(self.config, training=True))
        self.stage, self.step = "vae", 0
        self._budget: int | None = None  # steps this run() call may still take (None: no limit)
        self.vae_optimizer = torch.optim.AdamW(self.vae.parameters(), lr=self.config.vae_learning_rate)
        self.optimizer = torch.optim.AdamW(
            [*self.unet.parameters(), *self.text_encoder.parameters()], lr=self.config.diffusion_learning_rate
        )
        self.ema_unet = EMAModel(self.unet.parameters(), use_ema_warmup=True, power=self.config.ema_power)
        self.ema_text = EMAModel(self.text_encoder.parameters(), use_ema_warmup=True, power=self.config.ema_power)
        self._resume()

    # -- checkpoints ------------------------------------------------------------------------------------------
    def _state(self) -> dict[str, Any]:
        return {
            "config": json.dumps(self.config.as_dict()),
            "stage": self.stage,
            "step": self.step,
            "vae": self.vae.state_dict(),
            "vae_optimizer": self.vae_optimizer.state_dict(),
            "scaling_factor": float(self.vae.config.scaling_factor),
            "text_encoder": self.text_encoder.state_dict(),
            "unet": self.unet.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "ema_unet": self.ema_unet.state_dict(),
            "ema_text": self.ema_text.state_dict(),
        }

    def _resume(self) -> None:
        state = load_checkpoint(self.checkpoint_path)
        if state is None:
            if self.config.vae_from is not None and self.config.init_from is not None:
                raise ValueError("give vae_from or init_from, not both (init_from reuses the folder's VAE too)")
            if self.config.init_from is not None:
                self._load_model(Path(self.config.init_from))
            elif self.config.vae_from is not None:
                self._load_vae(Path(self.config.vae_from), "vae_from")
            return
        stored = json.loads(state["config"])
        # A field added to TrainingConfig after the checkpoint was written counts as its default value.
        defaults = json.loads(json.dumps(TrainingConfig().as_dict()))
        stored = {**{name: value for name, value in defaults.items() if name not in stored}, **stored}
        if stored != json.loads(json.dumps(self.config.as_dict())):
            raise ValueError(
                f"{self.checkpoint_path} was written with a different training config; "
                "use a new output folder or the same settings"
            )
        self.stage, self.step = state["stage"], state["step"]
        self.vae.load_state_dict(state["vae"])
        self.vae_optimizer.load_state_dict(state["vae_optimizer"])
        self.vae.register_to_config(scaling_factor=state["scaling_factor"])
        self.text_encoder.load_state_dict(state["text_encoder"])
        self.unet.load_state_dict(state["unet"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.ema_unet.load_state_dict(state["ema_unet"])
        self.ema_text.load_state_dict(state["ema_text"])

    def _load_vae(self, folder: Path, option: str) -> None:
        """Start at stage 2 with the VAE of an exported model folder (its architecture must match this run's)."""
        source = folder / "vae" if (folder / "vae").is_dir() else folder
        if not (source / "config.json").is_file():
            raise ValueError(f"{option}: {folder} holds no VAE (no vae/config.json); give a model folder")
        vae = AutoencoderKL.from_pretrained(str(source), torch_dtype=torch.float32)
        try:
            self.vae.load_state_dict(vae.state_dict())
        except RuntimeError as error:
            raise ValueError(
                f"{option}: the VAE in {folder} has another architecture than this run's: {error}") from None
        self.vae.register_to_config(scaling_factor=float(vae.config.scaling_factor))
        self.stage, self.step = "diffusion", 0

    def _load_model(self, folder: Path) -> None:
        """Start stage 2 from every network of an exported model folder; the EMA starts from its weights too."""
        from diffusers import UNet2DConditionModel
        from transformers import CLIPTextModel

        self._load_vae(folder, "init_from")
        for name, network, loader in (("unet", self.unet, UNet2DConditionModel),
                                      ("text_encoder", self.text_encoder, CLIPTextModel)):
            if not (folder / name / "config.json").is_file():
                raise ValueError(f"init_from: {folder} holds no {name} (no {name}/config.json); give a model folder")
            source = loader.from_pretrained(str(folder / name), torch_dtype=torch.float32)
            try:
                network.load_state_dict(source.state_dict())
            except RuntimeError as error:
                raise ValueError(
                    f"init_from: the {name} in {folder} has another architecture than this run's: {error}") from None
        power = self.config.ema_power
        self.ema_unet = EMAModel(self.unet.parameters(), use_ema_warmup=True, power=power)
        self.ema_text = EMAModel(self.text_encoder.parameters(), use_ema_warmup=True, power=power)

    def save(self) -> None:
        save_checkpoint(self.checkpoint_path, self._state())

    def _log(self, record: dict[str, Any]) -> None:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "a") as handle:
            handle.write(json.dumps({"time": round(time.time(), 1), **record}) + "\n")

    # -- stage 1: the VAE ---------------------------------------------------------------------------------------
    def vae_batch(self, step: int) -> torch.Tensor:
        world = ShapesWorld(seed=self.config.seed, split="train")
        size = self.config.vae_batch_size
        return images_to_tensor([s.image for s in world.scenes(step * size, size)]).to(self.device)

    def vae_loss(self, step: int) -> torch.Tensor:
        images = self.vae_batch(step)
        posterior = self.vae.encode(images).latent_dist
        reconstruction = self.vae.decode(posterior.mean).sample  # the posterior mean: faster for a small VAE
        return F.mse_loss(reconstruction, images) + self.config.vae_kl_weight * posterior.kl().mean()

    def vae_step(self, step: int) -> float:
        loss = self.vae_loss(step)
        for group in self.vae_optimizer.param_groups:
            group["lr"] = self.config.vae_learning_rate * _lr_factor(
                step, self.config.vae_warmup_steps, self.config.vae_steps)
        self.vae_optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.vae.parameters(), 1.0)
        self.vae_optimizer.step()
        return loss.item()

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Scaled latents of images in [-1, 1]."""
        return self.vae.encode(images).latent_dist.mean * self.vae.config.scaling_factor

    @torch.no_grad()
    def reconstruct(self, images: list) -> list:
        """Encode and decode PIL images through the VAE (posterior mean), back to PIL."""
        decoded = self.vae.decode(self.vae.encode(images_to_tensor(images).to(self.device)).latent_dist.mean).sample
        return tensor_to_images(decoded)

    @torch.no_grad()
    def set_scaling_factor(self) -> float:
        """1 / std of the latents, so the diffusion model sees unit-variance data (SD's 0.18215 came so)."""
        world = ShapesWorld(seed=self.config.seed + 1, split="train")
        images = images_to_tensor([s.image for s in world.scenes(0, 512)]).to(self.device)
        latents = self.vae.encode(images).latent_dist.mean
        factor = float(1.0 / latents.std())
        self.vae.register_to_config(scaling_factor=factor)
        return factor

    # -- stage 2: text encoder + UNet ---------------------------------------------------------------------------
    def scene_pool(self) -> tuple[list, torch.Tensor, torch.Tensor]:
        """The training scenes of stage 2: their specs, scaled latents and per-latent-cell loss weights."""
        world = ShapesWorld(seed=self.config.seed, split="train")
        specs, latents, weights = [], [], []
        for start in range(0, self.config.scene_pool, 256):
            scenes = world.scenes(start, min(256, self.config.scene_pool - start))
            specs += [s.spec for s in scenes]
            batch = self.encode(images_to_tensor([s.image for s in scenes]).to(self.device))
            latents.append(batch)
            weights.append(self.object_weights([s.mask for s in scenes], batch.shape[-1]))
        return specs, torch.cat(latents), torch.cat(weights)

    def object_weights(self, masks: list[np.ndarray], latent_side: int) -> torch.Tensor:
        """(n, 1, side, side) loss weights: 1 + object_loss_weight on the latent cells the shape touches, grown by
        one cell so that both sides of its outline count."""
        return object_cell_weights(masks, latent_side, self.config.object_loss_weight).to(self.device)

    def diffusion_batch(
        self, step: int, specs: list, latents: torch.Tensor, weights: torch.Tensor,
    ) -> tuple[torch.Tensor, list[str], torch.Tensor]:
        """(latents, captions, loss weights) of the batch of `step`."""
        rng = random.Random(f"{self.config.seed}:diffusion:{step}")
        picks = [rng.randrange(len(specs)) for _ in range(self.config.diffusion_batch_size)]
        captions = ["" if rng.random() < self.config.empty_caption_rate else caption_for(specs[i], rng) for i in picks]
        return latents[picks], captions, weights[picks]

    def diffusion_loss(self, step: int, specs: list, pool: torch.Tensor, pool_weights: torch.Tensor) -> torch.Tensor:
        """The min-SNR-weighted loss (epsilon or v target, as the config says) on the batch of `step` (fixed noise
        and timesteps per step), each latent cell weighted by pool_weights (from scene_pool)."""
        latents, captions, cell_weights = self.diffusion_batch(step, specs, pool, pool_weights)
        generator = torch.Generator().manual_seed(self.config.seed * 1_000_003 + step)
        discount = self.config.multires_noise_discount if step >= self.config.multires_noise_from_step else 0.0
        noise = multires_noise(tuple(latents.shape), generator, discount).to(self.device)
        timesteps = self.sample_timesteps(latents.shape[0], generator, self.high_timestep_share(step)).to(self.device)
        noisy = self.noise_schedule.add_noise(latents, noise, timesteps)
        ids = self.tokenizer(captions, padding="max_length", max_length=77, truncation=True,
                             return_tensors="pt").input_ids.to(self.device)
        text = self.text_encoder(ids)[0]
        prediction = self.unet(noisy, timesteps, encoder_hidden_states=text).sample
        target = diffusion_target(self.noise_schedule, latents, noise, timesteps)
        return min_snr_loss(self.noise_schedule, prediction, target, timesteps, cell_weights,
                            gamma=self.config.min_snr_gamma, floor=self.config.x0_weight_floor)

    def high_timestep_share(self, step: int) -> float:
        """The share of a batch drawn from the top of the schedule: linear from high_timestep_share at step 0 to
        high_timestep_share_end at the last step."""
        progress = step / max(1, self.config.diffusion_steps - 1)
        start, end = self.config.high_timestep_share, self.config.high_timestep_share_end
        return start + (end - start) * min(1.0, progress)

    def sample_timesteps(self, count: int, generator: torch.Generator, high_share: float) -> torch.Tensor:
        """Uniform timesteps, a high_share of them from the top of the schedule instead."""
        return sample_timesteps(count, generator, self.noise_schedule.config.num_train_timesteps,
                                self.config.high_timestep_from, high_share)

    def diffusion_step(self, step: int, specs: list, pool: torch.Tensor, pool_weights: torch.Tensor) -> float:
        loss = self.diffusion_loss(step, specs, pool, pool_weights)
        for group in self.optimizer.param_groups:
            group["lr"] = self.config.diffusion_learning_rate * _lr_factor(
                step, self.config.warmup_steps, self.config.diffusion_steps)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([*self.unet.parameters(), *self.text_encoder.parameters()], 1.0)
        self.optimizer.step()
        self.ema_unet.step(self.unet.parameters())
        self.ema_text.step(self.text_encoder.parameters())
        return loss.item()

    # -- the whole run ---------------------------------------------------------------------------------------------
    def _loop(self, name: str, total: int, step_fn, progress: bool) -> bool:
        """Run steps self.step..total of a stage; return False if the run's step budget ran out first."""
        bar = tqdm(total=total, initial=self.step, desc=name, unit="step", disable=not progress, dynamic_ncols=True)
        running = None
        try:
            while self.step < total:
                if self._budget is not None and self._budget <= 0:
                    return False
                loss = step_fn(self.step)
                running = loss if running is None else 0.98 * running + 0.02 * loss
                self.step += 1
                if self._budget is not None:
                    self._budget -= 1
                bar.update(1)
                bar.set_postfix(loss=f"{running:.4f}")
                if self.step % self.config.log_every == 0 or self.step == total:
                    self._log({"stage": name, "step": self.step, "loss": loss, "smoothed_loss": running})
                if self.step % self.config.checkpoint_every == 0:
                    self.save()
        finally:
            bar.close()
        return True

    def run(self, *, progress: bool = True, stop_after: int | None = None) -> Path | None:
        """Train what is left, export out_dir/model, and return its path.

        stop_after: train at most this many steps in this call, save a checkpoint and return None if the run is
        not finished by then (how tests and impatient people split a run)."""
        torch.set_grad_enabled(True)
        self._budget = stop_after
        if self.stage == "vae":
            self.vae.train()
            if not self._loop("vae", self.config.vae_steps, self.vae_step, progress):
                self.save()
                return None
            self.vae.eval()
            factor = self.set_scaling_factor()
            psnr, table = evaluate_reconstructions(self.reconstruct)
            self._log({"stage": "vae", "event": "done", "scaling_factor": factor, "psnr": psnr,
                       "scorer_on_reconstructions": {name: value for name, value, _ in table.rows()}})
            if progress:
                print(f"VAE: held-out reconstruction PSNR {psnr:.1f} dB; scorer on reconstructions:\n{table.format()}")
            self.stage, self.step = "diffusion", 0
            self.save()
        if self.stage == "diffusion":
            if self._budget is not None and self._budget <= 0:  # encoding the pool takes minutes: skip it
                self.save()
                return None
            self.vae.eval().requires_grad_(False)
            specs, pool, pool_weights = self.scene_pool()
            self.unet.train()
            self.text_encoder.train()
            step_fn = lambda step: self.diffusion_step(step, specs, pool, pool_weights)  # noqa: E731
            if not self._loop("diffusion", self.config.diffusion_steps, step_fn, progress):
                self.save()
                return None
            self.stage = "done"
            self.save()
        return self.export(self.out_dir / "model")

    def export(self, folder: Path, dtype: torch.dtype = torch.float16) -> Path:
        """Write the EMA weights as a diffusers folder, the VAE with a calibrated posterior std."""
        unet, text_encoder = copy.deepcopy(self.unet), copy.deepcopy(self.text_encoder)
        self.ema_unet.copy_to(unet.parameters())
        self.ema_text.copy_to(text_encoder.parameters())
        vae = copy.deepcopy(self.vae)
        calibration_images = images_to_tensor(
            [s.image for s in ShapesWorld(seed=self.config.seed + 2, split="train").scenes(0, 256)]).to(self.device)
        calibrate_posterior_std(vae, calibration_images)  # its samples decode like its mean (vae_posterior.py)
        return export_diffusers_folder(folder, vae.cpu().eval(), text_encoder.cpu().eval(), unet.cpu().eval(), dtype,
                                       scheduler_config=builtin_schedule_config(self.config))
