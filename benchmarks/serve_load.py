"""Load on `dapple serve`: C concurrent clients each submit J jobs and wait for them.

    python benchmarks/serve_load.py [--clients 8] [--jobs 5] [--queue-size 16] [--model DIR] [--steps 4]

Starts a server on a free loopback port (the given model, or a tiny random one made on the spot), lets every
client submit its jobs (retrying after 429 as Retry-After says) and poll them to the end, then reports
throughput, p50/p95 latency from submit to finished, the number of 429 answers, and checks that every accepted
job finished with its image in the gallery (nothing lost, nothing twice).
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def client(base: str, jobs: int, steps: int, seed: int, latencies: list, rejected: list) -> None:
    with httpx.Client(base_url=base, timeout=30) as http:
        for index in range(jobs):
            body = {"prompt": "a red circle on a blue background", "steps": steps, "seed": seed * 1000 + index}
            started = time.perf_counter()
            while True:
                answer = http.post("/jobs", json=body)
                if answer.status_code != 429:
                    break
                rejected.append(1)
                time.sleep(float(answer.headers.get("retry-after", "1")) / 5)
            answer.raise_for_status()
            job_id = answer.json()["id"]
            while http.get(f"/jobs/{job_id}").json()["status"] not in ("finished", "failed", "cancelled"):
                time.sleep(0.05)
            latencies.append(time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--jobs", type=int, default=5)
    parser.add_argument("--queue-size", type=int, default=16)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--model", type=Path, default=None)
    args = parser.parse_args()
    dapple = Path(sys.executable).with_name("dapple")
    with tempfile.TemporaryDirectory() as folder:
        model = args.model
        if model is None:
            model = Path(folder) / "tiny"
            subprocess.run([str(dapple), "create-tiny-model", str(model)], check=True, capture_output=True)
        port = free_port()
        server = subprocess.Popen([str(dapple), "serve", "--model", str(model), "--data-dir", f"{folder}/data",
                                   "--port", str(port), "--queue-size", str(args.queue_size)],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        base = f"http://127.0.0.1:{port}/api/v1"
        try:
            while True:
                try:
                    httpx.get(f"{base}/health", timeout=1)
                    break
                except httpx.HTTPError:
                    time.sleep(0.2)
            latencies: list[float] = []
            rejected: list[int] = []
            threads = [threading.Thread(target=client, args=(base, args.jobs, args.steps, c, latencies, rejected))
                       for c in range(args.clients)]
            began = time.perf_counter()
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            elapsed = time.perf_counter() - began
            jobs = httpx.get(f"{base}/jobs?limit=1000").json()
            gallery = httpx.get(f"{base}/images?limit=500").json()
        finally:
            server.terminate()
            server.wait(10)
    total = args.clients * args.jobs
    finished = sum(job["status"] == "finished" for job in jobs)
    ordered = sorted(latencies)
    print(f"{args.clients} clients x {args.jobs} jobs ({args.steps} steps, {model.name}), queue size "
          f"{args.queue_size}, {os.cpu_count()} CPU cores")
    print(f"throughput {total / elapsed:.2f} jobs/s; latency p50 {statistics.median(ordered):.2f} s, "
          f"p95 {ordered[int(0.95 * (len(ordered) - 1))]:.2f} s; 429 answers: {len(rejected)}")
    print(f"accepted {len(jobs)}, finished {finished}, gallery entries {len(gallery)}, "
          f"distinct seeds {len({entry['seed'] for entry in gallery})}")
    if not (len(jobs) == finished == len(gallery) == total):
        raise SystemExit("lost or duplicated jobs")


if __name__ == "__main__":
    main()
