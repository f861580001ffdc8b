"""The job service every server route uses: a persistent queue, one worker, and the gallery.

- Jobs are rows in SQLite (WAL journal) committed before submit() returns, so an accepted job survives a crash.
- One worker thread runs queued jobs in order on one pipeline. A job's images are written to the data folder
  (temp name, fsync, rename) under names derived from the job id, then recorded in the gallery in the same
  transaction that marks the job finished: a job is either finished with all its images or not finished at all.
- After a crash or kill -9, start() puts the job that was running back in the queue; it runs again and writes
  the same file names, so no job is lost and none ends in the gallery twice.
- The queue is bounded (QueueFullError past queue_size) and cancel() works for queued and running jobs.
- Listeners get events as the job moves: queued, started, progress, finished, failed, cancelled.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dapple.engine.hooks import CancelToken, StepContext
from dapple.errors import DappleError, GenerationCancelled, InvalidRequestError
from dapple.request import make_request
from dapple.samplers import resolve_sampler
from dapple.service.models import ModelPool
from dapple.service.outputs import save_png

STATUSES = ("queued", "running", "finished", "failed", "cancelled")
Event = dict[str, Any]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY, seq INTEGER NOT NULL, status TEXT NOT NULL, request TEXT NOT NULL,
    created REAL NOT NULL, started REAL, ended REAL, error TEXT, step INTEGER DEFAULT 0, steps INTEGER DEFAULT 0
);
CREATE INDEX IF NOT EXISTS jobs_status ON jobs (status, seq);
CREATE TABLE IF NOT EXISTS images (
    id TEXT PRIMARY KEY, job_id TEXT NOT NULL REFERENCES jobs(id), idx INTEGER NOT NULL, file TEXT NOT NULL,
    seed INTEGER NOT NULL, width INTEGER NOT NULL, height INTEGER NOT NULL, infotext TEXT NOT NULL,
    created REAL NOT NULL, UNIQUE (job_id, idx)
);
"""


class QueueFullError(DappleError):
    """The queue holds queue_size jobs already; try again later."""


class JobNotFoundError(DappleError):
    """No job or image has that id."""


@dataclass
class Job:
    id: str
    status: str
    request: dict[str, Any]
    created: float
    started: float | None
    ended: float | None
    error: str | None
    step: int
    steps: int
    position: int | None = None  # place in the queue (0 = next), for queued jobs
    image_ids: tuple[str, ...] = ()


def _validate(fields: dict[str, Any]) -> None:
    """Refuse a bad request before it is accepted: field bounds, sampler name (images are checked at run time)."""
    request = make_request(**fields)
    resolve_sampler(request.sampler)


