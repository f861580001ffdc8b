"""Train the built-in ControlNet: edge maps of shapes-world scenes steer the frozen built-in model.

ControlNet (Zhang, Rao & Agrawala, 2023, "Adding Conditional Control to Text-to-Image Diffusion Models"): a
trainable copy of the UNet's encoder and middle block (diffusers' ControlNetModel.from_unet) reads the control map
through a small conditioning embedding and adds its features to the frozen UNet's skip connections through zero
convolutions, so training starts exactly at the base model. Here the base is Dapple's built-in model (its VAE,
text encoder and UNet stay frozen) and the control map is `dapple.engine.preprocessors.canny` of the drawn scene,
the function users run on their pictures.

The loss is the built-in recipe's (dapple.train.diffusion_loss): v-prediction on the zero-terminal-SNR schedule,
min-SNR-gamma weighting with a floor, extra weight on the latent cells the shape covers, a share of timesteps
from the top of the schedule. Captions are a mix (see ControlNetConfig): the control must carry shape, size and
position, the prompt colour and background. EMA weights are what gets exported.

Every batch is a pure function of (seed, step), so a run stopped at any point and resumed from its last
checkpoint continues with exactly the data it would have seen, and ends with the same weights.
"""

from __future__ import annotations

import copy
import json
import math
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers import ControlNetModel, DDPMScheduler
from diffusers.training_utils import EMAModel
from PIL import Image
from tqdm import tqdm

from dapple.engine.preprocessors import canny
from dapple.train.builtin_training import TrainingConfig, builtin_schedule_config, images_to_tensor
from dapple.train.checkpoint import load_checkpoint, save_checkpoint
from dapple.train.data.captions import caption_for
from dapple.train.data.shapes import ShapesWorld
from dapple.train.diffusion_loss import diffusion_target, min_snr_loss, object_cell_weights, sample_timesteps

BUILTIN_DIR = Path(__file__).resolve().parents[1] / "models" / "assets" / "builtin"
CAPTION_KINDS = ("full", "colours", "empty")


def colours_caption(colour: str, background: str) -> str:
    """The prompt that names only what a control map cannot show: the shape's colour and the background.

    "shape" is not among the built-in model's training words (vocabulary.json); its CLIP token still has an
    embedding (never trained, so close to its random start), and without a control the frozen model draws
    these prompts' colours and backgrounds as well as with a shape word (measured in ControlNetConfig)."""
    return f"a {colour} shape on a {background} background"


def control_tensor(maps: list[Image.Image]) -> torch.Tensor:
    """RGB control maps -> (batch, 3, H, W) floats in [0, 1]: what diffusers' ControlNet pipelines feed
    (VaeImageProcessor with do_normalize=False)."""
    array = np.stack([np.asarray(image.convert("RGB"), dtype=np.float32) for image in maps]) / 255.0
    return torch.from_numpy(array).permute(0, 3, 1, 2)


@dataclass(frozen=True)
class ControlNetConfig:
    """Every number that decides the ControlNet's weights. The defaults are the shipped recipe."""

    seed: int = 0
    # The frozen base: a diffusers model folder (None: the built-in model shipped with Dapple).
    base: str | None = None
    # A ControlNet folder to start from (a continuation with its own schedule and settings; None: from_unet).
    init_from: str | None = None
    # One entry per conditioning-embedding level: 3 levels downsample by 4, the built-in VAE's 64 px -> 16.
    conditioning_channels: tuple[int, ...] = (16, 32, 64)
    steps: int = 3000
    batch_size: int = 32
    learning_rate: float = 3e-4
    warmup_steps: int = 100
    # Caption mix, shares of each batch (the rest are emptied). The evaluation prompts name colour and background
    # only, so that is half of the mix; empty captions (the ControlNet paper drops 50%) make the control carry
    # shape and position on its own and keep classifier-free guidance's unconditional pass controlled; full
    # captions keep the ControlNet agreeing with prompts that do name the shape and place.
    full_caption_share: float = 0.25
    colours_caption_share: float = 0.5
    min_snr_gamma: float = 5.0
    x0_weight_floor: float = 1.0
    object_loss_weight: float = 3.0
    high_timestep_share: float = 0.3  # of each batch, timesteps from [high_timestep_from, 1000): layout is made there
    high_timestep_from: int = 850
    ema_power: float = 0.75
    scene_pool: int = 10000  # training scenes encoded once to latents and edge maps
    checkpoint_every: int = 100
    log_every: int = 25

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def empty_caption_share(self) -> float:
        return max(0.0, 1.0 - self.full_caption_share - self.colours_caption_share)


# Fields `dapple train controlnet` sets with options of its own, not with --set NAME=VALUE.
_OWN_OPTIONS = ("seed", "base", "init_from", "steps", "batch_size")


