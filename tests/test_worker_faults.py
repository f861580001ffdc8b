"""Worker supervision and store faults, in process: any exception fails the job (not the worker), health reports
a dead or stuck worker, stop() is bounded and requeues, poison jobs end, and a locked database, a full disk, a
corrupt database file and a kill -9 during an image write are survived."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from PIL import Image
from typer.testing import CliRunner

from dapple.interfaces.cli import app as cli_app
from dapple.interfaces.server import create_app
from dapple.service import jobs as jobs_module
from dapple.service.jobs import JobService, StoreError

FAST = {"prompt": "a red circle", "steps": 2, "seed": 1}


def wait_for(condition, timeout: float = 60.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


class PanicException(BaseException):
    """Like pyo3_runtime.PanicException (the tokenizers library's Rust panics): a BaseException, not an Exception."""


class Scripted:
    """The tiny pipe, with behaviours chosen by the prompt: raise, hang without steps (a native call that never
    returns), step slowly, or run a hook after the denoise (before the images are written)."""

    def __init__(self, pipe, raises=None, step_delay: float = 0.0, after_run=None) -> None:
        self.pipe, self.raises, self.step_delay, self.after_run = pipe, raises or {}, step_delay, after_run
        self.release = threading.Event()
        self.hanging = threading.Event()

    def run(self, request, callback=None, cancel=None):
        if request.prompt in self.raises:
            raise self.raises[request.prompt]
        if request.prompt == "hang":
            self.hanging.set()
            self.release.wait(30)

        def step(context):
            if request.prompt.startswith("slow"):
                time.sleep(self.step_delay)
            callback(context)
        result = self.pipe.run(request, callback=step, cancel=cancel)
        if self.after_run is not None:
            self.after_run(request)
        return result


def test_any_exception_fails_the_job_and_the_worker_goes_on(tmp_path, pipe) -> None:
    raises = {"panic": PanicException("called `Result::unwrap()` on an `Err` value"), "exit": SystemExit(3),
              "interrupt": KeyboardInterrupt(), "memory": MemoryError(), "value": ValueError("x" * 10_000)}
    expected = {"panic": "PanicException: called `Result::unwrap()`", "exit": "SystemExit: 3",
                "interrupt": "KeyboardInterrupt", "memory": "out of memory", "value": "ValueError: xxx"}
    service = JobService(tmp_path / "data", lambda: Scripted(pipe, raises))
    service.subscribe(lambda job_id, event: 1 / 0)  # a broken listener must not stop the worker either
    try:
        ids = {prompt: service.submit({**FAST, "prompt": prompt}).id for prompt in raises}
        good = service.submit(FAST)
        service.start()
        wait_for(lambda: service.get(good.id).status == "finished", what="the good job")
        for prompt, job_id in ids.items():
            job = service.get(job_id)
            assert job.status == "failed" and expected[prompt] in job.error, (prompt, job.error)
        assert len(service.get(ids["value"]).error) < 2100  # a huge error message is cut
        health = service.health()
        assert health["ok"] and health["worker"] == "idle" and service._worker.is_alive()
        assert [entry["job_id"] for entry in service.images()] == [good.id]
    finally:
        service.stop()


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")  # the loop dies on purpose
def test_health_reports_a_stuck_and_a_dead_worker_with_503(tmp_path, pipe) -> None:
    scripted = Scripted(pipe, step_delay=0.25)
    service = JobService(tmp_path / "data", lambda: scripted, stall_after=0.5, max_job_seconds=1.5)
    service.start()
    try:
        with TestClient(create_app(service)) as client:
            assert client.get("/api/v1/health").status_code == 200
            hung = client.post("/api/v1/jobs", json={**FAST, "prompt": "hang"}).json()["id"]
            assert scripted.hanging.wait(30)
            time.sleep(0.8)  # no heartbeat for longer than stall_after
            answer = client.get("/api/v1/health")
            assert answer.status_code == 503 and answer.json()["status"] == "unhealthy"
            assert "stuck: no heartbeat" in answer.json()["reason"] and hung in answer.json()["reason"]
            scripted.release.set()
            wait_for(lambda: client.get(f"/api/v1/jobs/{hung}").json()["status"] == "finished")
            assert client.get("/api/v1/health").status_code == 200
            slow = client.post("/api/v1/jobs", json={**FAST, "prompt": "slow", "steps": 12}).json()["id"]
            wait_for(lambda: client.get(f"/api/v1/jobs/{slow}").json()["step"] >= 1)
            time.sleep(1.6)  # heartbeats keep coming, but the job is older than max_job_seconds
            answer = client.get("/api/v1/health")
            assert answer.status_code == 503 and f"job {slow} has run for" in answer.json()["reason"]
            wait_for(lambda: client.get(f"/api/v1/jobs/{slow}").json()["status"] == "finished")
    finally:
        service.stop()

    dead = JobService(tmp_path / "dead", lambda: pipe)

    def broken_claim():
        raise RuntimeError("the claim query broke")
    dead._next_job = broken_claim  # a failure outside any job: the worker loop itself ends
    dead.start()
    dead._worker.join(10)
    with TestClient(create_app(dead)) as client:
        answer = client.get("/api/v1/health")
    assert answer.status_code == 503 and answer.json()["worker"] == "dead"
    assert "worker thread is dead (RuntimeError: the claim query broke)" in answer.json()["reason"]


def test_stop_interrupts_and_requeues_the_running_job_within_its_bound(tmp_path, pipe) -> None:
    scripted = Scripted(pipe, step_delay=0.1)
    service = JobService(tmp_path / "data", lambda: scripted)
    running = service.submit({**FAST, "prompt": "slow", "steps": 100})
    queued = service.submit(FAST)
    service.start()
    wait_for(lambda: service.get(running.id).step >= 1)
    waiter: dict = {}
    thread = threading.Thread(target=lambda: waiter.update(job=service.run_and_wait(FAST)))  # A1111's sync call
    thread.start()
    began = time.monotonic()
    service.stop(drain=0.3, timeout=5)
    assert time.monotonic() - began < 3
    thread.join(5)
    assert not thread.is_alive() and waiter["job"].status == "queued"  # the synchronous caller is let go
    job = service.get(running.id)
    assert (job.status, job.attempts, job.step) == ("queued", 0, 0)  # the interrupted attempt does not count
    assert service.get(queued.id).status == "queued" and service.images() == []
    assert service.health()["worker"] == "stopped"


def test_stop_gives_up_on_a_hung_job_and_requeues_it_in_the_database(tmp_path, pipe) -> None:
    scripted = Scripted(pipe)
    service = JobService(tmp_path / "data", lambda: scripted)
    hung = service.submit({**FAST, "prompt": "hang"})
    service.start()
    assert scripted.hanging.wait(30)
    began = time.monotonic()
    service.stop(drain=0.2, timeout=0.3)  # the job never reaches a step: it cannot be interrupted
    assert time.monotonic() - began < 2
    job = service.get(hung.id)
    assert job.status == "queued" and job.attempts == 1  # a forced stop counts as an attempt
    scripted.release.set()  # the abandoned thread finishes its job late: it must not record it
    service._worker.join(30)
    assert service.get(hung.id).status == "queued" and service.images() == []
    again = JobService(tmp_path / "data", lambda: pipe)
    again.start()
    try:
        wait_for(lambda: again.get(hung.id).status == "finished")
        assert len(again.images()) == 1 and again.get(hung.id).attempts == 2
        assert sorted(p.name for p in (tmp_path / "data" / "images").iterdir()) == [f"{hung.id}-0.png"]
    finally:
        again.stop()


def test_a_job_running_at_two_deaths_is_failed_not_retried(tmp_path, pipe) -> None:
    service = JobService(tmp_path / "data", lambda: pipe)
    once, twice, hung_twice = service.submit(FAST), service.submit(FAST), service.submit(FAST)
    service._db.execute("UPDATE jobs SET status='running', attempts=1 WHERE id=?", (once.id,))
    service._db.execute("UPDATE jobs SET status='running', attempts=2 WHERE id=?", (twice.id,))
    service._db.execute("UPDATE jobs SET attempts=2 WHERE id=?", (hung_twice.id,))  # requeued by 2 forced stops
    service.start()
    try:
        wait_for(lambda: service.get(once.id).status == "finished")
        wait_for(lambda: service.get(hung_twice.id).status != "queued")
        for job_id in (twice.id, hung_twice.id):
            failed = service.get(job_id)
            assert failed.status == "failed" and "the worker died twice while running this job" in failed.error
        assert service.get(once.id).attempts == 2 and len(service.images()) == 1
    finally:
        service.stop()


def test_a_database_from_before_attempts_were_counted_is_upgraded(tmp_path, pipe) -> None:
    data = tmp_path / "data"
    data.mkdir()
    old = sqlite3.connect(data / "dapple.db")
    old.executescript(jobs_module._SCHEMA.replace(",\n    attempts INTEGER NOT NULL DEFAULT 0", ""))
    old.execute("INSERT INTO jobs (id, seq, status, request, created) VALUES ('a', 1, 'queued', ?, 0)",
                ('{"prompt": "a red circle", "steps": 2}',))
    old.commit()
    old.close()
    service = JobService(data, lambda: pipe)
    service.start()
    try:
        wait_for(lambda: service.get("a").status == "finished")
        assert service.get("a").attempts == 1
    finally:
        service.stop()


@pytest.mark.parametrize("garbage", [os.urandom(4096), b"SQLite format 3\x00" + os.urandom(8192)],
                         ids=["no-header", "sqlite-header-then-garbage"])
def test_a_corrupt_database_is_refused_by_name_and_left_unchanged(tmp_path, pipe, tiny_model_dir, garbage) -> None:
    data = tmp_path / "data"
    data.mkdir()
    database = data / "dapple.db"
    database.write_bytes(garbage)
    with pytest.raises(StoreError, match="left"):
        try:
            JobService(data, lambda: pipe)
        except StoreError as error:
            assert str(database) in str(error)
            raise
    assert database.read_bytes() == garbage
    assert sorted(p.name for p in data.iterdir()) == ["dapple.db", "images"]  # no journal written beside it
    result = CliRunner().invoke(cli_app, ["serve", "--model", str(tiny_model_dir), "--data-dir", str(data),
                                          "--port", "1"])
    assert result.exit_code == 2 and "error: " in result.output and str(database) in result.output
    assert "Traceback" not in result.output and database.read_bytes() == garbage


HOLDER = """
import sqlite3, sys, time
db = sqlite3.connect(sys.argv[1], isolation_level=None)
db.execute("BEGIN EXCLUSIVE")
db.execute("UPDATE jobs SET step = step")
print("locked", flush=True)
time.sleep(float(sys.argv[2]))
db.execute("COMMIT")
"""


def hold_lock(database: Path, seconds: float) -> subprocess.Popen:
    """Another process holding an exclusive transaction on the database for `seconds`."""
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(database), str(seconds)], stdout=subprocess.PIPE,
                              text=True)
    assert holder.stdout.readline().strip() == "locked"
    return holder


