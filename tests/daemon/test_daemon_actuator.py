"""NodeActuator against fakes of its two handles: the order that keeps SMTP honest."""

from __future__ import annotations

from collections.abc import Iterable
from ipaddress import IPv4Address

import trio

from duravip.daemon.actuator import ActuatorContext, NodeActuator

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

    async def start_ip(self, ip: IPv4Address) -> None:
        if ip in self.broken:
            raise OSError(98, "Address already in use")
        self.log.events.append(("start", ip))

    async def stop_ip(self, ip: IPv4Address, drain_timeout: float) -> None:
        await trio.sleep(0.01)
        self.log.events.append(("stop", (ip, drain_timeout)))


async def test_acquire_plumbs_then_starts_and_drops_ips_whose_listeners_fail() -> None:
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
    # C never got plumbed; B did but its listener failed: unplumbed again.
    assert log.events == [("plumb", {A, B}), ("start", A), ("unplumb", {B})]


async def test_release_drains_listeners_before_unplumbing_with_the_current_drain_timeout() -> None:
    log = Log()
    drain = [2.5]
    act = NodeActuator(
        ActuatorContext(
            plumbing=FakePlumbing(log), listeners=FakeListeners(log), drain_timeout=lambda: drain[0]
        )
    )
    with trio.fail_after(5):
        await act.release(frozenset({A, B}))
        drain[0] = 0.5  # a reload changed cluster.drain_timeout
        await act.release(frozenset({C}))
    assert sorted(log.events[:2]) == [("stop", (A, 2.5)), ("stop", (B, 2.5))]
    assert log.events[2:] == [("unplumb", {A, B}), ("stop", (C, 0.5)), ("unplumb", {C})]
