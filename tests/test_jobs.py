"""The job service: durable queue, one worker in order, gallery, bounds, cancellation, crash recovery."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

import dapple
from dapple.errors import InvalidRequestError, UnknownSamplerError
from dapple.service.jobs import JobNotFoundError, JobService, QueueFullError

FAST = {"prompt": "a red circle", "steps": 2, "seed": 1}


def wait_for(condition, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("timed out")
        time.sleep(0.05)


@pytest.fixture
def service(tmp_path, pipe):
    jobs = JobService(tmp_path / "data", lambda: pipe, queue_size=3)
    yield jobs
    jobs.stop()


def test_jobs_run_in_order_and_fill_the_gallery(service) -> None:
    events: list[tuple[str, str]] = []
    service.subscribe(lambda job_id, event: events.append((job_id, event["event"])))
    first = service.submit({**FAST, "batch_size": 2})
    second = service.submit({**FAST, "seed": 7})
    assert (first.status, first.position, second.position) == ("queued", 0, 1)
    service.start()
    wait_for(lambda: service.get(second.id).status == "finished")
    assert service.get(first.id).ended <= service.get(second.id).started
    gallery = service.images()
    assert [entry["job_id"] for entry in gallery] == [second.id, first.id, first.id]  # newest first
    assert service.get(first.id).image_ids == (f"{first.id}-0", f"{first.id}-1")
    assert service.image_path(gallery[0]["id"]).is_file() and "Seed: 7" in gallery[0]["infotext"]
    kinds = [kind for job, kind in events if job == first.id]
    assert kinds[:2] == ["queued", "started"] and kinds[-1] == "finished" and "progress" in kinds


def test_bad_requests_are_refused_before_they_are_queued(service) -> None:
    with pytest.raises(InvalidRequestError, match="steps=0"):
        service.submit({**FAST, "steps": 0})
    with pytest.raises(UnknownSamplerError):
        service.submit({**FAST, "sampler": "Euler b"})
    assert service.list() == []


def test_the_queue_is_bounded(service) -> None:
    for _ in range(3):
        service.submit(FAST)
    with pytest.raises(QueueFullError, match="queue is full"):
        service.submit(FAST)


def test_a_failing_job_leaves_the_queue_and_gallery_intact(service) -> None:
    bad = service.submit({**FAST, "init_image": "/no/such/image.png"})  # valid fields, fails when it runs
    good = service.submit(FAST)
    service.start()
    wait_for(lambda: service.get(good.id).status == "finished")
    failed = service.get(bad.id)
    assert failed.status == "failed" and "does not exist" in failed.error
    assert len(service.images()) == 1


def test_cancel_queued_and_running_jobs(tmp_path, pipe) -> None:
    release = threading.Event()

    class SlowPipe:  # holds the first job at its first step until released
        def run(self, request, callback=None, cancel=None):
            def hold(context):
                release.wait(10)
                callback(context)
            return pipe.run(request, callback=hold, cancel=cancel)

    service = JobService(tmp_path / "data", SlowPipe)
    try:
        running = service.submit({**FAST, "steps": 3})
        queued = service.submit(FAST)
        assert service.cancel(queued.id).status == "cancelled"
        service.start()
        wait_for(lambda: service.get(running.id).status == "running")
        service.cancel(running.id)
        release.set()
        wait_for(lambda: service.get(running.id).status == "cancelled")
        assert service.images() == []
    finally:
        service.stop()
    with pytest.raises(JobNotFoundError):
        service.get("nope")


CRASHING_WORKER = """
import sys, time
import dapple
from dapple.service.jobs import JobService
pipe = dapple.load(sys.argv[2], device="cpu")
class Slow:
    def run(self, request, callback=None, cancel=None):
        def slow(context):
            print("step", flush=True)
            time.sleep(0.5)
            callback(context)
        return pipe.run(request, callback=slow, cancel=cancel)
service = JobService(sys.argv[1], Slow)
for seed in (1, 2, 3):
    service.submit({"prompt": "a red circle", "steps": 4, "seed": seed})
service.start()
time.sleep(600)
"""


def test_after_kill_9_every_accepted_job_runs_once(tmp_path, tiny_model_dir, pipe) -> None:
    data = tmp_path / "data"
    worker = subprocess.Popen([sys.executable, "-c", CRASHING_WORKER, str(data), str(tiny_model_dir)],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert worker.stdout.readline().strip() == "step"  # the first job is running
    finally:
        os.kill(worker.pid, signal.SIGKILL)
        worker.wait()
    service = JobService(data, lambda: pipe)
    try:
        jobs = service.list()
        assert sorted(job.status for job in jobs) == ["queued", "queued", "running"]
        service.start()
        wait_for(lambda: all(job.status == "finished" for job in service.list()))
        gallery = service.images()
        assert len(gallery) == 3 and sorted(entry["seed"] for entry in gallery) == [1, 2, 3]
        assert len({entry["file"] for entry in gallery}) == 3
        assert sorted(p.name for p in (data / "images").iterdir()) == sorted(entry["file"] for entry in gallery)
    finally:
        service.stop()
