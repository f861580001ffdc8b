"""Quality of each precision, preset and speed option on the built-in model: the held-out evaluation (200 captions
of combinations training never showed, the model card's settings: 20 steps of DPM++ 2M, CFG 5 at timesteps >= 600,
seeds 0..) graded by the scorer, per attribute, against float32; and each image's PSNR against the fp32 image of
the same caption and seed. Also the time per image.

    python benchmarks/quality_presets.py                       # every configuration below, 200 captions
    python benchmarks/quality_presets.py --n 50 --configs fp32,bf16

A configuration is a load dtype (and backend) plus request fields; see CONFIGS.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np

from dapple.train.data.shapes import images_psnr

# name -> (dapple.load keyword arguments, request fields)
CONFIGS: dict[str, tuple[dict, dict]] = {
    "fp32": ({"dtype": "fp32"}, {"speed": "quality"}),
    "default": ({}, {}),  # what dapple.load() and a plain request give this model on this machine
    "bf16": ({"dtype": "bf16"}, {"speed": "quality"}),
    "fast": ({"dtype": "bf16"}, {"speed": "fast"}),
    "fast-fp32": ({"dtype": "fp32"}, {"speed": "fast"}),
    "deepcache-2": ({"dtype": "fp32"}, {"deep_cache_interval": 2}),
    "deepcache-3": ({"dtype": "fp32"}, {"deep_cache_interval": 3}),
    "tome-0.5": ({"dtype": "fp32"}, {"token_merging_ratio": 0.5}),
    "openvino-bf16": ({"dtype": "bf16", "backend": "openvino"}, {}),
}
CARD = dict(steps=20, guidance_scale=5.0, sampler="DPM++ 2M", guidance_min_timestep=600)


def run(name: str, n: int) -> tuple[object, list[np.ndarray], float]:
    import dapple
    from dapple.train.evaluate import held_out_cases
    from dapple.train.scorer import AccuracyTable, grade, score_image

    load, fields = CONFIGS[name]
    pipe = dapple.load(**load)
    table, images, seconds = AccuracyTable(), [], []
    for index, (caption, expected) in enumerate(held_out_cases(n)):
        started = time.perf_counter()
        image = pipe.generate(caption, seed=index, **CARD, **fields).images[0]
        seconds.append(time.perf_counter() - started)
        table.add(grade(score_image(image), expected))
        images.append(np.asarray(image))
    return table, images, statistics.median(seconds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=200)
    parser.add_argument("--configs", default=",".join(CONFIGS), help="from: " + ", ".join(CONFIGS))
    parser.add_argument("--json", help="also write the table here")
    args = parser.parse_args()
    names = [name for name in args.configs.split(",") if name]
    unknown = [name for name in names if name not in CONFIGS]
    if unknown:
        parser.error(f"unknown configuration(s) {', '.join(unknown)}; allowed: {', '.join(CONFIGS)}")
    if "fp32" not in names:
        names.insert(0, "fp32")  # the reference

    results = {}
    for name in names:
        try:
            results[name] = run(name, args.n)
        except Exception as error:  # an option this install lacks (e.g. the openvino extra): say so, go on
            print(f"{name}: skipped ({type(error).__name__}: {error})")
    reference_table, reference_images, _ = results["fp32"]
    attributes = [row[0] for row in reference_table.rows()]
    print(f"built-in model, {args.n} held-out captions, card settings {CARD}")
    print(f"{'configuration':<15}" + "".join(f"{a:>11}" for a in attributes) + f"{'max drop':>10}"
          f"{'PSNR dB':>9}{'s/image':>9}")
    report = {}
    for name, (table, images, seconds) in results.items():
        accuracy = {row[0]: row[1] for row in table.rows()}
        drop = max(reference_table.accuracy(a) - table.accuracy(a) if a != "all" else
                   reference_table.all_right_share - table.all_right_share for a in attributes)
        values = [images_psnr(a, b) for a, b in zip(reference_images, images)]
        finite = [v for v in values if v != float("inf")]
        mean_psnr = statistics.mean(finite) if finite else float("inf")
        print(f"{name:<15}" + "".join(f"{accuracy[a]:>11.1%}" for a in attributes) +
              f"{drop * 100:>9.1f}p{mean_psnr:>9.1f}{seconds:>9.3f}")
        report[name] = {"accuracy": accuracy, "max_drop_points": drop * 100, "psnr_db": mean_psnr,
                        "identical_images": len(values) - len(finite), "seconds_per_image": seconds}
    print("max drop: the largest loss in points against fp32 over the attributes (negative: a gain); PSNR: mean over "
          "images that differ from fp32's")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(report, handle, indent=1)


if __name__ == "__main__":
    main()
