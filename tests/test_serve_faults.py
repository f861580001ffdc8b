"""A real `dapple serve` process under faults: SIGTERM mid-job exits in bounded time leaving every job queued or
finished; a job that kills the process twice (a poison job) ends failed while the others finish; 200 event-stream
clients connecting and dropping leave the server responsive, without leaking threads or descriptors.

The server runs `dapple serve` itself (the CLI's serve command in a subprocess) with dapple.load wrapped so that
prompts select a behaviour: "slow ..." sleeps before each step, "POISON" kills the process with SIGKILL."""

from __future__ import annotations

import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx

import dapple
from dapple.service.jobs import JobService

LAUNCHER = """
import os, signal, sys, time
import dapple
from dapple.interfaces.cli import app
real_load = dapple.load
class Scripted:
    def __init__(self, pipe): self.pipe = pipe
    def __getattr__(self, name): return getattr(self.pipe, name)
    def run(self, request, callback=None, cancel=None):
        if request.prompt == "POISON":
            os.kill(os.getpid(), signal.SIGKILL)
        def step(context):
            if request.prompt.startswith("slow"):
                time.sleep(0.3)
            callback(context)
        return self.pipe.run(request, callback=step, cancel=cancel)
dapple.load = lambda *args, **kwargs: Scripted(real_load(*args, **kwargs))
app(["serve", *sys.argv[1:]], prog_name="dapple")
"""
FAST = {"prompt": "a red circle", "steps": 2, "width": 64, "height": 64}


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def launch(model: Path, data: Path, port: int) -> subprocess.Popen:
    """Start the server; its stderr goes to a file beside the data folder (a pipe nobody reads could fill)."""
    data.parent.mkdir(parents=True, exist_ok=True)
    with open(data.parent / "server.log", "ab") as log:
        process = subprocess.Popen([sys.executable, "-c", LAUNCHER, "--model", str(model), "--data-dir", str(data),
                                    "--port", str(port)], stdout=subprocess.DEVNULL, stderr=log,
                                   env={**os.environ, "OMP_NUM_THREADS": "1"})
    process.log = data.parent / "server.log"
    return process


