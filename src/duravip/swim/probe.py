"""Failure detection: one probe per period, direct then indirect, and its answers.

Each period probes one member: fresh suspects first (with the suspicion
attached, Lifeguard's buddy system), else the next one in a shuffled
round-robin order. No ack within ``probe_timeout`` sends ping-reqs through
``indirect_checks`` other members, which nack if they get no answer either; no
ack by the end of the period suspects the target. Missed acks and nacks raise
the Lifeguard awareness score, which stretches our own interval and timeout.

The other side lives here too: answering pings, and relaying ping-reqs (to a
target only at the address we know it by, so nothing can be reflected).
"""

from __future__ import annotations

from collections.abc import Callable

from attrs import define

from duravip.swim.codec import Ack, Message, Nack, Ping, PingReq, Suspect
from duravip.swim.context import Context
from duravip.swim.members import Addr, State

#: Ping-reqs relayed at once; more are dropped (a flood cannot grow memory).
MAX_RELAYS = 1024


@define
class Probe:
    """Our probe of ``target`` in the current period."""

    target: str
    seq: int
    incarnation: int
    direct_deadline: float
    end: float
    indirect_sent: bool = False
    acked: bool = False
    expected_nacks: int = 0
    nacks: int = 0


@define
class Relay:
    """This node helps another one probe ``target`` (ping-req)."""

    requester: str
    requester_addr: Addr
    seq: int
    nack: bool
    nack_at: float
    expire: float


