"""Where the spool's group-commit ``fdatasync`` runs: inline while the disk is fast.

A flush handed to a worker thread costs the event loop a thread hop and both
threads a wake-up: on the 2-core VM this was measured at about 230 µs of CPU
and 460 µs of wall time per flush, against 80 µs and 250 µs for the same
``write`` + ``fdatasync`` called inline (the disk's own flush: about 0.2 ms).
With a few lock-step SMTP clients every one of them is waiting for that very
flush, so nothing is lost by blocking the loop for it, and the hop was the
largest single cost of durable ingest. A slow disk must not stall the loop
(SWIM probes, timers, other sessions), so the runner measures every flush and
after one that took ``inline_below`` or longer sends the next ``backoff``
flushes to the thread, inline again only once they were all fast. The worst
stall is therefore one flush that turned slow unannounced.
"""

from __future__ import annotations

import os
import time

import trio

__all__ = ["FlushRunner"]


def _timed_fdatasync(fd: int) -> float:
    # os.fdatasync looked up per call (tests and the benchmark wrap it).
    start = time.perf_counter()
    os.fdatasync(fd)
    return time.perf_counter() - start


class FlushRunner:
    """Runs ``fdatasync`` inline or in a worker thread (see the module docstring)."""

    __slots__ = ("backoff", "inline", "inline_below", "slow_left", "threaded")

    def __init__(self, inline_below: float = 0.001, backoff: int = 64) -> None:
        #: A flush at least this long (seconds) sends the next ones to the thread; 0: never inline.
        self.inline_below = inline_below
        self.backoff = backoff
        #: Flushes still to run in the thread after the last slow one.
        self.slow_left = 0
        #: Flushes run each way (for benchmarks and tests).
        self.inline = 0
        self.threaded = 0

    async def fdatasync(self, fd: int) -> None:
        """Flush ``fd``; ``OSError`` as from ``os.fdatasync``."""
        if self.inline_below > 0 and self.slow_left == 0:
            self.inline += 1
            took = _timed_fdatasync(fd)
        else:
            self.threaded += 1
            took = await trio.to_thread.run_sync(_timed_fdatasync, fd)
        if took >= self.inline_below:
            self.slow_left = self.backoff
        elif self.slow_left:
            self.slow_left -= 1