def test_a_database_locked_by_another_process_gets_a_retry_answer_and_loses_nothing(tmp_path, pipe) -> None:
    service = JobService(tmp_path / "data", lambda: Scripted(pipe, step_delay=0.1), busy_timeout=1.5)
    service.start()
    try:
        with TestClient(create_app(service)) as client:
            running = client.post("/api/v1/jobs", json={**FAST, "prompt": "slow", "steps": 8}).json()["id"]
            wait_for(lambda: client.get(f"/api/v1/jobs/{running}").json()["status"] == "running")
            holder = hold_lock(service.database, 4.0)  # longer than the busy timeout
            began = time.monotonic()
            refused = client.post("/api/v1/jobs", json=FAST)
            waited = time.monotonic() - began
            assert refused.status_code == 429 and refused.headers["retry-after"]
            assert "locked by another process" in refused.json()["detail"] and 1.4 < waited < 3.9
            listed = client.get("/api/v1/jobs")  # reads go on while the lock is held
            assert listed.status_code == 200 and [job["id"] for job in listed.json()] == [running]
            holder.wait(10)
            wait_for(lambda: client.get(f"/api/v1/jobs/{running}").json()["status"] == "finished",
                     what="the job that was running while the database was locked")
            holder = hold_lock(service.database, 0.3)  # shorter than the busy timeout: the submit just waits
            waited_for = client.post("/api/v1/jobs", json=FAST)
            holder.wait(10)
            assert waited_for.status_code == 202
            wait_for(lambda: client.get(f"/api/v1/jobs/{waited_for.json()['id']}").json()["status"] == "finished")
            jobs = client.get("/api/v1/jobs").json()
            assert sorted(job["id"] for job in jobs) == sorted([running, waited_for.json()["id"]])
            assert {job["status"] for job in jobs} == {"finished"} and len(client.get("/api/v1/images").json()) == 2
    finally:
        service.stop()


