"""In-memory network that runs many SWIM cores under Trio's MockClock.

One task drives a heap of timed events (packet deliveries, TCP exchanges,
node timers), so a thousand nodes cost no thousand tasks. Loss, delay, jitter,
partitions, paused and crashed nodes are decided by one seeded RNG: a run is
reproducible from its seed.
"""

from __future__ import annotations

import heapq
import itertools
import math
import random
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Literal

import trio
from attrs import define, field

from duravip.sim.attacker import Attacker
from duravip.swim.core import StreamRequest, Swim
from duravip.swim.crypto import Keyring
from duravip.swim.members import Addr, MemberEvent, State
from duravip.swim.settings import Timers

NodeStatus = Literal["up", "paused", "crashed", "left"]
#: Packets a paused node's socket buffer holds; later ones are dropped.
PAUSED_QUEUE = 4096
_DELIVER, _TICK, _STREAM_ARRIVE, _STREAM_DONE, _CALL, _REPLAY = range(6)


@define(eq=False)
class SimNode:
    name: str
    addr: Addr
    swim: Swim
    status: NodeStatus = "up"
    scheduled: float = math.inf
    inbox: list[Callable[[], None]] = field(factory=list)
    last_tick: float = -1.0
    spins: int = 0


@define
class KillRecord:
    name: str
    time: float
    pending: set[str]
    done: float | None = None


@define
class MetaChange:
    name: str
    version: int
    time: float
    pending: set[str]
    done: float | None = None


