"""Peak memory of `dapple merge` on two checkpoints of a given size, in a fresh process.

    python benchmarks/merge_memory.py [--megabytes 1000]

Writes two random float16 .safetensors files (SD 1.5's UNet has ~860M parameters: ~1.7 GB in fp16), merges them
with `dapple merge` under /usr/bin/time, and reports wall time, peak RSS and the input size. The inputs are
memory-mapped, so RSS counts their pages as they are read; anonymous memory stays near one tensor.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--megabytes", type=int, default=1000, help="size of each input file")
    args = parser.parse_args()
    tensors = args.megabytes * 1024 * 1024 // (2 * 4096 * 1024)  # fp16 tensors of 4096 x 1024
    with tempfile.TemporaryDirectory() as folder:
        paths = []
        for seed in (1, 2):
            generator = torch.Generator().manual_seed(seed)
            weights = {f"layer{i}.weight": torch.randn(4096, 1024, generator=generator).half() for i in range(tensors)}
            paths.append(Path(folder) / f"model{seed}.safetensors")
            save_file(weights, str(paths[-1]))
            del weights
        dapple = Path(sys.executable).with_name("dapple")
        report = subprocess.run(["/usr/bin/time", "-v", str(dapple), "merge", *map(str, paths), "--alpha", "0.3",
                                 "--out", str(Path(folder) / "merged.safetensors")],
                                capture_output=True, text=True, check=True).stderr
        peak = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", report).group(1)) / 1024
        wall = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): (\S+)", report).group(1)
        size = paths[0].stat().st_size / 2**20
        print(f"inputs: 2 x {size:.0f} MB; merge wall time {wall}; peak RSS {peak:.0f} MB "
              f"({peak / size:.2f} x one input)")


if __name__ == "__main__":
    main()
