"""NodeActuator against fakes of its two handles: the order that keeps SMTP honest."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from ipaddress import IPv4Address

import trio

from duravip.daemon.actuator import CLOSE_GRACE, ActuatorContext, NodeActuator

A, B, C = (IPv4Address(f"10.0.0.{i}") for i in (1, 2, 3))


class Log:
    def __init__(self) -> None:
        self.events: list[tuple[str, object]] = []


class FakePlumbing:
    def __init__(self, log: Log, missing: frozenset[IPv4Address] = frozenset()) -> None:
        self.log, self.missing = log, missing

    async def ensure(self, ips: Iterable[IPv4Address]) -> frozenset[IPv4Address]:
        got = frozenset(ips) - self.missing
        self.log.events.append(("plumb", got))
        return got

    async def remove(self, ips: Iterable[IPv4Address]) -> None:
        self.log.events.append(("unplumb", frozenset(ips)))


class FakeListeners:
    def __init__(self, log: Log, broken: frozenset[IPv4Address] = frozenset()) -> None:
        self.log, self.broken = log, broken

    async def start_ip(self, ip: IPv4Address, *, freebind: bool = False) -> None:
        if ip in self.broken:
            raise OSError(98, "Address already in use")
        self.log.events.append(("start", ip) if freebind else ("start-bound-only", ip))

    async def quiesce_ip(self, ip: IPv4Address, drain_timeout: float) -> None:
        await trio.sleep(0.01)
        self.log.events.append(("quiesce", (ip, drain_timeout)))

    def gate_syns(self, ip: IPv4Address) -> int:
        self.log.events.append(("gate", ip))
        return 1

    def close_ip(self, ip: IPv4Address, grace: float) -> None:
        self.log.events.append(("close", (ip, grace)))

    async def stop_ip(self, ip: IPv4Address, drain_timeout: float) -> None:
        await trio.sleep(0.01)
        self.log.events.append(("stop", (ip, drain_timeout)))


class FakeCapture:
    def __init__(self, log: Log) -> None:
        self.log = log

    def start(self) -> None:
        self.log.events.append(("relay", "start"))


class FakeRelay:
    def __init__(self, log: Log) -> None:
        self.log = log

    def open(self, ips: Iterable[IPv4Address]) -> FakeCapture:
        self.log.events.append(("relay", frozenset(ips)))
        return FakeCapture(self.log)


async def test_acquire_binds_freely_then_plumbs_and_drops_ips_it_cannot_serve() -> None:
    log = Log()
    act = NodeActuator(
        ActuatorContext(
            plumbing=FakePlumbing(log, missing=frozenset({C})),
            listeners=FakeListeners(log, broken=frozenset({B})),
            drain_timeout=lambda: 1.0,
        )
    )
    with trio.fail_after(5):
        got = await act.acquire(frozenset({A, B, C}))
    assert got == {A}
    # Listeners first (freebind: before the address exists); B's failed, so B is never
    # plumbed; C could not be plumbed, so its listener stops again.
    assert log.events == [("start", A), ("start", C), ("plumb", {A}), ("stop", (C, 0.0))]


async def test_release_drains_before_unplumbing_and_closes_the_sockets_only_after() -> None:
    log = Log()
    drain = [2.5]

    @asynccontextmanager
    async def quiesce(ips: frozenset[IPv4Address]) -> AsyncIterator[None]:
        log.events.append(("mail-quiesce", ips))
        yield
        log.events.append(("mail-resume", ips))

    act = NodeActuator(
        ActuatorContext(
            plumbing=FakePlumbing(log),
            listeners=FakeListeners(log),
            drain_timeout=lambda: drain[0],
            relay=FakeRelay(log),
            quiesce=quiesce,
        )
    )
    with trio.fail_after(5):
        await act.release(frozenset({A, B}))
        drain[0] = 0.5  # a reload changed cluster.drain_timeout
        await act.release(frozenset({C}))
    # Drain (with the current drain_timeout) while the sockets accept; the deliveries
    # read their last reply; the relay captures before the listeners stop taking SYNs
    # and reads only after (what queued before, the kernel answered); unplumb; close.
    # A SYN between the close and the unplumb would have met a reset.
    ev = log.events
    assert sorted(ev[:2]) == [("quiesce", (A, 2.5)), ("quiesce", (B, 2.5))]
    assert ev[2:4] == [("mail-quiesce", {A, B}), ("relay", {A, B})]
    assert sorted(ev[4:6]) == [("gate", A), ("gate", B)]
    assert ev[6:9] == [("relay", "start"), ("unplumb", {A, B}), ("mail-resume", {A, B})]
    assert sorted(ev[9:11]) == [("close", (A, CLOSE_GRACE)), ("close", (B, CLOSE_GRACE))]
    assert ev[11:] == [
        ("quiesce", (C, 0.5)),
        ("mail-quiesce", {C}),
        ("relay", {C}),
        ("gate", C),
        ("relay", "start"),
        ("unplumb", {C}),
        ("mail-resume", {C}),
        ("close", (C, 0.2)),
    ]