def config_overrides(settings: list[str]) -> dict[str, Any]:
    """Parse NAME=VALUE strings (the CLI's --set) into ControlNetConfig fields, each of its field's type."""
    defaults = ControlNetConfig().as_dict()
    allowed = [name for name in defaults if name not in _OWN_OPTIONS]
    overrides: dict[str, Any] = {}
    for setting in settings:
        name, equals, text = setting.partition("=")
        name = name.strip()
        if not equals or name not in allowed:
            raise ValueError(f"--set {setting!r}: expected NAME=VALUE with NAME one of: {', '.join(allowed)}")
        kind = str if defaults[name] is None else type(defaults[name])  # (None defaults are optional paths)
        try:
            value = text if kind is str else json.loads(text)
            if kind is float and type(value) is int:
                value = float(value)
            if kind is tuple and isinstance(value, list) and all(type(v) is int and v > 0 for v in value):
                value = tuple(value)
            if type(value) is not kind:
                raise ValueError
        except ValueError:
            raise ValueError(f"--set {setting!r}: {name} takes {kind.__name__} values, not {text!r}") from None
        overrides[name] = value
    return overrides


def config_settings(config: ControlNetConfig) -> list[str]:
    """The --set NAME=VALUE strings that, with the command's own options, recreate `config` from the defaults."""
    defaults = ControlNetConfig().as_dict()

    def text(value: Any) -> str:
        return value if isinstance(value, str) else json.dumps(list(value) if isinstance(value, tuple) else value)

    return [f"{name}={text(value)}" for name, value in config.as_dict().items() if name not in _OWN_OPTIONS and value != defaults[name]]


def stored_config(fields: dict[str, Any]) -> ControlNetConfig:
    """A ControlNetConfig from its JSON form (a checkpoint's); fields added since count as their defaults."""
    known = ControlNetConfig().as_dict()
    values = {name: fields[name] for name in known if name in fields}
    if "conditioning_channels" in values:
        values["conditioning_channels"] = tuple(values["conditioning_channels"])
    return ControlNetConfig(**values)


def _lr_factor(step: int, warmup: int, total: int) -> float:
    """Linear warm-up, then cosine decay to a tenth (the built-in recipe's schedule)."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def load_base(folder: Path):
    """The frozen base networks of a diffusers model folder, in float32: (tokenizer, text encoder, VAE, UNet)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    from dapple.models.tokenizer import folder_tokenizer

    for name in ("text_encoder", "unet", "vae"):
        if not (folder / name / "config.json").is_file():
            raise ValueError(f"base: {folder} holds no {name} (no {name}/config.json); give a diffusers model folder")
    text_encoder = CLIPTextModel.from_pretrained(str(folder / "text_encoder"), torch_dtype=torch.float32)
    vae = AutoencoderKL.from_pretrained(str(folder / "vae"), torch_dtype=torch.float32)
    unet = UNet2DConditionModel.from_pretrained(str(folder / "unet"), torch_dtype=torch.float32)
    for network in (text_encoder, vae, unet):
        network.eval().requires_grad_(False)
    return folder_tokenizer(folder), text_encoder, vae, unet


def base_schedule(folder: Path) -> DDPMScheduler:
    """The noise schedule the base UNet was trained on, for training (from its scheduler config)."""
    path = folder / "scheduler" / "scheduler_config.json"
    if not path.is_file():  # a folder without one: the built-in recipe's schedule
        return DDPMScheduler(**builtin_schedule_config(TrainingConfig(), training=True))
    stored = json.loads(path.read_text())
    keys = ("beta_start", "beta_end", "beta_schedule", "num_train_timesteps", "prediction_type",
            "rescale_betas_zero_snr")
    return DDPMScheduler(**{key: stored[key] for key in keys if key in stored})


