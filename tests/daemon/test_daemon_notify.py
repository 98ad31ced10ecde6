"""Notify hooks: ordered, one at a time, bounded by a timeout, failures counted, never blocking."""

from __future__ import annotations

import os
from pathlib import Path

import trio

from duravip.daemon.notify import QUEUE_MAX, Notifier


def hook(tmp: Path, body: str) -> Path:
    p = tmp / "hook.sh"
    p.write_text("#!/bin/sh\n" + body)
    p.chmod(0o755)
    return p


def notifier(program: Path | None = None, fifo: Path | None = None, timeout: float = 2.0) -> Notifier:
    return Notifier(node="n1", program=lambda: program, fifo=lambda: fifo, timeout=lambda: timeout)


async def settle(n: Notifier, handled: int, timeout: float = 10.0) -> None:
    with trio.fail_after(timeout):
        while sum(n.counters[k] for k in ("ok", "failed", "timeouts")) < handled:
            await trio.sleep(0.01)


async def test_events_run_in_order_one_at_a_time(tmp_path: Path) -> None:
    log = tmp_path / "log"
    # Each run takes a while and checks nobody else runs: a lock file must not exist.
    prog = hook(
        tmp_path,
        f'[ -e {tmp_path}/busy ] && echo OVERLAP >> {log}\n'
        f"touch {tmp_path}/busy; sleep 0.05\n"
        f'echo "$DURAVIP_NODE $* ($DURAVIP_EVENT)" >> {log}\n'
        f"rm {tmp_path}/busy\n",
    )
    n = notifier(prog)
    async with trio.open_nursery() as nursery:
        await nursery.start(n.serve)
        n.emit("release", "10.1.1.1")
        n.emit("unhealthy")
        n.emit("acquire", "10.1.1.2")
        await settle(n, 3)
        nursery.cancel_scope.cancel()
    assert log.read_text().splitlines() == [
        "n1 release 10.1.1.1 (release 10.1.1.1)",
        "n1 unhealthy (unhealthy)",
        "n1 acquire 10.1.1.2 (acquire 10.1.1.2)",
    ]
    assert n.counters["ok"] == 3 and n.counters["failed"] == 0


async def test_failures_and_timeouts_are_counted_and_the_queue_goes_on(tmp_path: Path) -> None:
    log = tmp_path / "log"
    prog = hook(tmp_path, f'echo "$*" >> {log}\n[ "$1" = fail ] && exit 1\n[ "$1" = hang ] && sleep 30\nexit 0\n')
    n = notifier(prog, timeout=0.3)
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            await nursery.start(n.serve)
            for e in ("fail", "hang", "healthy"):
                n.emit(e)
            await settle(n, 3)
            nursery.cancel_scope.cancel()
    assert log.read_text().split() == ["fail", "hang", "healthy"]
    assert (n.counters["failed"], n.counters["timeouts"], n.counters["ok"]) == (1, 1, 1)


async def test_a_missing_program_is_a_failure_not_a_crash(tmp_path: Path) -> None:
    n = notifier(tmp_path / "nope")
    async with trio.open_nursery() as nursery:
        await nursery.start(n.serve)
        n.emit("drained")
        await settle(n, 1)
        nursery.cancel_scope.cancel()
    assert n.counters["failed"] == 1


async def test_fifo_gets_one_line_per_event_and_no_reader_is_a_failure(tmp_path: Path) -> None:
    fifo = tmp_path / "events"
    os.mkfifo(fifo)
    n = notifier(fifo=fifo)
    async with trio.open_nursery() as nursery:
        await nursery.start(n.serve)
        n.emit("acquire", "10.1.1.1")  # nobody reads: fails fast, never blocks
        with trio.fail_after(2):
            while n.counters["fifo_failed"] < 1:
                await trio.sleep(0.01)
        rfd = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
        try:
            n.emit("release", "10.1.1.1")
            n.emit("healthy")
            with trio.fail_after(2):
                while n.counters["fifo_ok"] < 2:
                    await trio.sleep(0.01)
            assert os.read(rfd, 4096) == b"release 10.1.1.1\nhealthy\n"
        finally:
            os.close(rfd)
        nursery.cancel_scope.cancel()


async def test_emit_never_blocks_and_drops_beyond_the_queue(tmp_path: Path) -> None:
    n = notifier(hook(tmp_path, "exit 0\n"))  # serve() not running: nothing is consumed
    for i in range(QUEUE_MAX + 5):
        n.emit("acquire", f"10.0.{i // 256}.{i % 256}")
    assert n.counters["dropped"] == 5 and n.counters["events"] == QUEUE_MAX + 5


def test_no_hook_configured_queues_nothing() -> None:
    n = notifier()
    n.emit("healthy")
    assert n.counters["events"] == 0


async def test_fifo_path_that_is_a_file_or_a_symlink_is_refused(tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    for path in (victim, tmp_path / "link"):
        if path.name == "link":
            path.symlink_to(victim)
        n = notifier(fifo=path)
        async with trio.open_nursery() as nursery:
            await nursery.start(n.serve)
            n.emit("healthy")
            with trio.fail_after(2):
                while n.counters["fifo_failed"] < 1:
                    await trio.sleep(0.01)
            nursery.cancel_scope.cancel()
    assert victim.read_text() == "precious\n"
