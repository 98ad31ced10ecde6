"""Resolver scenarios: three nodes over a shared in-memory world, autojump clock."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import asynccontextmanager
from ipaddress import IPv4Address
from typing import Any

import pytest
import trio
from trio_util import AsyncValue

from duravip.config import ClusterConfig, Config, DuraVip, HostPort
from duravip.election import NodeView
from duravip.election.picture import ClusterSnapshot
from duravip.election.resolver import ResolverService, serve
from duravip.swim.members import State

IPS = [IPv4Address(f"10.1.1.{i}") for i in range(1, 9)]
NAMES = ["n1", "n2", "n3"]
MATURE = 2.0
LATENCY = 0.01  # fake actuator time per call


def make_config(
    node: str,
    *,
    quorum: str = "none",
    binding: dict[IPv4Address, str] | None = None,
    pref: dict[IPv4Address, str] | None = None,
) -> Config:
    binding = binding or {}
    pref = pref or {}
    return Config(
        cluster=ClusterConfig(
            name="t",
            node_name=node,
            gossip_address=HostPort(IPv4Address("192.168.0.1"), 4801),
            view_mature_time=MATURE,
            quorum=quorum,  # type: ignore[arg-type]
        ),
        duravips={
            ip: DuraVip(
                ip=ip, listener_ports=(25,), binding=binding.get(ip), preference=pref.get(ip)
            )
            for ip in IPS
        },
    )


class FakeActuator:
    def __init__(self, world: World, node: str) -> None:
        self.world, self.node = world, node
        self.plumbed: set[IPv4Address] = set()
        self.calls: list[tuple[str, frozenset[IPv4Address]]] = []
        self.fail = 0

    async def acquire(self, ips: frozenset[IPv4Address]) -> frozenset[IPv4Address]:
        assert not self.world.busy.get(self.node), "actuator calls must be serialized"
        self.world.busy[self.node] = True
        try:
            self.calls.append(("acquire", ips))
            await trio.sleep(LATENCY)
            if self.fail:
                self.fail -= 1
                raise OSError("netlink says no")
            self.world.check_exclusive(self.node, ips)
            self.plumbed |= ips
            self.world.log.append((trio.current_time(), self.node, "acquire", ips))
            return ips
        finally:
            self.world.busy[self.node] = False

    async def release(self, ips: frozenset[IPv4Address]) -> None:
        self.calls.append(("release", ips))
        await trio.sleep(LATENCY)
        self.plumbed -= ips
        self.world.log.append((trio.current_time(), self.node, "release", ips))


class World:
    """Membership truth, reachability, and view propagation for the nodes."""

    def __init__(self, nursery: trio.Nursery, delay: float) -> None:
        self.nursery = nursery
        #: View propagation delay (gossip + TCP fetch); membership states are instant.
        self.delay = delay
        self.state: dict[str, str] = {}
        self.views: dict[str, NodeView] = {}
        self.seen: dict[str, dict[str, NodeView]] = {}
        self.snap: dict[str, AsyncValue[ClusterSnapshot]] = {}
        self.act: dict[str, FakeActuator] = {}
        self.svc: dict[str, ResolverService] = {}
        self.scope: dict[str, trio.CancelScope] = {}
        self.cut: set[frozenset[str]] = set()
        self.busy: dict[str, bool] = {}
        self.violations: list[Any] = []
        self.log: list[Any] = []

    def reach(self, a: str, b: str) -> bool:
        return a == b or frozenset((a, b)) not in self.cut

    def running(self) -> list[str]:
        return [n for n in self.scope if self.state.get(n) == "alive"]

    def check_exclusive(self, node: str, ips: frozenset[IPv4Address]) -> None:
        for other in self.running():
            if other != node and self.reach(node, other) and self.act[other].plumbed & ips:
                self.violations.append((trio.current_time(), node, other, ips))

    def publish(self, node: str, view: NodeView) -> None:
        if self.delay:
            self.nursery.start_soon(self._deliver, node, view)
        else:
            self.views[node] = view
            self.propagate()

    async def _deliver(self, node: str, view: NodeView) -> None:
        await trio.sleep(self.delay)
        if node not in self.views or self.views[node].version < view.version:
            self.views[node] = view
            self.propagate()

    def propagate(self) -> None:
        for n in self.running():
            seen = self.seen.setdefault(n, {})
            for m, v in self.views.items():
                if self.reach(n, m):
                    seen[m] = v
            states = {}
            for m, st in self.state.items():
                states[m] = State(st if st != "alive" or self.reach(n, m) else "dead")
            self.snap[n].value = ClusterSnapshot(n, states, dict(seen))

    async def start(self, node: str, config: Config | None = None) -> ResolverService:
        config = config or make_config(node)
        self.state[node] = "alive"
        self.snap[node] = AsyncValue(ClusterSnapshot(node, {}, {}))
        self.act.setdefault(node, FakeActuator(self, node))
        self.propagate()

        async def run(task_status: trio.TaskStatus[ResolverService]) -> None:
            with trio.CancelScope() as cs:
                self.scope[node] = cs
                await serve(
                    config=config,
                    snapshot=self.snap[node],
                    actuator=self.act[node],
                    publish_view=lambda v: self.publish(node, v),
                    mature_after=config.cluster.view_mature_time,
                    task_status=task_status,
                )

        svc: ResolverService = await self.nursery.start(run)
        self.svc[node] = svc
        return svc

    def crash(self, node: str) -> None:
        self.scope.pop(node).cancel()
        self.state[node] = "dead"
        self.propagate()

    async def leave(self, node: str) -> None:
        await self.svc[node].release_all()
        self.scope.pop(node).cancel()
        self.state[node] = "left"
        self.propagate()

    def partition(self, *sides: list[str]) -> None:
        for i, a in enumerate(sides):
            for b in sides[i + 1 :]:
                self.cut |= {frozenset((x, y)) for x in a for y in b}
        self.propagate()

    def heal(self) -> None:
        self.cut.clear()
        self.propagate()

    def holders(self, ip: IPv4Address) -> list[str]:
        return sorted(n for n in self.running() if ip in self.act[n].plumbed)

    def owner(self, node: str, ip: IPv4Address) -> str | None:
        d = self.svc[node].decisions.value.get(ip)
        return d.owner if d else None

    def assert_settled(self) -> None:
        """Connected, agreed: every IP held by exactly its owner."""
        assert not self.violations, self.violations
        live = self.running()
        for ip in IPS:
            owners = {self.owner(n, ip) for n in live}
            assert len(owners) == 1, (ip, owners)
            (owner,) = owners
            assert self.holders(ip) == ([owner] if owner else []), (ip, owner, self.holders(ip))
            for n in live:
                assert (ip in self.svc[n].held.value) == (n == owner)


@asynccontextmanager
async def open_world(delay: float = 0.0) -> Iterator[World]:  # type: ignore[misc]
    async with trio.open_nursery() as nursery:
        world = World(nursery, delay)
        try:
            yield world
        finally:
            nursery.cancel_scope.cancel()


async def start_all(world: World, **kw: Any) -> None:
    for n in NAMES:
        await world.start(n, make_config(n, **kw))
        await trio.sleep(0.3)  # staggered, as after a rolling start
    await trio.sleep(MATURE + 1)
    world.assert_settled()


@pytest.fixture(params=[0.0, 0.05], ids=["instant", "gossip50ms"])
def delay(request: pytest.FixtureRequest) -> float:
    return float(request.param)


def settle(delay: float) -> float:
    return 0.1 + 8 * delay


async def test_start_elects_one_holder_per_ip(autojump_clock):
    with trio.fail_after(30):
        async with open_world() as w:
            await w.start("n1")
            await trio.sleep(1)
            assert not w.act["n1"].plumbed  # immature: takes nothing
            assert w.views["n1"].mature is False
            await w.start("n2")
            await w.start("n3")
            await trio.sleep(MATURE + 1)
            w.assert_settled()
            assert sum(len(w.act[n].plumbed) for n in NAMES) == len(IPS)
            assert all(w.views[n].mature for n in NAMES)
            # one batched acquire per node
            for n in NAMES:
                assert len([c for c in w.act[n].calls if c[0] == "acquire"]) <= 1


async def test_crash_holder_new_owner_takes_at_once(autojump_clock, delay):
    with trio.fail_after(30):
        async with open_world(delay) as w:
            await start_all(w)
            victim = w.holders(IPS[0])[0]
            lost = set(w.act[victim].plumbed)
            t0 = trio.current_time()
            w.crash(victim)
            await trio.sleep(settle(delay))
            w.assert_settled()
            for ip in lost:
                assert w.holders(ip) and victim not in w.holders(ip)
            lat = [x for n in w.svc if n != victim for x in w.svc[n].stats.takeover_latencies]
            assert lat and max(lat) <= LATENCY + 1e-6
            recent = [t for n in w.svc if n != victim for t in w.svc[n].stats.recent]
            taken = [t for t in recent if t.from_node == victim]
            assert {t.ip for t in taken} == lost
            assert all(t.at - t0 <= LATENCY + 1e-6 for t in taken)  # at once: one actuator call


async def test_graceful_leave_hands_over_without_overlap(autojump_clock, delay):
    with trio.fail_after(30):
        async with open_world(delay) as w:
            await start_all(w)
            leaver = w.holders(IPS[0])[0]
            await w.leave(leaver)
            assert not w.act[leaver].plumbed
            await trio.sleep(settle(delay))
            w.assert_settled()
            assert w.svc[leaver].stats.moves_out > 0


async def test_fail_back_after_maturity_break_before_make(autojump_clock, delay):
    pref = {ip: "n1" for ip in IPS[:3]}
    with trio.fail_after(30):
        async with open_world(delay) as w:
            await w.start("n2", make_config("n2", pref=pref))
            await trio.sleep(0.3)
            await w.start("n3", make_config("n3", pref=pref))
            await trio.sleep(MATURE + 1)
            old = {ip: w.holders(ip)[0] for ip in IPS[:3]}
            await w.start("n1", make_config("n1", pref=pref))
            await trio.sleep(MATURE - 0.5)  # still immature: nothing moves
            assert {ip: w.holders(ip)[0] for ip in IPS[:3]} == old
            await trio.sleep(1.0)
            w.assert_settled()
            assert all(w.holders(ip) == ["n1"] for ip in IPS[:3])
            # the old holders released before n1 acquired
            first_acq = min(t for t, n, what, ips in w.log if n == "n1" and what == "acquire")
            rel = [t for t, n, what, ips in w.log if what == "release" and ips & set(IPS[:3])]
            assert rel and max(rel) <= first_acq


async def test_partition_without_quorum_both_sides_serve_then_heal(autojump_clock, delay):
    with trio.fail_after(30):
        async with open_world(delay) as w:
            await start_all(w)
            w.partition(["n1", "n2"], ["n3"])
            await trio.sleep(settle(delay))
            assert w.act["n3"].plumbed == set(IPS)
            assert w.act["n1"].plumbed | w.act["n2"].plumbed == set(IPS)
            w.heal()
            await trio.sleep(settle(delay))
            w.assert_settled()  # the non-owners released at once


async def test_partition_with_quorum_minority_releases(autojump_clock, delay):
    with trio.fail_after(30):
        async with open_world(delay) as w:
            await start_all(w, quorum="majority")
            w.assert_settled()
            w.partition(["n1", "n2"], ["n3"])
            await trio.sleep(settle(delay))
            assert not w.act["n3"].plumbed
            assert w.act["n1"].plumbed | w.act["n2"].plumbed == set(IPS)
            d = w.svc["n3"].decisions.value[IPS[0]]
            assert d.owner is None and "no quorum" in d.reason
            w.heal()
            await trio.sleep(settle(delay))
            w.assert_settled()


async def test_partition_with_quorum_one_one_one_nobody_serves(autojump_clock, delay):
    with trio.fail_after(30):
        async with open_world(delay) as w:
            await start_all(w, quorum="majority")
            w.partition(["n1"], ["n2"], ["n3"])
            await trio.sleep(settle(delay))
            assert all(not w.act[n].plumbed for n in NAMES)


async def test_config_change_broken_then_fixed(autojump_clock, delay):
    ip = IPS[0]
    good = {ip: "bind-a"}
    with trio.fail_after(30):
        async with open_world(delay) as w:
            await start_all(w, binding=good)
            assert len(w.holders(ip)) == 1
            w.svc["n2"].set_config(make_config("n2", binding={ip: "bind-b"}))
            await trio.sleep(settle(delay))
            assert w.holders(ip) == []
            d = w.svc["n1"].decisions.value[ip]
            assert "BROKEN" in d.states and d.owner is None
            w.svc["n2"].set_config(make_config("n2", binding=good))
            await trio.sleep(settle(delay))
            w.assert_settled()
            assert len(w.holders(ip)) == 1


async def test_admin_move_and_announce_view(autojump_clock, delay):
    ip = IPS[0]
    with trio.fail_after(30):
        async with open_world(delay) as w:
            await start_all(w)
            before = w.holders(ip)[0]
            target = next(n for n in NAMES if n != before)
            w.svc["n1"].request_move(ip, target)
            await trio.sleep(settle(delay))
            w.assert_settled()
            assert w.holders(ip) == [target]
            assert w.svc[target].decisions.value[ip].override == target
            w.svc["n1"].announce()  # clears the override: back to the hash
            await trio.sleep(settle(delay))
            w.assert_settled()
            assert w.holders(ip) == [before]
            # a move to a node that then dies is dropped
            w.svc["n1"].request_move(ip, target)
            await trio.sleep(settle(delay))
            if target != "n1":
                w.crash(target)
                await trio.sleep(settle(delay))
                assert not w.views["n1"].overrides


async def test_actuator_failure_is_retried_with_backoff(autojump_clock):
    with trio.fail_after(30):
        async with open_world() as w:
            for n in NAMES:
                w.act[n] = FakeActuator(w, n)
                w.act[n].fail = 2
            await start_all(w)
            await trio.sleep(2)
            w.assert_settled()
            assert all(w.svc[n].stats.actuator_failures >= 2 for n in NAMES)
            assert all(len(w.act[n].calls) >= 3 for n in NAMES)


async def test_simultaneous_cold_start_with_gossip_delay_settles(autojump_clock):
    """The known limit: peers maturing at one instant may both plumb briefly."""
    with trio.fail_after(30):
        async with open_world(0.05) as w:
            for n in NAMES:
                await w.start(n)
            await trio.sleep(MATURE + 1)
            w.violations.clear()  # documented: a short overlap at a cold start
            w.assert_settled()
            assert sum(len(w.act[n].plumbed) for n in NAMES) == len(IPS)


async def test_reload_dropping_an_ip_releases_it(autojump_clock, delay):
    with trio.fail_after(30):
        async with open_world(delay) as w:
            await start_all(w)
            ip = IPS[0]
            holder = w.holders(ip)[0]
            cfg = make_config(holder)
            smaller = Config(
                cluster=cfg.cluster,
                duravips={k: v for k, v in cfg.duravips.items() if k != ip},
            )
            w.svc[holder].set_config(smaller)
            await trio.sleep(settle(delay))
            w.assert_settled()
            assert ip not in w.act[holder].plumbed
            assert len(w.holders(ip)) == 1
            assert holder not in w.svc[holder].decisions.value[ip].candidates
