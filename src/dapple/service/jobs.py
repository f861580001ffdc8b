"""The job service every server route uses: a persistent queue, one supervised worker, and the gallery.

- Jobs are rows in SQLite (WAL journal) committed before submit() returns, so an accepted job survives a crash.
- One worker thread runs queued jobs in order on one pipeline. A job's images are written to the data folder
  (temp name, fsync, rename) under names derived from the job id, then recorded in the gallery in the same
  transaction that marks the job finished: a job is either finished with all its images or not finished at all.
- Supervision: any exception a job raises (BaseException included: a native library's panic, a stray SystemExit)
  fails that job with a reason and the worker goes on; store errors (a locked or full database) are retried.
- After a crash or kill -9, start() puts the job that was running back in the queue; it runs again and writes
  the same file names, so no job is lost and none ends in the gallery twice. Each claim counts an attempt in
  the database: a job whose attempts ended twice with the process dying (or with a forced stop, below) is failed
  instead of retried forever (a poison job). start() also removes what a killed write left behind (temp files,
  unrecorded images).
- stop() is bounded: it lets the running job finish for `drain` seconds, then interrupts it at its next step and
  puts it back in the queue (that attempt does not count), and after `timeout` more seconds gives up on the
  thread and requeues the job in the database itself. Every accepted job ends queued or finished, never running.
- health() says whether the worker is alive and making progress, and whether the store can be written.
- The queue is bounded (QueueFullError past queue_size) and cancel() works for queued and running jobs.
  A database locked by another process or a full disk is a StoreBusyError (a QueueFullError: retry later).
- While the data folder's disk has less than min_free_bytes free, the worker leaves the queue waiting (a job
  that hits a full disk fails with that reason; the jobs behind it run once space is back).
- Listeners get events as the job moves: queued, started, progress, finished, failed, cancelled (and queued
  again with a reason when shutdown interrupts the running job).
"""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import shutil
import sqlite3
import stat
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
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
MAX_WORKER_DEATHS = 2  # a job running when the process died this many times is failed, not retried
MAX_ERROR_CHARS = 2000  # a failure reason is cut here (an error may echo a huge input)
SQLITE_HEADER = b"SQLite format 3\x00"
_JOB_IMAGE = re.compile(r"^([0-9a-f]{32})-\d+\.png$")
log = logging.getLogger("dapple.service")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY, seq INTEGER NOT NULL, status TEXT NOT NULL, request TEXT NOT NULL,
    created REAL NOT NULL, started REAL, ended REAL, error TEXT, step INTEGER DEFAULT 0, steps INTEGER DEFAULT 0,
    attempts INTEGER NOT NULL DEFAULT 0, error_kind TEXT
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


class StoreBusyError(QueueFullError):
    """The job database cannot take the request now: another process holds its lock past the busy timeout, or
    the data folder's disk is full. Nothing was changed; retry later. (A QueueFullError, so every route answers
    it as one: 429 with Retry-After.)"""


class StoreError(DappleError):
    """The job database cannot be opened: not a SQLite file, corrupt, or unreadable. It is left unchanged."""


class JobNotFoundError(DappleError):
    """No job or image has that id."""


