"""Where the spool's group-commit ``fdatasync`` runs: a worker thread, waited for
synchronously for at most ``inline_below`` (1 ms), then asynchronously.

A flush handed over through ``trio.to_thread`` costs the event loop a thread
hop and both threads a wake-up: on the 2-core VM about 230 µs of CPU and
460 µs of wall time per flush, against 80 µs and 250 µs for the same
``write`` + ``fdatasync`` called inline (the disk's own flush: about 0.1-0.2
ms). With a few lock-step SMTP clients every one of them waits for that very
flush, so the loop has nothing better to do meanwhile; but a disk that turns
slow unannounced (4 ms phases on the VM disk, 100 ms and more on a real one
under load) must never stall the loop (SWIM probes, timers, other sessions).

So each flush goes to a long-lived worker thread (``workers`` of them, fed by a
queue: no thread start, no trio hop) and the loop blocks on a
``threading.Event`` for at most ``inline_below``: a fast flush is answered
there at about the cost of an inline one, and the loop is never blocked by the
spool for longer than that bound. A flush still running then is waited for
asynchronously (the worker wakes the loop with ``run_sync_soon``). After such a
slow one the next ``backoff`` flushes skip the bounded wait (they would only
burn it), until they were all fast.
"""

from __future__ import annotations

import contextlib
import os
import queue
import threading
import time
from collections.abc import Callable

import trio

__all__ = ["FlushRunner"]


def _timed_fdatasync(fd: int) -> float:
    # os.fdatasync looked up per call (tests and the benchmark wrap it).
    start = time.perf_counter()
    os.fdatasync(fd)
    return time.perf_counter() - start


class _Job:
    __slots__ = ("done", "error", "fd", "lock", "took", "wake")

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.done = threading.Event()
        self.lock = threading.Lock()
        self.took = 0.0
        self.error: OSError | None = None
        #: Set by a loop that stopped waiting synchronously: how to wake it.
        self.wake: Callable[[], None] | None = None


def _worker(jobs: queue.SimpleQueue[_Job | None]) -> None:
    while (job := jobs.get()) is not None:
        try:
            job.took = _timed_fdatasync(job.fd)
        except OSError as exc:
            job.error = exc
        with job.lock:
            job.done.set()
            wake = job.wake
        if wake is not None:
            with contextlib.suppress(trio.RunFinishedError):  # the run is over: nobody waits
                wake()


class FlushRunner:
    """Runs ``fdatasync`` in worker threads, waiting a bounded time synchronously."""

    __slots__ = (
        "_jobs",
        "_threads",
        "backoff",
        "inline",
        "inline_below",
        "slow_left",
        "threaded",
        "workers",
    )

    def __init__(self, inline_below: float = 0.001, backoff: int = 64, workers: int = 2) -> None:
        #: The longest the loop is blocked waiting for a flush (seconds); 0: never.
        self.inline_below = inline_below
        self.backoff = backoff
        self.workers = workers
        #: Flushes still to wait for asynchronously only, after the last slow one.
        self.slow_left = 0
        #: Flushes answered within the bounded wait, and the others (benchmarks, tests).
        self.inline = 0
        self.threaded = 0
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._threads: list[threading.Thread] = []

    def _submit(self, fd: int) -> _Job:
        if not self._threads:
            for _ in range(max(1, self.workers)):
                t = threading.Thread(
                    target=_worker, args=(self._jobs,), name="spool-flush", daemon=True
                )
                t.start()
                self._threads.append(t)
        job = _Job(fd)
        self._jobs.put(job)
        return job

    async def fdatasync(self, fd: int) -> None:
        """Flush ``fd``; ``OSError`` as from ``os.fdatasync``."""
        job = self._submit(fd)
        if self.inline_below > 0 and self.slow_left == 0 and job.done.wait(self.inline_below):
            self.inline += 1
        else:
            self.threaded += 1
            await _wait_async(job)
        if job.error is not None:
            raise job.error
        if job.took >= self.inline_below:
            self.slow_left = self.backoff
        elif self.slow_left:
            self.slow_left -= 1

    def close(self) -> None:
        """Stop the workers once the flushes queued so far are done."""
        for _ in self._threads:
            self._jobs.put(None)
        self._threads = []


async def _wait_async(job: _Job) -> None:
    token = trio.lowlevel.current_trio_token()
    finished = trio.Event()
    with job.lock:
        if not job.done.is_set():
            job.wake = lambda: token.run_sync_soon(finished.set)
        else:
            finished.set()
    # A flush is bounded disk I/O and the spool shields its caller; if cancelled all
    # the same, the flush still completes in the worker.
    await finished.wait()
