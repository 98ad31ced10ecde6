"""The resolver's policy, sans-IO: what to do now, given a snapshot and ``now``.

Everything the resolver decides lives here, with the time passed in, so it is
testable without trio: maturity (a node is no candidate for
``view_mature_time`` after start), the cold-start deferral (leave a free IP to
the maturing node that will own it), back-off after an actuator failure,
admin move overrides, the takeover latencies, this node's own view, its
eligibility (drained or unhealthy: announced as no candidate, like
immaturity) and its preemption yields (``preempt``, ``preempt_delay``).

The driver (:mod:`.resolver`) calls :meth:`ResolverPolicy.observe` on every
wake-up, performs the :class:`Action` that :meth:`ResolverPolicy.next_action`
returns through the actuator, and reports the outcome back (``released``,
``acquired``, ...). Each call may queue new versions of this node's view; the
driver publishes them (:meth:`ResolverPolicy.take_views`) before its next
await, so peers always see a claim before the acquisition it announces.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Mapping

import attrs
from attrs import frozen

from duravip.config import Config
from duravip.election.handover import plan
from duravip.election.picture import ClusterSnapshot
from duravip.election.preempt import apply_preemption
from duravip.election.quorum import LIVE_STATES, StableMembership, apply_quorum
from duravip.election.rule import Decision, Resolver, resolve
from duravip.election.view import NodeView, Override, build_view
from duravip.ipaddr import IPAddress, ip_key
from duravip.swim.members import State

__all__ = ["BACKOFF_MAX", "BACKOFF_MIN", "Action", "ResolverPolicy", "ResolverStats", "Takeover"]

BACKOFF_MIN = 0.1
BACKOFF_MAX = 5.0


@frozen
class Takeover:
    """One acquisition, for metrics and the console."""

    ip: IPAddress
    #: The driver's clock (``trio.current_time()``) when ``acquire`` returned.
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


@frozen
class Action:
    """One round of actuator calls: release first, then (if nothing was released) acquire."""

    #: Everything to release: IPs owned elsewhere now plus stray uncertain ones.
    release: frozenset[IPAddress]
    #: The owned-elsewhere part of ``release`` (what counts as a move out).
    moves_out: frozenset[IPAddress]
    acquire: frozenset[IPAddress]
    #: IP -> the dead or left holder it is taken from (a failover).
    from_dead: Mapping[IPAddress, str]


class ResolverPolicy:
    """This node's election state and the rules that turn decisions into actions."""

    def __init__(self, *, config: Config, now: float, wall: float, mature_after: float) -> None:
        """``now``: the driver's clock; ``wall``: ``time.time()`` (announced in the view)."""
        self.local = config.cluster.node_name
        self.stats = ResolverStats()
        self.held: frozenset[IPAddress] = frozenset()
        self.decisions: Mapping[IPAddress, Decision] = {}
        self._config = config
        self._started = now
        self._mature_at = now + mature_after
        self._mature = mature_after <= 0
        self._booted = wall
        self._base = build_view(
            config, version=0, mature=False, config_stable_since=wall, booted_at=wall
        )
        self._version = 0
        self._overrides: dict[IPAddress, Override] = {}
        #: IPs this node cannot serve (a listener stopped for good): not announced.
        self._withdrawn: set[IPAddress] = set()
        #: IPs whose acquire failed: maybe partly plumbed, released if not ours.
        self._uncertain: frozenset[IPAddress] = frozenset()
        #: IPs being acquired right now: announced as held *before* acquire()
        #: so a peer that matures meanwhile waits instead of plumbing too.
        self._claiming: frozenset[IPAddress] = frozenset()
        self._resolver = Resolver()
        self._stable = StableMembership(self.local, config.cluster.view_mature_time)
        self._stopping = False
        self._snap_at = now
        self._gone_since: dict[str, float] = {}
        self._defer_until = math.inf
        #: When each live peer was first seen live (for the cold-start deferral).
        self._live_since: dict[str, float] = {}
        self._last_views: Mapping[str, NodeView] = {}
        self._last_states: Mapping[str, State] = {}
        self._retry_at = -math.inf
        self._backoff = BACKOFF_MIN
        self._outbox: list[NodeView] = []
        #: Why this node is no candidate (drained, unhealthy), None: it may be one.
        self._ineligible: str | None = None
        #: IPs never taken from a live holder (preempt = false), and per-IP delays.
        self._never_preempt: frozenset[IPAddress] = frozenset()
        self._preempt_delay: dict[IPAddress, float] = {}
        #: Delayed yields in force: IP -> driver time they end.
        self._yield_until: dict[IPAddress, float] = {}
        self._load_preempt(config)
        if self.candidate:
            self._became_candidate(now)
        self._view = self._make_view()

    # ------------------------------------------------------------ own view

    @property
    def view(self) -> NodeView:
        """This node's current view (the last one queued for publication)."""
        return self._view

    @property
    def mature(self) -> bool:
        return self._mature

    @property
    def stopping(self) -> bool:
        return self._stopping

    @property
    def ineligible(self) -> str | None:
        """Why this node announces itself as no candidate (None: it is one when mature)."""
        return self._ineligible

    @property
    def candidate(self) -> bool:
        return self._mature and not self._stopping and self._ineligible is None

    def failback_pending(self) -> dict[IPAddress, float | None]:
        """IPs this node yields now -> wall time the yield ends (None: preempt = false)."""
        out: dict[IPAddress, float | None] = dict.fromkeys(self._never_preempt)
        for ip, until in self._yield_until.items():
            out.setdefault(ip, self._wall(until))
        return out

    def _wall(self, t: float) -> float:
        return self._booted + (t - self._started)

    def take_views(self) -> list[NodeView]:
        """The views queued since the last call, oldest first (publish them all)."""
        out, self._outbox = self._outbox, []
        return out

    def _make_view(self) -> NodeView:
        vips = self._base.vips
        if self._withdrawn:
            vips = {ip: c for ip, c in vips.items() if ip not in self._withdrawn}
        yields = self._never_preempt
        if self._yield_until:
            yields = yields | self._yield_until.keys()
        if self._withdrawn:
            yields = yields & vips.keys()
        return attrs.evolve(
            self._base,
            vips=vips,
            version=self._version,
            mature=self.candidate,
            held=self.held | self._claiming,
            overrides=dict(self._overrides),
            # A stopping node says so: its peers must not wait for it to mature
            # (the cold-start deferral) while it hands its IPs over.
            status=self._ineligible or ("stopping" if self._stopping else ""),
            yields=frozenset(yields),
            failback_at=self._wall(min(self._yield_until.values())) if self._yield_until else 0.0,
        )

    def _load_preempt(self, config: Config) -> None:
        """Per IP: the binding's ``preempt``/``preempt_delay``, else the cluster's."""
        never: set[IPAddress] = set()
        delays: dict[IPAddress, float] = {}
        c = config.cluster
        for ip, d in config.duravips.items():
            name = d.binding or d.follows
            b = config.binding(name) if name else None
            preempt = b.preempt if b is not None and b.preempt is not None else c.preempt
            delay = b.preempt_delay if b is not None and b.preempt_delay is not None else None
            delay = c.preempt_delay if delay is None else delay
            if not preempt:
                never.add(ip)
            elif delay > 0:
                delays[ip] = delay
        self._never_preempt = frozenset(never)
        self._preempt_delay = delays

    def _became_candidate(self, now: float) -> None:
        """Mature and eligible from ``now``: delayed fail-backs start waiting."""
        self._yield_until = {ip: now + d for ip, d in self._preempt_delay.items()}

    def set_eligibility(self, now: float, reason: str | None) -> None:
        """Drained or unhealthy (``reason``), or eligible again (None).

        An ineligible node announces itself as no candidate, as while it
        matures: every node elects other owners for its IPs, this one releases
        them (break-before-make) and its queues follow the holders.
        """
        if reason == self._ineligible:
            return
        was = self.candidate
        self._ineligible = reason
        if self.candidate and not was:
            self._became_candidate(now)
        self._republish()

    def _republish(self) -> None:
        self._version += 1
        self._view = self._make_view()
        self._outbox.append(self._view)

    # ------------------------------------------------------------ commands

    def request_move(self, ip: IPAddress, node: str) -> None:
        """Admin move: an override in our view, above every seq seen for ``ip``."""
        seqs = [v.overrides[ip].seq for v in self._last_views.values() if ip in v.overrides]
        if ip in self._overrides:
            seqs.append(self._overrides[ip].seq)
        self._overrides[ip] = Override(node, max(seqs, default=0) + 1)
        self._republish()

    def announce(self) -> None:
        """Re-announce the view (new version); drops our move overrides and withdrawals."""
        self._overrides.clear()
        self._withdrawn.clear()
        self._republish()

    def withdraw(self, ip: IPAddress) -> None:
        """Stop announcing ``ip``: this node cannot serve it (its listener stopped for good).

        No longer a candidate, the node loses ownership and the next action
        releases the IP (break-before-make) so another node can take it. Ends
        with :meth:`announce` or a reload.
        """
        if ip in self._base.vips and ip not in self._withdrawn:
            self._withdrawn.add(ip)
            self._republish()

    def set_config(self, config: Config, *, wall: float) -> None:
        """Reload: new DuraVIPs, quorum and maturity time; drops overrides."""
        if config.cluster.node_name != self.local:
            raise ValueError("node_name cannot change on reload")
        self._config = config
        self._base = build_view(
            config, version=0, mature=False, config_stable_since=wall, booted_at=self._booted
        )
        self._stable.stable_after = config.cluster.view_mature_time
        self._load_preempt(config)
        self._yield_until = {ip: t for ip, t in self._yield_until.items() if ip in self._preempt_delay}
        if not self._mature:
            self._mature_at = self._started + config.cluster.view_mature_time
        self._overrides.clear()
        self._withdrawn.clear()
        self._republish()

    # ------------------------------------------------------------ the step

    def snapshot_seen(self, now: float) -> None:
        """A new snapshot arrived at ``now`` (a gone holder's takeover clock starts here)."""
        self._snap_at = now

    def deadline(self, now: float) -> float:
        """When the next step is due even if nothing changes (``inf``: never)."""
        times = [self._retry_at]
        if not self._mature:
            times.append(self._mature_at)
        if self._config.cluster.quorum == "majority":
            nd = self._stable.next_deadline()
            if nd is not None:
                times.append(nd)
        times.append(self._defer_until)
        times.extend(self._yield_until.values())
        future = [t for t in times if t > now]
        return min(future, default=math.inf)

    def observe(self, now: float, snap: ClusterSnapshot) -> Mapping[IPAddress, Decision]:
        """Recompute the election for ``snap`` (maturity, overrides, quorum applied)."""
        if now >= self._defer_until:
            self._defer_until = math.inf
        if not self._mature and now >= self._mature_at:
            self._mature = True
            if self.candidate:
                self._became_candidate(now)
            self._republish()
        if any(t <= now for t in self._yield_until.values()):
            self._yield_until = {ip: t for ip, t in self._yield_until.items() if t > now}
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
        self._last_states = states
        decisions: Mapping[IPAddress, Decision] = self._resolver.update(views, alive)
        decisions = apply_preemption(decisions, views, alive)
        self.stats.elections += 1
        self._stable.observe(now, states)
        if self._config.cluster.quorum == "majority":
            decisions = apply_quorum(
                decisions, local=self.local, alive=alive, stable_members=self._stable.members
            )
        self.decisions = dict(decisions)
        return self.decisions

    def next_action(self, now: float) -> Action | None:
        """What to do about the last observed decisions; None while backing off or stopping."""
        if now < self._retry_at or self._stopping:
            return None
        views, states = self._last_views, self._last_states
        p = plan(
            local=self.local, decisions=self.decisions, held=self.held, views=views, states=states
        )
        deferred = self._defer_for_newcomers(now, p.acquire - p.from_dead.keys(), views, states)
        acquire = p.acquire - deferred
        stray = frozenset(
            ip
            for ip in self._uncertain
            if (d := self.decisions.get(ip)) is None or d.owner != self.local
        )
        return Action(
            release=p.release | stray,
            moves_out=p.release,
            acquire=acquire,
            from_dead={ip: n for ip, n in p.from_dead.items() if ip in acquire},
        )

    def _defer_for_newcomers(
        self,
        now: float,
        free: frozenset[IPAddress],
        views: Mapping[str, NodeView],
        states: Mapping[str, State],
    ) -> frozenset[IPAddress]:
        """Free IPs a live node that is still maturing will own: leave them to it.

        Without this, the first node to mature after a cold start plumbs every
        IP and hands most of them over a moment later (churn, and two holders
        for a gossip delay). IPs of a dead or left holder are never deferred:
        failover must not wait. A newcomer gets ``2 * view_mature_time + 1`` s
        to mature before the others stop waiting for it.
        """
        patience = 2 * self._config.cluster.view_mature_time + 1.0
        maturing = {
            n
            for n, v in views.items()
            if n != self.local
            and not v.mature
            and not v.status  # drained or unhealthy: not about to become a candidate
            and states.get(n) in LIVE_STATES
            and now - self._live_since.get(n, now) < patience
        }
        if not free or not maturing:
            return frozenset()
        optimistic = {n: attrs.evolve(v, mature=True) if n in maturing else v for n, v in views.items()}
        alive = {n for n, st in states.items() if st in LIVE_STATES}
        eager = resolve(optimistic, alive)
        deferred = frozenset(ip for ip in free if ip in eager and eager[ip].owner in maturing)
        if deferred:
            wake = min(self._live_since.get(n, now) for n in maturing) + patience
            self._defer_until = min(self._defer_until, wake)
        return deferred

    # ------------------------------------------------------------ outcomes

    def released(self, action: Action) -> None:
        """``actuator.release(action.release)`` returned."""
        self._uncertain -= action.release
        self.stats.moves_out += len(action.moves_out)
        self.held = self.held - action.release
        self._republish()

    def claim(self, ips: frozenset[IPAddress]) -> None:
        """About to acquire ``ips``: announce them as held first."""
        self._claiming = ips
        self._republish()

    def acquire_failed(self, ips: frozenset[IPAddress]) -> None:
        """``acquire`` raised: the IPs may be partly plumbed (released later if not ours).

        Call :meth:`failed` too: the next attempt waits for the back-off.
        """
        self._uncertain |= ips
        self._claiming = frozenset()
        self._republish()

    def acquired(
        self, now: float, action: Action, got: frozenset[IPAddress]
    ) -> frozenset[IPAddress]:
        """``acquire`` returned ``got`` at ``now``; returns what it missed.

        Anything missed stays uncertain: call :meth:`failed` to back off
        before it is retried.
        """
        self._claiming = frozenset()
        got = got & action.acquire
        self._uncertain = (self._uncertain - got) | (action.acquire - got)
        self.stats.moves_in += len(got)
        for ip in sorted(got, key=ip_key):
            gone = action.from_dead.get(ip)
            since = self._gone_since.get(gone) if gone is not None else None
            latency = now - since if since is not None else None
            if latency is not None:
                self.stats.takeover_latencies.append(latency)
            self.stats.recent.append(Takeover(ip, now, gone, latency))
        self.held = self.held | got
        self._republish()
        return action.acquire - got

    def succeeded(self) -> None:
        """A round of actuator calls went through: the next failure backs off from the start."""
        self._backoff = BACKOFF_MIN

    def failed(self, now: float) -> float:
        """An actuator call failed at ``now``: back off before the next one; returns the delay."""
        self.stats.actuator_failures += 1
        delay = self._backoff
        self._retry_at = now + delay
        self._backoff = min(self._backoff * 2, BACKOFF_MAX)
        return delay

    # ------------------------------------------------------------ shutdown

    def begin_stop(self) -> None:
        """Graceful stop: no longer a candidate (the others elect new owners now)."""
        self._stopping = True
        self._republish()

    def to_release_on_stop(self) -> frozenset[IPAddress]:
        return self.held | self._uncertain

    def stop_release_failed(self) -> None:
        """One shutdown release attempt failed (counted; the driver retries a few times)."""
        self.stats.actuator_failures += 1

    def stopped(self, released: frozenset[IPAddress], left: frozenset[IPAddress]) -> None:
        """The shutdown release is over: ``released`` went, ``left`` could not be released."""
        self.stats.moves_out += len(self.held & released)
        self._uncertain = frozenset()
        self.held = left
        self._republish()
