"""The SWIM + Lifeguard protocol object (sans-IO, h11 style).

Time and input are passed in (``receive_datagram``, ``handle_stream``,
``stream_response``, ``tick``); datagrams, TCP exchanges and membership
events come out (``outgoing``, ``stream_requests``, ``events``). Nothing here
does I/O or reads a clock, so the simulator and the Trio driver run the very
same code, and no input can make it raise.
"""

from __future__ import annotations

import math
import random
import struct
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from types import MappingProxyType
from typing import Literal

import xxhash
from attrs import define, frozen

from duravip.config.model import Timers
from duravip.swim import codec
from duravip.swim.awareness import Awareness
from duravip.swim.broadcast import BroadcastQueue, retransmit_limit
from duravip.swim.codec import (
    Ack,
    Alive,
    CodecError,
    Dead,
    Message,
    MetaRequest,
    MetaResponse,
    Nack,
    NodeRecord,
    Ping,
    PingReq,
    PushPull,
    Suspect,
    saturating_inc,
)
from duravip.swim.crypto import OVERHEAD, Boot, CryptoError, Keyring
from duravip.swim.members import Addr, EventKind, Member, MemberEvent, MemberTable, NodeState, State
from duravip.swim.replay import ReplayGuard
from duravip.swim.suspicion import Suspicion, min_timeout

UDP = b"udp"
TCP = b"tcp"
#: channel of the small sealed frame that announces a TCP frame's length
TCP_HEADER = b"tcp-len"
_STREAM_LEN = struct.Struct("!I")
#: Join retries back off from this to ``JOIN_BACKOFF_MAX`` seconds.
JOIN_BACKOFF_MIN = 0.25
JOIN_BACKOFF_MAX = 4.0
#: Meta fetch retries back off from this to ``META_BACKOFF_MAX`` seconds.
META_BACKOFF_MIN = 0.05
META_BACKOFF_MAX = 2.0
#: A graceful leave is sent directly to at most this many members (the rest hear it by gossip).
LEAVE_DIRECT_FANOUT = 32
_SEQ_MASK = 0xFFFFFFFF


def meta_digest(meta: bytes) -> int:
    return xxhash.xxh64_intdigest(meta)


StreamKind = Literal["join", "push_pull", "meta"]


@frozen
class StreamRequest:
    """A TCP exchange the driver must perform: send ``data``, return the reply."""

    id: int
    kind: StreamKind
    addr: Addr
    data: bytes
    timeout: float


@define
class _Probe:
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
class _Relay:
    """This node helps another one probe ``target`` (ping-req)."""

    requester: str
    requester_addr: Addr
    seq: int
    nack: bool
    nack_at: float
    expire: float


