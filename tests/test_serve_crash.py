"""kill -9 the `dapple serve` process mid-run, restart it, and every accepted job finishes exactly once."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

JOBS = 4


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_server(model: Path, data: Path, port: int) -> subprocess.Popen:
    dapple = Path(sys.executable).with_name("dapple")
    process = subprocess.Popen([str(dapple), "serve", "--model", str(model), "--data-dir", str(data), "--port",
                                str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               env={**os.environ, "OMP_NUM_THREADS": "1"})
    for _ in range(600):
        try:
            if httpx.get(f"http://127.0.0.1:{port}/api/v1/health", timeout=1).status_code == 200:
                return process
        except httpx.HTTPError:
            time.sleep(0.1)
    process.kill()
    raise AssertionError("server did not start")


def test_kill_9_mid_run_then_restart_finishes_every_job_once(tiny_model_dir, tmp_path) -> None:
    data, port = tmp_path / "data", free_port()
    base = f"http://127.0.0.1:{port}/api/v1"
    server = start_server(tiny_model_dir, data, port)
    try:
        ids = [httpx.post(f"{base}/jobs", json={"prompt": "a red circle", "steps": 30, "seed": seed,
                                                "width": 64, "height": 64}).json()["id"] for seed in range(JOBS)]
        first = {}
        for _ in range(600):  # wait until the first job is mid-run
            first = httpx.get(f"{base}/jobs/{ids[0]}").json()
            if first["step"] >= 2:
                break
            time.sleep(0.05)
        assert first["status"] == "running" and 2 <= first["step"] < 30  # killed mid-run, not after
    finally:
        os.kill(server.pid, signal.SIGKILL)
        server.wait()
    statuses: dict[str, str] = {}
    server = start_server(tiny_model_dir, data, port)
    try:
        for _ in range(1200):
            statuses = {job_id: httpx.get(f"{base}/jobs/{job_id}").json()["status"] for job_id in ids}
            if all(status == "finished" for status in statuses.values()):
                break
            time.sleep(0.1)
        assert set(statuses.values()) == {"finished"}
        gallery = httpx.get(f"{base}/images?limit=100").json()
        assert len(gallery) == JOBS and sorted(entry["seed"] for entry in gallery) == list(range(JOBS))
        assert sorted(p.name for p in (data / "images").glob("*.png")) == sorted(f"{i}-0.png" for i in ids)
    finally:
        server.terminate()
        server.wait(10)