class JobService:
    """Queue, worker and gallery over one SQLite file and one images folder."""

    def __init__(self, data_dir: str | Path, pipeline: Callable[[], Any], *, queue_size: int = 64,
                 models: ModelPool | None = None) -> None:
        """pipeline: makes the default model's pipeline (called once, by the worker); models: the pool of
        models jobs may name (default: only that one)."""
        self.data_dir = Path(data_dir)
        self.images_dir = self.data_dir / "images"
        self.images_dir.mkdir(parents=True, exist_ok=True)
        self.models = models or ModelPool(pipeline)
        self.queue_size = queue_size
        self._db = sqlite3.connect(self.data_dir / "dapple.db", check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(_SCHEMA)
        self._lock = threading.RLock()
        self._wake = threading.Condition(self._lock)
        self._cancel_tokens: dict[str, CancelToken] = {}
        self._listeners: list[Callable[[str, Event], None]] = []
        self._worker: threading.Thread | None = None
        self._stopping = False
        self.current: dict[str, Any] | None = None  # the running job: id, step, steps, phase, last StepContext

    # -- lifecycle ------------------------------------------------------------------------------------------
    def start(self) -> None:
        """Requeue a job a crash left running, then start the worker."""
        with self._lock:
            self._db.execute("UPDATE jobs SET status='queued', started=NULL, step=0 WHERE status='running'")
        self._worker = threading.Thread(target=self._work, name="dapple-worker", daemon=True)
        self._worker.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Stop after the running job (queued jobs stay queued for the next start)."""
        with self._wake:
            self._stopping = True
            self._wake.notify_all()
        if self._worker is not None:
            self._worker.join(timeout)

    def subscribe(self, listener: Callable[[str, Event], None]) -> Callable[[], None]:
        """Call listener(job_id, event) for every event; returns a function that unsubscribes."""
        self._listeners.append(listener)
        return lambda: self._listeners.remove(listener)

    def _emit(self, job_id: str, event: Event) -> None:
        for listener in list(self._listeners):
            listener(job_id, event)

    # -- the API the routes use -------------------------------------------------------------------------------
    def submit(self, fields: dict[str, Any]) -> Job:
        """Validate and store a job; it is durable once this returns."""
        _validate(fields)
        self.models.check(fields.get("model"))
        job_id = uuid.uuid4().hex
        with self._wake:
            queued = self._db.execute("SELECT COUNT(*) FROM jobs WHERE status='queued'").fetchone()[0]
            if queued >= self.queue_size:
                raise QueueFullError(f"the queue is full ({self.queue_size} jobs waiting); try again later")
            seq = self._db.execute("SELECT COALESCE(MAX(seq), 0) + 1 FROM jobs").fetchone()[0]
            self._db.execute("INSERT INTO jobs (id, seq, status, request, created) VALUES (?, ?, 'queued', ?, ?)",
                             (job_id, seq, json.dumps(fields), time.time()))
            self._wake.notify_all()
        job = self.get(job_id)
        self._emit(job_id, {"event": "queued", "position": job.position})
        return job

    def run_and_wait(self, fields: dict[str, Any], timeout: float | None = None) -> Job:
        """Submit a job and block until it ends (the A1111 API's synchronous endpoints)."""
        ended = threading.Event()
        box: dict[str, str] = {}

        def listen(job_id: str, event: Event) -> None:
            if job_id == box.get("id") and event["event"] in ("finished", "failed", "cancelled"):
                ended.set()

        unsubscribe = self.subscribe(listen)
        try:
            with self._lock:  # no event of this job can arrive before its id is known
                box["id"] = self.submit(fields).id
            ended.wait(timeout)
            return self.get(box["id"])
        finally:
            unsubscribe()

    def running_job_id(self) -> str | None:
        with self._lock:
            row = self._db.execute("SELECT id FROM jobs WHERE status='running'").fetchone()
        return row[0] if row else None

    def get(self, job_id: str) -> Job:
        with self._lock:
            row = self._db.execute("SELECT id, status, request, created, started, ended, error, step, steps, seq "
                                   "FROM jobs WHERE id=?", (job_id,)).fetchone()
            if row is None:
                raise JobNotFoundError(f"no job with id {job_id!r}")
            return self._job(row)

    def list(self, status: str | None = None, limit: int = 100) -> list[Job]:
        if status is not None and status not in STATUSES:
            raise InvalidRequestError(f"status={status!r} is invalid; allowed: {', '.join(STATUSES)}")
        with self._lock:
            where, args = ("WHERE status=?", (status,)) if status else ("", ())
            rows = self._db.execute(f"SELECT id, status, request, created, started, ended, error, step, steps, seq "
                                    f"FROM jobs {where} ORDER BY seq DESC LIMIT ?", (*args, limit)).fetchall()
            return [self._job(row) for row in rows]

    def _job(self, row: tuple) -> Job:
        job = Job(row[0], row[1], json.loads(row[2]), *row[3:9])
        if job.status == "queued":
            job.position = self._db.execute("SELECT COUNT(*) FROM jobs WHERE status='queued' AND seq < ?",
                                            (row[9],)).fetchone()[0]
        job.image_ids = tuple(r[0] for r in self._db.execute(
            "SELECT id FROM images WHERE job_id=? ORDER BY idx", (job.id,)))
        return job

    def cancel(self, job_id: str) -> Job:
        """Cancel a queued job at once, or a running one at its next step. Finished jobs are left as they are."""
        with self._lock:
            job = self.get(job_id)
            if job.status == "queued":
                self._db.execute("UPDATE jobs SET status='cancelled', ended=? WHERE id=?", (time.time(), job_id))
                self._emit(job_id, {"event": "cancelled"})
            elif job.status == "running" and job_id in self._cancel_tokens:
                self._cancel_tokens[job_id].cancel()
        return self.get(job_id)

    # -- the gallery --------------------------------------------------------------------------------------------
    def images(self, offset: int = 0, limit: int = 50) -> list[dict[str, Any]]:
        """Gallery entries, newest first."""
        with self._lock:
            rows = self._db.execute("SELECT id, job_id, idx, file, seed, width, height, infotext, created FROM images "
                                    "ORDER BY created DESC, idx DESC LIMIT ? OFFSET ?", (limit, offset)).fetchall()
        keys = ("id", "job_id", "index", "file", "seed", "width", "height", "infotext", "created")
        return [dict(zip(keys, row)) for row in rows]

    def image_path(self, image_id: str) -> Path:
        """The file of a gallery image, looked up by id only (never a client-supplied path)."""
        with self._lock:
            row = self._db.execute("SELECT file FROM images WHERE id=?", (image_id,)).fetchone()
        if row is None:
            raise JobNotFoundError(f"no image with id {image_id!r}")
        return self.images_dir / row[0]

    def delete_image(self, image_id: str) -> None:
        path = self.image_path(image_id)
        with self._lock:
            self._db.execute("DELETE FROM images WHERE id=?", (image_id,))
        path.unlink(missing_ok=True)

    # -- the worker ---------------------------------------------------------------------------------------------
    def _next_job(self) -> str | None:
        with self._wake:
            while not self._stopping:
                row = self._db.execute("SELECT id FROM jobs WHERE status='queued' ORDER BY seq LIMIT 1").fetchone()
                if row is not None:
                    self._db.execute("UPDATE jobs SET status='running', started=? WHERE id=?", (time.time(), row[0]))
                    self._cancel_tokens[row[0]] = CancelToken()
                    return row[0]
                self._wake.wait(timeout=1.0)
        return None

    def _work(self) -> None:
        while (job_id := self._next_job()) is not None:
            self._run(job_id)

    def _run(self, job_id: str) -> None:
        job = self.get(job_id)
        self._emit(job_id, {"event": "started"})

        def progress(context: StepContext) -> None:
            self.current = {"id": job_id, "step": context.step, "steps": context.total, "phase": context.phase,
                            "context": context, "started": job.started}
            with self._lock:
                self._db.execute("UPDATE jobs SET step=?, steps=? WHERE id=?", (context.step, context.total, job_id))
            self._emit(job_id, {"event": "progress", "step": context.step, "steps": context.total,
                                "phase": context.phase, "context": context})

        try:
            request = make_request(**job.request)
            pipeline = self.models.get(request.model)
            result = pipeline.run(request.model_copy(update={"model": None}), callback=progress,
                                  cancel=self._cancel_tokens[job_id])
            records = []
            for index, (image, seed, infotext) in enumerate(zip(result.images, result.seeds, result.infotexts)):
                name = f"{job_id}-{index}.png"  # the same name if the job runs again after a crash
                save_png(image, self.images_dir / name, infotext)
                records.append((f"{job_id}-{index}", job_id, index, name, seed, image.width, image.height, infotext,
                                time.time()))
            with self._lock:  # the images and the job's end in one transaction
                self._db.execute("BEGIN IMMEDIATE")
                try:
                    self._db.executemany("INSERT OR REPLACE INTO images VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)", records)
                    self._db.execute("UPDATE jobs SET status='finished', ended=? WHERE id=?", (time.time(), job_id))
                    self._db.execute("COMMIT")
                except BaseException:
                    self._db.execute("ROLLBACK")
                    raise
            self._emit(job_id, {"event": "finished", "images": [record[0] for record in records]})
        except GenerationCancelled:
            self._finish(job_id, "cancelled", None)
            self._emit(job_id, {"event": "cancelled"})
        except Exception as error:  # noqa: BLE001 - one bad job must not stop the worker
            message = str(error) if isinstance(error, DappleError) else f"{type(error).__name__}: {error}"
            self._finish(job_id, "failed", message)
            self._emit(job_id, {"event": "failed", "error": message})
        finally:
            self._cancel_tokens.pop(job_id, None)
            self.current = None

    def _finish(self, job_id: str, status: str, error: str | None) -> None:
        with self._lock:
            self._db.execute("UPDATE jobs SET status=?, ended=?, error=? WHERE id=?",
                             (status, time.time(), error, job_id))
