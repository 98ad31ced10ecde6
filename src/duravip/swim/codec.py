"""Compact, versioned binary wire format for SWIM datagrams and TCP streams.

A datagram is ``version, sender, destination, count`` followed by ``count``
parts of ``type, length, body``: one packet can carry a ping plus many
piggybacked updates. The sender and destination names sit inside the sealed
envelope, so a captured packet is only ever accepted by the node it was meant
for, and only as coming from its real sender. Decoding any byte string returns
messages or raises :class:`CodecError`, never anything else; incarnations and
view versions above :data:`MAX_INCARNATION` are refused (``reason="range"``),
so that ``+ 1`` on any accepted value still fits the wire.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence

from attrs import frozen

WIRE_VERSION = 2
#: Largest incarnation / view version accepted from the wire (and ever produced): one
#: below 2^63, so the core's ``+ 1`` (saturated at this value) always stays encodable.
MAX_INCARNATION = (1 << 63) - 1
MAX_META_VERSION = MAX_INCARNATION

Addr = tuple[str, int]


class CodecError(Exception):
    """Input that is not a well-formed message of this wire version.

    ``reason`` is ``parse`` (malformed) or ``range`` (a number out of the accepted range).
    """

    def __init__(self, msg: str, reason: str = "parse") -> None:
        super().__init__(msg)
        self.reason = reason


def _check_inc(*values: int) -> None:
    for v in values:
        if v > MAX_INCARNATION:
            raise CodecError("incarnation or view version out of range", "range")


def saturating_inc(v: int) -> int:
    """``v + 1``, but never beyond :data:`MAX_INCARNATION` (what the core uses on wire values)."""
    return min(v + 1, MAX_INCARNATION)


# --- datagram messages -------------------------------------------------------


@frozen
class Ping:
    seq: int
    target: str  # the node name the sender means; a reused address is not mistaken
    source: str
    source_addr: Addr


@frozen
class PingReq:
    seq: int
    target: str
    target_addr: Addr
    source: str
    source_addr: Addr
    nack: bool


@frozen
class Ack:
    seq: int


@frozen
class Nack:
    seq: int


@frozen
class Alive:
    incarnation: int
    name: str
    addr: Addr
    meta_version: int
    meta_digest: int  # xxh64 of the full meta
    meta_len: int


@frozen
class Suspect:
    incarnation: int
    name: str
    sender: str


@frozen
class Dead:
    """``sender == name`` means the node left gracefully."""

    incarnation: int
    name: str
    sender: str


Message = Ping | PingReq | Ack | Nack | Alive | Suspect | Dead


@frozen
class Packet:
    """One datagram: who sealed it, for whom, and its messages."""

    sender: str
    dest: str
    messages: list[Message]


# --- stream messages --------------------------------------------------------


@frozen
class NodeRecord:
    """One member in a push-pull exchange (state as a wire code, see ``STATE_CODES``)."""

    name: str
    addr: Addr
    incarnation: int
    state: int
    meta_version: int
    meta_digest: int
    meta_len: int


@frozen
class PushPull:
    join: bool
    records: tuple[NodeRecord, ...]


@frozen
class MetaRequest:
    name: str
    version: int
    digest: int


@frozen
class MetaResponse:
    name: str
    found: bool
    version: int
    digest: int
    meta: bytes


StreamMessage = PushPull | MetaRequest | MetaResponse

#: state codes on the wire
STATE_CODES = {"alive": 0, "suspect": 1, "dead": 2, "left": 3}
STATE_NAMES = {v: k for k, v in STATE_CODES.items()}

T_PING, T_PINGREQ, T_ACK, T_NACK, T_ALIVE, T_SUSPECT, T_DEAD = range(1, 8)
T_PUSHPULL, T_METAREQ, T_METARESP = range(32, 35)

_B = struct.Struct("!B")
_H = struct.Struct("!H")
_I = struct.Struct("!I")
_Q = struct.Struct("!Q")
_PART = struct.Struct("!BH")
_HDR = struct.Struct("!BB")
_VER = _B
_ALIVE = struct.Struct("!QQQI")
_PPREC = struct.Struct("!QBQQI")
_MAX_U8 = 255


class _W:
    """Little append-only writer."""

    __slots__ = ("b",)

    def __init__(self) -> None:
        self.b = bytearray()

    def str(self, s: str) -> None:
        raw = s.encode()
        if len(raw) > _MAX_U8:
            raise ValueError(f"string too long for the wire: {s[:20]!r}...")
        self.b += _B.pack(len(raw)) + raw

    def addr(self, a: Addr) -> None:
        self.str(a[0])
        self.b += _H.pack(a[1])


class _R:
    """Bounds-checked reader; every failure surfaces as CodecError via decode_*."""

    __slots__ = ("data", "pos")

    def __init__(self, data: bytes, pos: int = 0) -> None:
        self.data = data
        self.pos = pos

    def take(self, n: int) -> bytes:
        end = self.pos + n
        if end > len(self.data):
            raise CodecError("truncated")
        out = self.data[self.pos : end]
        self.pos = end
        return out

    def unpack(self, st: struct.Struct) -> tuple[int, ...]:
        out: tuple[int, ...] = st.unpack(self.take(st.size))
        return out

    def u8(self) -> int:
        return self.unpack(_B)[0]

    def u32(self) -> int:
        return self.unpack(_I)[0]

    def u64(self) -> int:
        return self.unpack(_Q)[0]

    def str(self) -> str:
        return self.take(self.u8()).decode()

    def addr(self) -> Addr:
        host = self.str()
        return (host, self.unpack(_H)[0])

    def end(self) -> None:
        if self.pos != len(self.data):
            raise CodecError("trailing bytes")


def encode_message(m: Message) -> bytes:
    """One part (``type, length, body``), ready to be packed into a datagram."""
    w = _W()
    if isinstance(m, Ping):
        t = T_PING
        w.b += _I.pack(m.seq)
        w.str(m.target)
        w.str(m.source)
        w.addr(m.source_addr)
    elif isinstance(m, PingReq):
        t = T_PINGREQ
        w.b += _I.pack(m.seq)
        w.str(m.target)
        w.addr(m.target_addr)
        w.str(m.source)
        w.addr(m.source_addr)
        w.b += _B.pack(1 if m.nack else 0)
    elif isinstance(m, Ack):
        t = T_ACK
        w.b += _I.pack(m.seq)
    elif isinstance(m, Nack):
        t = T_NACK
        w.b += _I.pack(m.seq)
    elif isinstance(m, Alive):
        t = T_ALIVE
        w.b += _ALIVE.pack(m.incarnation, m.meta_version, m.meta_digest, m.meta_len)
        w.str(m.name)
        w.addr(m.addr)
    elif isinstance(m, Suspect | Dead):
        t = T_SUSPECT if isinstance(m, Suspect) else T_DEAD
        w.b += _Q.pack(m.incarnation)
        w.str(m.name)
        w.str(m.sender)
    else:  # pragma: no cover - exhaustive
        raise TypeError(type(m))
    return _PART.pack(t, len(w.b)) + bytes(w.b)


def packet_header(sender: str, dest: str, count: int) -> bytes:
    if count > _MAX_U8:
        raise ValueError("too many parts in one packet")
    w = _W()
    w.b += _VER.pack(WIRE_VERSION)
    w.str(sender)
    w.str(dest)
    w.b += _B.pack(count)
    return bytes(w.b)


def encode_packet(parts: Sequence[bytes], sender: str, dest: str) -> bytes:
    """A datagram of already encoded parts (see :func:`encode_message`)."""
    return packet_header(sender, dest, len(parts)) + b"".join(parts)


def _decode_part(t: int, r: _R) -> Message:
    if t == T_PING:
        seq = r.u32()
        return Ping(seq, r.str(), r.str(), r.addr())
    if t == T_PINGREQ:
        seq = r.u32()
        target = r.str()
        taddr = r.addr()
        source = r.str()
        saddr = r.addr()
        flag = r.u8()
        if flag > 1:
            raise CodecError("bad flag")
        return PingReq(seq, target, taddr, source, saddr, flag == 1)
    if t == T_ACK:
        return Ack(r.u32())
    if t == T_NACK:
        return Nack(r.u32())
    if t == T_ALIVE:
        inc, mver, mdig, mlen = r.unpack(_ALIVE)
        _check_inc(inc, mver)
        return Alive(inc, r.str(), r.addr(), mver, mdig, mlen)
    if t in (T_SUSPECT, T_DEAD):
        inc = r.u64()
        _check_inc(inc)
        name = r.str()
        sender = r.str()
        return Suspect(inc, name, sender) if t == T_SUSPECT else Dead(inc, name, sender)
    raise CodecError(f"unknown message type {t}")


def decode_packet(data: bytes) -> Packet:
    """Every message of a datagram, or :class:`CodecError`."""
    try:
        r = _R(data)
        version = r.u8()
        if version != WIRE_VERSION:
            raise CodecError(f"wire version {version}")
        sender = r.str()
        dest = r.str()
        count = r.u8()
        if count == 0:
            raise CodecError("empty packet")
        out: list[Message] = []
        for _ in range(count):
            t, length = r.unpack(_PART)
            part = _R(r.take(length))
            out.append(_decode_part(t, part))
            part.end()
        r.end()
        return Packet(sender, dest, out)
    except (struct.error, UnicodeDecodeError, ValueError, IndexError) as exc:
        raise CodecError(str(exc)) from None


def encode_stream(m: StreamMessage) -> bytes:
    w = _W()
    if isinstance(m, PushPull):
        t = T_PUSHPULL
        w.b += _B.pack(1 if m.join else 0) + _I.pack(len(m.records))
        for rec in m.records:
            w.b += _PPREC.pack(
                rec.incarnation, rec.state, rec.meta_version, rec.meta_digest, rec.meta_len
            )
            w.str(rec.name)
            w.addr(rec.addr)
    elif isinstance(m, MetaRequest):
        t = T_METAREQ
        w.b += _Q.pack(m.version) + _Q.pack(m.digest)
        w.str(m.name)
    elif isinstance(m, MetaResponse):
        t = T_METARESP
        w.b += _B.pack(1 if m.found else 0) + _Q.pack(m.version) + _Q.pack(m.digest)
        w.str(m.name)
        w.b += _I.pack(len(m.meta)) + m.meta
    else:  # pragma: no cover - exhaustive
        raise TypeError(type(m))
    return _HDR.pack(WIRE_VERSION, t) + bytes(w.b)


def decode_stream(data: bytes) -> StreamMessage:
    try:
        r = _R(data)
        version, t = r.unpack(_HDR)
        if version != WIRE_VERSION:
            raise CodecError(f"wire version {version}")
        msg: StreamMessage
        if t == T_PUSHPULL:
            flag = r.u8()
            n = r.u32()
            if flag > 1 or n > len(data):
                raise CodecError("bad push-pull header")
            recs = []
            for _ in range(n):
                inc, state, mver, mdig, mlen = r.unpack(_PPREC)
                _check_inc(inc, mver)
                if state not in STATE_NAMES:
                    raise CodecError("bad state")
                recs.append(NodeRecord(r.str(), r.addr(), inc, state, mver, mdig, mlen))
            msg = PushPull(flag == 1, tuple(recs))
        elif t == T_METAREQ:
            ver = r.u64()
            _check_inc(ver)
            dig = r.u64()
            msg = MetaRequest(r.str(), ver, dig)
        elif t == T_METARESP:
            flag = r.u8()
            if flag > 1:
                raise CodecError("bad flag")
            ver = r.u64()
            _check_inc(ver)
            dig = r.u64()
            name = r.str()
            meta = r.take(r.u32())
            msg = MetaResponse(name, flag == 1, ver, dig, meta)
        else:
            raise CodecError(f"unknown stream type {t}")
        r.end()
        return msg
    except (struct.error, UnicodeDecodeError, ValueError, IndexError) as exc:
        raise CodecError(str(exc)) from None
