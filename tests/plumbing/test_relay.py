"""The handover relay's frame rules (sans-IO) and its window logic against a fake socket."""

from __future__ import annotations

import socket
import struct
from ipaddress import IPv4Address, IPv4Network, IPv6Address

import pytest
import trio
from hypothesis import given
from hypothesis import strategies as st

from duravip.config.model import Topology
from duravip.plumbing.garp import garp_request
from duravip.plumbing.ndisc import na_message
from duravip.plumbing.netns import open_socket
from duravip.plumbing.relay import (
    PACKET_HOST,
    PACKET_OTHERHOST,
    PACKET_OUTGOING,
    Announce,
    HandoverRelay,
    Syn,
    _Window,
    classify,
    forward_frame,
    inet_checksum,
)

from .conftest import Lab

OLD, NEW, CLIENT = (
    b"\x02\x00\x00\x00\x00\x01",
    b"\x02\x00\x00\x00\x00\x02",
    b"\x02\xcc" + b"\x00" * 4,
)
VIP = IPv4Address("10.1.1.2")
VIP6 = IPv6Address("2001:db8:1::2")
CLIENT_IP = IPv4Address("10.1.1.200")


def tcp_segment(flags: int, *, options: bytes = b"") -> bytearray:
    offset = (20 + len(options)) // 4
    return bytearray(
        struct.pack("!HHIIBBHHH", 40000, 25, 12345, 0, offset << 4, flags, 64240, 0xBEEF, 0)
        + options
    )


def syn4(flags: int = 0x02, dst: IPv4Address = VIP, pad: int = 0) -> bytes:
    tcp = tcp_segment(flags, options=b"\x02\x04\x05\xb4")
    ip = struct.pack(
        "!BBHHHBBH4s4s", 0x45, 0, 20 + len(tcp), 1, 0x4000, 64, 6, 0, CLIENT_IP.packed, dst.packed
    )
    return OLD + CLIENT + b"\x08\x00" + ip + bytes(tcp) + b"\x00" * pad


def syn6(flags: int = 0x02) -> bytes:
    tcp = tcp_segment(flags)
    ip = struct.pack(
        "!IHBB16s16s", 6 << 28, len(tcp), 6, 64, IPv6Address("2001:db8:1::c8").packed, VIP6.packed
    )
    return OLD + CLIENT + b"\x86\xdd" + ip + bytes(tcp)


def tcp_checksum_ok(frame: bytes) -> bool:
    if frame[12:14] == b"\x08\x00":
        total = int.from_bytes(frame[16:18], "big")
        tcp = frame[34 : 14 + total]
        pseudo = frame[26:34] + struct.pack("!BBH", 0, 6, len(tcp))
    else:
        plen = int.from_bytes(frame[18:20], "big")
        tcp = frame[54 : 54 + plen]
        pseudo = frame[22:54] + struct.pack("!IxxxB", len(tcp), 6)
    return inet_checksum(pseudo + tcp) == 0


def na_frame(target: IPv6Address, mac: bytes) -> bytes:
    body = na_message(target, mac)
    ip = struct.pack(
        "!IHBB16s16s", 6 << 28, len(body), 58, 255, IPv6Address("fe80::2").packed,
        IPv6Address("ff02::1").packed,
    )  # fmt: skip
    return b"\x33\x33\x00\x00\x00\x01" + mac + b"\x86\xdd" + ip + body


def test_classify_tells_syns_from_everything_else() -> None:
    assert classify(syn4()) == Syn(VIP)
    assert classify(syn6()) == Syn(VIP6)
    assert classify(syn4(flags=0x12)) is None  # SYN-ACK
    assert classify(syn4(flags=0x10)) is None  # a session's ACK
    assert classify(syn6(flags=0x11)) is None
    assert classify(garp_request(NEW, VIP)) == Announce(VIP, NEW)
    assert classify(na_frame(VIP6, NEW)) == Announce(VIP6, NEW)
    probe = bytearray(garp_request(NEW, VIP))
    probe[28:32] = b"\x00" * 4  # an RFC 5227 probe claims nothing
    assert classify(bytes(probe)) is None


@given(st.binary(max_size=120))
def test_classify_and_forward_never_raise(frame: bytes) -> None:
    classify(frame)
    forward_frame(frame, NEW, OLD)


@pytest.mark.parametrize("make", [syn4, syn6, lambda: syn4(pad=6)])
def test_forward_readdresses_and_makes_the_checksum_whole(make: object) -> None:
    frame = make()  # type: ignore[operator]
    assert not tcp_checksum_ok(frame)  # 0xBEEF: what an offloading sender leaves
    out = forward_frame(frame, NEW, OLD)
    assert out is not None
    assert out[:12] == NEW + OLD
    assert tcp_checksum_ok(out)
    # Everything from the EtherType on is unchanged but the checksum; padding is cut.
    v4 = frame[12:14] == b"\x08\x00"
    end = 14 + (
        int.from_bytes(frame[16:18], "big") if v4 else 40 + int.from_bytes(frame[18:20], "big")
    )
    at = (34 if v4 else 54) + 16
    assert len(out) == end
    assert out[12:at] == frame[12:at] and out[at + 2 :] == frame[at + 2 : end]
    assert classify(out) == classify(frame)


