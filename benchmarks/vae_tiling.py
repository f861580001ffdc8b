"""VAE tiling: peak memory, time and seams of a large decode, tiled against untiled, with SD 1.5's VAE.

SD 1.5's VAE architecture (84M parameters) is built from its config with random weights (seeded; nothing is
downloaded). Each decode runs in a fresh process, so that its peak RSS is its own: the untiled decode and two tiled
ones through dapple.engine.latents.decode (diffusers' tiled_decode: 512 px tiles overlapping by a quarter, borders
blended linearly; see dapple.models.memory):
    shared    Dapple's default: every tile's group norms use one set of statistics estimated from the latents
              scaled down to one tile (pkuliyi2015's Tiled VAE, fast mode; dapple.models.tiled_norms)
    per-tile  diffusers' plain tiled decode: each tile normalises by its own statistics

Two latents are decoded (--kinds):
    smooth  low-frequency gradients and waves: the output is smooth, so a seam would show as a line
    noise   unit normal latents: what a random-weight VAE makes of them looks like noise

For each kind and tiled mode it reports the max and mean |tiled - untiled| in the blend zones (where two tiles
mix, 128 px after each 384 px tile step) against the rest of the image, and a seam ratio: the mean pixel step
across the tile lines over the mean pixel step elsewhere (1.0: the lines cannot be told from the rest). It writes
docs/gallery/vae_tiling.png: per-tile | shared | untiled, the whole image (downscaled) over crops at full
resolution around a tile corner, over |tiled - untiled| x 10 of both tiled modes. A random-weight VAE is far more
sensitive to what its group norms and mid-block attention see than a trained one: the tiled/untiled difference
here is an upper bound of what a real VAE shows.

    python benchmarks/vae_tiling.py                          # 2048x2048 (256x256 latents), fp32, 1 thread
    python benchmarks/vae_tiling.py --size 1024 --kinds smooth --picture /tmp/vae_tiling_1024.png   # a quick check

The untiled 2048x2048 decode needs about 16 GB of RAM; the tiled ones stay under 2 GB.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# SD 1.5's vae/config.json (the fields that shape the network).
SD15_VAE = dict(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, sample_size=512,
                block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
                up_block_types=("UpDecoderBlock2D",) * 4, scaling_factor=0.18215)
TILE, OVERLAP = 512, 0.25  # pixels per tile side, and diffusers' tile_overlap_factor
STRIDE = int(TILE // 8 * (1 - OVERLAP)) * 8  # 384 px between tile starts
BLEND = int(TILE * OVERLAP)  # 128 px blended after each tile start
MARGIN = 32  # px at the image's edges left out of the seam ratio's "elsewhere"
MODES = ("untiled", "per-tile", "shared")
TILED = MODES[1:]


def build_vae(dtype):
    import torch
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    return AutoencoderKL(**SD15_VAE).to(dtype).eval().requires_grad_(False)


def make_latents(kind: str, side: int):
    """(1, 4, side, side) latents, scaled as the UNet gives them (unit variance)."""
    import torch

    if kind == "noise":
        return torch.randn((1, 4, side, side), generator=torch.Generator().manual_seed(0))
    y, x = torch.meshgrid(torch.linspace(0, 1, side), torch.linspace(0, 1, side), indexing="ij")
    channels = [2 * x - 1, 2 * y - 1, torch.sin(6.2832 * (x + 0.5 * y)), torch.cos(6.2832 * 1.5 * (x - y))]
    return torch.stack(channels)[None] * 1.5


def worker(args: argparse.Namespace) -> None:
    """One decode in this process: print its peak RSS, time and where it saved the image (JSON)."""
    import numpy as np
    import torch

    from dapple.engine.latents import decode
    from dapple.models.memory import set_tile_size

    torch.set_num_threads(args.threads)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    vae = build_vae(dtype)
    latents = make_latents(args.kind, args.size // 8)
    if args.mode in TILED:  # what memory=MemoryOptions(vae_tiling=True, vae_tile_norms=...) sets on the VAE
        vae.use_tiling = True
        vae.shared_tile_norms = args.mode == "shared"
        set_tile_size(vae, TILE)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    clock = time.perf_counter()
    with torch.inference_mode():
        pixels = decode(vae, latents, SD15_VAE["scaling_factor"])
    seconds = time.perf_counter() - clock
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    np.save(args.save, pixels[0].permute(1, 2, 0).float().numpy())
    print(json.dumps({"seconds": seconds, "peak_rss_mb": peak, "before_decode_mb": before}))


def run_worker(kind: str, mode: str, args: argparse.Namespace, folder: Path) -> dict:
    save = folder / f"{kind}-{mode}.npy"
    command = [sys.executable, __file__, "--worker", "--kind", kind, "--mode", mode, "--size", str(args.size),
               "--dtype", args.dtype, "--threads", str(args.threads), "--save", str(save)]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        return {"error": (done.stderr.strip().splitlines() or [f"exit {done.returncode}"])[-1], "save": None}
    return {**json.loads(done.stdout.strip().splitlines()[-1]), "save": save}


def blend_mask(size: int):
    """True where two tiles mix: the BLEND pixels after each tile start but the first, in either direction."""
    import numpy as np

    line = np.zeros(size, dtype=bool)
    for start in range(STRIDE, size if size > TILE else 0, STRIDE):  # one tile's worth is decoded untiled
        line[start:start + BLEND] = True
    return line[:, None] | line[None, :]


def seam_ratio(image, size: int) -> float:
    """Mean |pixel step| across the tile lines (each tile's start and blend end) over the mean step elsewhere."""
    import numpy as np

    lines = sorted({edge for start in range(STRIDE, size if size > TILE else 0, STRIDE)
                    for edge in (start, start + BLEND) if edge < size})
    if not lines:  # the image fits one tile
        return float("nan")
    steps_y = np.abs(np.diff(image, axis=0)).mean(axis=(1, 2))  # step between row r-1 and r at index r-1
    steps_x = np.abs(np.diff(image, axis=1)).mean(axis=(0, 2))
    at = np.zeros(size - 1, dtype=bool)
    at[[line - 1 for line in lines]] = True
    inside = np.zeros(size - 1, dtype=bool)
    inside[MARGIN:size - 1 - MARGIN] = True  # not the frame the VAE's zero padding draws at the image's edges
    across = np.concatenate([steps_y[at], steps_x[at]]).mean()
    elsewhere = np.concatenate([steps_y[~at & inside], steps_x[~at & inside]]).mean()
    return float(across / elsewhere)


def compare(tiled, untiled, size: int) -> dict:
    import numpy as np

    difference = np.abs(tiled - untiled).max(axis=2)
    zone = blend_mask(size)
    return {"max_diff_blend_zones": float(difference[zone].max()) if zone.any() else 0.0,
            "max_diff_elsewhere": float(difference[~zone].max()),
            "mean_diff_blend_zones": float(difference[zone].mean()) if zone.any() else 0.0,
            "mean_diff_elsewhere": float(difference[~zone].mean()),
            "seam_ratio_tiled": seam_ratio(tiled, size), "seam_ratio_untiled": seam_ratio(untiled, size)}


def picture(images: dict, path: Path) -> None:
    """per-tile | shared | untiled: the whole image (downscaled to 512) over 512 px crops at full resolution
    around the first tile corner; below, |tiled - untiled| x 10 of each tiled mode (whole, then the crop)."""
    import numpy as np
    from PIL import Image, ImageDraw

    untiled = images["untiled"]
    size = untiled.shape[0]
    to_image = lambda array: Image.fromarray((np.clip(array, 0, 1) * 255).round().astype(np.uint8))  # noqa: E731
    side = min(512, size)
    corner = min(STRIDE + BLEND // 2, size - side // 2)  # the middle of the first blend zone
    top = max(0, min(corner - side // 2, size - side))
    label = 20
    rows = [[(images[mode], f"{mode if mode == 'untiled' else mode + ' norms'}") for mode in ("per-tile", "shared",
                                                                                            "untiled")],
            [(np.clip(np.abs(images[mode] - untiled) * 10, 0, 1), f"|{mode} - untiled| x 10") for mode in TILED]]
    sheet = Image.new("RGB", (3 * side, 4 * (side + label)), "white")
    draw = ImageDraw.Draw(sheet)
    for row, panels in enumerate(rows):
        for column, (array, name) in enumerate(panels):
            y = row * 2 * (side + label)
            sheet.paste(to_image(array).resize((side, side), Image.LANCZOS), (column * side, y + label))
            sheet.paste(to_image(array[top:top + side, top:top + side]), (column * side, y + 2 * label + side))
            draw.text((column * side + 4, y + 4), f"{name} ({size}x{size}, downscaled)", fill="black")
            draw.text((column * side + 4, y + label + side + 4), f"{name}: pixels {top}..{top + side} at full size",
                      fill="black")
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=2048, help="image side in pixels (multiple of 8)")
    parser.add_argument("--kinds", default="smooth,noise", help="latents to decode: smooth, noise")
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument("--threads", type=int, default=1, help="torch threads per decode process")
    parser.add_argument("--picture", type=Path, default=Path(__file__).parents[1] / "docs/gallery/vae_tiling.png")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--kind", help=argparse.SUPPRESS)
    parser.add_argument("--mode", help=argparse.SUPPRESS)
    parser.add_argument("--save", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    import numpy as np

    print(f"SD 1.5 VAE (random weights), {args.size}x{args.size} ({args.size // 8}x{args.size // 8} latents), "
          f"{args.dtype}, {args.threads} thread(s), {platform.processor() or platform.machine()}; tiles of {TILE} px "
          f"every {STRIDE} px, {BLEND} px blended", flush=True)
    results = {}
    with tempfile.TemporaryDirectory() as folder:
        for kind in args.kinds.split(","):
            runs = {mode: run_worker(kind, mode, args, Path(folder)) for mode in MODES}
            entry = {mode: {k: v for k, v in run.items() if k != "save"} for mode, run in runs.items()}
            if all(run["save"] for run in runs.values()):
                images = {mode: np.load(run["save"]) for mode, run in runs.items()}
                entry["comparison"] = {mode: compare(images[mode], images["untiled"], args.size) for mode in TILED}
                if kind == args.kinds.split(",")[0]:
                    picture(images, args.picture)
                    entry["picture"] = str(args.picture)
            results[kind] = entry
    print("\n| latents | decode | seconds | peak RSS MB | max diff, blend zones | max diff, elsewhere | "
          "mean diff, zones / elsewhere | seam ratio |")
    print("|---|---|---|---|---|---|---|---|")
    for kind, entry in results.items():
        comparisons = entry.get("comparison", {})
        for mode in MODES:
            run = entry[mode]
            if "error" in run:
                print(f"| {kind} | {mode} | failed: {run['error']} | | | | | |")
                continue
            comparison = comparisons.get(mode)
            diffs = ("", "", "") if comparison is None else (
                f"{comparison['max_diff_blend_zones']:.4f}", f"{comparison['max_diff_elsewhere']:.4f}",
                f"{comparison['mean_diff_blend_zones']:.4f} / {comparison['mean_diff_elsewhere']:.4f}")
            ratio = (comparison or {}).get("seam_ratio_tiled") if mode in TILED else next(
                iter(comparisons.values()), {}).get("seam_ratio_untiled")
            print(f"| {kind} | {mode} | {run['seconds']:.1f} | {run['peak_rss_mb']:.0f} | {' | '.join(diffs)} | "
                  f"{'' if ratio is None else f'{ratio:.3f}'} |")
        for mode in TILED:
            if "error" not in entry[mode] and "error" not in entry["untiled"]:
                share = entry[mode]["peak_rss_mb"] / entry["untiled"]["peak_rss_mb"]
                print(f"| {kind} | {mode} / untiled peak RSS | {share:.2f} | | | | | |")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    print(f"\npicture: {args.picture}")


if __name__ == "__main__":
    main()