def _mount_tmpfs(folder: Path, size: str) -> bool:
    folder.mkdir()
    try:
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
                              capture_output=True)
    except OSError:
        return False
    return done.returncode == 0


def test_a_full_disk_fails_the_job_clearly_and_the_queue_waits_for_space(tmp_path, pipe, monkeypatch) -> None:
    """The data folder lives on a real 8 MB tmpfs when the test may mount one (it runs as root here); otherwise
    ENOSPC is simulated by monkeypatching the image write and the free-space probe. A job's disk fills up while
    it runs (after the denoise, before its 180 KB PNG is written, 48 KB left)."""
    disk = tmp_path / "disk"
    mounted = _mount_tmpfs(disk, "8m")
    filler = disk / "filler"
    full = threading.Event()

    def fill(request) -> None:
        if request.prompt == "fill":
            if mounted:
                with open(filler, "wb") as handle:
                    handle.write(b"\0" * (os.statvfs(disk).f_bavail * os.statvfs(disk).f_frsize - 48 * 1024))
            full.set()

    service = JobService(disk / "data", lambda: Scripted(pipe, after_run=fill), min_free_bytes=128 * 1024)
    if not mounted:  # the simulation: writes fail with ENOSPC and the probe reports 0 bytes free while "full"
        real_save, real_free = jobs_module.save_png, service._free_bytes

        def save(image, path, infotext):
            if full.is_set():
                path.with_name(f".{path.name}.tmp").write_bytes(b"\x89PNG half")
                raise OSError(28, "No space left on device", str(path.with_name(f".{path.name}.tmp")))
            return real_save(image, path, infotext)
        monkeypatch.setattr(jobs_module, "save_png", save)
        monkeypatch.setattr(service, "_free_bytes", lambda: 0 if full.is_set() else real_free())
    try:
        service.start()
        with TestClient(create_app(service)) as client:
            first = client.post("/api/v1/jobs", json=FAST).json()["id"]
            wait_for(lambda: client.get(f"/api/v1/jobs/{first}").json()["status"] == "finished")
            doomed = client.post("/api/v1/jobs", json={**FAST, "prompt": "fill", "width": 256, "height": 256})
            later = client.post("/api/v1/jobs", json=FAST).json()["id"]
            wait_for(lambda: client.get(f"/api/v1/jobs/{doomed.json()['id']}").json()["status"] == "failed")
            failed = client.get(f"/api/v1/jobs/{doomed.json()['id']}").json()
            assert "disk is full" in failed["error"] and "No space left on device" in failed["error"]
            time.sleep(1.5)
            health = client.get("/api/v1/health")
            assert health.status_code == 503 and "disk is full" in health.json()["reason"]
            assert client.get(f"/api/v1/jobs/{later}").json()["status"] == "queued"  # waits, does not fail
            images = sorted(p.name for p in (disk / "data" / "images").iterdir())
            assert images == [f"{first}-0.png"]  # no half-written file, no temp file
            accepted = [later]
            if mounted:  # the last bytes too: a submit is then refused with a reason (or fits in the journal)
                with open(disk / "filler-2", "wb", buffering=0) as handle:
                    try:
                        while True:
                            handle.write(b"\0" * 4096)
                    except OSError:
                        pass
                answer = client.post("/api/v1/jobs", json=FAST)
                assert answer.status_code in (202, 429), answer.text
                if answer.status_code == 429:
                    assert "disk is full" in answer.json()["detail"]
                else:
                    accepted.append(answer.json()["id"])
                (disk / "filler-2").unlink(missing_ok=True)
                filler.unlink()
            full.clear()
            for job_id in accepted:
                wait_for(lambda: client.get(f"/api/v1/jobs/{job_id}").json()["status"] == "finished",
                         what="the queued jobs once space is back")
            assert client.get("/api/v1/health").status_code == 200
            gallery = client.get("/api/v1/images").json()
            assert sorted(entry["job_id"] for entry in gallery) == sorted([first, *accepted])
            for entry in gallery:
                with Image.open(service.image_path(entry["id"])) as picture:
                    picture.load()
    finally:
        service.stop()
        if mounted:
            subprocess.run(["umount", "-l", str(disk)], check=False)