def test_forward_refuses_what_is_not_a_syn() -> None:
    assert forward_frame(syn4(flags=0x10), NEW, OLD) is None
    assert forward_frame(garp_request(NEW, VIP), NEW, OLD) is None
    short = bytearray(syn4())
    short[16:18] = (9999).to_bytes(2, "big")  # IP length beyond the frame
    assert forward_frame(bytes(short), NEW, OLD) is None


class FakeRaw:
    def __init__(self) -> None:
        self.sent: list[bytes] = []

    def send(self, data: bytes) -> int:
        self.sent.append(data)
        return len(data)


async def test_window_holds_syns_until_the_new_holder_announces_then_forwards() -> None:
    async with trio.open_nursery() as nursery:
        relay = HandoverRelay(netns=None, topology=lambda: [], nursery=nursery, limit=3)
        raw = FakeRaw()
        w = _Window(frozenset({VIP}), raw, OLD)  # type: ignore[arg-type]
        other = IPv4Address("10.1.1.3")
        relay._handle(w, syn4(), PACKET_HOST)
        relay._handle(w, syn4(dst=other), PACKET_HOST)  # not released here
        relay._handle(w, syn4(), PACKET_OTHERHOST)  # not addressed to us
        relay._handle(w, syn4(), PACKET_OUTGOING)
        relay._handle(w, garp_request(OLD, VIP), PACKET_HOST)  # our own announcement
        assert raw.sent == [] and w.held == 1
        relay._handle(w, garp_request(NEW, VIP), PACKET_HOST)
        assert len(raw.sent) == 1 and raw.sent[0][:12] == NEW + OLD
        relay._handle(w, syn4(), PACKET_HOST)  # MAC known: at once
        assert len(raw.sent) == 2
        assert relay.counters["relay_syns_forwarded"] == 2
        # Over the limit while nobody announced: counted, not held.
        w2 = _Window(frozenset({other}), raw, OLD)  # type: ignore[arg-type]
        for _ in range(5):
            relay._handle(w2, syn4(dst=other), PACKET_HOST)
        assert w2.held == 3 and relay.counters["relay_syns_expired"] == 2
        nursery.cancel_scope.cancel()


@pytest.mark.lab
async def test_real_kernel_captures_gated_syns_and_forwards_them_to_the_announcer(lab: Lab) -> None:
    """ns a released VIP; ns b sends a SYN to a's MAC, then announces VIP itself."""
    mac_a, mac_b = (bytes.fromhex(lab.mac(ns).replace(":", "")) for ns in (lab.a, lab.b))
    vip = IPv4Address("10.9.1.5")
    raw_b = open_socket(lab.b, socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0003))
    raw_b.bind(("eth1", 0x0003))
    raw_b.setblocking(False)
    sock_b = trio.socket.from_stdlib_socket(raw_b)

    def syn_to_a(sport: int) -> bytes:
        frame = bytearray(syn4(dst=vip))
        frame[0:12] = mac_a + mac_b
        frame[34:36] = sport.to_bytes(2, "big")
        return bytes(frame)

    topo = [Topology(IPv4Network("10.9.1.0/24"), "eth1")]
    with raw_b:
        async with trio.open_nursery() as nursery:
            relay = HandoverRelay(netns=lab.a, topology=lambda: topo, nursery=nursery, window=1.0)
            capture = relay.open([vip])
            await sock_b.send(syn_to_a(1111))  # before the gate: the kernel's to answer
            await trio.sleep(0.05)
            capture.start()
            await sock_b.send(syn_to_a(2222))  # in the gap: held
            await trio.sleep(0.05)
            await sock_b.send(garp_request(mac_b, vip))  # the new holder announces
            got: list[bytes] = []
            with trio.move_on_after(2):
                while not got:
                    data, addr = await sock_b.recvfrom(65536)
                    if addr[2] == PACKET_HOST and classify(data) == Syn(vip):
                        got.append(data)
            await sock_b.send(syn_to_a(3333))  # a late SYN: forwarded at once
            with trio.move_on_after(2):
                while len(got) < 2:
                    data, addr = await sock_b.recvfrom(65536)
                    if addr[2] == PACKET_HOST and classify(data) == Syn(vip):
                        got.append(data)
            await trio.sleep(1.1)  # the window ends
            counters = dict(relay.counters)
            nursery.cancel_scope.cancel()
    ports = [int.from_bytes(f[34:36], "big") for f in got]
    assert ports == [2222, 3333]
    assert all(f[:12] == mac_b + mac_a and tcp_checksum_ok(f) for f in got)
    assert counters["relay_windows"] == 1
    assert counters["relay_syns_forwarded"] == 2
    assert counters["relay_syns_expired"] == 0