def wait_until_up(process: subprocess.Popen, port: int) -> None:
    for _ in range(900):
        if process.poll() is not None:
            raise AssertionError(f"server exited ({process.returncode}): {process.log.read_text()[-2000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/api/v1/health", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            time.sleep(0.1)
    process.kill()
    raise AssertionError("server did not start")


def wait_for(condition, timeout: float = 60.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def statuses(data: Path) -> dict[str, tuple[str, int]]:
    with sqlite3.connect(data / "dapple.db") as db:
        return {row[0]: (row[1], row[2]) for row in db.execute("SELECT id, status, attempts FROM jobs")}


def test_sigterm_mid_job_exits_in_bounded_time_and_requeues_it(tiny_model_dir, tmp_path) -> None:
    data, port = tmp_path / "data", free_port()
    base = f"http://127.0.0.1:{port}"
    server = launch(tiny_model_dir, data, port)
    try:
        wait_until_up(server, port)
        done = httpx.post(f"{base}/api/v1/jobs", json=FAST).json()["id"]
        wait_for(lambda: httpx.get(f"{base}/api/v1/jobs/{done}").json()["status"] == "finished")
        slow = httpx.post(f"{base}/api/v1/jobs", json={**FAST, "prompt": "slow job", "steps": 60}).json()["id"]
        queued = httpx.post(f"{base}/api/v1/jobs", json=FAST).json()["id"]
        stream = httpx.stream("GET", f"{base}/api/v1/jobs/{slow}/events", timeout=60)  # an open event stream
        stream.__enter__()
        sync: dict = {}

        def a1111_call() -> None:  # a synchronous A1111 request waiting behind the slow job
            try:
                sync["answer"] = httpx.post(f"{base}/sdapi/v1/txt2img", json={"prompt": "sync", "steps": 2,
                                                                              "width": 64, "height": 64}, timeout=60)
            except httpx.HTTPError as error:
                sync["error"] = error
        caller = threading.Thread(target=a1111_call)
        caller.start()
        wait_for(lambda: httpx.get(f"{base}/api/v1/jobs/{slow}").json()["step"] >= 2, what="the slow job to run")
        wait_for(lambda: len(httpx.get(f"{base}/api/v1/jobs?status=queued").json()) == 2, what="the A1111 job")
        began = time.monotonic()
        server.send_signal(signal.SIGTERM)
        code = server.wait(15)
        took = time.monotonic() - began
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
    stream.__exit__(None, None, None)
    caller.join(10)
    assert code == 0 and took < 15, (code, took)
    # the waiting A1111 call is answered before connections close: 503, never a 200 with no image or uvicorn's 500
    assert "answer" in sync, sync
    assert sync["answer"].status_code == 503 and "shutting down" in sync["answer"].text, sync["answer"].text
    jobs = statuses(data)
    assert jobs[done] == ("finished", 1)
    assert jobs[slow] == ("queued", 0) and jobs[queued] == ("queued", 0)  # interrupted: requeued, attempt given back
    assert sorted(status for status, _ in jobs.values()) == ["finished", "queued", "queued", "queued"]
    # The next start runs them, on a pipeline of its own: the session's shared `pipe` may carry what earlier tests
    # in the suite left on it (the one suite failure here timed out on this wait, the test alone takes seconds).
    own = dapple.load(tiny_model_dir, device="cpu")
    service = JobService(data, lambda: own)
    service.start()
    try:
        # a liveness wait, not a speed bound: on a loaded 2-core machine three jobs (one of 60 steps) can take long
        wait_for(lambda: all(job.status == "finished" for job in service.list()), timeout=240,
                 what="the requeued jobs")
        assert len(service.images()) == 4
    finally:
        service.stop()


def test_a_job_that_kills_the_server_twice_is_failed_and_the_others_finish(tiny_model_dir, tmp_path) -> None:
    data, port = tmp_path / "data", free_port()
    base = f"http://127.0.0.1:{port}/api/v1"
    server = launch(tiny_model_dir, data, port)
    try:
        wait_until_up(server, port)
        busy = httpx.post(f"{base}/jobs", json={**FAST, "prompt": "slow job", "steps": 8}).json()["id"]
        poison = httpx.post(f"{base}/jobs", json={**FAST, "prompt": "POISON"}).json()["id"]  # queued behind it
        others = [httpx.post(f"{base}/jobs", json={**FAST, "seed": seed}).json()["id"] for seed in (1, 2)]
        assert httpx.get(f"{base}/jobs/{others[1]}").json()["status"] == "queued"  # all four accepted in time
        assert server.wait(60) == -signal.SIGKILL  # the first death
        assert statuses(data)[busy] == ("finished", 1)
        assert statuses(data)[poison] == ("running", 1)
        server = launch(tiny_model_dir, data, port)
        assert server.wait(60) == -signal.SIGKILL  # requeued at start, claimed again: the second death
        assert statuses(data)[poison] == ("running", 2)
        assert {statuses(data)[job_id][0] for job_id in others} == {"queued"}
        server = launch(tiny_model_dir, data, port)
        wait_until_up(server, port)
        wait_for(lambda: all(httpx.get(f"{base}/jobs/{job_id}").json()["status"] == "finished" for job_id in others),
                 what="the other jobs")
        failed = httpx.get(f"{base}/jobs/{poison}").json()
        assert failed["status"] == "failed" and "the worker died twice while running this job" in failed["error"]
        assert sorted(entry["job_id"] for entry in httpx.get(f"{base}/images").json()) == sorted([busy, *others])
        assert httpx.get(f"{base}/health").json()["status"] == "ok"
    finally:
        server.terminate()
        server.wait(20)


def _open_stream(port: int, job_id: str) -> socket.socket:
    client = socket.create_connection(("127.0.0.1", port), timeout=20)
    client.sendall(f"GET /api/v1/jobs/{job_id}/events HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())
    return client


def _counts(pid: int) -> tuple[int, int]:
    """The server's open file descriptors and threads."""
    threads = int(next(line.split()[1] for line in Path(f"/proc/{pid}/status").read_text().splitlines()
                       if line.startswith("Threads:")))
    return len(os.listdir(f"/proc/{pid}/fd")), threads


def test_200_event_stream_clients_connecting_and_dropping(tiny_model_dir, tmp_path) -> None:
    data, port = tmp_path / "data", free_port()
    base = f"http://127.0.0.1:{port}/api/v1"
    server = launch(tiny_model_dir, data, port)
    try:
        wait_until_up(server, port)
        warm = httpx.post(f"{base}/jobs", json=FAST).json()["id"]
        wait_for(lambda: httpx.get(f"{base}/jobs/{warm}").json()["status"] == "finished")
        fds_before, threads_before = _counts(server.pid)
        job = httpx.post(f"{base}/jobs", json={**FAST, "prompt": "slow job", "steps": 20}).json()["id"]
        wait_for(lambda: httpx.get(f"{base}/jobs/{job}").json()["status"] == "running")
        slowest_health = 0.0
        for wave in range(2):
            clients = [_open_stream(port, job) for _ in range(200)]
            for client in clients:  # every stream answers: headers and the first event
                assert b"200 OK" in client.recv(65536)
            began = time.monotonic()
            assert httpx.get(f"{base}/health", timeout=10).status_code == 200
            slowest_health = max(slowest_health, time.monotonic() - began)
            for index, client in enumerate(clients):
                if index % 2:  # half drop hard (RST), half close politely
                    client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\1\0\0\0\0\0\0\0")
                client.close()
        wait_for(lambda: httpx.get(f"{base}/health").json()["listeners"] <= 2, timeout=20,
                 what="the dropped streams to unsubscribe")
        fds_after, threads_after = _counts(server.pid)
        assert fds_after <= fds_before + 10 and threads_after <= threads_before + 10, \
            (fds_before, fds_after, threads_before, threads_after)
        assert slowest_health < 5
        with httpx.stream("GET", f"{base}/jobs/{job}/events", timeout=60) as stream:  # a client that stays
            events = [json.loads(line[5:]) for line in stream.iter_lines() if line.startswith("data:")]
        assert events[-1]["event"] == "finished" and httpx.get(f"{base}/jobs/{job}").json()["status"] == "finished"
    finally:
        server.terminate()
        server.wait(20)
