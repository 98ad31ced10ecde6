"""The SWIM + Lifeguard protocol object (sans-IO, h11 style).

Time and input are passed in (``receive_datagram``, ``handle_stream``,
``stream_response``, ``tick``); datagrams, TCP exchanges and membership
events come out (``outgoing``, ``stream_requests``, ``events``). Nothing here
does I/O or reads a clock, so the simulator and the Trio driver run the very
same code, and no input can make it raise.

:class:`Swim` is the facade: it keeps the entry points and the timers' order,
and delegates each concern to its module: :mod:`.dispatch` (admission and
routing by message type), :mod:`.transitions` (member states, incarnations,
refutation, suspicion timers), :mod:`.probe` (failure detection),
:mod:`.metasync` (view fetches), :mod:`.pushpull` (join and anti-entropy),
all sharing one :class:`.context.Context`.
"""

from __future__ import annotations

import math
import random
import struct
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from types import MappingProxyType
from typing import assert_never

from duravip.swim import codec
from duravip.swim.awareness import Awareness
from duravip.swim.broadcast import BroadcastQueue
from duravip.swim.codec import Dead, MetaResponse, NodeRecord, saturating_inc
from duravip.swim.context import Context, StreamRequest, meta_digest
from duravip.swim.crypto import Keyring
from duravip.swim.dispatch import admit, answer, dispatch, open_stream
from duravip.swim.members import Addr, Member, MemberEvent, MemberTable, NodeState, State
from duravip.swim.metasync import MetaSync
from duravip.swim.probe import Prober
from duravip.swim.pushpull import AntiEntropy, merge, records
from duravip.swim.replay import ReplayGuard
from duravip.swim.settings import Timers
from duravip.swim.transitions import Transitions

__all__ = ["LEAVE_DIRECT_FANOUT", "StreamRequest", "Swim"]

#: A graceful leave is sent directly to at most this many members (the rest hear it by gossip).
LEAVE_DIRECT_FANOUT = 32


