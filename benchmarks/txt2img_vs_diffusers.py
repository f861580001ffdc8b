"""Text-to-image speed and peak memory: Dapple vs diffusers' StableDiffusionPipeline, same machine, one run.

The SD 1.5 architecture (UNet 860M, VAE 84M, CLIP ViT-L/14 text encoder 123M parameters) is built from its
configs with random weights (nothing is downloaded) and saved once as a diffusers folder. Then each configuration
loads that folder and generates with the same sampler, size, steps, seed and guidance, in turn, each run in a fresh
process so that peak memory is measured per process. Each process warms up with one 1-step image, then times
--repeats images; shared CPUs are noisy, so the median over all timed images is the headline.

Configurations (--configs, comma-separated):
    dapple            Dapple's default for the device and model (for SD on the CPU: bf16 where the CPU has it natively,
                      models/precision.py, and the "fast" speed preset, engine/pipeline.default_speed)
    dapple-quality    the default dtype with the exact "quality" speed preset (no step reuse, no token merging)
    dapple-fp32       Dapple in float32 with the quality preset: the bit-exact reproducible mode
    dapple-fast       the default dtype with the fields of --fast-fields (default: the "fast" preset)
    dapple-openvino   the default dtype on the optional OpenVINO backend (dapple[openvino]; the conversion is
                      cached on disk, so run it once before timing: the first load converts for a minute or two)
    diffusers         diffusers' StableDiffusionPipeline in float32 (fp16 on CUDA)
    diffusers-bf16    diffusers in bf16 (torch_dtype=torch.bfloat16)
    diffusers-bf16-cl diffusers in bf16 with the UNet and VAE in channels-last (diffusers' memory-format advice)

    python benchmarks/txt2img_vs_diffusers.py                      # CPU defaults: 256x256, 4 steps, 2 rounds
    python benchmarks/txt2img_vs_diffusers.py --size 512 --steps 20 --rounds 1 --repeats 1
    python benchmarks/txt2img_vs_diffusers.py --device cuda --size 512 --steps 20 --rounds 3
    python benchmarks/txt2img_vs_diffusers.py --builtin --size 64 --steps 20 --repeats 10   # the built-in model
    python benchmarks/txt2img_vs_diffusers.py --latent-error --size 256 --steps 20   # bf16 vs fp32, step by step

Prints seconds per image and peak memory (CPU: process peak RSS; CUDA: peak allocated) for each, each one's ratio to
diffusers fp32 and to diffusers bf16, and each image's PSNR against Dapple's fp32 image.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PROMPT = "a photograph of an astronaut riding a horse"
NEGATIVE = "blurry, low quality"


def build_sd15_random(folder: Path) -> None:
    """Write SD 1.5's architecture with random weights (seeded) as a diffusers folder."""
    import torch
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from dapple.models.tiny import SD15_SCHEDULER_CONFIG
    from dapple.models.tokenizer import bundled_clip_tokenizer

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
        block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768, attention_head_dim=8,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    )
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, sample_size=512,
        block_out_channels=(128, 256, 512, 512),
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
    )
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=49408, hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12,
        max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768,
        bos_token_id=49406, eos_token_id=49407, pad_token_id=49407,
    ))
    StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=bundled_clip_tokenizer(), unet=unet,
        scheduler=PNDMScheduler(**SD15_SCHEDULER_CONFIG), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    ).save_pretrained(str(folder), safe_serialization=True)


def peak_memory_mb(device: str) -> float:
    import torch

    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports kB


def _dtype(name: str, device: str):
    import torch

    if name.endswith("fp32"):
        return torch.float32
    if "bf16" in name:
        return torch.bfloat16
    if name.startswith("dapple"):
        return None  # Dapple's own choice for the device
    return torch.float16 if device.startswith("cuda") else torch.float32


