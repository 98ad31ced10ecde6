"""What every concern of the SWIM core shares: who we are, what we know, what goes out.

The concern modules (:mod:`.dispatch`, :mod:`.transitions`, :mod:`.probe`,
:mod:`.metasync`, :mod:`.pushpull`) each hold their own state and work on one
:class:`Context`: this node's identity and keys, the member table, the gossip
queue, the counters, and the three output queues the facade hands out
(datagrams, TCP exchanges, membership events). Sending, sealing and event
bookkeeping live here so every module does them the same way.
"""

from __future__ import annotations

import random
import struct
from collections import Counter
from collections.abc import Sequence
from typing import Literal

import xxhash
from attrs import frozen

from duravip.swim import codec
from duravip.swim.awareness import Awareness
from duravip.swim.broadcast import BroadcastQueue, retransmit_limit
from duravip.swim.codec import Alive, Message
from duravip.swim.crypto import OVERHEAD, Boot, CryptoError, Keyring
from duravip.swim.members import Addr, EventKind, Member, MemberEvent, MemberTable, NodeState, State
from duravip.swim.settings import Timers

UDP = b"udp"
TCP = b"tcp"
#: channel of the small sealed frame that announces a TCP frame's length
TCP_HEADER = b"tcp-len"
_STREAM_LEN = struct.Struct("!I")
_SEQ_MASK = 0xFFFFFFFF
_U64 = (1 << 64) - 1

StreamKind = Literal["join", "push_pull", "meta"]


def meta_digest(meta: bytes) -> int:
    return xxhash.xxh64_intdigest(meta)


@frozen
class StreamRequest:
    """A TCP exchange the driver must perform: send ``data``, return the reply."""

    id: int
    kind: StreamKind
    addr: Addr
    data: bytes
    timeout: float


class Context:
    """Identity, member table, gossip queue and outputs of one node's core."""

    def __init__(
        self,
        *,
        name: str,
        addr: Addr,
        cluster: str,
        timers: Timers,
        keyring: Keyring,
        meta: bytes,
        rng: random.Random,
        now: float,
        epoch: int,
    ) -> None:
        self.name = name
        self.addr = addr
        self.cluster = cluster
        self.timers = timers
        self.keyring = keyring
        self.rng = rng
        self.counters: Counter[str] = Counter()
        self.boot = Boot(epoch & _U64, rng.randbytes(8))
        self.table = MemberTable(name, rng)
        self.broadcasts = BroadcastQueue()
        self.awareness = Awareness(timers.awareness_max_multiplier)
        #: set once by a graceful leave, never cleared
        self.leaving = False
        self.out: list[tuple[bytes, Addr]] = []
        self.streams: list[StreamRequest] = []
        self.events: list[MemberEvent] = []
        self.public: dict[str, Member] = {}
        #: stream request id -> (kind, member name for a meta fetch)
        self.pending: dict[int, tuple[StreamKind, str]] = {}
        #: member -> stage ("ack", "suspect", "dead") -> core time it last happened: the
        #: detection part of a takeover's latency budget (one small dict per member)
        self.marks: dict[str, dict[str, float]] = {}
        self._seq = rng.randrange(1 << 32)
        self._stream_id = 0

        local = NodeState(name, addr, 0, now)
        local.meta = meta
        local.meta_version = local.have_version = 0
        local.meta_digest = local.have_digest = meta_digest(meta)
        local.meta_len = len(meta)
        self.local = local
        self.table.add(local)
        self.touch(local, "joined")

    # ------------------------------------------------------------------ bookkeeping

    def touch(self, node: NodeState, kind: EventKind) -> None:
        """Publish ``node``'s current state and emit a ``kind`` event for it."""
        m = node.snapshot()
        self.public[node.name] = m
        self.events.append(MemberEvent(kind, m))

    def mark(self, name: str, stage: str, now: float) -> None:
        """Remember when ``stage`` last happened to member ``name`` (the latency budget)."""
        self.marks.setdefault(name, {})[stage] = now

    def next_seq(self) -> int:
        self._seq = (self._seq + 1) & _SEQ_MASK
        return self._seq

    def limit(self) -> int:
        """How many times each gossip update is retransmitted at the current size."""
        return retransmit_limit(self.timers.retransmit_mult, self.table.active_count())

    def known_addr(self, sender: str, addr: Addr) -> NodeState | None:
        """The member ``sender`` if the packet came from its known address, else None
        (counted): what we send is only ever sent to members' own addresses."""
        node = self.table.get(sender)
        if node is None or node is self.local or node.addr != addr:
            self.counters["dropped_unknown_addr"] += 1
            return None
        return node

    # ------------------------------------------------------------------ our own alive

    def alive_msg(self, node: NodeState) -> Alive:
        return Alive(
            node.incarnation,
            node.name,
            node.addr,
            node.meta_version,
            node.meta_digest,
            node.meta_len,
        )

    def own_state(self) -> list[Message]:
        """Our own alive, carried by every ping and ack at no transmit cost: a node that
        missed our latest gossip (a view change) catches up at its next exchange with us."""
        return [] if self.leaving else [self.alive_msg(self.local)]

    def broadcast_alive(self, node: NodeState) -> None:
        self.broadcasts.queue(node.name, codec.encode_message(self.alive_msg(node)))

    # ------------------------------------------------------------------ sending

    def send(
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
                parts += self.broadcasts.get(budget, self.limit(), 250 - len(parts))
            else:
                parts += self.broadcasts.peek(budget, 250 - len(parts))
        if not parts:
            return
        data = self.seal_packet(parts, dest)
        self.counters["msgs_sent"] += 1
        self.counters["bytes_sent"] += len(data)
        self.out.append((data, addr))

    def gossip(self, now: float) -> None:
        """One gossip round: pending updates to ``gossip_nodes`` random members."""
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
            self.send(name, node.addr, [], count=node.state in (State.ALIVE, State.SUSPECT))

    def new_stream(
        self, kind: StreamKind, addr: Addr, msg: codec.StreamMessage, key: str = ""
    ) -> int:
        """Queue a TCP exchange carrying ``msg``; its id comes back with the reply."""
        self._stream_id += 1
        data = self.seal_stream(codec.encode_stream(msg))
        timeout = max(1.0, 10 * self.timers.probe_timeout)
        self.streams.append(StreamRequest(self._stream_id, kind, addr, data, timeout))
        self.pending[self._stream_id] = (kind, key)
        self.counters[f"stream_{kind}"] += 1
        return self._stream_id

    # ------------------------------------------------------------------ sealing

    def seal_stream(self, plaintext: bytes) -> bytes:
        return self.keyring.seal(plaintext, self.cluster, TCP, self.boot)

    def seal_packet(self, parts: Sequence[bytes], dest: str) -> bytes:
        plain = codec.encode_packet(parts, self.name, dest)
        return self.keyring.seal(plain, self.cluster, UDP, self.boot)

    def seal_raw_datagram(self, plaintext: bytes) -> bytes:
        return self.keyring.seal(plaintext, self.cluster, UDP, self.boot)

    def stream_header(self, length: int) -> bytes:
        return self.keyring.seal(_STREAM_LEN.pack(length), self.cluster, TCP_HEADER, self.boot)

    def open_stream_header(self, frame: bytes) -> int | None:
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
