"""The resolver task: recompute the election on every change and act on it.

The Trio driver around the pure pieces (:mod:`.rule`, :mod:`.quorum`,
:mod:`.handover`). It owns this node's view (held set, maturity, admin
overrides), publishes it on every change, and drives the :class:`Actuator`
one call at a time: release first and announce the smaller held set, acquire
only what no live node still holds (break-before-make).
"""

from __future__ import annotations

import logging
import math
import time
from collections import deque
from collections.abc import Callable, Mapping
from ipaddress import IPv4Address
from typing import Protocol

import attrs
import trio
from trio_util import AsyncValue

from duravip.config import Config
from duravip.election.handover import plan
from duravip.election.picture import ClusterSnapshot
from duravip.election.quorum import LIVE_STATES, StableMembership, apply_quorum
from duravip.election.rule import Decision, Resolver, resolve
from duravip.election.view import NodeView, Override, build_view
from duravip.swim.members import State

__all__ = [
    "Actuator",
    "ResolverService",
    "ResolverStats",
    "Takeover",
    "serve",
]

log = logging.getLogger("duravip.election")

_BACKOFF_MIN = 0.1
_BACKOFF_MAX = 5.0


class Actuator(Protocol):
    async def acquire(self, ips: frozenset[IPv4Address]) -> frozenset[IPv4Address]:
        """Plumb, start listeners, GARP; return what was really acquired."""
        ...

    async def release(self, ips: frozenset[IPv4Address]) -> None:
        """Stop listeners (drain), then unplumb."""
        ...


@attrs.frozen
class Takeover:
    """One acquisition, for metrics and the console."""

    ip: IPv4Address
    #: ``trio.current_time()`` when ``acquire`` returned.
    at: float
    #: The dead or left holder we took it from, None if it was free.
    from_node: str | None
    #: Seconds from the snapshot that showed ``from_node`` gone to acquire().
    latency: float | None


@attrs.define
class ResolverStats:
    elections: int = 0
    moves_in: int = 0
    moves_out: int = 0
    actuator_failures: int = 0
    takeover_latencies: deque[float] = attrs.Factory(lambda: deque(maxlen=4096))
    recent: deque[Takeover] = attrs.Factory(lambda: deque(maxlen=256))


