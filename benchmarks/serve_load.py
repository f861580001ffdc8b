"""Load on `dapple serve`: C concurrent clients each submit J jobs and wait for them; or a soak of mixed traffic.

    python benchmarks/serve_load.py [--clients 8] [--jobs 5] [--queue-size 16] [--model DIR] [--steps 4]
    python benchmarks/serve_load.py --soak-minutes N [--clients C] [--steps 2]

Starts a server on a free loopback port (the given model, or a tiny random one made on the spot).

Load mode: every client submits its jobs (retrying after 429 as Retry-After says) and polls them to the end; the
report gives throughput, p50/p95 latency from submit to finished, the number of 429 answers, and checks that
every accepted job finished with its image in the gallery (nothing lost, nothing twice).

Soak mode: for N minutes, C clients send a mix of valid and invalid requests as fast as the server answers: job
submits (some refused with 429 when the queue is full), polls, job and gallery listings, health, A1111 options,
event streams of finished jobs, and invalid ones (out-of-range and wrongly typed fields, unknown samplers and ids,
malformed JSON, a lone surrogate, a huge offset, an A1111 body with wrong types). Then it waits for the queue to
drain and reports requests served, answers by status class (any 5xx is a failure), p50/p95 request latency, the
server's RSS at the start and the end, and checks that every accepted job finished exactly once (one gallery
image per job, no job twice, no job missing).
"""

from __future__ import annotations

import argparse
import os
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import httpx


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[int(fraction * (len(ordered) - 1))] if ordered else float("nan")


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


JSON = {"content-type": "application/json"}
# (method, path, request arguments): each must be answered with a 4xx, never a 5xx.
INVALID = [
    ("POST", "/api/v1/jobs", {"json": {"prompt": "x", "steps": 0}}),
    ("POST", "/api/v1/jobs", {"json": {"prompt": "x", "width": 65}}),
    ("POST", "/api/v1/jobs", {"json": {"prompt": "x", "sampler": "Euler b"}}),
    ("POST", "/api/v1/jobs", {"json": {"prompt": ["a"], "steps": "abc"}}),
    ("POST", "/api/v1/jobs", {"content": b"{not json", "headers": JSON}),
    ("POST", "/api/v1/jobs", {"content": b'{"prompt": "\\ud800"}', "headers": JSON}),
    ("POST", "/api/v1/jobs", {"content": b"[" * 5000 + b"]" * 5000, "headers": JSON}),
    ("GET", "/api/v1/jobs/no-such-job", {}),
    ("GET", "/api/v1/jobs?status=lost", {}),
    ("GET", "/api/v1/images/no-such-image", {}),
    ("GET", "/api/v1/images?offset=99999999999999999999", {}),
    ("DELETE", "/api/v1/jobs/no-such-job", {}),
    ("POST", "/sdapi/v1/txt2img", {"json": {"width": "abc", "steps": [3]}}),
]