KILLED_WRITER = """
import os, sys, time
import dapple
import dapple.service.outputs as outputs
from dapple.service.jobs import JobService
pipe = dapple.load(sys.argv[2], device="cpu")
opened = []
class Half:  # the second image's file: write half of what PIL gives, then hang until killed
    def __init__(self, handle): self.handle = handle
    def write(self, data):
        self.handle.write(data[: len(data) // 2]); self.handle.flush()
        print("half", flush=True); time.sleep(600)
    def __getattr__(self, name): return getattr(self.handle, name)
    def __enter__(self): return self
    def __exit__(self, *exc): self.handle.close()
def half_open(path, mode="r", *args, **kwargs):
    handle = open(path, mode, *args, **kwargs)
    opened.append(path)
    return Half(handle) if len(opened) == 2 else handle
outputs.open = half_open
service = JobService(sys.argv[1], lambda: pipe)
service.submit({"prompt": "a red circle", "steps": 2, "seed": 5, "batch_size": 2})
service.start()
time.sleep(600)
"""


def test_kill_9_during_an_image_write_then_the_job_finishes_once(tmp_path, tiny_model_dir, pipe) -> None:
    data = tmp_path / "data"
    writer = subprocess.Popen([sys.executable, "-c", KILLED_WRITER, str(data), str(tiny_model_dir)],
                              stdout=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        assert writer.stdout.readline().strip() == "half"  # the second image is half written
    finally:
        os.kill(writer.pid, signal.SIGKILL)
        writer.wait()
    left = sorted(p.name for p in (data / "images").iterdir())
    assert len(left) == 2 and left[0].startswith(".") and left[0].endswith("-1.png.tmp")  # what the kill left
    service = JobService(data, lambda: pipe)
    try:
        (job,) = service.list()
        assert job.status == "running"
        service.start()
        wait_for(lambda: service.get(job.id).status == "finished")
        assert service.get(job.id).attempts == 2
        gallery = service.images()
        assert sorted(entry["file"] for entry in gallery) == [f"{job.id}-0.png", f"{job.id}-1.png"]
        assert sorted(p.name for p in (data / "images").iterdir()) == [f"{job.id}-0.png", f"{job.id}-1.png"]
        for entry in gallery:
            with Image.open(service.image_path(entry["id"])) as picture:
                picture.load()  # complete PNGs
    finally:
        service.stop()


def test_start_removes_what_a_killed_write_left_and_nothing_else(tmp_path, pipe) -> None:
    data = tmp_path / "data"
    first = JobService(data, lambda: pipe)
    first.start()
    done = first.submit(FAST)
    wait_for(lambda: first.get(done.id).status == "finished")
    first.stop()
    killed = first.submit({**FAST, "batch_size": 2})
    first._db.execute("UPDATE jobs SET status='running', attempts=1 WHERE id=?", (killed.id,))  # as a kill leaves it
    images = data / "images"
    (images / f"{killed.id}-0.png").write_bytes(b"a whole but unrecorded image")
    (images / f".{killed.id}-1.png.tmp").write_bytes(b"\x89PNG half")
    (images / "my-notes.txt").write_text("not Dapple's")
    gate = threading.Event()
    second = JobService(data, lambda: (gate.wait(30), pipe)[1])  # the worker waits before its first job
    second.start()
    try:
        assert sorted(p.name for p in images.iterdir()) == sorted([f"{done.id}-0.png", "my-notes.txt"])
        gate.set()
        wait_for(lambda: second.get(killed.id).status == "finished")
        assert sorted(p.name for p in images.iterdir()) == sorted(
            [f"{done.id}-0.png", f"{killed.id}-0.png", f"{killed.id}-1.png", "my-notes.txt"])
    finally:
        gate.set()
        second.stop()
