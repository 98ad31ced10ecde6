"""The resolver task: recompute the election on every change and act on it.

A thin Trio driver around :class:`~duravip.election.policy.ResolverPolicy`
(which holds every decision: maturity, deferral, back-off, overrides, this
node's view). It wakes on every snapshot and policy deadline, publishes the
views the policy queues, and drives the :class:`Actuator` one call at a time:
release first and announce the smaller held set, acquire only what no live
node still holds (break-before-make).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from typing import Protocol

import trio
from trio_util import AsyncValue

from duravip.config import Config
from duravip.election.picture import ClusterSnapshot
from duravip.election.policy import (
    BACKOFF_MIN,
    Action,
    ResolverPolicy,
    ResolverStats,
    Takeover,
)
from duravip.election.rule import Decision
from duravip.election.view import NodeView
from duravip.ipaddr import IPAddress, ip_key

__all__ = [
    "Actuator",
    "ResolverService",
    "ResolverStats",
    "Takeover",
    "serve",
]

log = logging.getLogger("duravip.election")


class Actuator(Protocol):
    async def acquire(self, ips: frozenset[IPAddress]) -> frozenset[IPAddress]:
        """Plumb, start listeners, GARP; return what was really acquired."""
        ...

    async def release(self, ips: frozenset[IPAddress]) -> None:
        """Stop listeners (drain), then unplumb."""
        ...


class ResolverService:
    """Handle to the running resolver (given to ``task_status.started``).

    Holds only what needs trio (the lock serialising actuator calls, the wake
    event, the observable values); every decision is the policy's.
    """

    def __init__(
        self,
        *,
        config: Config,
        actuator: Actuator,
        publish_view: Callable[[NodeView], None],
        mature_after: float,
    ) -> None:
        self.policy = ResolverPolicy(
            config=config, now=trio.current_time(), wall=time.time(), mature_after=mature_after
        )
        self.decisions: AsyncValue[Mapping[IPAddress, Decision]] = AsyncValue({})
        self.held: AsyncValue[frozenset[IPAddress]] = AsyncValue(frozenset())
        self.local = self.policy.local
        self._actuator = actuator
        self._publish = publish_view
        self._lock = trio.Lock()
        self._wake = trio.Event()
        #: Called in order with ("acquire" | "release", ip) as the held set changes
        #: (the notify hooks; must not block).
        self.on_held_change: list[Callable[[str, IPAddress], None]] = []
        #: Called with (ip, dead or left holder, wall time the acquisition started)
        #: once an IP taken from a gone node is acquired (the latency budget).
        self.on_takeover: list[Callable[[IPAddress, str, float], None]] = []
        #: Called with the new config after a reload (health checks follow it).
        self.on_config: list[Callable[[Config], None]] = []

    @property
    def stats(self) -> ResolverStats:
        return self.policy.stats

    @property
    def view(self) -> NodeView:
        """This node's current view (as last published)."""
        return self.policy.view

    @property
    def mature(self) -> bool:
        return self.policy.mature

    def _flush(self) -> None:
        """Mirror the policy's held set, then publish every view it queued, in order."""
        before, after = self.held.value, self.policy.held
        self.held.value = after
        if before != after:
            for hook in self.on_held_change:
                for ip in sorted(before - after, key=ip_key):
                    hook("release", ip)
                for ip in sorted(after - before, key=ip_key):
                    hook("acquire", ip)
        for view in self.policy.take_views():
            self._publish(view)

    # ------------------------------------------------------------ commands

    def request_move(self, ip: IPAddress, node: str) -> None:
        """Admin move: an override in our view, above every seq seen for ``ip``."""
        self.policy.request_move(ip, node)
        self._flush()
        self._wake.set()

    def announce(self) -> None:
        """Re-announce the view (new version); drops our move overrides."""
        self.policy.announce()
        self._flush()
        self._wake.set()

    def withdraw(self, ip: IPAddress) -> None:
        """This node cannot serve ``ip`` any more (e.g. its listener stopped for good).

        Wiring point for ``smtp.listeners``' ``on_listener_failed``: the IP is
        no longer announced, so it is released here and another node takes it.
        """
        self.policy.withdraw(ip)
        self._flush()
        self._wake.set()

    def set_eligibility(self, reason: str | None) -> None:
        """Drained or unhealthy (``reason``: why), or a candidate again (None)."""
        self.policy.set_eligibility(trio.current_time(), reason)
        self._flush()
        self._wake.set()

    def set_config(self, config: Config) -> None:
        """Reload: new DuraVIPs, quorum and maturity time; drops overrides."""
        self.policy.set_config(config, wall=time.time())
        self._flush()
        self._wake.set()
        for hook in self.on_config:
            hook(config)

    async def release_all(self) -> None:
        """Graceful shutdown: release every IP, announce; acquire nothing more."""
        self.policy.begin_stop()
        self._flush()
        async with self._lock:
            todo = self.policy.to_release_on_stop()
            released: frozenset[IPAddress] = frozenset()
            for attempt in range(3):
                if not todo:
                    break
                try:
                    await self._actuator.release(todo)
                except Exception:
                    self.policy.stop_release_failed()
                    log.exception("release_all failed (attempt %d)", attempt + 1)
                    await trio.sleep(BACKOFF_MIN * 2**attempt)
                    continue
                released, todo = todo, frozenset()
            self.policy.stopped(released, todo)
            self._flush()
        self._wake.set()

    # ------------------------------------------------------------ the loop

    async def _watch(self, snapshot: AsyncValue[ClusterSnapshot]) -> None:
        async for _ in snapshot.transitions():
            self.policy.snapshot_seen(trio.current_time())
            self._wake.set()

    async def _run(self, snapshot: AsyncValue[ClusterSnapshot]) -> None:
        while True:
            self._wake = trio.Event()
            async with self._lock:
                # Read the snapshot only now: acquiring the lock is a checkpoint.
                await self._step(snapshot.value)
            with trio.move_on_at(self.policy.deadline(trio.current_time())):
                await self._wake.wait()

    async def _step(self, snap: ClusterSnapshot) -> None:
        """Recompute and act; call with the lock held."""
        decisions = self.policy.observe(trio.current_time(), snap)
        self._flush()
        self.decisions.value = dict(decisions)
        action = self.policy.next_action(trio.current_time())
        if action is not None:
            await self._act(action)

    async def _act(self, action: Action) -> None:
        policy = self.policy
        if action.release:
            try:
                await self._actuator.release(action.release)
            except Exception:
                log.exception("actuator release of %d IP(s) failed", len(action.release))
                self._failed(action.release)
                return
            policy.released(action)
            log.info("released %d IP(s)", len(action.release))
            self._flush()
            if action.acquire:
                # The world moved while we released: plan acquisitions afresh.
                self._wake.set()
                return
        if action.acquire:
            decided = time.time()
            policy.claim(action.acquire)
            self._flush()
            try:
                got = await self._actuator.acquire(action.acquire)
            except Exception:
                log.exception("actuator acquire of %d IP(s) failed", len(action.acquire))
                policy.acquire_failed(action.acquire)
                self._flush()
                self._failed(action.acquire)
                return
            missed = policy.acquired(trio.current_time(), action, got)
            for ip, gone in action.from_dead.items():
                if ip in got:
                    for hook in self.on_takeover:
                        hook(ip, gone, decided)
            log.info(
                "acquired %d IP(s) (%d from dead holders)",
                len(action.acquire - missed),
                len(action.from_dead),
            )
            self._flush()
            if missed:
                log.warning(
                    "acquired only %d of %d IP(s)", len(action.acquire - missed), len(action.acquire)
                )
                self._failed(missed)
                return
        policy.succeeded()

    def _failed(self, ips: frozenset[IPAddress]) -> None:
        delay = self.policy.failed(trio.current_time())
        log.info("retrying %d IP(s) in %.1fs", len(ips), delay)


async def serve(
    *,
    config: Config,
    snapshot: AsyncValue[ClusterSnapshot],
    actuator: Actuator,
    publish_view: Callable[[NodeView], None],
    mature_after: float,
    task_status: trio.TaskStatus[ResolverService] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run the resolver until cancelled; start it once membership has synced."""
    svc = ResolverService(
        config=config, actuator=actuator, publish_view=publish_view, mature_after=mature_after
    )
    publish_view(svc.view)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(svc._watch, snapshot)
        task_status.started(svc)
        await svc._run(snapshot)