@define
class _MetaFetch:
    name: str
    version: int
    digest: int
    attempts: int = 0
    inflight: int | None = None  # stream request id
    retry_at: float | None = None


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
        self.timers = timers
        self.keyring = keyring
        self.seeds = tuple(s for s in seeds if s != addr)
        self.rng = rng if rng is not None else random.Random()
        self.counters: Counter[str] = Counter()
        if epoch is None:
            epoch = max(0, int(now * 1e9))
        self._boot = Boot(epoch & ((1 << 64) - 1), self.rng.randbytes(8))
        self._replay = ReplayGuard()
        self.table = MemberTable(name, self.rng)
        self.broadcasts = BroadcastQueue()
        self.awareness = Awareness(timers.awareness_max_multiplier)
        self._out: list[tuple[bytes, Addr]] = []
        self._streams: list[StreamRequest] = []
        self._events: list[MemberEvent] = []
        self._public: dict[str, Member] = {}
        self._suspicions: dict[str, Suspicion] = {}
        self._relays: dict[int, _Relay] = {}
        self._pending: dict[int, tuple[StreamKind, str]] = {}
        self._meta_fetch: dict[str, _MetaFetch] = {}
        self._seq = self.rng.randrange(1 << 32)
        self._stream_id = 0
        self._probe: _Probe | None = None
        #: fresh suspects to probe next, out of round-robin order (see _on_suspect)
        self._urgent: list[str] = []
        self._leaving = False
        self._leave_pending = False

        local = NodeState(name, addr, 0, now)
        local.meta = meta
        local.meta_version = local.have_version = 0
        local.meta_digest = local.have_digest = meta_digest(meta)
        local.meta_len = len(meta)
        self.local = local
        self.table.add(local)
        self._touch(local, "joined")

        # stagger the periodic timers so nodes started together do not move in lockstep
        self._next_probe = now + self.rng.uniform(0, timers.probe_interval)
        self._next_gossip = now + self.rng.uniform(0, timers.gossip_interval)
        # the push-pull period follows the cluster size (it is recomputed on every use)
        self._pp_last = now
        self._pp_factor = self.rng.uniform(0.5, 1.0)
        self._join_backoff = JOIN_BACKOFF_MIN
        self._join_at = now
        self._joins_inflight = 0
        self._next_reap = math.inf
        if self.seeds:
            self._start_join(self.seeds, now)

    # ------------------------------------------------------------------ API

    @property
    def epoch(self) -> int:
        """This boot's epoch (sealed into every frame)."""
        return self._boot.epoch

    def receive_datagram(self, data: bytes, addr: Addr, now: float) -> None:
        """One datagram from ``addr``; anything that is not a fresh, authentic packet for
        us is dropped and counted (``dropped_<reason>``), never raised."""
        self.counters["msgs_recv"] += 1
        self.counters["bytes_recv"] += len(data)
        try:
            opened = self.keyring.open(data, self.cluster, UDP)
        except CryptoError as exc:
            self.counters[f"dropped_{exc.reason}"] += 1
            return
        try:
            pkt = codec.decode_packet(opened.plaintext)
        except CodecError as exc:
            self.counters[f"dropped_{exc.reason}"] += 1
            return
        if pkt.dest != self.name or pkt.sender == self.name:
            self.counters["dropped_misdirected"] += 1
            return
        known = self.table.get(pkt.sender)
        if known is not None and known.addr != addr:
            # not from the sender's own address: a copy an attacker re-sent. Checked before
            # the replay window, so such a copy cannot make us reject the genuine one
            self.counters["dropped_unknown_addr"] += 1
            return
        if not self._replay.accept(pkt.sender, opened.epoch, opened.salt, opened.counter):
            self.counters["dropped_replay"] += 1
            return
        try:
            for m in pkt.messages:
                self._handle(m, pkt.sender, addr, now)
        except (ValueError, OverflowError, struct.error):
            # last line of defence: a bug must cost one packet, never the daemon
            self.counters["dropped_internal"] += 1

    def tick(self, now: float) -> None:
        """Run every timer that is due at ``now``."""
        self._tick_probe(now)
        self._tick_relays(now)
        self._tick_suspicions(now)
        if now >= self._next_gossip:
            if len(self.broadcasts):
                self._gossip(now)
            interval = max(1e-3, self.timers.gossip_interval)
            self._next_gossip += (
                max(1, math.floor((now - self._next_gossip) / interval) + 1) * interval
            )
        if now >= self._next_push_pull():
            self._periodic_push_pull(now)
            self._pp_last = now
            self._pp_factor = self.rng.uniform(0.9, 1.1)
        if self.seeds and not self._leaving and now >= self._join_at:
            if self.table.live_peers():
                self._join_backoff = JOIN_BACKOFF_MIN
                self._join_at = now + JOIN_BACKOFF_MAX
            elif self._joins_inflight == 0:
                self._start_join(self.seeds, now)
            else:
                self._join_at = now + self._join_backoff  # still waiting for the last round
        self._tick_meta(now)
        if now >= self._next_reap:
            self._reap(now)

    def next_deadline(self) -> float:
        d = self._next_probe
        p = self._probe
        if p is not None:
            d = min(d, p.end if (p.indirect_sent or p.acked) else p.direct_deadline)
        if len(self.broadcasts):
            d = min(d, self._next_gossip)
        d = min(d, self._next_push_pull(), self._next_reap)
        if self.seeds and not self._leaving:
            d = min(d, self._join_at)
        for s in self._suspicions.values():
            d = min(d, s.deadline)
        for r in self._relays.values():
            d = min(d, r.nack_at if r.nack else r.expire, r.expire)
        for f in self._meta_fetch.values():
            if f.retry_at is not None:
                d = min(d, f.retry_at)
        return d

    def outgoing(self) -> list[tuple[bytes, Addr]]:
        out, self._out = self._out, []
        return out

    def stream_requests(self) -> list[StreamRequest]:
        out, self._streams = self._streams, []
        return out

    def events(self) -> list[MemberEvent]:
        out, self._events = self._events, []
        return out

    def members(self) -> Mapping[str, Member]:
        """Live read-only view of every known member (self included)."""
        return MappingProxyType(self._public)

    def join(self, addrs: Iterable[Addr], now: float) -> None:
        """Push-pull with ``addrs`` now (join or re-sync); the seeds are retried on their own."""
        self._start_join([a for a in addrs if a != self.addr], now)

    def set_meta(self, meta: bytes, now: float) -> None:
        """Publish new metadata: a new version and incarnation, gossiped as a digest."""
        local = self.local
        local.meta = meta
        local.meta_version = saturating_inc(local.meta_version)
        local.have_version = local.meta_version
        local.meta_digest = local.have_digest = meta_digest(meta)
        local.meta_len = len(meta)
        self._touch(local, "meta-changed")
        if self._leaving:
            return  # an alive now would cancel the leave
        local.incarnation = saturating_inc(local.incarnation)
        self._broadcast_alive(local)
        # Push the new digest now instead of at the next gossip tick: a handover
        # (release here, plumb there) waits on exactly this message.
        self._gossip(now)

    def leave(self, now: float) -> None:
        """Announce a graceful leave: others mark this node ``left`` at once."""
        if self._leaving:
            return
        self._leaving = True
        self._leave_pending = True
        local = self.local
        local.state = State.LEFT
        local.state_since = now
        self.table.changed()
        msg = Dead(local.incarnation, self.name, self.name)
        self.broadcasts.queue(self.name, codec.encode_message(msg))
        peers = list(self.table.live_peers())
        self.rng.shuffle(peers)
        for name in peers[:LEAVE_DIRECT_FANOUT]:
            node = self.table.get(name)
            if node is not None:
                self._send(name, node.addr, [msg])
        self._touch(local, "left")

    def left_done(self) -> bool:
        """True once the leave has been gossiped its full retransmit count (or nobody is left)."""
        if not self._leaving:
            return False
        if not self.table.live_peers():
            return True
        return self.broadcasts.pending(self.name) is None

    def set_keyring(self, keyring: Keyring) -> None:
        self.keyring = keyring

    def set_timers(self, timers: Timers) -> None:
        self.timers = timers
        self.awareness.max_multiplier = max(1, timers.awareness_max_multiplier)
        self.awareness.apply_delta(0)

    def hint_unreachable(self, addr: Addr, now: float) -> None:
        """ICMP port unreachable from ``addr``: go to indirect probes early, never declare death."""
        p = self._probe
        if p is None or p.acked or p.indirect_sent:
            return
        node = self.table.get(p.target)
        if node is not None and node.addr == addr:
            self.counters["unreachable_hints"] += 1
            p.direct_deadline = min(p.direct_deadline, now)

    def state_records(self) -> tuple[NodeRecord, ...]:
        """The full state as push-pull records (what a TCP exchange would carry)."""
        return self._records()

    def merge_state(self, records: Sequence[NodeRecord], now: float) -> None:
        """Apply push-pull records as if received over TCP (a simulator's instant bootstrap)."""
        self._merge(records, now)

    def reset_broadcasts(self) -> None:
        """Drop pending gossip (a simulator's instant bootstrap uses this)."""
        self.broadcasts.clear()

    # ------------------------------------------------------------------ streams

    def seal_stream(self, plaintext: bytes) -> bytes:
        """``plaintext`` sealed as a TCP frame of this node."""
        return self.keyring.seal(plaintext, self.cluster, TCP, self._boot)

    def seal_packet(self, parts: Sequence[bytes], dest: str) -> bytes:
        """Encoded message parts sealed as a datagram from this node to ``dest``."""
        plain = codec.encode_packet(parts, self.name, dest)
        return self.keyring.seal(plain, self.cluster, UDP, self._boot)

    def seal_raw_datagram(self, plaintext: bytes) -> bytes:
        """Any bytes sealed on the datagram channel (tests: authentic garbage)."""
        return self.keyring.seal(plaintext, self.cluster, UDP, self._boot)

    def stream_header(self, length: int) -> bytes:
        """The small sealed frame sent before a TCP frame of ``length`` bytes: the
        receiver checks the key on it before it agrees to read a large frame."""
        return self.keyring.seal(_STREAM_LEN.pack(length), self.cluster, TCP_HEADER, self._boot)

    def open_stream_header(self, frame: bytes) -> int | None:
        """The length a peer announced, or None (counted) if the header is not authentic."""
        try:
            plain = self.keyring.open(frame, self.cluster, TCP_HEADER).plaintext
        except CryptoError as exc:
            self.counters[f"dropped_stream_{exc.reason}"] += 1
            return None
        if len(plain) != _STREAM_LEN.size:
            self.counters["dropped_stream_parse"] += 1
            return None
        length: int = _STREAM_LEN.unpack(plain)[0]
        return length

    def _open_stream(self, frame: bytes) -> codec.StreamMessage | None:
        try:
            return codec.decode_stream(self.keyring.open(frame, self.cluster, TCP).plaintext)
        except CryptoError as exc:
            self.counters[f"dropped_stream_{exc.reason}"] += 1
        except CodecError as exc:
            self.counters[f"dropped_stream_{exc.reason}"] += 1
        return None

    def handle_stream(self, request: bytes, peer: Addr, now: float) -> bytes:
        """Server side of one TCP exchange; bad input returns b"" and is counted."""
        self.counters["streams_in"] += 1
        msg = self._open_stream(request)
        if msg is None:
            return b""
        if isinstance(msg, PushPull):
            self._merge(msg.records, now)
            reply: codec.StreamMessage = PushPull(False, self._records())
        elif isinstance(msg, MetaRequest):
            node = self.table.get(msg.name)
            if node is not None and (
                node is self.local
                or (node.have_version, node.have_digest) == (msg.version, msg.digest)
            ):
                reply = MetaResponse(msg.name, True, node.have_version, node.have_digest, node.meta)
            else:
                reply = MetaResponse(msg.name, False, 0, 0, b"")
        else:
            self.counters["dropped_stream_parse"] += 1
            return b""
        return self.seal_stream(codec.encode_stream(reply))

    def stream_response(self, req: StreamRequest, response: bytes | None, now: float) -> None:
        """Client side completion of a :class:`StreamRequest` (``None``: it failed)."""
        pending = self._pending.pop(req.id, None)
        if pending is None:
            return
        kind, name = pending
        msg: codec.StreamMessage | None = None
        if response:
            msg = self._open_stream(response)
        if kind in ("join", "push_pull"):
            if kind == "join":
                self._joins_inflight = max(0, self._joins_inflight - 1)
            if isinstance(msg, PushPull):
                self.counters["push_pull_ok"] += 1
                self._merge(msg.records, now)
            else:
                self.counters["push_pull_failed"] += 1
        else:
            self._meta_done(name, req.id, msg if isinstance(msg, MetaResponse) else None, now)

    # ------------------------------------------------------------------ internals: sending

    def _next_seq(self) -> int:
        self._seq = (self._seq + 1) & _SEQ_MASK
        return self._seq

    def _limit(self) -> int:
        return retransmit_limit(self.timers.retransmit_mult, self.table.active_count())

    def _send(
        self,
        dest: str,
        addr: Addr,
        msgs: Sequence[Message],
        piggyback: bool = True,
        count: bool = True,
    ) -> None:
        """Send ``msgs`` to member ``dest`` at ``addr``, plus piggybacked updates
        (``count=False``: without spending transmits)."""
        parts = [codec.encode_message(m) for m in msgs]
        if piggyback:
            header = 4 + len(self.name.encode()) + len(dest.encode())
            budget = self.timers.mtu - OVERHEAD - header - sum(len(p) for p in parts)
            if count:
                parts += self.broadcasts.get(budget, self._limit(), 250 - len(parts))
            else:
                parts += self.broadcasts.peek(budget, 250 - len(parts))
        if not parts:
            return
        data = self.seal_packet(parts, dest)
        self.counters["msgs_sent"] += 1
        self.counters["bytes_sent"] += len(data)
        self._out.append((data, addr))

    def _new_stream(
        self, kind: StreamKind, addr: Addr, msg: codec.StreamMessage, key: str = ""
    ) -> int:
        self._stream_id += 1
        data = self.seal_stream(codec.encode_stream(msg))
        timeout = max(1.0, 10 * self.timers.probe_timeout)
        self._streams.append(StreamRequest(self._stream_id, kind, addr, data, timeout))
        self._pending[self._stream_id] = (kind, key)
        self.counters[f"stream_{kind}"] += 1
        return self._stream_id

    def _start_join(self, addrs: Iterable[Addr], now: float) -> None:
        for a in addrs:
            self._joins_inflight += 1
            self._new_stream("join", a, PushPull(True, self._records()))
        self._join_at = now + self._join_backoff
        self._join_backoff = min(JOIN_BACKOFF_MAX, self._join_backoff * 2)

    def _next_push_pull(self) -> float:
        return self._pp_last + self._push_pull_interval() * self._pp_factor

    def _push_pull_interval(self) -> float:
        """memberlist's scaling: slower anti-entropy beyond 32 nodes keeps per-node load flat."""
        n = self.table.active_count()
        base = self.timers.push_pull_interval
        if n <= 32:
            return base
        return base * (math.ceil(math.log2(n) - math.log2(32)) + 1)

    def _periodic_push_pull(self, now: float) -> None:
        if self._leaving:
            return
        peers = self.table.live_peers()
        if peers:
            node = self.table.get(self.rng.choice(peers))
            if node is not None:
                self._new_stream("push_pull", node.addr, PushPull(False, self._records()))
        # reconnect: try one member we believe dead (or forgot); after a partition heals
        # this is what brings the two sides back together
        dead = [n.addr for n in self.table.gone() if n.state == State.DEAD]
        dead += [t.addr for t in self.table.tombstones.values() if not t.left]
        if dead:
            self.counters["reconnect_attempts"] += 1
            self._new_stream("push_pull", self.rng.choice(dead), PushPull(False, self._records()))

    def _records(self) -> tuple[NodeRecord, ...]:
        recs = [
            NodeRecord(
                n.name,
                n.addr,
                n.incarnation,
                codec.STATE_CODES[n.state.value],
                n.meta_version,
                n.meta_digest,
                n.meta_len,
            )
            for n in self.table
        ]
        dead, left = codec.STATE_CODES["dead"], codec.STATE_CODES["left"]
        recs += [
            NodeRecord(name, t.addr, t.incarnation, left if t.left else dead, 0, 0, 0)
            for name, t in self.table.tombstones.items()
        ]
        return tuple(recs)

    def _gossip(self, now: float) -> None:
        live = self.table.live_peers()
        horizon = now - self.timers.gossip_to_the_dead_time
        dead = [n.name for n in self.table.gone() if n.state_since >= horizon]
        targets = live + dead
        if not targets:
            return
        k = min(self.timers.gossip_nodes, len(targets))
        for name in self.rng.sample(targets, k):
            node = self.table.get(name)
            if node is None or not len(self.broadcasts):
                continue
            # gossip to the (recently) dead lets a wrongly declared node learn it and refute,
            # but must not use up the transmit budget the live members need
            self._send(name, node.addr, [], count=node.state in (State.ALIVE, State.SUSPECT))

    # ------------------------------------------------------------------ internals: probing

    def _tick_probe(self, now: float) -> None:
        p = self._probe
        if p is not None and not p.acked and not p.indirect_sent and now >= p.direct_deadline:
            self._send_indirect(p, now)
        if p is not None and now >= p.end:
            self._probe = None
            if not p.acked:
                self._probe_failed(p, now)
            node = self.table.get(p.target)
            if (
                p.acked
                and node is not None
                and node.state == State.SUSPECT
                and p.target not in self._urgent
            ):
                # it answers but the refutation has not reached us: keep asking (with the
                # suspicion attached) every period; a failed probe instead confirmed it
                self._urgent.append(p.target)
        if self._probe is None and now >= self._next_probe:
            if self._leaving:
                self._next_probe = now + self.timers.probe_interval
                return
            self._start_probe(now)

    def _start_probe(self, now: float) -> None:
        interval = self.awareness.scale(self.timers.probe_interval)
        self._next_probe = now + interval
        target = None
        while self._urgent and target is None:
            cand = self.table.get(self._urgent.pop(0))
            if cand is not None and cand.state == State.SUSPECT:
                target = cand
                self.counters["urgent_probes"] += 1
        if target is None:
            target = self.table.next_probe_target()
        if target is None:
            return
        seq = self._next_seq()
        self._probe = _Probe(
            target=target.name,
            seq=seq,
            incarnation=target.incarnation,
            direct_deadline=now + self.awareness.scale(self.timers.probe_timeout),
            end=now + interval,
        )
        msgs: list[Message] = [Ping(seq, target.name, self.name, self.addr), *self._own_state()]
        if target.state == State.SUSPECT:
            # Lifeguard buddy system: tell the suspect directly so it can refute at once
            msgs.append(Suspect(target.incarnation, target.name, self.name))
        self.counters["pings_sent"] += 1
        # a suspect is likely dead: do not spend piggybacked transmits on it
        self._send(target.name, target.addr, msgs, count=target.state == State.ALIVE)

    def _send_indirect(self, p: _Probe, now: float) -> None:
        p.indirect_sent = True
        target = self.table.get(p.target)
        if target is None:
            return
        helpers = [n for n in self.table.live_peers() if n != p.target]
        k = min(self.timers.indirect_checks, len(helpers))
        for name in self.rng.sample(helpers, k):
            helper = self.table.get(name)
            if helper is None:
                continue
            self.counters["ping_reqs_sent"] += 1
            self._send(
                name,
                helper.addr,
                [PingReq(p.seq, p.target, target.addr, self.name, self.addr, True)],
            )
            p.expected_nacks += 1

    def _probe_failed(self, p: _Probe, now: float) -> None:
        self.counters["probes_failed"] += 1
        if p.expected_nacks > 0:
            self.awareness.apply_delta(max(0, p.expected_nacks - p.nacks))
        else:
            self.awareness.apply_delta(1)
        node = self.table.get(p.target)
        if node is None or node.state not in (State.ALIVE, State.SUSPECT):
            return
        if node.incarnation != p.incarnation:
            return  # it refuted while we were probing
        self._on_suspect(Suspect(node.incarnation, node.name, self.name), now)

    def _tick_relays(self, now: float) -> None:
        if not self._relays:
            return
        for seq, r in list(self._relays.items()):
            if r.nack and now >= r.nack_at:
                r.nack = False
                self.counters["nacks_sent"] += 1
                self._send(r.requester, r.requester_addr, [Nack(r.seq)])
            if now >= r.expire:
                del self._relays[seq]

    def _tick_suspicions(self, now: float) -> None:
        if not self._suspicions:
            return
        for name, s in list(self._suspicions.items()):
            if now < s.deadline:
                continue
            del self._suspicions[name]
            node = self.table.get(name)
            if (
                node is not None
                and node.state == State.SUSPECT
                and node.incarnation == s.incarnation
            ):
                self.counters["declared_dead"] += 1
                self._on_dead(Dead(node.incarnation, name, self.name), now)

    # ------------------------------------------------------------------ internals: messages

    def _known_addr(self, sender: str, addr: Addr) -> NodeState | None:
        """The member ``sender`` if the packet came from its known address, else None
        (counted): what we send is only ever sent to members' own addresses."""
        node = self.table.get(sender)
        if node is None or node is self.local or node.addr != addr:
            self.counters["dropped_unknown_addr"] += 1
            return None
        return node

    def _handle(self, m: Message, sender: str, addr: Addr, now: float) -> None:
        if isinstance(m, Ping):
            if m.target != self.name or m.source != sender:
                self.counters["dropped_misdirected"] += 1
                return
            node = self.table.get(sender)
            if node is None and m.source_addr == addr:
                # first contact (it learned of us before we of it): a bare ack, no gossip
                self.counters["acks_sent"] += 1
                self._send(sender, addr, [Ack(m.seq), *self._own_state()], piggyback=False)
                return
            node = self._known_addr(sender, addr)
            if node is None:
                return
            self.counters["acks_sent"] += 1
            self._send(
                sender,
                node.addr,
                [Ack(m.seq), *self._own_state()],
                count=node.state in (State.ALIVE, State.SUSPECT),
            )
        elif isinstance(m, Ack):
            self._on_ack(m.seq, now)
        elif isinstance(m, Nack):
            p = self._probe
            if p is not None and p.seq == m.seq and p.nacks < p.expected_nacks:
                p.nacks += 1
                self.counters["nacks_recv"] += 1
            else:
                self.counters["dropped_stale"] += 1
        elif isinstance(m, PingReq):
            self._on_ping_req(m, sender, addr, now)
        elif isinstance(m, Alive):
            self._on_alive(m, now)
        elif isinstance(m, Suspect):
            self._on_suspect(m, now)
        else:
            self._on_dead(m, now)

    def _on_ack(self, seq: int, now: float) -> None:
        p = self._probe
        if p is not None and p.seq == seq:
            if not p.acked:
                p.acked = True
                self.counters["acks_recv"] += 1
                if not p.indirect_sent:
                    self.awareness.apply_delta(-1)
            return
        relay = self._relays.pop(seq, None)
        if relay is not None:
            self._send(relay.requester, relay.requester_addr, [Ack(relay.seq)])
            return
        self.counters["dropped_stale"] += 1

    def _on_ping_req(self, m: PingReq, sender: str, addr: Addr, now: float) -> None:
        if len(self._relays) > 1024:  # bounded: a flood cannot grow memory
            self.counters["dropped_busy"] += 1
            return
        requester = self._known_addr(sender, addr)
        if requester is None:
            return
        target = self.table.get(m.target)
        if target is None or target is self.local or target.addr != m.target_addr:
            # we only ever ping members at the address we know them by: no reflection
            self.counters["dropped_unknown_addr"] += 1
            return
        seq = self._next_seq()
        t = self.timers
        self._relays[seq] = _Relay(
            requester=sender,
            requester_addr=requester.addr,
            seq=m.seq,
            nack=m.nack,
            nack_at=now + t.probe_timeout * 0.8,
            expire=now + t.probe_interval * 2,
        )
        self._send(target.name, target.addr, [Ping(seq, m.target, self.name, self.addr)])

    def _on_alive(self, a: Alive, now: float, rebroadcast: bool = True) -> None:
        if a.name == self.name:
            local = self.local
            if self._leaving or a.incarnation < local.incarnation:
                return
            same = (a.addr, a.meta_version, a.meta_digest) == (
                local.addr,
                local.meta_version,
                local.meta_digest,
            )
            if a.incarnation == local.incarnation and same:
                return
            self._refute(a.incarnation, None, now, min_meta_version=saturating_inc(a.meta_version))
            return
        node = self.table.get(a.name)
        if node is None:
            tomb = self.table.tombstones.get(a.name)
            if tomb is not None and a.incarnation <= tomb.incarnation:
                self.counters["dropped_stale"] += 1
                return
            node = NodeState(a.name, a.addr, a.incarnation, now)
            self._set_announced(node, a)
            self.table.add(node)
            self._touch(node, "joined")
            if rebroadcast:
                self._broadcast_alive(node)
            self._want_meta(node, now)
            return
        if a.incarnation <= node.incarnation:
            if a.incarnation < node.incarnation:
                self.counters["dropped_stale"] += 1
            return
        prev = node.state
        node.incarnation = a.incarnation
        node.addr = a.addr
        self._set_announced(node, a)
        if prev != State.ALIVE:
            node.state = State.ALIVE
            node.state_since = now
        self._suspicions.pop(a.name, None)
        self.table.changed()
        kind: EventKind = (
            "alive"
            if prev == State.SUSPECT
            else "joined"
            if prev in (State.DEAD, State.LEFT)
            else "updated"
        )
        self._touch(node, kind)
        if rebroadcast:
            self._broadcast_alive(node)
        self._want_meta(node, now)

    def _on_suspect(self, s: Suspect, now: float) -> None:
        if s.name == self.name:
            if self._leaving:
                return
            if s.incarnation < self.local.incarnation:
                # already refuted; the sender may have missed it, answer it directly
                self._tell_alive(s.sender)
                return
            self._refute(s.incarnation, s.sender, now)
            return
        node = self.table.get(s.name)
        if node is None or s.incarnation < node.incarnation:
            self.counters["dropped_stale"] += 1
            return
        if node.state in (State.DEAD, State.LEFT):
            return
        if node.state == State.SUSPECT and s.incarnation == node.incarnation:
            susp = self._suspicions.get(s.name)
            if susp is not None and susp.confirm(s.sender):
                self.counters["suspect_confirmations"] += 1
                # pass the confirmation on with the copies of the suspicion still pending;
                # our own observation gets one gossip round's worth of copies more, not a
                # full wave (a wave per confirming node would cost O(n) waves at scale)
                payload = codec.encode_message(s)
                if not self.broadcasts.refresh(s.name, payload) and s.sender == self.name:
                    limit = self._limit()
                    self.broadcasts.queue(s.name, payload, max(0, limit - self.timers.gossip_nodes))
            return
        node.incarnation = s.incarnation
        node.state = State.SUSPECT
        node.state_since = now
        self.table.changed()
        n = self.table.active_count()
        k = min(self.timers.indirect_checks, n - 2)
        lo = min_timeout(self.timers.suspicion_mult, n, self.timers.probe_interval)
        self._suspicions[s.name] = Suspicion(
            incarnation=s.incarnation,
            sender=s.sender,
            k=k,
            min_t=lo,
            max_t=lo * self.timers.suspicion_max_timeout_mult,
            start=now,
        )
        self.counters["suspected"] += 1
        self._touch(node, "suspect")
        self.broadcasts.queue(s.name, codec.encode_message(s))
        # probe the suspect next (with the suspicion attached, Lifeguard's buddy system):
        # a live one refutes to us directly, a dead one is confirmed sooner
        if s.name not in self._urgent:
            self._urgent.append(s.name)
        if s.sender == self.name:
            # tell the suspect at once: it refutes in one round trip
            self._send(node.name, node.addr, [s])

    def _on_dead(self, d: Dead, now: float) -> None:
        left = d.sender == d.name
        if d.name == self.name:
            if self._leaving or d.incarnation < self.local.incarnation:
                return
            self._refute(d.incarnation, d.sender, now)
            return
        node = self.table.get(d.name)
        if node is None or d.incarnation < node.incarnation:
            self.counters["dropped_stale"] += 1
            return
        if node.state in (State.DEAD, State.LEFT):
            return
        node.incarnation = d.incarnation
        node.state = State.LEFT if left else State.DEAD
        node.state_since = now
        self._suspicions.pop(d.name, None)
        self._replay.forget(d.name)  # its next boot is accepted whatever its clock says
        self.table.changed()
        self._touch(node, "left" if left else "dead")
        self.broadcasts.queue(d.name, codec.encode_message(d))
        self._schedule_reap(now)

    def _refute(
        self, incarnation: int, sender: str | None, now: float, min_meta_version: int = 0
    ) -> None:
        """Somebody claims we are suspect/dead (or stale): out-bid them with a higher incarnation."""
        local = self.local
        local.incarnation = saturating_inc(max(local.incarnation, incarnation))
        # keep our view version monotonic across restarts
        local.meta_version = local.have_version = max(local.meta_version, min_meta_version)
        self.counters["refutes"] += 1
        self.awareness.apply_delta(1)
        self._broadcast_alive(local)
        if sender is not None:
            self._tell_alive(sender)
        self._touch(local, "updated")

    def _tell_alive(self, name: str) -> None:
        """Send our current alive straight to ``name`` (a suspecter that must hear the refutation)."""
        node = self.table.get(name)
        if node is not None and node is not self.local:
            self.counters["direct_refutes"] += 1
            self._send(name, node.addr, [self._alive_msg(self.local)], piggyback=False)

    def _own_state(self) -> list[Message]:
        """Our own alive, carried by every ping and ack at no transmit cost: a node that
        missed our latest gossip (a view change) catches up at its next exchange with us."""
        return [] if self._leaving else [self._alive_msg(self.local)]

    def _alive_msg(self, node: NodeState) -> Alive:
        return Alive(
            node.incarnation,
            node.name,
            node.addr,
            node.meta_version,
            node.meta_digest,
            node.meta_len,
        )

    def _broadcast_alive(self, node: NodeState) -> None:
        self.broadcasts.queue(node.name, codec.encode_message(self._alive_msg(node)))

    @staticmethod
    def _set_announced(node: NodeState, a: Alive) -> None:
        node.meta_version = a.meta_version
        node.meta_digest = a.meta_digest
        node.meta_len = a.meta_len

    def _merge(self, records: Sequence[NodeRecord], now: float) -> None:
        """Push-pull state merge; a remote 'dead' only makes us suspect (memberlist rule)."""
        for r in records:
            state = codec.STATE_NAMES[r.state]
            if state == "alive":
                self._on_alive(
                    Alive(r.incarnation, r.name, r.addr, r.meta_version, r.meta_digest, r.meta_len),
                    now,
                )
            elif state == "left":
                self._on_dead(Dead(r.incarnation, r.name, r.name), now)
            else:
                self._on_suspect(Suspect(r.incarnation, r.name, self.name), now)

    # ------------------------------------------------------------------ internals: meta

    def _want_meta(self, node: NodeState, now: float) -> None:
        if node.meta_current:
            return
        f = self._meta_fetch.get(node.name)
        if f is not None and (f.version, f.digest) == (node.meta_version, node.meta_digest):
            return
        if node.meta_len == 0 and node.meta_digest == meta_digest(b""):
            # nothing to fetch: the empty view
            node.meta = b""
            node.have_version, node.have_digest = node.meta_version, node.meta_digest
            self._touch(node, "meta-changed")
            self._meta_fetch.pop(node.name, None)
            return
        f = _MetaFetch(node.name, node.meta_version, node.meta_digest)
        self._meta_fetch[node.name] = f
        self._fetch_meta(f, node.addr)

    def _fetch_meta(self, f: _MetaFetch, addr: Addr) -> None:
        f.retry_at = None
        f.inflight = self._new_stream(
            "meta", addr, MetaRequest(f.name, f.version, f.digest), f.name
        )
        self.counters["meta_fetches"] += 1

    def _meta_done(self, name: str, req_id: int, msg: MetaResponse | None, now: float) -> None:
        f = self._meta_fetch.get(name)
        if f is None or f.inflight != req_id:
            return
        f.inflight = None
        node = self.table.get(name)
        if node is None or node.state in (State.DEAD, State.LEFT):
            self._meta_fetch.pop(name, None)
            return
        if (
            msg is not None
            and msg.found
            and msg.name == name
            and (msg.version, msg.digest) == (node.meta_version, node.meta_digest)
            and meta_digest(msg.meta) == msg.digest
        ):
            node.meta = msg.meta
            node.have_version, node.have_digest = msg.version, msg.digest
            del self._meta_fetch[name]
            self.counters["meta_fetched"] += 1
            self._touch(node, "meta-changed")
            return
        self.counters["meta_fetch_failed"] += 1
        if (f.version, f.digest) != (node.meta_version, node.meta_digest):
            f.version, f.digest, f.attempts = node.meta_version, node.meta_digest, 0
        f.attempts += 1
        backoff = min(META_BACKOFF_MAX, META_BACKOFF_MIN * 2 ** (f.attempts - 1))
        f.retry_at = now + backoff * self.rng.uniform(0.5, 1.0)

    def _tick_meta(self, now: float) -> None:
        for f in list(self._meta_fetch.values()):
            if f.retry_at is None or now < f.retry_at:
                continue
            node = self.table.get(f.name)
            if node is None or node.state in (State.DEAD, State.LEFT) or node.meta_current:
                del self._meta_fetch[f.name]
                continue
            # alternate between the owner and any other live member that may hold the version
            addr = node.addr
            others = [n for n in self.table.live_peers() if n != f.name]
            if f.attempts % 2 == 1 and others:
                other = self.table.get(self.rng.choice(others))
                if other is not None:
                    addr = other.addr
            self._fetch_meta(f, addr)

    # ------------------------------------------------------------------ internals: bookkeeping

    def _touch(self, node: NodeState, kind: EventKind) -> None:
        m = node.snapshot()
        self._public[node.name] = m
        self._events.append(MemberEvent(kind, m))

    def _reclaim_after(self) -> float:
        return max(self.timers.dead_node_reclaim_time, self.timers.gossip_to_the_dead_time)

    def _schedule_reap(self, now: float) -> None:
        self._next_reap = min(self._next_reap, now + self._reclaim_after())

    def _reap(self, now: float) -> None:
        nxt = math.inf
        for node in list(self.table.gone()):
            if node is self.local or node.state not in (State.DEAD, State.LEFT):
                continue
            if node.state_since + self._reclaim_after() <= now:
                self.table.forget(node.name)
                m = self._public.pop(node.name)
                self._events.append(MemberEvent("forgotten", m))
                self._meta_fetch.pop(node.name, None)
            else:
                nxt = min(nxt, node.state_since + self._reclaim_after())
        self._next_reap = nxt