class ResolverService:
    """Handle to the running resolver (given to ``task_status.started``)."""

    def __init__(
        self,
        *,
        config: Config,
        actuator: Actuator,
        publish_view: Callable[[NodeView], None],
        mature_after: float,
    ) -> None:
        self.decisions: AsyncValue[Mapping[IPv4Address, Decision]] = AsyncValue({})
        self.held: AsyncValue[frozenset[IPv4Address]] = AsyncValue(frozenset())
        self.stats = ResolverStats()
        self.local = config.cluster.node_name
        self._config = config
        self._actuator = actuator
        self._publish = publish_view
        self._started = trio.current_time()
        self._mature_at = self._started + mature_after
        self._mature = mature_after <= 0
        self._booted = time.time()
        self._base = build_view(
            config,
            version=0,
            mature=False,
            config_stable_since=self._booted,
            booted_at=self._booted,
        )
        self._version = 0
        self._overrides: dict[IPv4Address, Override] = {}
        #: IPs whose acquire failed: maybe partly plumbed, released if not ours.
        self._uncertain: frozenset[IPv4Address] = frozenset()
        #: IPs being acquired right now: announced as held *before* acquire()
        #: so a peer that matures meanwhile waits instead of plumbing too.
        self._claiming: frozenset[IPv4Address] = frozenset()
        self._resolver = Resolver()
        self._stable = StableMembership(self.local, config.cluster.view_mature_time)
        self._lock = trio.Lock()
        self._wake = trio.Event()
        self._stopping = False
        self._snap_at = self._started
        self._gone_since: dict[str, float] = {}
        self._defer_until = math.inf
        #: When each live peer was first seen live (for the cold-start deferral).
        self._live_since: dict[str, float] = {}
        self._last_views: Mapping[str, NodeView] = {}
        self._retry_at = -math.inf
        self._backoff = _BACKOFF_MIN
        self._view = self._make_view()

    # ------------------------------------------------------------ own view

    @property
    def view(self) -> NodeView:
        """This node's current view (as last published)."""
        return self._view

    @property
    def mature(self) -> bool:
        return self._mature

    def _make_view(self) -> NodeView:
        return attrs.evolve(
            self._base,
            version=self._version,
            mature=self._mature and not self._stopping,
            held=self.held.value | self._claiming,
            overrides=dict(self._overrides),
        )

    def _republish(self) -> None:
        self._version += 1
        self._view = self._make_view()
        self._publish(self._view)

    # ------------------------------------------------------------ commands

    def request_move(self, ip: IPv4Address, node: str) -> None:
        """Admin move: an override in our view, above every seq seen for ``ip``."""
        seqs = [v.overrides[ip].seq for v in self._last_views.values() if ip in v.overrides]
        if ip in self._overrides:
            seqs.append(self._overrides[ip].seq)
        self._overrides[ip] = Override(node, max(seqs, default=0) + 1)
        self._republish()
        self._wake.set()

    def announce(self) -> None:
        """Re-announce the view (new version); drops our move overrides."""
        self._overrides.clear()
        self._republish()
        self._wake.set()

    def set_config(self, config: Config) -> None:
        """Reload: new DuraVIPs, quorum and maturity time; drops overrides."""
        if config.cluster.node_name != self.local:
            raise ValueError("node_name cannot change on reload")
        self._config = config
        self._base = build_view(
            config,
            version=0,
            mature=False,
            config_stable_since=time.time(),
            booted_at=self._booted,
        )
        self._stable.stable_after = config.cluster.view_mature_time
        if not self._mature:
            self._mature_at = self._started + config.cluster.view_mature_time
        self._overrides.clear()
        self._republish()
        self._wake.set()

    async def release_all(self) -> None:
        """Graceful shutdown: release every IP, announce; acquire nothing more."""
        self._stopping = True
        # Stop being a candidate first: the others elect new owners now and
        # wait only for the release below.
        self._republish()
        async with self._lock:
            todo = self.held.value | self._uncertain
            for attempt in range(3):
                if not todo:
                    break
                try:
                    await self._actuator.release(todo)
                except Exception:
                    self.stats.actuator_failures += 1
                    log.exception("release_all failed (attempt %d)", attempt + 1)
                    await trio.sleep(_BACKOFF_MIN * 2**attempt)
                    continue
                self.stats.moves_out += len(self.held.value & todo)
                todo = frozenset()
            self._uncertain = frozenset()
            self.held.value = todo
            self._republish()
        self._wake.set()

    # ------------------------------------------------------------ the loop

    async def _watch(self, snapshot: AsyncValue[ClusterSnapshot]) -> None:
        async for _ in snapshot.transitions():
            self._snap_at = trio.current_time()
            self._wake.set()

    def _deadline(self) -> float:
        times = [self._retry_at]
        if not self._mature:
            times.append(self._mature_at)
        if self._config.cluster.quorum == "majority":
            nd = self._stable.next_deadline()
            if nd is not None:
                times.append(nd)
        times.append(self._defer_until)
        future = [t for t in times if t > trio.current_time()]
        return min(future, default=math.inf)

    async def _run(self, snapshot: AsyncValue[ClusterSnapshot]) -> None:
        while True:
            self._wake = trio.Event()
            async with self._lock:
                # Read the snapshot only now: acquiring the lock is a checkpoint.
                await self._step(snapshot.value)
            with trio.move_on_at(self._deadline()):
                await self._wake.wait()

    async def _step(self, snap: ClusterSnapshot) -> None:
        """Recompute and act; call with the lock held."""
        now = trio.current_time()
        if now >= self._defer_until:
            self._defer_until = math.inf
        if not self._mature and now >= self._mature_at:
            self._mature = True
            self._republish()
        states = dict(snap.states)
        states[self.local] = State.ALIVE
        for node, state in states.items():
            if state in LIVE_STATES:
                self._gone_since.pop(node, None)
                self._live_since.setdefault(node, now)
            else:
                self._gone_since.setdefault(node, self._snap_at)
                self._live_since.pop(node, None)
        stale = [
            ip for ip, ov in self._overrides.items() if states.get(ov.target) not in LIVE_STATES
        ]
        if stale:
            for ip in stale:
                del self._overrides[ip]
            self._republish()
        alive = {n for n, s in states.items() if s in LIVE_STATES}
        views = dict(snap.views)
        views[self.local] = self._view
        self._last_views = views
        decisions: Mapping[IPv4Address, Decision] = self._resolver.update(views, alive)
        self.stats.elections += 1
        self._stable.observe(now, states)
        if self._config.cluster.quorum == "majority":
            decisions = apply_quorum(
                decisions, local=self.local, alive=alive, stable_members=self._stable.members
            )
        self.decisions.value = dict(decisions)
        if now < self._retry_at:
            return
        await self._act(decisions, views, states)

    async def _act(
        self,
        decisions: Mapping[IPv4Address, Decision],
        views: Mapping[str, NodeView],
        states: Mapping[str, str],
    ) -> None:
        held = self.held.value
        if self._stopping:
            return
        p = plan(local=self.local, decisions=decisions, held=held, views=views, states=states)
        deferred = self._defer_for_newcomers(p.acquire - p.from_dead.keys(), views, states)
        if deferred:
            p = attrs.evolve(p, acquire=p.acquire - deferred)
        stray = frozenset(
            ip
            for ip in self._uncertain
            if decisions.get(ip) is None or decisions[ip].owner != self.local
        )
        release = p.release | stray
        if release:
            try:
                await self._actuator.release(release)
            except Exception:
                log.exception("actuator release of %d IP(s) failed", len(release))
                self._failed(release)
                return
            self._uncertain -= release
            self.stats.moves_out += len(p.release)
            self.held.value = held - release
            log.info("released %d IP(s)", len(release))
            self._republish()
            if p.acquire:
                # The world moved while we released: plan acquisitions afresh.
                self._wake.set()
                return
        if p.acquire:
            self._claiming = p.acquire
            self._republish()
            try:
                got = await self._actuator.acquire(p.acquire)
            except Exception:
                log.exception("actuator acquire of %d IP(s) failed", len(p.acquire))
                self._uncertain |= p.acquire
                self._claiming = frozenset()
                self._republish()
                self._failed(p.acquire)
                return
            self._claiming = frozenset()
            got = got & p.acquire
            done = trio.current_time()
            self._uncertain = (self._uncertain - got) | (p.acquire - got)
            self.stats.moves_in += len(got)
            for ip in sorted(got):
                gone = p.from_dead.get(ip)
                since = self._gone_since.get(gone) if gone is not None else None
                latency = done - since if since is not None else None
                if latency is not None:
                    self.stats.takeover_latencies.append(latency)
                self.stats.recent.append(Takeover(ip, done, gone, latency))
            self.held.value = self.held.value | got
            log.info("acquired %d IP(s) (%d from dead holders)", len(got), len(p.from_dead))
            self._republish()
            if got != p.acquire:
                log.warning("acquired only %d of %d IP(s)", len(got), len(p.acquire))
                self._failed(p.acquire - got)
                return
        self._backoff = _BACKOFF_MIN

    def _defer_for_newcomers(
        self,
        free: frozenset[IPv4Address],
        views: Mapping[str, NodeView],
        states: Mapping[str, str],
    ) -> frozenset[IPv4Address]:
        """Free IPs a live node that is still maturing will own: leave them to it.

        Without this, the first node to mature after a cold start plumbs every
        IP and hands most of them over a moment later (churn, and two holders
        for a gossip delay). IPs of a dead or left holder are never deferred:
        failover must not wait. A newcomer gets ``2 * view_mature_time + 1`` s
        to mature before the others stop waiting for it.
        """
        now = trio.current_time()
        patience = 2 * self._config.cluster.view_mature_time + 1.0
        maturing = {
            n
            for n, v in views.items()
            if n != self.local
            and not v.mature
            and states.get(n) in LIVE_STATES
            and now - self._live_since.get(n, now) < patience
        }
        if not free or not maturing:
            return frozenset()
        optimistic = {n: attrs.evolve(v, mature=True) if n in maturing else v for n, v in views.items()}
        alive = {n for n, st in states.items() if st in LIVE_STATES}
        eager = resolve(optimistic, alive)
        deferred = frozenset(
            ip for ip in free if ip in eager and eager[ip].owner in maturing
        )
        if deferred:
            wake = min(self._live_since.get(n, now) for n in maturing) + patience
            self._defer_until = min(self._defer_until, wake)
        return deferred

    def _failed(self, ips: frozenset[IPv4Address]) -> None:
        """Back off before the next actuator call (``ips`` are retried then)."""
        self.stats.actuator_failures += 1
        log.info("retrying %d IP(s) in %.1fs", len(ips), self._backoff)
        self._retry_at = trio.current_time() + self._backoff
        self._backoff = min(self._backoff * 2, _BACKOFF_MAX)


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
