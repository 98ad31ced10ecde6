"""Admission and dispatch of what arrives: datagrams and TCP requests.

:func:`admit` is the gate every datagram passes (authentic, decodable, for us,
from the sender's own address, fresh in its replay window); each drop is
counted by reason, nothing raises. :func:`dispatch` and :func:`answer` route
each message type to the module that owns it with an exhaustive ``match``: a
message type added to the codec and not handled here fails ``mypy``.
"""

from __future__ import annotations

from typing import Protocol, assert_never

from duravip.swim import codec
from duravip.swim.codec import (
    Ack,
    Alive,
    CodecError,
    Dead,
    Message,
    MetaRequest,
    MetaResponse,
    Nack,
    Packet,
    Ping,
    PingReq,
    PushPull,
    Suspect,
)
from duravip.swim.context import TCP, UDP, Context
from duravip.swim.crypto import CryptoError
from duravip.swim.members import Addr
from duravip.swim.replay import ReplayGuard


class ProbeHandler(Protocol):
    """The failure detector's side of the datagram protocol (:class:`.probe.Prober`)."""

    def on_ping(self, m: Ping, sender: str, addr: Addr) -> None: ...
    def on_ack(self, seq: int, now: float) -> None: ...
    def on_nack(self, seq: int, now: float) -> None: ...
    def on_ping_req(self, m: PingReq, sender: str, addr: Addr, now: float) -> None: ...


class StateHandler(Protocol):
    """Membership claims (:class:`.transitions.Transitions`)."""

    def on_alive(self, a: Alive, now: float, rebroadcast: bool = True) -> None: ...
    def on_suspect(self, s: Suspect, now: float) -> None: ...
    def on_dead(self, d: Dead, now: float) -> None: ...


class PushPullServer(Protocol):
    def serve(self, msg: PushPull, now: float) -> PushPull: ...


class MetaServer(Protocol):
    def serve(self, msg: MetaRequest) -> MetaResponse: ...


def admit(ctx: Context, replay: ReplayGuard, data: bytes, addr: Addr) -> Packet | None:
    """The packet in datagram ``data`` from ``addr`` if we should act on it, else None."""
    counters = ctx.counters
    try:
        opened = ctx.keyring.open(data, ctx.cluster, UDP)
    except CryptoError as exc:
        counters[f"dropped_{exc.reason}"] += 1
        return None
    try:
        pkt = codec.decode_packet(opened.plaintext)
    except CodecError as exc:
        counters[f"dropped_{exc.reason}"] += 1
        return None
    if pkt.dest != ctx.name or pkt.sender == ctx.name:
        counters["dropped_misdirected"] += 1
        return None
    known = ctx.table.get(pkt.sender)
    if known is not None and known.addr != addr:
        # not from the sender's own address: a copy an attacker re-sent. Checked before
        # the replay window, so such a copy cannot make us reject the genuine one
        counters["dropped_unknown_addr"] += 1
        return None
    if not replay.accept(pkt.sender, opened.epoch, opened.salt, opened.counter):
        counters["dropped_replay"] += 1
        return None
    return pkt


def dispatch(
    m: Message,
    sender: str,
    addr: Addr,
    now: float,
    probes: ProbeHandler,
    states: StateHandler,
) -> None:
    """Hand one message of an admitted packet to the module that owns its type."""
    match m:
        case Ping():
            probes.on_ping(m, sender, addr)
        case Ack():
            probes.on_ack(m.seq, now)
        case Nack():
            probes.on_nack(m.seq, now)
        case PingReq():
            probes.on_ping_req(m, sender, addr, now)
        case Alive():
            states.on_alive(m, now)
        case Suspect():
            states.on_suspect(m, now)
        case Dead():
            states.on_dead(m, now)
        case _:
            assert_never(m)


def open_stream(ctx: Context, frame: bytes) -> codec.StreamMessage | None:
    """The message in TCP frame ``frame``, or None (counted) if not authentic or malformed."""
    try:
        return codec.decode_stream(ctx.keyring.open(frame, ctx.cluster, TCP).plaintext)
    except CryptoError as exc:
        ctx.counters[f"dropped_stream_{exc.reason}"] += 1
    except CodecError as exc:
        ctx.counters[f"dropped_stream_{exc.reason}"] += 1
    return None


def answer(
    ctx: Context, msg: codec.StreamMessage, now: float, sync: PushPullServer, meta: MetaServer
) -> codec.StreamMessage | None:
    """Our reply to a TCP request, or None (counted) for a message that is no request."""
    match msg:
        case PushPull():
            return sync.serve(msg, now)
        case MetaRequest():
            return meta.serve(msg)
        case MetaResponse():
            ctx.counters["dropped_stream_parse"] += 1
            return None
        case _:
            assert_never(msg)