class Simulation:
    """A deterministic cluster of :class:`Swim` cores over a lossy in-memory network."""

    def __init__(
        self,
        *,
        timers: Timers,
        seed: int = 0,
        cluster: str = "sim",
        keyring: Keyring | None = None,
        loss: float = 0.0,
        delay: float = 0.0005,
        jitter: float = 0.0003,
        granularity: float = 0.001,
    ) -> None:
        self.timers = timers
        self.rng = random.Random(seed)
        self.cluster = cluster
        self.keyring = keyring if keyring is not None else Keyring([self.rng.randbytes(32)])
        self.loss = loss
        self.delay = delay
        self.jitter = jitter
        self.granularity = granularity
        self.nodes: dict[str, SimNode] = {}
        self.by_addr: dict[Addr, SimNode] = {}
        self.link_loss: dict[tuple[str, str], float] = {}
        self.groups: dict[str, int] = {}
        self.now = 0.0
        self._t0: float | None = None
        self._heap: list[tuple[float, int, int, Any]] = []
        self._seq = itertools.count()
        # measurements
        self.msgs_sent = 0
        self.bytes_sent = 0
        #: integral of the number of running ("up") nodes over time: the fair
        #: denominator of per-node load when nodes crash during a run
        self.up_node_seconds = 0.0
        self._up_count: int | None = None
        self.false_dead: set[str] = set()
        self.false_dead_events: list[tuple[float, str, str]] = []
        self.kills: list[KillRecord] = []
        self.meta_changes: list[MetaChange] = []
        self.inc_violations: list[tuple[str, str, int, int]] = []
        self._max_inc: dict[str, dict[str, int]] = {}
        self.on_event: Callable[[str, MemberEvent, float], None] | None = None
        self.attackers: list[Attacker] = []
        self._last_epoch = 0
        #: (time, sender, address) of every datagram a node sent to an address that is
        #: no member's (a reflection: what a replaying attacker must not obtain)
        self.sent_to_unknown: list[tuple[float, str, Addr]] = []

    # ------------------------------------------------------------------ building

    def add_node(
        self,
        name: str,
        *,
        seeds: Sequence[Addr] = (),
        meta: bytes = b"",
        addr: Addr | None = None,
        keyring: Keyring | None = None,
        timers: Timers | None = None,
    ) -> SimNode:
        if addr is None:
            i = len(self.nodes) + 1
            addr = (f"10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}", 4801)
        swim = Swim(
            name=name,
            addr=addr,
            cluster=self.cluster,
            timers=timers or self.timers,
            keyring=keyring or self.keyring,
            seeds=seeds,
            meta=meta,
            rng=random.Random(self.rng.getrandbits(64)),
            now=self.now,
            epoch=self._next_epoch(),
        )
        node = SimNode(name, addr, swim)
        self.nodes[name] = node
        self.by_addr[addr] = node
        self._up_count = None
        self._max_inc[name] = {}
        self._flush(node)
        return node

    def _next_epoch(self) -> int:
        """Boot epochs grow like a wall clock (ns) would, strictly, even within one instant."""
        self._last_epoch = max(self._last_epoch + 1, int(self.now * 1e9))
        return self._last_epoch

    def add_cluster(self, n: int, *, prefix: str = "n", meta: bytes = b"") -> list[SimNode]:
        """``n`` nodes that already know each other (instant bootstrap, no warm-up storm)."""
        nodes = [self.add_node(f"{prefix}{i}", meta=meta) for i in range(n)]
        records = [r for nd in nodes for r in nd.swim.state_records() if r.name == nd.name]
        for nd in nodes:
            nd.swim.merge_state(records, self.now)
            nd.swim.reset_broadcasts()
            nd.swim.outgoing()
            nd.swim.events()
        for nd in nodes:
            self._flush(nd)  # only meta fetches (if ``meta``) remain
        return nodes

    def add_attacker(
        self,
        addr: Addr = ("10.255.0.66", 4801),
        *,
        interval: float = 0.005,
        burst: int = 4,
        seed: int = 0,
        start: float | None = None,
    ) -> Attacker:
        """A replaying attacker: every ``interval`` it re-sends, from ``addr``, the first
        datagram it saw towards each node plus the ``burst`` most recent ones, each to
        its own destination and to one other random node."""
        att = Attacker(addr, interval, burst, random.Random(seed))
        self.attackers.append(att)
        self._push(self.now if start is None else start, _REPLAY, att)
        return att

    # ------------------------------------------------------------------ faults

    def kill(self, name: str) -> None:
        """Crash a node: it stops at once, packets to it are lost."""
        node = self.nodes[name]
        self._set_status(node, "crashed")
        node.inbox.clear()
        observers = {n for n, nd in self.nodes.items() if nd.status == "up"}
        self.kills.append(KillRecord(name, self.now, observers))
        self._forget_observer(name)

    def pause(self, name: str) -> None:
        self._set_status(self.nodes[name], "paused")

    def resume(self, name: str) -> None:
        node = self.nodes[name]
        if node.status != "paused":
            return
        self._set_status(node, "up")
        inbox, node.inbox = node.inbox, []
        for fn in inbox:
            fn()
        node.swim.tick(self.now)
        self._flush(node)

    def restart(self, name: str, seeds: Sequence[Addr] | None = None, meta: bytes = b"") -> SimNode:
        """A fresh process with the same name and address (incarnation 0)."""
        old = self.nodes[name]
        if seeds is None:
            seeds = [nd.addr for nd in self.nodes.values() if nd.status == "up" and nd is not old][
                :3
            ]
        self._set_status(old, "crashed")
        self._forget_observer(name)
        return self.add_node(name, seeds=seeds, meta=meta, addr=old.addr)

    def leave(self, name: str) -> None:
        node = self.nodes[name]
        node.swim.leave(self.now)
        self._flush(node)

    def stop_left(self, name: str) -> None:
        """The left node's process exits."""
        self._set_status(self.nodes[name], "left")
        self._forget_observer(name)

    def partition(self, *groups: Iterable[str]) -> None:
        """Split the cluster: nodes in different groups cannot talk (unlisted nodes: group 0)."""
        self.groups = {}
        for i, g in enumerate(groups, 1):
            for n in g:
                self.groups[n] = i

    def heal(self) -> None:
        self.groups = {}
        self.link_loss.clear()

    def set_loss(self, p: float) -> None:
        self.loss = p

    def change_meta(self, name: str, meta: bytes) -> None:
        node = self.nodes[name]
        node.swim.set_meta(meta, self.now)
        pending = {n for n, nd in self.nodes.items() if nd.status == "up" and n != name}
        self.meta_changes.append(MetaChange(name, node.swim.local.meta_version, self.now, pending))
        self._flush(node)

    def connected(self, a: str, b: str) -> bool:
        return self.groups.get(a, 0) == self.groups.get(b, 0)

    # ------------------------------------------------------------------ queries

    def up(self) -> list[SimNode]:
        return [nd for nd in self.nodes.values() if nd.status == "up"]

    def live_view(self, name: str) -> frozenset[str]:
        """Names ``name`` believes alive or suspect."""
        return frozenset(
            m.name
            for m in self.nodes[name].swim.members().values()
            if m.state in (State.ALIVE, State.SUSPECT)
        )

    def converged(self) -> bool:
        """Every up node sees exactly the up nodes as live, with every view current."""
        expected = frozenset(nd.name for nd in self.up())
        for nd in self.up():
            members = nd.swim.members()
            if self.live_view(nd.name) != expected:
                return False
            for n in expected:
                m = members[n]
                if not m.meta_current or m.meta != self.nodes[n].swim.local.meta:
                    return False
        return True

    # ------------------------------------------------------------------ running

    async def run_for(self, seconds: float) -> None:
        await self.run_until(self.now + seconds)

    async def run_until(self, t_end: float) -> None:
        if self._t0 is None:
            self._t0 = trio.current_time() - self.now
        heap = self._heap
        g = self.granularity
        while heap and heap[0][0] <= t_end:
            t = heap[0][0]
            await trio.sleep_until(self._t0 + t)
            bucket_end = min(t_end, (math.floor(t / g) + 1) * g)
            while heap and heap[0][0] <= bucket_end:
                t, _, kind, payload = heapq.heappop(heap)
                self._advance(t)
                self._dispatch(kind, payload)
        await trio.sleep_until(self._t0 + t_end)
        self._advance(t_end)

    async def run_until_converged(self, timeout: float, step: float = 0.1) -> float | None:
        """Run until :meth:`converged`; the time it took, or None on timeout."""
        start = self.now
        while self.now - start < timeout:
            if self.converged():
                return self.now - start
            await self.run_for(step)
        return self.now - start if self.converged() else None

    # ------------------------------------------------------------------ internals

    def _advance(self, t: float) -> None:
        if t > self.now:
            if self._up_count is None:
                self._up_count = sum(1 for nd in self.nodes.values() if nd.status == "up")
            self.up_node_seconds += (t - self.now) * self._up_count
            self.now = t

    def _set_status(self, node: SimNode, status: NodeStatus) -> None:
        node.status = status
        self._up_count = None

    def _push(self, t: float, kind: int, payload: Any) -> None:
        heapq.heappush(self._heap, (t, next(self._seq), kind, payload))

    def _dispatch(self, kind: int, payload: Any) -> None:
        now = self.now
        if kind == _TICK:
            node = payload
            assert isinstance(node, SimNode)
            if node.scheduled > now or node.status != "up" or self.nodes.get(node.name) is not node:
                return
            node.scheduled = math.inf
            if now == node.last_tick:
                node.spins += 1
                if node.spins > 1000:
                    raise RuntimeError(f"{node.name}: next_deadline() does not advance at {now}")
            else:
                node.last_tick, node.spins = now, 0
            node.swim.tick(now)
            self._flush(node)
        elif kind == _DELIVER:
            dst, data, src = payload
            self._deliver(dst, data, src)
        elif kind == _STREAM_ARRIVE:
            src, dst, req = payload
            self._stream_arrive(src, dst, req)
        elif kind == _STREAM_DONE:
            src, req, resp = payload
            self._stream_done(src, req, resp)
        elif kind == _REPLAY:
            self._replay(payload)

    def _replay(self, att: Attacker) -> None:
        if self.now >= att.stop_at:
            return
        targets = [nd.addr for nd in self.nodes.values() if nd.status == "up"]
        for data, addr, source in att.volley(targets):
            dst = self.by_addr.get(addr)
            if dst is None:
                continue
            att.sent += 1
            # fixed delay, no loss: the network RNG is left untouched
            self._push(self.now + self.delay, _DELIVER, (dst, data, source))
        self._push(self.now + att.interval, _REPLAY, att)

    def _deliver(self, dst: SimNode, data: bytes, src: Addr) -> None:
        for att in self.attackers:
            att.capture(data, dst.addr, src)
        if dst.status == "paused":
            if len(dst.inbox) < PAUSED_QUEUE:
                dst.inbox.append(lambda: dst.swim.receive_datagram(data, src, self.now))
            return
        if dst.status != "up" or self.nodes.get(dst.name) is not dst:
            return
        dst.swim.receive_datagram(data, src, self.now)
        self._flush(dst)

    def _stream_arrive(self, src: SimNode, dst: SimNode | None, req: StreamRequest) -> None:
        now = self.now
        if (
            dst is None
            or self.nodes.get(dst.name) is not dst
            or dst.status != "up"
            or not self.connected(src.name, dst.name)
        ):
            # refused (crashed process) comes back fast, anything else waits for the timeout
            refused = (
                dst is not None
                and dst.status in ("crashed", "left")
                and self.connected(src.name, dst.name)
            )
            self._push(
                now + (self.delay if refused else req.timeout), _STREAM_DONE, (src, req, None)
            )
            return
        resp = dst.swim.handle_stream(req.data, src.addr, now)
        self.msgs_sent += 1
        self.bytes_sent += len(req.data) + len(resp)
        self._flush(dst)
        self._push(now + self._delay() + len(resp) / 1e8, _STREAM_DONE, (src, req, resp or None))

    def _stream_done(self, src: SimNode, req: StreamRequest, resp: bytes | None) -> None:
        if self.nodes.get(src.name) is not src:
            return
        if src.status == "paused":
            src.inbox.append(lambda: src.swim.stream_response(req, resp, self.now))
            return
        if src.status != "up":
            return
        src.swim.stream_response(req, resp, self.now)
        self._flush(src)

    def _delay(self) -> float:
        return self.delay + self.rng.uniform(0, self.jitter)

    def _flush(self, node: SimNode) -> None:
        swim = node.swim
        now = self.now
        for data, addr in swim.outgoing():
            self.msgs_sent += 1
            self.bytes_sent += len(data)
            dst = self.by_addr.get(addr)
            if dst is None:
                self.sent_to_unknown.append((now, node.name, addr))
                continue
            if not self.connected(node.name, dst.name):
                continue
            loss = self.link_loss.get((node.name, dst.name), self.loss)
            if loss and self.rng.random() < loss:
                continue
            self._push(now + self._delay(), _DELIVER, (dst, data, node.addr))
        for req in swim.stream_requests():
            self.msgs_sent += 1  # a connection attempt; its bytes count once it is served
            self._push(now + self._delay(), _STREAM_ARRIVE, (node, self.by_addr.get(req.addr), req))
        evs = swim.events()
        if evs:
            self._observe(node.name, evs)
        self._reschedule(node)

    def _reschedule(self, node: SimNode) -> None:
        d = max(node.swim.next_deadline(), self.now)
        if d < node.scheduled:
            node.scheduled = d
            self._push(d, _TICK, node)

    def _forget_observer(self, name: str) -> None:
        self._max_inc[name] = {}
        for k in self.kills:
            if k.done is None:
                k.pending.discard(name)
                if not k.pending:
                    k.done = self.now
        for c in self.meta_changes:
            if c.done is None:
                c.pending.discard(name)
                if not c.pending:
                    c.done = self.now

    def _observe(self, observer: str, events: list[MemberEvent]) -> None:
        now = self.now
        incs = self._max_inc.setdefault(observer, {})
        for ev in events:
            m = ev.member
            if self.on_event is not None:
                self.on_event(observer, ev, now)
            if ev.kind == "forgotten":
                continue
            if m.name != observer:
                prev = incs.get(m.name, -1)
                if m.incarnation < prev:
                    self.inc_violations.append((observer, m.name, prev, m.incarnation))
                incs[m.name] = max(prev, m.incarnation)
            if ev.kind in ("dead", "left"):
                subject = self.nodes.get(m.name)
                if (
                    ev.kind == "dead"
                    and subject is not None
                    and subject.status == "up"
                    and self.connected(observer, m.name)
                ):
                    self.false_dead.add(m.name)
                    self.false_dead_events.append((now, observer, m.name))
                for k in self.kills:
                    if k.done is None and k.name == m.name and now >= k.time:
                        k.pending.discard(observer)
                        if not k.pending:
                            k.done = now
            elif ev.kind == "meta-changed" and m.meta_current:
                for c in self.meta_changes:
                    if c.done is None and c.name == m.name and m.meta_version >= c.version:
                        c.pending.discard(observer)
                        if not c.pending:
                            c.done = now
