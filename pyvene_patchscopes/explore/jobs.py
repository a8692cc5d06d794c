"""The explorer's queue: one worker thread runs every job on the one model, bounded, cancellable.

Many browser tabs queue on the one model. The queue is bounded: a submission past `MAX_QUEUED` waiting or
running jobs is refused (`QueueFull`, HTTP 429), never evicted later; finished jobs are kept (the last
`KEEP_FINISHED`) for their pages to fetch. Job ids are random (a capability: only the page that made a job can
read or cancel it), and Cancel stops a running job before its next decoder layer (`execution.interrupt`).
"""

from __future__ import annotations

import secrets
import threading
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from ..errors import PatchscopeError
from ..execution.interrupt import checkpoints
from .explorer import Explorer
from .query import FieldError, Query, field_of

MAX_QUEUED = 32  # jobs waiting or running; a submission past them is refused with 429
KEEP_FINISHED = 256  # finished jobs kept for their pages to fetch, oldest dropped first


class QueueFull(PatchscopeError):
    """The queue holds `MAX_QUEUED` jobs (or the server is stopping): the submission is refused, not kept."""


class Cancelled(Exception):
    """The job was cancelled from the page."""


@dataclass
class Job:
    id: str
    kind: str
    query: Query
    warnings: list[str] = field(default_factory=list)
    state: str = "queued"  # queued | running | done | error | cancelled
    progress: float = 0.0
    result: dict[str, Any] | None = None
    error: dict[str, str] | None = None
    cancel: threading.Event = field(default_factory=threading.Event)

    def to_json(self) -> dict[str, Any]:
        """What a poll answers: the job's state and, once done, its result; the prompts are not echoed back."""
        return {
            "id": self.id,
            "kind": self.kind,
            "state": self.state,
            "progress": round(self.progress, 3),
            "result": self.result,
            "error": self.error,
            "warnings": self.warnings,
            "position": self.query.position,
            "preset": self.query.preset,
        }


class Jobs:
    """One worker thread runs every job on the one model, in the order they came.

    At most `max_queued` jobs wait or run at once: a submission past them raises `QueueFull` (the page's
    429), so nothing submitted is dropped later. Finished jobs are kept (the last `keep`) so that their pages
    can fetch them. `close` cancels what is queued, stops the running job before its next layer and joins
    the worker, so the process can exit while no model code runs (Ctrl-C).
    """

    def __init__(self, explorer: Explorer, keep: int = KEEP_FINISHED, max_queued: int = MAX_QUEUED):
        self.explorer, self.keep, self.max_queued = explorer, keep, max_queued
        self._jobs: dict[str, Job] = {}
        self._queue: deque[Job] = deque()
        self._finished: deque[str] = deque()
        self._running: Job | None = None
        self._closed = False
        self._lock = threading.Condition()
        self._worker = threading.Thread(target=self._work, name="patchscopes-explorer", daemon=True)
        self._worker.start()

    def submit(self, kind: str, query: Query) -> Job:
        notes = self.explorer.check(query, kind)
        with self._lock:
            if self._closed:
                raise QueueFull("the explorer is shutting down (allowed: nothing more)")
            waiting = len(self._queue) + (self._running is not None)
            if waiting >= self.max_queued:
                raise QueueFull(
                    f"the queue holds {waiting} jobs (allowed: at most {self.max_queued} waiting or "
                    "running); try again when one has finished"
                )
            job = Job(secrets.token_urlsafe(18), kind, query, notes)
            self._jobs[job.id] = job
            self._queue.append(job)
            self._lock.notify()
        return job

    def get(self, job_id: str) -> Job | None:
        with self._lock:
            return self._jobs.get(job_id)

    def cancel(self, job_id: str) -> Job | None:
        with self._lock:
            job = self._jobs.get(job_id)
            if job is not None and job.state in ("queued", "running"):
                job.cancel.set()
                if job.state == "queued":
                    self._queue.remove(job)
                    job.state = "cancelled"
                    self._finish(job)
            return job

    def counts(self) -> dict[str, int]:
        """How many jobs are in each state (kept jobs only)."""
        with self._lock:
            states = [job.state for job in self._jobs.values()]
        return {state: states.count(state) for state in ("queued", "running", "done", "error", "cancelled")}

    def close(self, timeout: float = 30.0) -> bool:
        """Refuse new jobs, cancel the queued ones, stop the running one and wait for the worker; True once the
        worker has ended within `timeout` seconds."""
        with self._lock:
            self._closed = True
            while self._queue:
                job = self._queue.popleft()
                job.cancel.set()
                job.state = "cancelled"
                self._finish(job)
            if self._running is not None:
                self._running.cancel.set()
            self._lock.notify_all()
        self._worker.join(timeout)
        return not self._worker.is_alive()

    def _finish(self, job: Job) -> None:
        """Keep `job` among the finished ones, dropping the oldest finished beyond `keep` (under the lock)."""
        self._finished.append(job.id)
        while len(self._finished) > self.keep:
            self._jobs.pop(self._finished.popleft(), None)

    def _work(self) -> None:
        while True:
            with self._lock:
                while not self._queue and not self._closed:
                    self._lock.wait()
                if not self._queue:
                    return
                job = self._queue.popleft()
                job.state, self._running = "running", job
            self._run(job)
            with self._lock:
                self._running = None
                self._finish(job)

    def _run(self, job: Job) -> None:
        def check() -> None:
            if job.cancel.is_set():
                raise Cancelled()

        def step(fraction: float) -> None:
            check()
            job.progress = fraction

        try:
            with checkpoints(self.explorer.handle.model, check):  # Cancel stops the job before its next layer
                job.result = getattr(self.explorer, job.kind)(job.query, step)
            job.state = "done"
        except Cancelled:
            job.state = "cancelled"
        except FieldError as error:
            job.error, job.state = {"field": error.field, "message": str(error)}, "error"
        except (PatchscopeError, ValueError, RuntimeError) as error:  # reported to the page, the worker lives on
            job.error, job.state = {"field": field_of(error), "message": str(error)}, "error"


__all__ = ["Job", "Jobs", "QueueFull", "Cancelled", "MAX_QUEUED", "KEEP_FINISHED"]