class Prober:
    """Probe scheduling and the ping / ack / nack / ping-req exchanges."""

    def __init__(self, ctx: Context, suspect: Callable[[Suspect, float], None], now: float) -> None:
        """``suspect(claim, now)`` applies our own suspicion of a member that failed a probe."""
        self.ctx = ctx
        self.suspect = suspect
        self.probe: Probe | None = None
        self.relays: dict[int, Relay] = {}
        #: fresh suspects to probe next, out of round-robin order (see probe_soon)
        self.urgent: list[str] = []
        # staggered so nodes started together do not probe in lockstep
        self.next_probe = now + ctx.rng.uniform(0, ctx.timers.probe_interval)

    def probe_soon(self, name: str) -> None:
        """Probe the fresh suspect ``name`` at the next period."""
        if name not in self.urgent:
            self.urgent.append(name)

    def confirm_now(self, name: str, now: float) -> None:
        """A peer suspects ``name``: probe it now, not at the next period (Lifeguard dogpile).

        Our own probe is the independent confirmation that shrinks every
        suspicion timer to its minimum (or, attached to the ping, the suspicion
        the suspect refutes at once); waiting up to a period for it was most of
        a crash failover's suspect-to-dead time.
        """
        self.probe_soon(name)
        self.next_probe = min(self.next_probe, now)

    # ------------------------------------------------------------------ timers

    def tick(self, now: float) -> None:
        self._tick_probe(now)
        self._tick_relays(now)

    def next_deadline(self, d: float) -> float:
        """``d`` or the next probe step or relay timer, whichever comes first."""
        p = self.probe
        if p is None or (p.acked and self.urgent):
            d = min(d, self.next_probe)
        else:
            # a probe in flight ends before the next starts (confirm_now may pull it earlier)
            d = min(d, max(self.next_probe, p.end))
        if p is not None:
            d = min(d, p.end if (p.indirect_sent or p.acked) else p.direct_deadline)
        for r in self.relays.values():
            d = min(d, r.nack_at if r.nack else r.expire, r.expire)
        return d

    def _tick_probe(self, now: float) -> None:
        ctx = self.ctx
        p = self.probe
        if p is not None and not p.acked and not p.indirect_sent and now >= p.direct_deadline:
            self._send_indirect(p)
        if p is not None and p.acked and self.urgent and self.next_probe <= now < p.end:
            p.end = now  # acked: nothing left to learn from it; a fresh suspect goes first
        if p is not None and now >= p.end:
            self.probe = None
            if not p.acked:
                self._probe_failed(p, now)
            node = ctx.table.get(p.target)
            if (
                p.acked
                and node is not None
                and node.state == State.SUSPECT
                and p.target not in self.urgent
            ):
                # it answers but the refutation has not reached us: keep asking (with the
                # suspicion attached) every period; a failed probe instead confirmed it
                self.urgent.append(p.target)
        if self.probe is None and now >= self.next_probe:
            if ctx.leaving:
                self.next_probe = now + ctx.timers.probe_interval
                return
            self._start_probe(now)

    def _start_probe(self, now: float) -> None:
        ctx = self.ctx
        interval = ctx.awareness.scale(ctx.timers.probe_interval)
        self.next_probe = now + interval
        target = None
        while self.urgent and target is None:
            cand = ctx.table.get(self.urgent.pop(0))
            if cand is not None and cand.state == State.SUSPECT:
                target = cand
                ctx.counters["urgent_probes"] += 1
        if target is None:
            target = ctx.table.next_probe_target()
        if target is None:
            return
        seq = ctx.next_seq()
        self.probe = Probe(
            target=target.name,
            seq=seq,
            incarnation=target.incarnation,
            direct_deadline=now + ctx.awareness.scale(ctx.timers.probe_timeout),
            end=now + interval,
        )
        msgs: list[Message] = [Ping(seq, target.name, ctx.name, ctx.addr), *ctx.own_state()]
        if target.state == State.SUSPECT:
            # Lifeguard buddy system: tell the suspect directly so it can refute at once
            msgs.append(Suspect(target.incarnation, target.name, ctx.name))
        ctx.counters["pings_sent"] += 1
        # a suspect is likely dead: do not spend piggybacked transmits on it
        ctx.send(target.name, target.addr, msgs, count=target.state == State.ALIVE)

    def _send_indirect(self, p: Probe) -> None:
        ctx = self.ctx
        p.indirect_sent = True
        target = ctx.table.get(p.target)
        if target is None:
            return
        helpers = [n for n in ctx.table.live_peers() if n != p.target]
        k = min(ctx.timers.indirect_checks, len(helpers))
        for name in ctx.rng.sample(helpers, k):
            helper = ctx.table.get(name)
            if helper is None:
                continue
            ctx.counters["ping_reqs_sent"] += 1
            ctx.send(
                name,
                helper.addr,
                [PingReq(p.seq, p.target, target.addr, ctx.name, ctx.addr, True)],
            )
            p.expected_nacks += 1

    def _probe_failed(self, p: Probe, now: float) -> None:
        ctx = self.ctx
        ctx.counters["probes_failed"] += 1
        if p.expected_nacks > 0:
            ctx.awareness.apply_delta(max(0, p.expected_nacks - p.nacks))
        else:
            ctx.awareness.apply_delta(1)
        node = ctx.table.get(p.target)
        if node is None or node.state not in (State.ALIVE, State.SUSPECT):
            return
        if node.incarnation != p.incarnation:
            return  # it refuted while we were probing
        self.suspect(Suspect(node.incarnation, node.name, ctx.name), now)

    def _tick_relays(self, now: float) -> None:
        if not self.relays:
            return
        for seq, r in list(self.relays.items()):
            if r.nack and now >= r.nack_at:
                r.nack = False
                self.ctx.counters["nacks_sent"] += 1
                self.ctx.send(r.requester, r.requester_addr, [Nack(r.seq)])
            if now >= r.expire:
                del self.relays[seq]

    def hint_unreachable(self, addr: Addr, now: float) -> None:
        """ICMP port unreachable from ``addr``: go to indirect probes early, never declare death."""
        p = self.probe
        if p is None or p.acked or p.indirect_sent:
            return
        node = self.ctx.table.get(p.target)
        if node is not None and node.addr == addr:
            self.ctx.counters["unreachable_hints"] += 1
            p.direct_deadline = min(p.direct_deadline, now)

    # ------------------------------------------------------------------ messages

    def on_ping(self, m: Ping, sender: str, addr: Addr) -> None:
        ctx = self.ctx
        if m.target != ctx.name or m.source != sender:
            ctx.counters["dropped_misdirected"] += 1
            return
        node = ctx.table.get(sender)
        if node is None and m.source_addr == addr:
            # first contact (it learned of us before we of it): a bare ack, no gossip
            ctx.counters["acks_sent"] += 1
            ctx.send(sender, addr, [Ack(m.seq), *ctx.own_state()], piggyback=False)
            return
        node = ctx.known_addr(sender, addr)
        if node is None:
            return
        ctx.counters["acks_sent"] += 1
        ctx.send(
            sender,
            node.addr,
            [Ack(m.seq), *ctx.own_state()],
            count=node.state in (State.ALIVE, State.SUSPECT),
        )

    def on_ack(self, seq: int, now: float) -> None:
        ctx = self.ctx
        p = self.probe
        if p is not None and p.seq == seq:
            if not p.acked:
                p.acked = True
                ctx.mark(p.target, "ack", now)
                ctx.counters["acks_recv"] += 1
                if not p.indirect_sent:
                    ctx.awareness.apply_delta(-1)
            return
        relay = self.relays.pop(seq, None)
        if relay is not None:
            ctx.send(relay.requester, relay.requester_addr, [Ack(relay.seq)])
            return
        ctx.counters["dropped_stale"] += 1

    def on_nack(self, seq: int, now: float) -> None:
        p = self.probe
        if p is not None and p.seq == seq and p.nacks < p.expected_nacks:
            p.nacks += 1
            self.ctx.counters["nacks_recv"] += 1
            if p.nacks == p.expected_nacks and not p.acked:
                # every helper failed to reach it too: waiting for the period's end
                # only delays the suspicion (a late ack still refutes it, buddy system)
                p.end = min(p.end, now)
        else:
            self.ctx.counters["dropped_stale"] += 1

    def on_ping_req(self, m: PingReq, sender: str, addr: Addr, now: float) -> None:
        ctx = self.ctx
        if len(self.relays) > MAX_RELAYS:
            ctx.counters["dropped_busy"] += 1
            return
        requester = ctx.known_addr(sender, addr)
        if requester is None:
            return
        target = ctx.table.get(m.target)
        if target is None or target is ctx.local or target.addr != m.target_addr:
            # we only ever ping members at the address we know them by: no reflection
            ctx.counters["dropped_unknown_addr"] += 1
            return
        seq = ctx.next_seq()
        t = ctx.timers
        self.relays[seq] = Relay(
            requester=sender,
            requester_addr=requester.addr,
            seq=m.seq,
            nack=m.nack,
            nack_at=now + t.probe_timeout * 0.8,
            expire=now + t.probe_interval * 2,
        )
        ctx.send(target.name, target.addr, [Ping(seq, m.target, ctx.name, ctx.addr)])