class Soak:
    """The shared tallies of a soak run."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.latencies: list[float] = []
        self.statuses: Counter = Counter()
        self.accepted: list[str] = []
        self.server_errors: list[str] = []
        self.invalid_not_refused: list[str] = []
        self.transport_errors = 0

    def record(self, what: str, started: float, status: int | None, expect_4xx: bool = False) -> None:
        with self.lock:
            self.latencies.append(time.perf_counter() - started)
            if status is None:
                self.transport_errors += 1
                return
            self.statuses[f"{status // 100}xx"] += 1
            if status == 429:
                self.statuses["of which 429"] += 1
            if status >= 500:
                self.server_errors.append(f"{status} {what}")
            elif expect_4xx and not 400 <= status < 500:
                self.invalid_not_refused.append(f"{status} {what}")


def soak_client(base: str, until: float, steps: int, number: int, soak: Soak) -> None:
    chance = random.Random(number)
    mine: list[str] = []
    with httpx.Client(base_url=base, timeout=60) as http:
        while time.monotonic() < until:
            roll = chance.random()
            started = time.perf_counter()
            try:
                if roll < 0.12:  # a valid job
                    body = {"prompt": "a red circle on a blue background", "steps": steps, "width": 64, "height": 64,
                            "seed": chance.randrange(1 << 30)}
                    answer = http.post("/api/v1/jobs", json=body)
                    soak.record("POST /api/v1/jobs", started, answer.status_code)
                    if answer.status_code == 202:
                        mine.append(answer.json()["id"])
                        with soak.lock:
                            soak.accepted.append(mine[-1])
                elif roll < 0.45:  # an invalid request
                    method, path, arguments = chance.choice(INVALID)
                    answer = http.request(method, path, **arguments)
                    soak.record(f"{method} {path[:60]}", started, answer.status_code, expect_4xx=True)
                else:  # reads
                    choice = chance.random()
                    if choice < 0.35 and mine:
                        path = f"/api/v1/jobs/{chance.choice(mine)}"
                    elif choice < 0.5:
                        path = "/api/v1/jobs?status=queued&limit=20"
                    elif choice < 0.65:
                        path = "/api/v1/images?limit=20"
                    elif choice < 0.8:
                        path = "/api/v1/health"
                    elif choice < 0.9:
                        path = "/sdapi/v1/options"
                    else:
                        path = f"/api/v1/jobs/{mine[0]}/events" if mine else "/api/v1/samplers"
                    if path.endswith("/events"):  # the stream of a job that may still run: read its first event
                        with http.stream("GET", path) as stream:
                            next(stream.iter_lines(), None)
                            status = stream.status_code
                    else:
                        status = http.get(path).status_code
                    # health may honestly say 503 (e.g. the disk is low); anything else 5xx is a failure
                    soak.record(f"GET {path}", started, 200 if path == "/api/v1/health" and status == 503 else status)
            except httpx.HTTPError:
                soak.record("transport", started, None)


def soak_run(base: str, pid: int, minutes: float, clients: int, steps: int) -> bool:
    warm = httpx.post(f"{base}/api/v1/jobs", json={"prompt": "warm up", "steps": steps, "width": 64, "height": 64})
    warm.raise_for_status()
    while httpx.get(f"{base}/api/v1/jobs/{warm.json()['id']}").json()["status"] not in ("finished", "failed"):
        time.sleep(0.1)
    rss_start = rss_mb(pid)
    soak = Soak()
    soak.accepted.append(warm.json()["id"])
    until = time.monotonic() + minutes * 60
    threads = [threading.Thread(target=soak_client, args=(base, until, steps, c, soak)) for c in range(clients)]
    began = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - began
    drained_at = time.monotonic()
    while httpx.get(f"{base}/api/v1/health").json().get("queued") or httpx.get(f"{base}/api/v1/health").json().get(
            "running"):
        if time.monotonic() - drained_at > 600:
            break
        time.sleep(0.2)
    drain = time.monotonic() - drained_at
    rss_end = rss_mb(pid)
    with httpx.Client(base_url=base, timeout=30) as http:
        ended = Counter(http.get(f"/api/v1/jobs/{job_id}").json()["status"] for job_id in soak.accepted)
        gallery: list[dict] = []
        while True:
            page = http.get(f"/api/v1/images?limit=500&offset={len(gallery)}").json()
            gallery += page
            if len(page) < 500:
                break
        listed = http.get("/api/v1/jobs?limit=1000").json()
    per_job = Counter(entry["job_id"] for entry in gallery)
    accepted = set(soak.accepted)
    lost = [job_id for job_id in accepted if per_job[job_id] == 0]
    doubled = [job_id for job_id, count in per_job.items() if count > 1]
    strangers = [job_id for job_id in per_job if job_id not in accepted]
    served = sum(count for name, count in soak.statuses.items() if name.endswith("xx"))
    print(f"soak: {minutes:g} min, {clients} clients, {steps}-step 64x64 jobs, {os.cpu_count()} CPU cores")
    print(f"requests served {served} ({served / elapsed:.0f}/s), by class {dict(sorted(soak.statuses.items()))}, "
          f"transport errors {soak.transport_errors}; latency p50 {1000 * statistics.median(soak.latencies):.1f} ms, "
          f"p95 {1000 * percentile(soak.latencies, 0.95):.1f} ms")
    print(f"server RSS {rss_start:.0f} MB at the start, {rss_end:.0f} MB at the end (after a {drain:.0f} s drain)")
    print(f"jobs accepted {len(accepted)}, ended {dict(ended)}; gallery images {len(gallery)}, "
          f"lost {len(lost)}, doubled {len(doubled)}, not accepted but present {len(strangers)}; "
          f"jobs listed {len(listed)}")
    if soak.server_errors:
        print(f"5xx answers ({len(soak.server_errors)}): {Counter(soak.server_errors).most_common(5)}")
    if soak.invalid_not_refused:
        print(f"invalid requests not refused: {Counter(soak.invalid_not_refused).most_common(5)}")
    return not (soak.server_errors or soak.invalid_not_refused or lost or doubled or strangers or soak.transport_errors
                or ended.get("finished", 0) != len(accepted) or len(gallery) != len(accepted))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--jobs", type=int, default=5)
    parser.add_argument("--queue-size", type=int, default=16)
    parser.add_argument("--steps", type=int, default=None, help="steps per job (default: 4; 2 in soak mode)")
    parser.add_argument("--model", type=Path, default=None)
    parser.add_argument("--soak-minutes", type=float, default=None, help="soak mode: mixed traffic for N minutes")
    args = parser.parse_args()
    steps = args.steps or (2 if args.soak_minutes else 4)
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
                    if server.poll() is not None:
                        raise SystemExit("the server did not start") from None
                    time.sleep(0.2)
            if args.soak_minutes is not None:
                ok = soak_run(f"http://127.0.0.1:{port}", server.pid, args.soak_minutes, args.clients, steps)
                if not ok:
                    raise SystemExit("soak failed: 5xx answers, invalid requests accepted, or jobs lost or doubled")
                return
            latencies: list[float] = []
            rejected: list[int] = []
            threads = [threading.Thread(target=client, args=(base, args.jobs, steps, c, latencies, rejected))
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
            server.wait(30)
    total = args.clients * args.jobs
    finished = sum(job["status"] == "finished" for job in jobs)
    ordered = sorted(latencies)
    print(f"{args.clients} clients x {args.jobs} jobs ({steps} steps, {model.name}), queue size "
          f"{args.queue_size}, {os.cpu_count()} CPU cores")
    print(f"throughput {total / elapsed:.2f} jobs/s; latency p50 {statistics.median(ordered):.2f} s, "
          f"p95 {ordered[int(0.95 * (len(ordered) - 1))]:.2f} s; 429 answers: {len(rejected)}")
    print(f"accepted {len(jobs)}, finished {finished}, gallery entries {len(gallery)}, "
          f"distinct seeds {len({entry['seed'] for entry in gallery})}")
    if not (len(jobs) == finished == len(gallery) == total):
        raise SystemExit("lost or duplicated jobs")


if __name__ == "__main__":
    main()