def worker(args: argparse.Namespace) -> None:
    """One measured run of one configuration in this process; prints a JSON line."""
    import torch

    import dapple
    from dapple.samplers import create_scheduler

    torch.set_grad_enabled(False)
    config = args.worker
    dtype = _dtype(config, args.device)
    settings = dict(width=args.size, height=args.size, guidance_scale=7.0)
    if config.startswith("dapple"):
        backend = {"backend": "openvino"} if config == "dapple-openvino" else {}
        pipe = dapple.load(args.model_dir, device=args.device, dtype=dtype, **backend)
        extra = {"dapple-fast": json.loads(args.fast_fields), "dapple-quality": {"speed": "quality"},
                 "dapple-fp32": {"speed": "quality"}}.get(config, {})

        def run(steps: int):
            # guidance at every step, as diffusers does, whatever the model folder recommends
            return pipe.generate(args.prompt, negative_prompt=args.negative, steps=steps, seed=args.seed,
                                 sampler=args.sampler, guidance_min_timestep=0, **settings, **extra).images[0]
        loaded = str(pipe.components.dtype)
    else:
        from diffusers import StableDiffusionPipeline

        pipe = StableDiffusionPipeline.from_pretrained(
            args.model_dir, torch_dtype=dtype, safety_checker=None, requires_safety_checker=False
        ).to(args.device)
        if config.endswith("-cl"):
            pipe.unet.to(memory_format=torch.channels_last)
            pipe.vae.to(memory_format=torch.channels_last)
        pipe.set_progress_bar_config(disable=True)
        scheduler_config = dict(pipe.scheduler.config)

        def run(steps: int):
            pipe.scheduler = create_scheduler(args.sampler, scheduler_config, seeds=[args.seed])
            generator = torch.Generator("cpu").manual_seed(args.seed)
            return pipe(args.prompt, negative_prompt=args.negative, num_inference_steps=steps, generator=generator,
                        **settings).images[0]
        loaded = str(pipe.unet.dtype)

    run(1)  # warm-up: kernel selection, allocator
    seconds = []
    for _ in range(args.repeats):
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        started = time.perf_counter()
        image = run(args.steps)
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        seconds.append(time.perf_counter() - started)
    if args.save:
        image.save(args.save)
    print(json.dumps({"who": config, "dtype": loaded, "seconds": seconds, "peak_mb": peak_memory_mb(args.device)}))


def latent_error(args: argparse.Namespace) -> None:
    """Dapple's default dtype against fp32 (both with the exact quality preset), step by step: the relative error
    of the latents after each step."""
    import torch

    import dapple

    torch.set_grad_enabled(False)
    latents: dict[str, list[torch.Tensor]] = {}
    for name, dtype in (("fp32", "fp32"), ("default", None)):
        pipe = dapple.load(args.model_dir, device=args.device, dtype=dtype)
        steps: list[torch.Tensor] = []
        pipe.generate(args.prompt, negative_prompt=args.negative, steps=args.steps, seed=args.seed,
                      sampler=args.sampler, guidance_min_timestep=0, width=args.size, height=args.size, speed="quality",
                      callback=lambda step, kept=steps: kept.append(step.latents.float().clone()))
        latents[name] = steps
        print(f"{name}: {pipe.components.dtype}", file=sys.stderr)
        del pipe
    print(f"step  relative error of the default's latents against fp32 ({args.size}x{args.size}, {args.sampler})")
    for index, (a, b) in enumerate(zip(latents["fp32"], latents["default"])):
        print(f"{index + 1:>4}  {float((b - a).norm() / a.norm()):.4f}")


