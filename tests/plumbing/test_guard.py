"""The takeover guard: its nft scripts, its timing, and the kernel dropping instead of resetting."""

from __future__ import annotations

import os
import select
import socket
import struct
import subprocess
import time
from collections.abc import Iterator
from ipaddress import ip_address

import pytest
import trio

from duravip.plumbing import guard
from duravip.plumbing.netns import open_socket

VIP = ip_address("10.9.0.100")
OTHER = ip_address("10.9.0.101")


def test_ruleset_guards_every_ip_by_family() -> None:
    text = guard.ruleset([VIP, ip_address("2001:db8::5"), OTHER])
    assert text.startswith("add table inet duravip_guard\ndelete table inet duravip_guard\n")
    assert "add element inet duravip_guard fresh4 { 10.9.0.100, 10.9.0.101 }" in text
    assert "add element inet duravip_guard fresh6 { 2001:db8::5 }" in text
    assert "tcp flags & (syn | rst) == 0 ct state new counter drop" in text


def test_delete_adds_first_so_an_absent_element_is_no_error() -> None:
    assert guard.elements("delete", [VIP]) == [
        "add element inet duravip_guard fresh4 { 10.9.0.100 }",
        "delete element inet duravip_guard fresh4 { 10.9.0.100 }",
    ]


async def test_an_acquired_ip_settles_after_hold_and_a_release_guards_it_again(
    autojump_clock: trio.abc.Clock,
) -> None:
    scripts: list[tuple[float, str]] = []

    async def runner(script: str) -> None:
        scripts.append((trio.current_time(), script))

    g = guard.TakeoverGuard([VIP, OTHER], hold=10.0, runner=runner)
    async with trio.open_nursery() as n:
        await n.start(g.serve)
        assert g.active and "fresh4 { 10.9.0.100, 10.9.0.101 }" in scripts[0][1]
        t0 = trio.current_time()
        g.on_held_change("acquire", VIP)
        g.on_held_change("acquire", ip_address("10.9.0.7"))  # not a configured DuraVIP: ignored
        await trio.sleep(9.0)
        assert len(scripts) == 1  # still guarded
        await trio.sleep(2.0)
        assert len(scripts) == 2
        at, text = scripts[1]
        assert at == pytest.approx(t0 + 10.0, abs=0.01)
        assert text.endswith("delete element inet duravip_guard fresh4 { 10.9.0.100 }\n")
        g.on_held_change("acquire", OTHER)
        await trio.sleep(1.0)
        g.on_held_change("release", OTHER)  # released before it settled: no delete at all
        await trio.sleep(0.1)
        assert scripts[2][1] == "add element inet duravip_guard fresh4 { 10.9.0.101 }\n"
        await trio.sleep(20.0)
        assert len(scripts) == 3
        n.cancel_scope.cancel()
    assert scripts[-1][1] == "add table inet duravip_guard\ndelete table inet duravip_guard\n"


async def test_without_nft_the_guard_is_inactive_and_ignores_hooks() -> None:
    async def runner(script: str) -> None:
        raise FileNotFoundError("nft")

    g = guard.TakeoverGuard([VIP], runner=runner)
    async with trio.open_nursery() as n:
        await n.start(g.serve)
        assert not g.active and g.errors == 1
        g.on_held_change("acquire", VIP)
        n.cancel_scope.cancel()


# --- the kernel: two namespaces, a raw TCP segment with no connection behind it -------------------


def _sh(*args: str, stdin: str | None = None) -> None:
    subprocess.run(args, check=True, capture_output=True, text=True, input=stdin)


@pytest.fixture
def pair(monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[str, str]]:
    """Namespaces ``h11g<pid>-a`` (holds the VIP) and ``-b`` (the peer), joined by a veth."""
    if os.geteuid() != 0:
        pytest.skip("needs root for network namespaces")
    monkeypatch.setenv("DURAVIP_REQUIRE_NETNS", "1")
    a, b = f"h11g{os.getpid()}-a", f"h11g{os.getpid()}-b"
    try:
        _sh("ip", "netns", "add", a)
        _sh("ip", "netns", "add", b)
        _sh(
            "ip", "-n", a, "link", "add", "eth1", "type", "veth", "peer", "name", "eth1", "netns", b
        )
        for ns, addr in ((a, "10.9.0.1/24"), (b, "10.9.0.2/24")):
            _sh("ip", "-n", ns, "addr", "add", addr, "dev", "eth1")
            _sh("ip", "-n", ns, "link", "set", "eth1", "up")
        _sh("ip", "-n", a, "addr", "add", f"{VIP}/32", "dev", "eth1")
        yield a, b
    finally:
        for ns in (a, b):
            subprocess.run(["ip", "netns", "del", ns], check=False, capture_output=True)


def _csum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    s: int = sum(int(x) for x in struct.unpack(f"!{len(data) // 2}H", data))
    s = (s >> 16) + (s & 0xFFFF)
    s += s >> 16
    return ~s & 0xFFFF


def _segment(src: str, dst: str, sport: int, dport: int, flags: int) -> bytes:
    hdr = struct.pack("!HHIIBBHHH", sport, dport, 1000, 2000, 5 << 4, flags, 65535, 0, 0)
    pseudo = socket.inet_aton(src) + socket.inet_aton(dst) + struct.pack("!BBH", 0, 6, len(hdr))
    c = _csum(pseudo + hdr)
    return hdr[:16] + struct.pack("!H", c) + hdr[18:]


def _answered_with_reset(b: str, flags: int, sport: int) -> bool:
    """Send one segment from ``b`` to the VIP; whether a RST for it came back within 0.5 s."""
    s = open_socket(b, socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_TCP)
    try:
        s.sendto(_segment("10.9.0.2", str(VIP), sport, 4321, flags), (str(VIP), 0))
        end = time.monotonic() + 0.5
        while (left := end - time.monotonic()) > 0:
            if not select.select([s], [], [], left)[0]:
                break
            pkt = s.recv(2048)
            ihl = (pkt[0] & 0xF) * 4
            src = socket.inet_ntoa(pkt[12:16])
            tsport, tdport = struct.unpack("!HH", pkt[ihl : ihl + 4])
            if src == str(VIP) and tsport == 4321 and tdport == sport and pkt[ihl + 13] & 0x04:
                return True
        return False
    finally:
        s.close()


ACK, SYN = 0x10, 0x02


async def test_a_guarded_ip_drops_a_stray_segment_and_a_settled_one_resets_it(
    pair: tuple[str, str],
) -> None:
    a, b = pair

    async def in_a(script: str) -> None:
        await trio.run_process(["ip", "netns", "exec", a, "nft", "-f", "-"], stdin=script.encode())

    g = guard.TakeoverGuard([VIP], hold=0.5, runner=in_a)
    async with trio.open_nursery() as n:
        await n.start(g.serve)
        assert g.active
        assert not _answered_with_reset(b, ACK, 40001)  # guarded: dropped, no RST
        assert _answered_with_reset(b, SYN, 40002)  # a SYN is not guarded: refused as ever
        g.on_held_change("acquire", VIP)
        await trio.sleep(1.0)
        assert _answered_with_reset(b, ACK, 40003)  # settled: reset as ever
        g.on_held_change("release", VIP)
        await trio.sleep(0.3)
        assert not _answered_with_reset(b, ACK, 40004)  # guarded again
        n.cancel_scope.cancel()
    out = subprocess.run(
        ["ip", "netns", "exec", a, "nft", "list", "tables"], capture_output=True, text=True
    )
    assert "duravip_guard" not in out.stdout  # removed on exit
