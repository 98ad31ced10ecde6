"""swim.dispatch on its own: the admission gate, routing by type, stream answers."""

from __future__ import annotations

import typing
from typing import Any

import pytest

from duravip.swim import codec
from duravip.swim.context import Context
from duravip.swim.crypto import Boot, Keyring
from duravip.swim.dispatch import admit, answer, dispatch, open_stream
from duravip.swim.members import Addr
from duravip.swim.replay import ReplayGuard

from .contexts import KEY, addr, new_context

Y_ADDR: Addr = addr(1)


def make_ctx() -> Context:
    return new_context("y")  # y at addr(1) == Y_ADDR


def frame(*msgs: codec.Message, sender: str = "y", dest: str = "x", boot: Boot) -> bytes:
    plain = codec.encode_packet([codec.encode_message(m) for m in msgs], sender, dest)
    return KEY.seal(plain, "c", b"udp", boot)


class Recorder:
    """Stands in for both the prober and the transitions: records every call."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, tuple[Any, ...]]] = []

    def __getattr__(self, name: str) -> Any:
        def record(*args: Any, **kwargs: Any) -> None:
            self.calls.append((name, args))

        return record


PING = codec.Ping(5, "x", "y", Y_ADDR)
PING_REQ = codec.PingReq(6, "z", ("10.0.0.3", 4801), "y", Y_ADDR, True)
ALIVE = codec.Alive(1, "z", ("10.0.0.3", 4801), 0, 0, 0)
SUSPECT = codec.Suspect(1, "z", "y")
DEAD = codec.Dead(1, "z", "y")
ROUTES: list[tuple[codec.Message, str, str, tuple[Any, ...]]] = [
    (PING, "probes", "on_ping", (PING, "y", Y_ADDR)),
    (codec.Ack(7), "probes", "on_ack", (7, 3.0)),
    (codec.Nack(8), "probes", "on_nack", (8, 3.0)),
    (PING_REQ, "probes", "on_ping_req", (PING_REQ, "y", Y_ADDR, 3.0)),
    (ALIVE, "states", "on_alive", (ALIVE, 3.0)),
    (SUSPECT, "states", "on_suspect", (SUSPECT, 3.0)),
    (DEAD, "states", "on_dead", (DEAD, 3.0)),
]


@pytest.mark.parametrize(("msg", "owner", "method", "args"), ROUTES)
def test_each_message_type_goes_to_its_owner_only(
    msg: codec.Message, owner: str, method: str, args: tuple[Any, ...]
) -> None:
    probes, states = Recorder(), Recorder()
    dispatch(msg, "y", Y_ADDR, 3.0, probes, states)
    hit, other = (probes, states) if owner == "probes" else (states, probes)
    assert hit.calls == [(method, args)]
    assert other.calls == []


def test_every_codec_message_type_has_a_route() -> None:
    """A message type added to the codec must be routed (mypy: assert_never) and tested here."""
    assert {type(m) for m, *_ in ROUTES} == set(typing.get_args(codec.Message))


def test_admit_accepts_an_authentic_fresh_packet_once() -> None:
    ctx, replay, boot = make_ctx(), ReplayGuard(), Boot.fresh(5)
    data = frame(codec.Ack(1), boot=boot)
    pkt = admit(ctx, replay, data, Y_ADDR)
    assert pkt is not None and pkt.sender == "y" and pkt.messages == [codec.Ack(1)]
    assert admit(ctx, replay, data, Y_ADDR) is None
    assert ctx.counters["dropped_replay"] == 1


def test_admit_drops_by_reason() -> None:
    ctx, replay, boot = make_ctx(), ReplayGuard(), Boot.fresh(5)
    other_key = Keyring([b"f" * 32])
    plain = codec.encode_packet([codec.encode_message(codec.Ack(1))], "y", "x")
    assert admit(ctx, replay, other_key.seal(plain, "c", b"udp", boot), Y_ADDR) is None
    assert admit(ctx, replay, b"\x00" * 40, Y_ADDR) is None
    assert admit(ctx, replay, KEY.seal(b"\xff\xff", "c", b"udp", boot), Y_ADDR) is None
    assert admit(ctx, replay, frame(codec.Ack(1), dest="w", boot=boot), Y_ADDR) is None
    assert admit(ctx, replay, frame(codec.Ack(1), sender="x", boot=boot), Y_ADDR) is None
    drops = {k: v for k, v in ctx.counters.items() if k.startswith("dropped_")}
    assert drops.pop("dropped_misdirected") == 2
    assert sum(drops.values()) == 3  # bad key, garbage, authentic garbage: each one reason
    assert len(replay) == 0  # nothing that failed the gate touched a replay window


def test_copy_from_a_forged_address_cannot_burn_the_genuine_packet() -> None:
    ctx, replay, boot = make_ctx(), ReplayGuard(), Boot.fresh(5)
    data = frame(codec.Ack(1), boot=boot)
    assert admit(ctx, replay, data, ("10.9.9.9", 4801)) is None  # attacker's copy first
    assert ctx.counters["dropped_unknown_addr"] == 1
    assert admit(ctx, replay, data, Y_ADDR) is not None  # the genuine one still counts


def test_stream_answers_route_by_type() -> None:
    ctx = make_ctx()
    sync, meta = Recorder(), Recorder()
    pp = codec.PushPull(False, ())
    req = codec.MetaRequest("y", 1, 2)
    answer(ctx, pp, 4.0, sync, meta)
    answer(ctx, req, 4.0, sync, meta)
    assert sync.calls == [("serve", (pp, 4.0))]
    assert meta.calls == [("serve", (req,))]
    # a response is never a request: dropped and counted, no answer
    assert answer(ctx, codec.MetaResponse("y", False, 0, 0, b""), 4.0, sync, meta) is None
    assert ctx.counters["dropped_stream_parse"] == 1


def test_open_stream_counts_what_it_rejects() -> None:
    ctx, boot = make_ctx(), Boot.fresh(5)
    good = KEY.seal(codec.encode_stream(codec.MetaRequest("y", 1, 2)), "c", b"tcp", boot)
    assert open_stream(ctx, good) == codec.MetaRequest("y", 1, 2)
    udp_frame = KEY.seal(codec.encode_stream(codec.MetaRequest("y", 1, 2)), "c", b"udp", boot)
    assert open_stream(ctx, udp_frame) is None  # another channel's frame
    assert open_stream(ctx, KEY.seal(b"\x09junk", "c", b"tcp", boot)) is None
    assert sum(v for k, v in ctx.counters.items() if k.startswith("dropped_stream_")) == 2