class GalleryFileError(Exception):
    """A gallery entry whose file cannot be served: gone (410) or not a regular file in the folder (403)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


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
    attempts: int = 0  # times a worker claimed it (a shutdown's interruption gives its attempt back)
    # A failed job's cause: "request" (what it asked cannot be done: an unreadable image, an unknown LoRA, a size
    # over the limits; answered 4xx by the A1111 routes) or "server" (disk full, out of memory, a crash)
    error_kind: str | None = None


_COLUMNS = "id, status, request, created, started, ended, error, step, steps, seq, attempts, error_kind"


def _validate(fields: dict[str, Any]) -> None:
    """Refuse a bad request before it is accepted: field bounds, sampler name (images are checked at run time)."""
    request = make_request(**fields)
    resolve_sampler(request.sampler)


def _disk_full(error: BaseException) -> bool:
    if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    return isinstance(error, sqlite3.OperationalError) and "full" in str(error)


def _clip(message: str) -> str:
    return message if len(message) <= MAX_ERROR_CHARS else message[:MAX_ERROR_CHARS] + " [...]"


def _open_database(path: Path, busy_timeout: float) -> sqlite3.Connection:
    """Connect, refusing (StoreError, file untouched) anything that is not a readable SQLite database: the header
    is checked before SQLite sees the file, and the schema is read before anything is written."""
    try:
        if path.is_file() and path.stat().st_size > 0:
            with open(path, "rb") as handle:
                header = handle.read(len(SQLITE_HEADER))
            if header != SQLITE_HEADER:
                raise StoreError(
                    f"{path} is not a SQLite database (its first bytes are not SQLite's header), so Dapple cannot "
                    f"read its jobs and gallery; the file was left unchanged. Move it away to start with an "
                    f"empty queue and gallery (the images folder beside it is kept), or restore a backup")
        db = sqlite3.connect(path, check_same_thread=False, isolation_level=None, timeout=busy_timeout)
    except OSError as error:
        raise StoreError(f"cannot open the job database {path}: {error.strerror or error}") from None
    try:
        db.execute("SELECT COUNT(*) FROM sqlite_master").fetchone()  # reads the schema: corrupt files fail here
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=FULL")
        db.executescript(_SCHEMA)
        columns = {row[1] for row in db.execute("PRAGMA table_info(jobs)")}
        if "attempts" not in columns:  # a database from before attempts were counted
            db.execute("ALTER TABLE jobs ADD COLUMN attempts INTEGER NOT NULL DEFAULT 0")
        if "error_kind" not in columns:  # ... or before failures said whose they were
            db.execute("ALTER TABLE jobs ADD COLUMN error_kind TEXT")
    except sqlite3.DatabaseError as error:
        db.close()
        hint = ("another process holds it locked; stop that process or wait" if "locked" in str(error) else
                "it is corrupt or not a Dapple database; the file was left as it is. Move it away to start with "
                "an empty queue and gallery, or restore a backup")
        raise StoreError(f"cannot open the job database {path} ({error}): {hint}") from None
    return db


class JobService:
    """Queue, supervised worker and gallery over one SQLite file and one images folder."""

    def __init__(self, data_dir: str | Path, pipeline: Callable[[], Any], *, queue_size: int = 64,
                 models: ModelPool | None = None, busy_timeout: float = 5.0, stall_after: float = 600.0,
                 max_job_seconds: float | None = None, min_free_bytes: int = 16 * 2**20) -> None:
        """pipeline: makes the default model's pipeline (called once, by the worker); models: the pool of
        models jobs may name (default: only that one). busy_timeout: how long a request waits for a database
        another process holds locked before StoreBusyError. stall_after: seconds without a worker heartbeat (a
        step, or an idle turn) after which health() calls the worker stuck; max_job_seconds: a running job older
        than this is reported stuck too (None: no limit). min_free_bytes: the worker starts no job while the data
        folder's disk has less free (0: never wait). Raises StoreError for an unreadable database."""
        self.data_dir = Path(data_dir)
        self.images_dir = self.data_dir / "images"
        self.images_dir.mkdir(parents=True, exist_ok=True)
        self.models = models or ModelPool(pipeline)
        self.queue_size = queue_size
        self.database = self.data_dir / "dapple.db"
        self.busy_timeout = busy_timeout
        self.stall_after = stall_after
        self.max_job_seconds = max_job_seconds
        self.min_free_bytes = min_free_bytes
        self._db = _open_database(self.database, busy_timeout)  # writes (and the worker's reads), under _lock
        self._reader = sqlite3.connect(self.database, check_same_thread=False, isolation_level=None,
                                       timeout=busy_timeout)  # the routes' reads: never behind a held write lock
        self._reader.execute("PRAGMA query_only=1")
        self._lock = threading.RLock()
        self._read_lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._cancel_tokens: dict[str, CancelToken] = {}
        self._listeners: list[Callable[[str, Event], None]] = []
        self._worker: threading.Thread | None = None
        self._stopping = False
        self._stopped = threading.Event()
        self._released = threading.Event()  # release_waiters(): synchronous callers stop waiting
        self._interrupting: str | None = None  # the job stop() interrupted: requeued, its attempt given back
        self._abandoned: set[str] = set()  # jobs stop() requeued while their thread still ran
        self._running: str | None = None  # the job the worker holds
        self._running_since: float | None = None
        self._beat = time.monotonic()  # the worker's heartbeat
        self._problem: str | None = None  # why the worker cannot go on now (store, disk), for health()
        self._worker_error: str | None = None  # what ended the worker thread, if anything did
        self.current: dict[str, Any] | None = None  # the running job: id, step, steps, phase, last StepContext

    # -- lifecycle ------------------------------------------------------------------------------------------
    def start(self) -> None:
        """Recover from a crash (requeue the job that was running, or fail it if this was the second death of
        the process while it ran; remove half-written files), then start the worker."""
        with self._lock:
            for (job_id,) in self._db.execute("SELECT id FROM jobs WHERE status='running'").fetchall():
                if not self._poisoned(job_id):  # requeued: its attempt stays counted
                    self._db.execute("UPDATE jobs SET status='queued', started=NULL, step=0 WHERE id=?", (job_id,))
            self._remove_leftovers()
        if self._worker is not None and self._worker.is_alive():  # an abandoned worker still holds a job
            raise StoreError("the previous worker has not stopped yet; wait for it before starting again")
        self._interrupting, self._abandoned = None, set()
        self._released.clear()
        self._stopping = False
        self._stopped.clear()
        self._beat = time.monotonic()
        self._worker = threading.Thread(target=self._work, name="dapple-worker", daemon=True)
        self._worker.start()

    def _poisoned(self, job_id: str) -> bool:
        """Fail a job whose earlier attempts ended with the process dying or a forced stop MAX_WORKER_DEATHS
        times (an attempt that ends any other way is over, or given back by a graceful stop). Under the lock."""
        attempts = self._db.execute("SELECT attempts FROM jobs WHERE id=?", (job_id,)).fetchone()[0]
        if attempts < MAX_WORKER_DEATHS:
            return False
        reason = (f"the worker died twice while running this job (the process was killed, crashed or had to be "
                  f"stopped during each of its {attempts} attempts); it is not retried")
        self._db.execute("UPDATE jobs SET status='failed', ended=?, error=?, error_kind='request' WHERE id=?",
                         (time.time(), reason, job_id))  # the request itself brings the worker down
        log.error("job %s: %s", job_id, reason)
        self._emit(job_id, {"event": "failed", "error": reason, "error_kind": "request"})
        return True

    def _remove_leftovers(self) -> None:
        """Files a killed write left: temp files, and images of jobs that are not finished (they run again and
        write the same names). Images of finished jobs and files Dapple did not name are never touched."""
        finished = {row[0] for row in self._db.execute("SELECT id FROM jobs WHERE status='finished'")}
        for path in self.images_dir.iterdir():
            match = _JOB_IMAGE.match(path.name)
            stale_temp = path.name.startswith(".") and path.name.endswith(".png.tmp")
            if (stale_temp or (match and match.group(1) not in finished)) and path.is_file():
                try:
                    path.unlink(missing_ok=True)
                except OSError as error:
                    log.warning("could not remove %s: %s", path, error)

    def stop(self, drain: float = 3.0, timeout: float = 3.0) -> None:
        """Stop the worker within about drain + timeout seconds; queued jobs stay queued for the next start.
        The running job may finish during `drain`; then it is interrupted at its next step and requeued, and if
        its thread still has not let go after `timeout`, the job is requeued in the database and the thread is
        left to die with the process (that attempt counts towards the poison-job limit)."""
        with self._wake:
            self._stopping = True
            self._wake.notify_all()
        worker = self._worker
        if worker is not None and worker.is_alive():
            worker.join(drain)
            if worker.is_alive():
                job_id = self._running  # read once: the worker may clear it meanwhile
                token = self._cancel_tokens.get(job_id) if job_id is not None else None
                if job_id is not None and not (token is not None and token.cancelled):  # a user's cancel stands
                    self._interrupting = job_id
                    if token is not None:
                        token.cancel()
                worker.join(timeout)
            job_id = self._running
            if worker.is_alive() and job_id is not None:
                self._abandoned.add(job_id)
                try:
                    with self._lock:
                        self._db.execute("UPDATE jobs SET status='queued', started=NULL, step=0 "
                                         "WHERE id=? AND status='running'", (job_id,))
                except sqlite3.Error as error:  # still "running": the next start requeues it all the same
                    log.warning("job %s could not be requeued now (%s)", job_id, error)
                log.warning("job %s did not stop within %.0f s; requeued for the next start", job_id,
                            drain + timeout)
        self._stopped.set()

    def subscribe(self, listener: Callable[[str, Event], None]) -> Callable[[], None]:
        """Call listener(job_id, event) for every event; returns a function that unsubscribes."""
        self._listeners.append(listener)

        def unsubscribe() -> None:
            try:
                self._listeners.remove(listener)
            except ValueError:
                pass
        return unsubscribe

    def _emit(self, job_id: str, event: Event) -> None:
        for listener in list(self._listeners):
            try:
                listener(job_id, event)
            except Exception:  # noqa: BLE001 - a listener's bug must not stop the worker
                log.exception("an event listener failed on %s", event.get("event"))

    # -- the store ------------------------------------------------------------------------------------------
    def _busy(self, error: sqlite3.Error, what: str) -> StoreBusyError:
        if _disk_full(error):
            return StoreBusyError(f"{what} failed: the data folder's disk is full ({self.data_dir}: {error}); "
                                  f"nothing was changed, try again once space is freed")
        if "locked" in str(error) or "busy" in str(error):
            return StoreBusyError(f"{what} failed: the job database {self.database} is locked by another process "
                                  f"(waited {self.busy_timeout:g} s); nothing was changed, try again")
        return StoreBusyError(f"{what} failed: the job database {self.database} cannot be used now ({error}); "
                              f"try again")

    @contextmanager
    def _writing(self, what: str) -> Iterator[sqlite3.Connection]:
        """The write connection under the lock; store errors become StoreBusyError."""
        with self._lock:
            try:
                yield self._db
            except sqlite3.OperationalError as error:
                if self._db.in_transaction:
                    self._db.execute("ROLLBACK")
                raise self._busy(error, what) from None

    @contextmanager
    def _reading(self, what: str) -> Iterator[sqlite3.Connection]:
        with self._read_lock:
            try:
                yield self._reader
            except sqlite3.OperationalError as error:
                raise self._busy(error, what) from None

    # -- the API the routes use -------------------------------------------------------------------------------
    def submit(self, fields: dict[str, Any]) -> Job:
        """Validate and store a job; it is durable once this returns."""
        _validate(fields)
        self.models.check(fields.get("model"))
        job_id = uuid.uuid4().hex
        with self._writing("submitting the job") as db, self._wake:
            db.execute("BEGIN IMMEDIATE")  # the count, the next seq and the insert as one
            try:
                queued = db.execute("SELECT COUNT(*) FROM jobs WHERE status='queued'").fetchone()[0]
                if queued >= self.queue_size:
                    raise QueueFullError(f"the queue is full ({self.queue_size} jobs waiting); try again later")
                seq = db.execute("SELECT COALESCE(MAX(seq), 0) + 1 FROM jobs").fetchone()[0]
                db.execute("INSERT INTO jobs (id, seq, status, request, created) VALUES (?, ?, 'queued', ?, ?)",
                           (job_id, seq, json.dumps(fields), time.time()))
                db.execute("COMMIT")
            except BaseException:
                if db.in_transaction:
                    db.execute("ROLLBACK")
                raise
            self._wake.notify_all()
        job = self.get(job_id)
        self._emit(job_id, {"event": "queued", "position": job.position})
        return job

    def release_waiters(self) -> None:
        """Shutdown has begun: run_and_wait callers return now with their job as it stands (queued jobs stay
        queued for the next start), so the HTTP layer can answer them before the server closes connections."""
        self._released.set()

    def run_and_wait(self, fields: dict[str, Any], timeout: float | None = None) -> Job:
        """Submit a job and block until it ends (the A1111 API's synchronous endpoints), or until the service
        stops (the job is then still queued, for the next start)."""
        ended = threading.Event()
        box: dict[str, str] = {}

        def listen(job_id: str, event: Event) -> None:
            if job_id == box.get("id") and event["event"] in ("finished", "failed", "cancelled"):
                ended.set()

        unsubscribe = self.subscribe(listen)
        try:
            with self._lock:  # no event of this job can arrive before its id is known
                box["id"] = self.submit(fields).id
            deadline = None if timeout is None else time.monotonic() + timeout
            while not ended.wait(0.25) and not self._stopped.is_set() and not self._released.is_set():
                if deadline is not None and time.monotonic() > deadline:
                    break
            return self.get(box["id"])
        finally:
            unsubscribe()

    def running_job_id(self) -> str | None:
        with self._reading("reading the jobs") as db:
            row = db.execute("SELECT id FROM jobs WHERE status='running'").fetchone()
        return row[0] if row else None

    def get(self, job_id: str) -> Job:
        with self._reading("reading the job") as db:
            row = db.execute(f"SELECT {_COLUMNS} FROM jobs WHERE id=?", (job_id,)).fetchone()
            if row is None:
                raise JobNotFoundError(f"no job with id {job_id!r}")
            return self._job(db, row)

    def list(self, status: str | None = None, limit: int = 100) -> list[Job]:
        if status is not None and status not in STATUSES:
            raise InvalidRequestError(f"status={status!r} is invalid; allowed: {', '.join(STATUSES)}")
        with self._reading("listing the jobs") as db:
            where, args = ("WHERE status=?", (status,)) if status else ("", ())
            rows = db.execute(f"SELECT {_COLUMNS} FROM jobs {where} ORDER BY seq DESC LIMIT ?",
                              (*args, limit)).fetchall()
            return [self._job(db, row) for row in rows]

    def count(self, status: str) -> int:
        with self._reading("counting the jobs") as db:
            return db.execute("SELECT COUNT(*) FROM jobs WHERE status=?", (status,)).fetchone()[0]

    def _job(self, db: sqlite3.Connection, row: tuple) -> Job:
        job = Job(row[0], row[1], json.loads(row[2]), *row[3:9], attempts=row[10], error_kind=row[11])
        if job.status == "queued":
            job.position = db.execute("SELECT COUNT(*) FROM jobs WHERE status='queued' AND seq < ?",
                                      (row[9],)).fetchone()[0]
        job.image_ids = tuple(r[0] for r in db.execute("SELECT id FROM images WHERE job_id=? ORDER BY idx",
                                                       (job.id,)))
        return job

    def cancel(self, job_id: str) -> Job:
        """Cancel a queued job at once, or a running one at its next step. Finished jobs are left as they are."""
        with self._writing("cancelling the job") as db:
            job = self.get(job_id)
            if job.status == "queued":
                db.execute("UPDATE jobs SET status='cancelled', ended=? WHERE id=? AND status='queued'",
                           (time.time(), job_id))
                self._emit(job_id, {"event": "cancelled"})
            elif job.status == "running" and job_id in self._cancel_tokens:
                self._cancel_tokens[job_id].cancel()
        return self.get(job_id)

    # -- the gallery --------------------------------------------------------------------------------------------
    def images(self, offset: int = 0, limit: int = 50) -> list[dict[str, Any]]:
        """Gallery entries, newest first."""
        with self._reading("reading the gallery") as db:
            rows = db.execute("SELECT id, job_id, idx, file, seed, width, height, infotext, created FROM images "
                              "ORDER BY created DESC, idx DESC LIMIT ? OFFSET ?", (limit, offset)).fetchall()
        keys = ("id", "job_id", "index", "file", "seed", "width", "height", "infotext", "created")
        return [dict(zip(keys, row)) for row in rows]

    def image_path(self, image_id: str) -> Path:
        """The file of a gallery image, looked up by id only (never a client-supplied path)."""
        with self._reading("reading the gallery") as db:
            row = db.execute("SELECT file FROM images WHERE id=?", (image_id,)).fetchone()
        if row is None:
            raise JobNotFoundError(f"no image with id {image_id!r}")
        return self.images_dir / row[0]

    def image_bytes(self, image_id: str) -> bytes:
        """A gallery image's file, only if it is a regular file in the images folder: a file swapped for a
        symlink (to anything, inside or out) is refused, a missing one is GalleryFileError 410. The file is
        opened relative to the folder's own descriptor, so no path component is followed as a link."""
        name = self.image_path(image_id).name
        folder = os.open(self.images_dir, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
        try:
            descriptor = os.open(name, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0), dir_fd=folder)
        except FileNotFoundError:
            raise GalleryFileError(410, f"image {image_id!r} is in the gallery but its file is gone") from None
        except OSError:  # ELOOP: a symlink where the file should be
            raise GalleryFileError(403, f"image {image_id!r}: its file is not a regular file; refused") from None
        finally:
            os.close(folder)
        with os.fdopen(descriptor, "rb") as handle:
            if not stat.S_ISREG(os.fstat(handle.fileno()).st_mode):
                raise GalleryFileError(403, f"image {image_id!r}: its file is not a regular file; refused")
            return handle.read()

    def delete_image(self, image_id: str) -> None:
        path = self.image_path(image_id)
        with self._writing("deleting the image") as db:
            db.execute("DELETE FROM images WHERE id=?", (image_id,))
        path.unlink(missing_ok=True)

    # -- health -------------------------------------------------------------------------------------------------
    def health(self) -> dict[str, Any]:
        """{"ok", "reason" (None when ok), "worker": not started | idle | running | stopping | stopped | dead,
        "running": job id or None, "queued", "seconds_since_heartbeat", "listeners" (event subscribers, e.g. open
        event streams)}."""
        problems: list[str] = []
        worker = self._worker
        silent = time.monotonic() - self._beat
        if worker is None:
            state = "not started"
        elif self._stopped.is_set():
            state = "stopped"
        elif not worker.is_alive():
            state = "dead"
            problems.append("the worker thread is dead" + (f" ({self._worker_error})" if self._worker_error else
                                                          "") + "; queued jobs will not run until a restart")
        elif self._stopping:
            state = "stopping"
        else:
            state = "running" if self._running else "idle"
            if silent > self.stall_after:
                doing = f"on job {self._running}" if self._running else "while idle"
                problems.append(f"the worker is stuck: no heartbeat for {silent:.0f} s {doing} (limit "
                                f"{self.stall_after:g} s)")
            since = self._running_since
            if self.max_job_seconds is not None and since is not None and time.monotonic() - since > \
                    self.max_job_seconds:
                problems.append(f"the worker is stuck: job {self._running} has run for "
                                f"{time.monotonic() - since:.0f} s (limit {self.max_job_seconds:g} s)")
        if self._problem is not None and state in ("idle", "running"):
            problems.append(self._problem)
        try:
            queued: int | None = self.count("queued")
        except (StoreBusyError, sqlite3.Error) as error:
            queued = None
            problems.append(f"the job database cannot be read: {error}")
        return {"ok": not problems, "reason": "; ".join(problems) or None, "worker": state,
                "running": self._running, "queued": queued, "seconds_since_heartbeat": round(silent, 1),
                "listeners": len(self._listeners)}

    # -- the worker ---------------------------------------------------------------------------------------------
    def _free_bytes(self) -> int:
        return shutil.disk_usage(self.data_dir).free

    def _space_problem(self) -> str | None:
        """Why the worker should not start a job on this disk now (None: enough space)."""
        if self.min_free_bytes <= 0:
            return None
        try:
            free = self._free_bytes()
        except OSError:
            return None
        if free >= self.min_free_bytes:
            return None
        return (f"the data folder's disk is full ({free} bytes free in {self.data_dir}, at least "
                f"{self.min_free_bytes} needed); queued jobs wait until space is freed")

    def _next_job(self) -> str | None:
        """Claim the oldest queued job (counting the attempt), waiting while there is none, the disk is full or
        the database is locked. None once stopping."""
        with self._wake:
            while not self._stopping:
                self._beat = time.monotonic()
                problem = self._space_problem()
                if problem is None:
                    try:
                        row = self._db.execute("SELECT id FROM jobs WHERE status='queued' ORDER BY seq LIMIT 1"
                                               ).fetchone()
                        if row is not None and self._poisoned(row[0]):  # e.g. hung past two forced stops
                            continue
                        if row is not None:
                            self._db.execute("UPDATE jobs SET status='running', started=?, step=0, "
                                             "attempts=attempts+1 WHERE id=? AND status='queued'",
                                             (time.time(), row[0]))
                            self._problem = None
                            self._cancel_tokens[row[0]] = CancelToken()
                            self._running, self._running_since = row[0], time.monotonic()
                            return row[0]
                    except sqlite3.OperationalError as error:
                        problem = f"the worker cannot claim a job: {self._busy(error, 'claiming a job')}"
                self._problem = problem
                self._wake.wait(timeout=1.0)
        return None

    def _work(self) -> None:
        """The worker thread: run jobs until stopped. Nothing a job does ends it."""
        try:
            while (job_id := self._next_job()) is not None:
                try:
                    self._run(job_id)
                except BaseException as error:  # noqa: BLE001 - recorded by _run; never end the worker
                    log.error("worker: job %s: %s: %s", job_id, type(error).__name__, error)
                finally:
                    self._running = self._running_since = None
                    self._cancel_tokens.pop(job_id, None)
                    self.current = None
        except BaseException as error:  # the loop itself failed (not a job): say so in health()
            self._worker_error = _clip(f"{type(error).__name__}: {error}")
            log.exception("the worker stopped")
            raise

    def _run(self, job_id: str) -> None:
        token = self._cancel_tokens[job_id]
        written: list[Path] = []
        try:
            job = self.get(job_id)
            self._emit(job_id, {"event": "started"})

            def progress(context: StepContext) -> None:
                self._beat = time.monotonic()
                self.current = {"id": job_id, "step": context.step, "steps": context.total, "phase": context.phase,
                                "context": context, "started": job.started}
                self._write_progress(job_id, context.step, context.total)
                self._emit(job_id, {"event": "progress", "step": context.step, "steps": context.total,
                                    "phase": context.phase, "context": context})

            request = make_request(**job.request)
            pipeline = self.models.get(request.model)
            result = pipeline.run(request.model_copy(update={"model": None}), callback=progress, cancel=token)
            self._beat = time.monotonic()
            records = []
            for index, (image, seed, infotext) in enumerate(zip(result.images, result.seeds, result.infotexts)):
                name = f"{job_id}-{index}.png"  # the same name if the job runs again after a crash
                path = self.images_dir / name
                written.append(path)
                save_png(image, path, infotext)
                records.append((f"{job_id}-{index}", job_id, index, name, seed, image.width, image.height, infotext,
                                time.time()))
            if not self._record_finished(job_id, records):
                return  # stop() gave up on this thread and requeued the job: it runs again at the next start
            written.clear()  # in the gallery now
            self._emit(job_id, {"event": "finished", "images": [record[0] for record in records]})
        except GenerationCancelled:
            self._remove(written)
            if self._interrupting == job_id:  # shutdown: back in the queue, and this attempt does not count
                self._end(job_id, "UPDATE jobs SET status='queued', started=NULL, step=0, "
                          "attempts=MAX(attempts-1, 0) WHERE id=? AND status='running'", (job_id,))
                self._emit(job_id, {"event": "queued", "reason": "the server is shutting down; the job runs again "
                                    "at the next start"})
            else:
                self._end(job_id, "UPDATE jobs SET status='cancelled', ended=? WHERE id=? AND status='running'",
                          (time.time(), job_id))
                self._emit(job_id, {"event": "cancelled"})
        except BaseException as error:  # noqa: BLE001 - native panics and SystemExit too: fail the job
            self._remove(written)
            message = self._reason(error)
            kind = "request" if isinstance(error, DappleError) and not _disk_full(error) else "server"
            log.warning("job %s failed: %s", job_id, message)
            self._end(job_id, "UPDATE jobs SET status='failed', ended=?, error=?, error_kind=? WHERE id=? AND "
                      "status='running'", (time.time(), message, kind, job_id))
            self._emit(job_id, {"event": "failed", "error": message, "error_kind": kind})

    def _reason(self, error: BaseException) -> str:
        if _disk_full(error):
            where = getattr(error, "filename", None) or self.data_dir
            return _clip(f"the data folder's disk is full: writing {where} failed ({error}); the job's images "
                         f"were removed. Free space in {self.data_dir} and submit it again")
        if isinstance(error, MemoryError):
            return _clip(f"out of memory while running this job ({error or 'MemoryError'}); try a smaller size "
                         f"or batch")
        if isinstance(error, DappleError):
            return _clip(str(error))
        return _clip(f"{type(error).__name__}: {error}")

    def _remove(self, paths: list[Path]) -> None:
        """Remove the images (and temp files) of a job that did not finish: nothing unrecorded stays behind."""
        for path in paths:
            for each in (path, path.with_name(f".{path.name}.tmp")):
                try:
                    each.unlink(missing_ok=True)
                except OSError:
                    pass

    def _write_progress(self, job_id: str, step: int, steps: int) -> None:
        """Best effort: a locked or full database must not fail or slow the job (self.current has the step)."""
        with self._lock:
            try:
                self._db.execute("PRAGMA busy_timeout=50")
                self._db.execute("UPDATE jobs SET step=?, steps=? WHERE id=?", (step, steps, job_id))
            except sqlite3.OperationalError:
                pass
            finally:
                self._db.execute(f"PRAGMA busy_timeout={int(self.busy_timeout * 1000)}")

    def _record_finished(self, job_id: str, records: list[tuple]) -> bool:
        """The images and the job's end in one transaction, retried while the store is busy. False if the job
        is no longer this worker's (stop() requeued it)."""
        def write() -> bool:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                self._db.executemany("INSERT OR REPLACE INTO images VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)", records)
                done = self._db.execute("UPDATE jobs SET status='finished', ended=? WHERE id=? AND status='running'",
                                        (time.time(), job_id)).rowcount == 1 and job_id not in self._abandoned
                self._db.execute("COMMIT" if done else "ROLLBACK")
                return done
            except BaseException:
                if self._db.in_transaction:
                    self._db.execute("ROLLBACK")
                raise
        return self._retrying(write)

    def _end(self, job_id: str, sql: str, args: tuple) -> None:
        self._retrying(lambda: self._db.execute(sql, args))

    def _retrying(self, write: Callable[[], Any]) -> Any:
        """Run a write of the job's end under the lock, retrying while the database is locked or the disk full
        (health() says so meanwhile), so no job is left "running" by a passing store error. Raises once
        stopping, after which the next start recovers the job."""
        delay = 0.2
        while True:
            with self._lock:
                try:
                    result = write()
                    self._problem = None
                    return result
                except sqlite3.OperationalError as error:
                    self._problem = f"the worker cannot record a job's end: {self._busy(error, 'recording')}"
                    if self._stopping:
                        raise
            self._beat = time.monotonic()
            time.sleep(delay)
            delay = min(delay * 2, 5.0)