class ControlNetTrainer:
    """Runs (or resumes) a ControlNet training run in `out_dir` and exports the diffusers folder to out_dir/model."""

    def __init__(self, out_dir: str | Path, config: ControlNetConfig | None = None, device: str = "cpu") -> None:
        self.out_dir = Path(out_dir)
        self.config = config or ControlNetConfig()
        self.device = torch.device(device)
        self.checkpoint_path = self.out_dir / "checkpoint.pt"
        self.log_path = self.out_dir / "train.log"
        self.base_dir = Path(self.config.base) if self.config.base else BUILTIN_DIR
        self.tokenizer, self.text_encoder, self.vae, self.unet = load_base(self.base_dir)
        for network in (self.text_encoder, self.vae, self.unet):
            network.to(self.device)
        self.noise_schedule = base_schedule(self.base_dir)
        torch.manual_seed(self.config.seed)
        self.controlnet = ControlNetModel.from_unet(
            self.unet, conditioning_embedding_out_channels=self.config.conditioning_channels).to(self.device)
        if self.config.init_from is not None:
            self._load_init(Path(self.config.init_from))
        self.controlnet.train().requires_grad_(True)
        self.step = 0
        self._budget: int | None = None
        self._pool: tuple[list, torch.Tensor, torch.Tensor, torch.Tensor] | None = None
        self.optimizer = torch.optim.AdamW(self.controlnet.parameters(), lr=self.config.learning_rate)
        self.ema = EMAModel(self.controlnet.parameters(), use_ema_warmup=True, power=self.config.ema_power)
        self._resume()

    @classmethod
    def from_run(cls, out_dir: str | Path, device: str = "cpu") -> "ControlNetTrainer":
        """The trainer of an existing run folder, with the config its checkpoint was written with."""
        state = load_checkpoint(Path(out_dir) / "checkpoint.pt")
        if state is None:
            raise ValueError(f"{out_dir} holds no checkpoint.pt; train with `dapple train controlnet --out "
                             f"{out_dir}` first")
        return cls(out_dir, stored_config(json.loads(state["config"])), device=device)

    # -- checkpoints ------------------------------------------------------------------------------------------
    def _state(self) -> dict[str, Any]:
        return {
            "config": json.dumps(self.config.as_dict()),
            "step": self.step,
            "controlnet": self.controlnet.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "ema": self.ema.state_dict(),
        }

    def _resume(self) -> None:
        state = load_checkpoint(self.checkpoint_path)
        if state is None:
            return
        if stored_config(json.loads(state["config"])) != self.config:
            raise ValueError(f"{self.checkpoint_path} was written with a different ControlNet training config; "
                             "use a new output folder or the same settings")
        self.step = state["step"]
        self.controlnet.load_state_dict(state["controlnet"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.ema.load_state_dict(state["ema"])

    def _load_init(self, folder: Path) -> None:
        """Start from the weights of a ControlNet folder with this run's architecture."""
        if not (folder / "config.json").is_file():
            raise ValueError(f"init_from: {folder} is not a ControlNet folder (no config.json)")
        source = ControlNetModel.from_pretrained(str(folder), torch_dtype=torch.float32)
        try:
            self.controlnet.load_state_dict(source.state_dict())
        except RuntimeError as error:
            raise ValueError(f"init_from: the ControlNet in {folder} has another architecture than this run's "
                             f"(conditioning_channels={list(self.config.conditioning_channels)}): {error}") from None

    def save(self) -> None:
        save_checkpoint(self.checkpoint_path, self._state())

    def _log(self, record: dict[str, Any]) -> None:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "a") as handle:
            handle.write(json.dumps({"time": round(time.time(), 1), **record}) + "\n")

    # -- data -------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def scene_pool(self) -> tuple[list, torch.Tensor, torch.Tensor, torch.Tensor]:
        """The training scenes (split "train": never a held-out combination): their specs, scaled latents
        (VAE posterior mean), edge maps (uint8, one channel: canny's three are equal) and loss weights."""
        if self._pool is not None:
            return self._pool
        world = ShapesWorld(seed=self.config.seed, split="train")
        scaling = float(self.vae.config.scaling_factor)
        specs, latents, edges, weights = [], [], [], []
        for start in range(0, self.config.scene_pool, 256):
            scenes = world.scenes(start, min(256, self.config.scene_pool - start))
            images = [s.image for s in scenes]
            specs += [s.spec for s in scenes]
            batch = self.vae.encode(images_to_tensor(images).to(self.device)).latent_dist.mean * scaling
            latents.append(batch)
            edges.append(torch.from_numpy(np.stack([np.asarray(canny(image))[..., 0] for image in images])))
            weights.append(object_cell_weights([s.mask for s in scenes], batch.shape[-1],
                                               self.config.object_loss_weight))
        self._pool = (specs, torch.cat(latents), torch.cat(edges)[:, None], torch.cat(weights).to(self.device))
        return self._pool

    def captions(self, specs: list, rng: random.Random) -> list[str]:
        """One caption per scene, its kind drawn by the config's mix."""
        out = []
        for spec in specs:
            draw = rng.random()
            if draw < self.config.full_caption_share:
                out.append(caption_for(spec, rng))
            elif draw < self.config.full_caption_share + self.config.colours_caption_share:
                out.append(colours_caption(spec.colour, spec.background))
            else:
                out.append("")
        return out

    def batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor, list[str], torch.Tensor]:
        """(latents, control maps in [0, 1], captions, loss weights) of the batch of `step`."""
        specs, latents, edges, weights = self.scene_pool()
        rng = random.Random(f"{self.config.seed}:controlnet:{step}")
        picks = [rng.randrange(len(specs)) for _ in range(self.config.batch_size)]
        captions = self.captions([specs[i] for i in picks], rng)
        control = (edges[picks].float() / 255.0).expand(-1, 3, -1, -1).to(self.device)
        return latents[picks], control, captions, weights[picks]

    @torch.no_grad()
    def encode_text(self, captions: list[str]) -> torch.Tensor:
        ids = self.tokenizer(captions, padding="max_length", max_length=self.tokenizer.model_max_length,
                             truncation=True, return_tensors="pt").input_ids.to(self.device)
        return self.text_encoder(ids)[0]

    # -- the loss and a step ------------------------------------------------------------------------------------
    def loss(self, step: int, controlnet: ControlNetModel | None = None) -> torch.Tensor:
        """The min-SNR-weighted v loss of the frozen UNet, steered by the ControlNet, on the batch of `step`
        (fixed noise and timesteps per step)."""
        controlnet = controlnet or self.controlnet
        latents, control, captions, cell_weights = self.batch(step)
        generator = torch.Generator().manual_seed(self.config.seed * 1_000_003 + step)
        noise = torch.randn(latents.shape, generator=generator).to(self.device)
        total = self.noise_schedule.config.num_train_timesteps
        timesteps = sample_timesteps(latents.shape[0], generator, total, self.config.high_timestep_from,
                                     self.config.high_timestep_share).to(self.device)
        noisy = self.noise_schedule.add_noise(latents, noise, timesteps)
        text = self.encode_text(captions)
        down, mid = controlnet(noisy, timesteps, encoder_hidden_states=text, controlnet_cond=control,
                               return_dict=False)
        prediction = self.unet(noisy, timesteps, encoder_hidden_states=text, down_block_additional_residuals=down,
                               mid_block_additional_residual=mid).sample
        target = diffusion_target(self.noise_schedule, latents, noise, timesteps)
        return min_snr_loss(self.noise_schedule, prediction, target, timesteps, cell_weights,
                            gamma=self.config.min_snr_gamma, floor=self.config.x0_weight_floor)

    def train_step(self, step: int) -> float:
        loss = self.loss(step)
        for group in self.optimizer.param_groups:
            group["lr"] = self.config.learning_rate * _lr_factor(step, self.config.warmup_steps, self.config.steps)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.controlnet.parameters(), 1.0)
        self.optimizer.step()
        self.ema.step(self.controlnet.parameters())
        return loss.item()

    # -- the whole run ---------------------------------------------------------------------------------------------
    def run(self, *, progress: bool = True, stop_after: int | None = None, threads: int | None = 1,
            on_checkpoint=None) -> Path | None:
        """Train what is left, export out_dir/model, and return its path.

        stop_after: train at most this many steps in this call, save a checkpoint and return None if the run is
        not finished by then. threads: torch's CPU threads for the run (1: the machine's other core stays free).
        on_checkpoint(trainer): called after each checkpoint is written (e.g. to export and evaluate it)."""
        if threads is not None:
            torch.set_num_threads(threads)
        torch.set_grad_enabled(True)
        budget = stop_after
        if self.step < self.config.steps and budget != 0:
            self.scene_pool()
        bar = tqdm(total=self.config.steps, initial=self.step, desc="controlnet", unit="step", disable=not progress,
                   dynamic_ncols=True)
        running = None
        try:
            while self.step < self.config.steps:
                if budget is not None and budget <= 0:
                    self.save()
                    return None
                loss = self.train_step(self.step)
                running = loss if running is None else 0.98 * running + 0.02 * loss
                self.step += 1
                if budget is not None:
                    budget -= 1
                bar.update(1)
                bar.set_postfix(loss=f"{running:.4f}")
                if self.step % self.config.log_every == 0 or self.step == self.config.steps:
                    self._log({"stage": "controlnet", "step": self.step, "loss": loss, "smoothed_loss": running})
                if self.step % self.config.checkpoint_every == 0:
                    self.save()
                    if on_checkpoint is not None:
                        on_checkpoint(self)
        finally:
            bar.close()
        self.save()
        return self.export(self.out_dir / "model")

    def ema_controlnet(self) -> ControlNetModel:
        """A copy of the ControlNet holding the EMA weights (what gets exported)."""
        controlnet = copy.deepcopy(self.controlnet)
        self.ema.copy_to(controlnet.parameters())
        return controlnet.eval().requires_grad_(False)

    def export(self, folder: Path) -> Path:
        """Write the EMA weights as a diffusers ControlNetModel folder (float32 safetensors)."""
        controlnet = self.ema_controlnet().cpu()
        controlnet.save_pretrained(str(folder), safe_serialization=True)
        return Path(folder)