class Swim:
    """One node's membership protocol state machine."""

    def __init__(
        self,
        *,
        name: str,
        addr: Addr,
        cluster: str,
        timers: Timers,
        keyring: Keyring,
        seeds: Sequence[Addr] = (),
        meta: bytes = b"",
        rng: random.Random | None = None,
        now: float = 0.0,
        epoch: int | None = None,
    ) -> None:
        """``epoch`` orders this process's boots (the driver passes the wall clock in
        ns; it must grow across restarts): peers take a higher one as a restart and
        reject older ones as replays. Default: ``now`` in ns (fine within one clock)."""
        self.name = name
        self.addr = addr
        self.cluster = cluster
        self.seeds = tuple(s for s in seeds if s != addr)
        self.rng = rng if rng is not None else random.Random()
        if epoch is None:
            epoch = max(0, int(now * 1e9))
        # the construction order below is the order the RNG is drawn from: keep it
        ctx = Context(
            name=name,
            addr=addr,
            cluster=cluster,
            timers=timers,
            keyring=keyring,
            meta=meta,
            rng=self.rng,
            now=now,
            epoch=epoch,
        )
        self._ctx = ctx
        self._replay = ReplayGuard()
        self._meta = MetaSync(ctx)
        self._probes = Prober(ctx, self._suspect, now)
        self._transitions = Transitions(
            ctx, self._meta, self._replay, self._probes.probe_soon, self._probes.confirm_now
        )
        # staggered so nodes started together do not gossip in lockstep
        self._next_gossip = now + self.rng.uniform(0, timers.gossip_interval)
        self._sync = AntiEntropy(ctx, self._transitions, self.seeds, now)

    def _suspect(self, s: codec.Suspect, now: float) -> None:
        self._transitions.on_suspect(s, now)

    # ------------------------------------------------------------------ shared state

    @property
    def epoch(self) -> int:
        """This boot's epoch (sealed into every frame)."""
        return self._ctx.boot.epoch

    @property
    def timers(self) -> Timers:
        return self._ctx.timers

    @property
    def keyring(self) -> Keyring:
        return self._ctx.keyring

    @property
    def counters(self) -> Counter[str]:
        return self._ctx.counters

    @property
    def table(self) -> MemberTable:
        return self._ctx.table

    @property
    def broadcasts(self) -> BroadcastQueue:
        return self._ctx.broadcasts

    @property
    def awareness(self) -> Awareness:
        return self._ctx.awareness

    @property
    def local(self) -> NodeState:
        return self._ctx.local

    # ------------------------------------------------------------------ API

    def receive_datagram(self, data: bytes, addr: Addr, now: float) -> None:
        """One datagram from ``addr``; anything that is not a fresh, authentic packet for
        us is dropped and counted (``dropped_<reason>``), never raised."""
        counters = self._ctx.counters
        counters["msgs_recv"] += 1
        counters["bytes_recv"] += len(data)
        pkt = admit(self._ctx, self._replay, data, addr)
        if pkt is None:
            return
        try:
            for m in pkt.messages:
                dispatch(m, pkt.sender, addr, now, self._probes, self._transitions)
        except (ValueError, OverflowError, struct.error):
            # last line of defence: a bug must cost one packet, never the daemon
            counters["dropped_internal"] += 1

    def tick(self, now: float) -> None:
        """Run every timer that is due at ``now``."""
        ctx = self._ctx
        self._probes.tick(now)
        self._transitions.tick_suspicions(now)
        if now >= self._next_gossip:
            if len(ctx.broadcasts):
                ctx.gossip(now)
            interval = max(1e-3, ctx.timers.gossip_interval)
            self._next_gossip += (
                max(1, math.floor((now - self._next_gossip) / interval) + 1) * interval
            )
        self._sync.tick(now)
        self._meta.tick(now)
        if now >= self._transitions.next_reap:
            self._transitions.reap(now)

    def next_deadline(self) -> float:
        d = self._probes.next_deadline(math.inf)
        if len(self._ctx.broadcasts):
            d = min(d, self._next_gossip)
        d = self._sync.next_deadline(d)
        d = self._transitions.next_deadline(d)
        return self._meta.next_deadline(d)

    def outgoing(self) -> list[tuple[bytes, Addr]]:
        out, self._ctx.out = self._ctx.out, []
        return out

    def stream_requests(self) -> list[StreamRequest]:
        out, self._ctx.streams = self._ctx.streams, []
        return out

    def events(self) -> list[MemberEvent]:
        out, self._ctx.events = self._ctx.events, []
        return out

    def members(self) -> Mapping[str, Member]:
        """Live read-only view of every known member (self included)."""
        return MappingProxyType(self._ctx.public)

    def join(self, addrs: Iterable[Addr], now: float) -> None:
        """Push-pull with ``addrs`` now (join or re-sync); the seeds are retried on their own."""
        self._sync.start_join([a for a in addrs if a != self.addr], now)

    def set_meta(self, meta: bytes, now: float) -> None:
        """Publish new metadata: a new version and incarnation, gossiped as a digest."""
        ctx = self._ctx
        local = ctx.local
        local.meta = meta
        local.meta_version = saturating_inc(local.meta_version)
        local.have_version = local.meta_version
        local.meta_digest = local.have_digest = meta_digest(meta)
        local.meta_len = len(meta)
        ctx.touch(local, "meta-changed")
        if ctx.leaving:
            return  # an alive now would cancel the leave
        local.incarnation = saturating_inc(local.incarnation)
        ctx.broadcast_alive(local)
        # Push the new digest now instead of at the next gossip tick: a handover
        # (release here, plumb there) waits on exactly this message.
        ctx.gossip(now)

    def leave(self, now: float) -> None:
        """Announce a graceful leave: others mark this node ``left`` at once."""
        ctx = self._ctx
        if ctx.leaving:
            return
        ctx.leaving = True
        local = ctx.local
        local.state = State.LEFT
        local.state_since = now
        ctx.table.changed()
        msg = Dead(local.incarnation, self.name, self.name)
        ctx.broadcasts.queue(self.name, codec.encode_message(msg))
        peers = list(ctx.table.live_peers())
        self.rng.shuffle(peers)
        for name in peers[:LEAVE_DIRECT_FANOUT]:
            node = ctx.table.get(name)
            if node is not None:
                ctx.send(name, node.addr, [msg])
        ctx.touch(local, "left")

    def left_done(self) -> bool:
        """True once the leave has been gossiped its full retransmit count (or nobody is left)."""
        ctx = self._ctx
        if not ctx.leaving:
            return False
        if not ctx.table.live_peers():
            return True
        return ctx.broadcasts.pending(self.name) is None

    def set_keyring(self, keyring: Keyring) -> None:
        self._ctx.keyring = keyring

    def set_timers(self, timers: Timers) -> None:
        self._ctx.timers = timers
        self.awareness.max_multiplier = max(1, timers.awareness_max_multiplier)
        self.awareness.apply_delta(0)

    def marks(self, name: str) -> Mapping[str, float]:
        """When member ``name`` last acked our probe, was suspected, declared dead (core time)."""
        return dict(self._ctx.marks.get(name, {}))

    def hint_unreachable(self, addr: Addr, now: float) -> None:
        """ICMP port unreachable from ``addr``: go to indirect probes early, never declare death."""
        self._probes.hint_unreachable(addr, now)

    def state_records(self) -> tuple[NodeRecord, ...]:
        """The full state as push-pull records (what a TCP exchange would carry)."""
        return records(self._ctx.table)

    def merge_state(self, records: Sequence[NodeRecord], now: float) -> None:
        """Apply push-pull records as if received over TCP (a simulator's instant bootstrap)."""
        merge(records, self._transitions, now)

    def reset_broadcasts(self) -> None:
        """Drop pending gossip (a simulator's instant bootstrap uses this)."""
        self._ctx.broadcasts.clear()

    # ------------------------------------------------------------------ streams

    def seal_stream(self, plaintext: bytes) -> bytes:
        """``plaintext`` sealed as a TCP frame of this node."""
        return self._ctx.seal_stream(plaintext)

    def seal_packet(self, parts: Sequence[bytes], dest: str) -> bytes:
        """Encoded message parts sealed as a datagram from this node to ``dest``."""
        return self._ctx.seal_packet(parts, dest)

    def seal_raw_datagram(self, plaintext: bytes) -> bytes:
        """Any bytes sealed on the datagram channel (tests: authentic garbage)."""
        return self._ctx.seal_raw_datagram(plaintext)

    def stream_header(self, length: int) -> bytes:
        """The small sealed frame sent before a TCP frame of ``length`` bytes: the
        receiver checks the key on it before it agrees to read a large frame."""
        return self._ctx.stream_header(length)

    def open_stream_header(self, frame: bytes) -> int | None:
        """The length a peer announced, or None (counted) if the header is not authentic."""
        return self._ctx.open_stream_header(frame)

    def handle_stream(self, request: bytes, peer: Addr, now: float) -> bytes:
        """Server side of one TCP exchange; bad input returns b"" and is counted."""
        ctx = self._ctx
        ctx.counters["streams_in"] += 1
        msg = open_stream(ctx, request)
        if msg is None:
            return b""
        reply = answer(ctx, msg, now, self._sync, self._meta)
        if reply is None:
            return b""
        return ctx.seal_stream(codec.encode_stream(reply))

    def stream_response(self, req: StreamRequest, response: bytes | None, now: float) -> None:
        """Client side completion of a :class:`StreamRequest` (``None``: it failed)."""
        pending = self._ctx.pending.pop(req.id, None)
        if pending is None:
            return
        kind, name = pending
        msg = open_stream(self._ctx, response) if response else None
        match kind:
            case "join" | "push_pull":
                self._sync.done(kind == "join", msg, now)
            case "meta":
                self._meta.done(name, req.id, msg if isinstance(msg, MetaResponse) else None, now)
            case _:
                assert_never(kind)