CONFIGS = ("dapple", "dapple-quality", "dapple-fp32", "dapple-fast", "dapple-openvino", "diffusers", "diffusers-bf16", "diffusers-bf16-cl")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--sampler", default="DPM++ 2M Karras")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=2, help="processes per configuration, in turn")
    parser.add_argument("--repeats", type=int, default=3, help="timed images per process")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--configs", default="dapple,dapple-quality,dapple-fp32,diffusers,diffusers-bf16",
                        help="comma-separated, from: " + ", ".join(CONFIGS))
    parser.add_argument("--fast-fields", default='{"speed": "fast"}',
                        help="request fields of the dapple-fast configuration (JSON)")
    parser.add_argument("--model-dir", help="reuse (or create) the random SD 1.5 folder here")
    parser.add_argument("--builtin", action="store_true", help="measure Dapple's built-in model instead")
    parser.add_argument("--latent-error", action="store_true", help="the default dtype's per-step error vs fp32")
    parser.add_argument("--prompt", default=None, help="default: an SD prompt, or a shapes caption with --builtin")
    parser.add_argument("--negative", default=None)
    parser.add_argument("--worker", choices=CONFIGS, help=argparse.SUPPRESS)
    parser.add_argument("--save", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)

    scratch = tempfile.TemporaryDirectory(prefix="dapple-bench-")
    model_name = "SD 1.5 architecture (random weights)"
    if args.builtin:
        from dapple.api import BUILTIN_MODEL_DIR

        args.model_dir, model_name = str(BUILTIN_MODEL_DIR), "Dapple's built-in model"
    if args.prompt is None:
        args.prompt = "a red circle at the top left on a blue background" if args.builtin else PROMPT
    if args.negative is None:
        args.negative = "" if args.builtin else NEGATIVE
    if args.model_dir is None:
        args.model_dir = str(Path(scratch.name) / "sd15-random")
    if not (Path(args.model_dir) / "model_index.json").exists():
        print(f"building SD 1.5 architecture with random weights in {args.model_dir} ...", file=sys.stderr)
        build_sd15_random(Path(args.model_dir))
    if args.latent_error:
        return latent_error(args)

    configs = [name.strip() for name in args.configs.split(",") if name.strip()]
    unknown = [name for name in configs if name not in CONFIGS]
    if unknown:
        parser.error(f"unknown configuration(s) {', '.join(unknown)}; allowed: {', '.join(CONFIGS)}")
    runs: dict[str, list[dict]] = {name: [] for name in configs}
    for round_index in range(args.rounds):
        order = configs if round_index % 2 == 0 else configs[::-1]
        for who in order:
            command = [sys.executable, __file__, "--worker", who, "--model-dir", args.model_dir,
                       "--prompt", args.prompt, "--negative", args.negative, "--fast-fields", args.fast_fields,
                       "--size", str(args.size), "--steps", str(args.steps), "--sampler", args.sampler,
                       "--seed", str(args.seed), "--device", args.device, "--repeats", str(args.repeats),
                       "--save", str(Path(scratch.name) / f"{who}.png")]
            output = subprocess.run(command, capture_output=True, text=True, check=True).stdout
            result = json.loads(output.strip().splitlines()[-1])
            runs[who].append(result)
            times = " ".join(f"{t:.2f}" for t in result["seconds"])
            print(f"round {round_index + 1} {who:<17} {result['dtype']:<14} {times} s  peak {result['peak_mb']:.0f} MB",
                  file=sys.stderr)

    seconds = {who: statistics.median([t for r in rs for t in r["seconds"]]) for who, rs in runs.items()}
    peak = {who: max(r["peak_mb"] for r in rs) for who, rs in runs.items()}
    import numpy as np
    import torch
    from PIL import Image

    from dapple.train.data.shapes import images_psnr

    pixels = {who: np.asarray(Image.open(Path(scratch.name) / f"{who}.png")) for who in runs}
    reference = "dapple-fp32" if "dapple-fp32" in pixels else None

    machine = f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}"
    print(f"{model_name}, {args.size}x{args.size}, {args.steps} steps, {args.sampler}, CFG 7, batch 1, device "
          f"{args.device} ({machine}), {args.rounds} process(es) x {args.repeats} image(s) per configuration")
    baselines = [name for name in ("diffusers", "diffusers-bf16") if name in seconds]
    header = f"{'configuration':<18} {'dtype':<15} {'median s/image':>14} {'peak MB':>8}"
    header += "".join(f" {'x vs ' + name:>19}" for name in baselines) + f" {'peak / diffusers':>16}"
    header += f" {'PSNR vs dapple-fp32':>20}" if reference else ""
    print(header)
    for who in configs:
        row = f"{who:<18} {runs[who][0]['dtype'].replace('torch.', ''):<15} {seconds[who]:>14.2f} {peak[who]:>8.0f}"
        row += "".join(f" {seconds[name] / seconds[who]:>19.2f}" for name in baselines)
        row += f" {peak[who] / peak['diffusers']:>16.2f}" if "diffusers" in peak else f" {'':>16}"
        if reference:
            row += f" {images_psnr(pixels[reference], pixels[who]):>20.1f}"
        print(row)
    print("x vs: how many times faster than that configuration (above 1: faster); peak: the process's peak RSS")
    scratch.cleanup()


if __name__ == "__main__":
    main()
