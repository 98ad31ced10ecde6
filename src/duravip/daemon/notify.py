"""Notify hooks: run a program and/or write a FIFO line on every local transition.

Events (keepalived's ``notify`` / ``notify_fifo``): ``acquire IP``, ``release
IP``, ``healthy``, ``unhealthy``, ``drained``, ``undrained``. They are queued
without blocking the caller and handled by one task, in order, one at a
time: the program gets the event words as arguments (``notify acquire
10.1.1.1``) and ``DURAVIP_NODE`` / ``DURAVIP_EVENT`` in its environment, and
is killed after ``notify_timeout``; the FIFO gets ``EVENT [IP]\\n``, written
non-blocking (no reader or a full pipe is a failure, never a stall). Every
failure is logged and counted (``duravip_notify_total``); a full queue drops
the event and counts it.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
import subprocess
from collections.abc import Callable
from pathlib import Path

import trio

__all__ = ["QUEUE_MAX", "Notifier"]

log = logging.getLogger("duravip.notify")

#: Events waiting beyond this are dropped (a hung hook must not eat memory).
QUEUE_MAX = 4096


class Notifier:
    """The event queue and its counters; :meth:`serve` runs the hooks."""

    def __init__(
        self,
        *,
        node: str,
        program: Callable[[], Path | None],
        fifo: Callable[[], Path | None],
        timeout: Callable[[], float],
    ) -> None:
        self.node = node
        self._program = program
        self._fifo = fifo
        self._timeout = timeout
        self._send, self._recv = trio.open_memory_channel[tuple[str, ...]](QUEUE_MAX)
        self.counters: dict[str, int] = dict.fromkeys(
            ("events", "ok", "failed", "timeouts", "dropped", "fifo_ok", "fifo_failed"), 0
        )
        #: The last events handled, newest last (for the console).
        self.recent: list[tuple[str, ...]] = []

    def emit(self, *words: str) -> None:
        """Queue one event (never blocks; counted as dropped when the queue is full)."""
        if self._program() is None and self._fifo() is None:
            return
        self.counters["events"] += 1
        try:
            self._send.send_nowait(words)
        except trio.WouldBlock:
            self.counters["dropped"] += 1
            log.error("notify queue full: dropped %s", " ".join(words))

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        async for words in self._recv:
            self.recent = [*self.recent[-31:], words]
            program, fifo = self._program(), self._fifo()
            if program is not None:
                await self._run(program, words)
            if fifo is not None:
                self._write_fifo(fifo, words)

    async def _run(self, program: Path, words: tuple[str, ...]) -> None:
        timeout = self._timeout()
        env = {**os.environ, "DURAVIP_NODE": self.node, "DURAVIP_EVENT": " ".join(words)}
        with trio.move_on_after(timeout) as scope:
            try:
                proc = await trio.run_process(
                    [str(program), *words],
                    check=False,
                    env=env,
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.DEVNULL,
                )
            except OSError as exc:
                self._fail("failed", f"{program}: {exc.strerror or exc}", words)
                return
        if scope.cancelled_caught:
            self._fail("timeouts", f"{program} ran over {timeout}s (killed)", words)
        elif proc.returncode != 0:
            self._fail("failed", f"{program} exited {proc.returncode}", words)
        else:
            self.counters["ok"] += 1

    def _write_fifo(self, fifo: Path, words: tuple[str, ...]) -> None:
        line = (" ".join(words) + "\n").encode()
        try:
            # Never follow a symlink, never write into a regular file put in its place.
            fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK | os.O_NOFOLLOW)
        except OSError as exc:
            why = "no reader" if exc.errno == errno.ENXIO else exc.strerror
            self._fail("fifo_failed", f"{fifo}: {why}", words)
            return
        try:
            if not stat.S_ISFIFO(os.fstat(fd).st_mode):
                self._fail("fifo_failed", f"{fifo}: not a FIFO (refused)", words)
                return
            os.write(fd, line)
        except OSError as exc:
            self._fail("fifo_failed", f"{fifo}: {exc.strerror}", words)
        else:
            self.counters["fifo_ok"] += 1
        finally:
            os.close(fd)

    def _fail(self, counter: str, why: str, words: tuple[str, ...]) -> None:
        self.counters[counter] += 1
        log.error("notify %s failed: %s", " ".join(words), why)
