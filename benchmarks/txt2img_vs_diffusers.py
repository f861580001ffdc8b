"""Text-to-image speed and peak memory: Dapple vs diffusers' StableDiffusionPipeline, same machine, one run.

The SD 1.5 architecture (UNet 860M, VAE 84M, CLIP ViT-L/14 text encoder 123M parameters) is built from its
configs with random weights (nothing is downloaded) and saved once as a diffusers folder. Then Dapple and
diffusers load that folder and generate with the same sampler, size, steps, seed and guidance, alternately, each
run in a fresh process so that peak memory is measured per process. Each process warms up with one 1-step image,
then times --repeats images; shared CPUs are noisy, so the median over all timed images is the headline.

    python benchmarks/txt2img_vs_diffusers.py                      # CPU defaults: 256x256, 4 steps, 2 rounds
    python benchmarks/txt2img_vs_diffusers.py --device cuda --size 512 --steps 20 --rounds 3
    python benchmarks/txt2img_vs_diffusers.py --builtin --size 64 --steps 20 --repeats 10   # the built-in model

Prints seconds per image and peak memory (CPU: process peak RSS; CUDA: peak allocated) for each, and the ratio
Dapple / diffusers (below 1 means Dapple is faster or leaner).
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


def worker(args: argparse.Namespace) -> None:
    """One measured run in this process; prints a JSON line."""
    import torch

    import dapple
    from dapple.samplers import create_scheduler

    torch.set_grad_enabled(False)
    dtype = torch.float16 if args.device.startswith("cuda") else torch.float32
    settings = dict(width=args.size, height=args.size, guidance_scale=7.0)
    if args.worker == "dapple":
        pipe = dapple.load(args.model_dir, device=args.device, dtype=dtype)

        def run(steps: int):
            # guidance at every step, as diffusers does, whatever the model folder recommends
            return pipe.generate(args.prompt, negative_prompt=args.negative, steps=steps, seed=args.seed,
                                 sampler=args.sampler, guidance_min_timestep=0, **settings).images[0]
    else:
        from diffusers import StableDiffusionPipeline

        pipe = StableDiffusionPipeline.from_pretrained(
            args.model_dir, torch_dtype=dtype, safety_checker=None, requires_safety_checker=False
        ).to(args.device)
        pipe.set_progress_bar_config(disable=True)
        config = dict(pipe.scheduler.config)

        def run(steps: int):
            pipe.scheduler = create_scheduler(args.sampler, config, seeds=[args.seed])
            generator = torch.Generator("cpu").manual_seed(args.seed)
            return pipe(args.prompt, negative_prompt=args.negative, num_inference_steps=steps, generator=generator,
                        **settings).images[0]

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
    print(json.dumps({"who": args.worker, "seconds": seconds, "peak_mb": peak_memory_mb(args.device)}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--sampler", default="DPM++ 2M Karras")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=2, help="processes per side, alternating")
    parser.add_argument("--repeats", type=int, default=3, help="timed images per process")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--model-dir", help="reuse (or create) the random SD 1.5 folder here")
    parser.add_argument("--builtin", action="store_true", help="measure Dapple's built-in model instead")
    parser.add_argument("--prompt", default=None, help="default: an SD prompt, or a shapes caption with --builtin")
    parser.add_argument("--negative", default=None)
    parser.add_argument("--worker", choices=["dapple", "diffusers"], help=argparse.SUPPRESS)
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

    runs: dict[str, list[dict]] = {"dapple": [], "diffusers": []}
    for round_index in range(args.rounds):
        order = ("dapple", "diffusers") if round_index % 2 == 0 else ("diffusers", "dapple")
        for who in order:
            command = [sys.executable, __file__, "--worker", who, "--model-dir", args.model_dir,
                       "--prompt", args.prompt, "--negative", args.negative,
                       "--size", str(args.size), "--steps", str(args.steps), "--sampler", args.sampler,
                       "--seed", str(args.seed), "--device", args.device, "--repeats", str(args.repeats),
                       "--save", str(Path(scratch.name) / f"{who}.png")]
            output = subprocess.run(command, capture_output=True, text=True, check=True).stdout
            result = json.loads(output.strip().splitlines()[-1])
            runs[who].append(result)
            times = " ".join(f"{t:.2f}" for t in result["seconds"])
            print(f"round {round_index + 1} {who:<9} {times} s  peak {result['peak_mb']:.0f} MB", file=sys.stderr)

    all_times = {who: [t for r in rs for t in r["seconds"]] for who, rs in runs.items()}
    seconds = {who: statistics.median(times) for who, times in all_times.items()}
    best = {who: min(times) for who, times in all_times.items()}
    peak = {who: max(r["peak_mb"] for r in rs) for who, rs in runs.items()}
    import numpy as np
    import torch
    from PIL import Image

    pixels = {who: np.asarray(Image.open(Path(scratch.name) / f"{who}.png"), dtype=np.int16) for who in runs}
    difference = int(np.abs(pixels["dapple"] - pixels["diffusers"]).max())

    machine = f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}"
    print(f"{model_name}, {args.size}x{args.size}, {args.steps} steps, {args.sampler}, "
          f"CFG 7, batch 1, device {args.device} ({machine}), {args.rounds} processes x {args.repeats} images each")
    print(f"{'':<10} {'median s/image':>15} {'best s/image':>13} {'peak MB':>9}")
    for who in ("dapple", "diffusers"):
        print(f"{who:<10} {seconds[who]:>15.2f} {best[who]:>13.2f} {peak[who]:>9.0f}")
    print(f"{'ratio':<10} {seconds['dapple'] / seconds['diffusers']:>15.3f} {best['dapple'] / best['diffusers']:>13.3f} "
          f"{peak['dapple'] / peak['diffusers']:>9.3f}   (Dapple / diffusers)")
    print(f"largest pixel difference between the two images: {difference} of 255")
    scratch.cleanup()


if __name__ == "__main__":
    main()
