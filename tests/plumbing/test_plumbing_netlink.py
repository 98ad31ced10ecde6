"""The netlink plumber, GARP and the worker on a real kernel, inside lab namespaces.

Every socket is opened inside the lab namespaces (pyroute2 helper); the test
process never moves, and the root namespace is never touched.
"""

from __future__ import annotations

import os
import socket
import struct
import subprocess
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from ipaddress import IPv4Address, IPv4Network

import pytest
import trio
import trio.testing
import trio_util

from duravip.config.model import Topology
from duravip.plumbing import rtnl
from duravip.plumbing.base import Placement
from duravip.plumbing.cache import AddressCache, run_cache
from duravip.plumbing.garp import GarpSender, garp_request
from duravip.plumbing.netlink import NetlinkPlumber, open_netlink_plumber
from duravip.plumbing.netns import RootNamespaceError, _ns_inode, open_socket, root_inode
from duravip.plumbing.nlsock import NetlinkSocket, open_route_socket
from duravip.plumbing.worker import PlumbingWorker, clean_slate, serve

from .conftest import Lab

pytestmark = pytest.mark.lab

TOPO = (
    Topology(IPv4Network("10.9.1.0/24"), "eth1"),
    Topology(IPv4Network("10.9.2.0/24"), "eth1", 24),
)
VIPS = [IPv4Address(f"10.9.1.{i}") for i in range(5, 21)]
MANAGED = frozenset(VIPS) | {IPv4Address("10.9.2.5")}


def pl(ip: IPv4Address | str, prefixlen: int = 32, ifname: str = "eth1") -> Placement:
    return Placement(IPv4Address(ip), ifname, prefixlen)


async def wait_for(pred: Callable[[], bool], timeout: float = 5.0) -> None:
    with trio.fail_after(timeout):
        while not pred():
            await trio.sleep(0.02)


async def test_guard_refuses_root_namespace(monkeypatch: pytest.MonkeyPatch) -> None:
    if _ns_inode("/proc/self/ns/net") != root_inode():
        pytest.skip("the test process is not in the root namespace")
    monkeypatch.setenv("DURAVIP_REQUIRE_NETNS", "1")
    with pytest.raises(RootNamespaceError):
        async with open_netlink_plumber(netns=None):
            pass  # pragma: no cover


async def test_plumb_unplumb_lists(lab: Lab) -> None:
    with trio.fail_after(20):
        async with open_netlink_plumber(netns=lab.a) as p:
            lab.ip(lab.a, "addr", "add", "10.9.1.200/32", "dev", "eth1")  # unmanaged, by hand
            wanted = [pl(ip) for ip in VIPS] + [pl("10.9.2.5", 24)]
            assert set((await p.plumb(wanted)).values()) == {None}
            expect = {f"{ip}/32" for ip in VIPS} | {"10.9.2.5/24", "10.9.0.1/24", "10.9.1.200/32"}
            assert lab.addrs() == expect
            assert set((await p.plumb(wanted[:4])).values()) == {None}  # EEXIST is success
            assert await p.present(MANAGED) == MANAGED
            bad = await p.plumb([pl("10.9.1.30", ifname="eth7")])
            assert bad[IPv4Address("10.9.1.30")] == "interface eth7 not found"

            assert set((await p.unplumb(wanted[:10])).values()) == {None}
            assert set((await p.unplumb(wanted[:10])).values()) == {None}  # EADDRNOTAVAIL too
            assert lab.addrs() == expect - {f"{ip}/32" for ip in VIPS[:10]}
            assert set((await p.unplumb(wanted)).values()) == {None}
            assert lab.addrs() == {"10.9.0.1/24", "10.9.1.200/32"}  # unmanaged untouched
            assert await p.present(MANAGED) == frozenset()


async def test_interface_down_is_reported(lab: Lab) -> None:
    with trio.fail_after(20):
        async with open_netlink_plumber(netns=lab.a) as p:
            lab.ip(lab.a, "link", "set", "eth1", "down")
            res = await p.plumb([pl(VIPS[0])])
            assert res[VIPS[0]] == "interface eth1 is down"
            lab.ip(lab.a, "link", "set", "eth1", "up")
            assert (await p.plumb([pl(VIPS[0])]))[VIPS[0]] is None


async def test_clean_slate_any_interface(lab: Lab) -> None:
    lab.ip(lab.a, "addr", "add", "10.9.1.7/32", "dev", "lo")  # a stray on another interface
    lab.ip(lab.a, "addr", "add", "10.9.1.8/32", "dev", "eth1")
    lab.ip(lab.a, "addr", "add", "10.9.1.200/32", "dev", "eth1")  # not managed
    with trio.fail_after(20):
        async with open_netlink_plumber(netns=lab.a) as p:
            removed = await clean_slate(p, MANAGED, TOPO)
    assert removed == {IPv4Address("10.9.1.7"), IPv4Address("10.9.1.8")}
    assert lab.addrs() == {"10.9.0.1/24", "10.9.1.200/32"}
    assert "10.9.1.7" not in lab.ip(lab.a, "-4", "addr", "show", "dev", "lo")


@asynccontextmanager
async def worker_in(
    lab: Lab, *, cache: bool, all_hosts: bool = True, garp_count: int = 1, interval: float = 0.3
) -> AsyncIterator[tuple[NetlinkPlumber, PlumbingWorker]]:
    async with (
        open_netlink_plumber(netns=lab.a, use_iflist_cache=cache) as p,
        trio.open_nursery() as n,
    ):
        w: PlumbingWorker = await n.start(
            lambda task_status: serve(
                plumber=p,
                managed=MANAGED,
                topology=TOPO,
                forbidden=frozenset({IPv4Address("10.9.0.1")}),
                announce_all_hosts=all_hosts,
                garp_count=garp_count,
                garp_interval=0.05,
                reconcile_interval=interval,
                task_status=task_status,
            )
        )
        yield p, w
        n.cancel_scope.cancel()


@pytest.mark.parametrize("cache", [False, True], ids=["dump", "iflist_cache"])
async def test_worker_repairs_external_delete(lab: Lab, cache: bool) -> None:
    with trio.fail_after(20):
        # With the cache, repair is event-driven: a 5 s period would be too slow.
        async with worker_in(lab, cache=cache, interval=5.0 if cache else 0.3) as (_p, w):
            assert await w.ensure(frozenset(VIPS[:4])) == frozenset(VIPS[:4])
            await w.reconcile_once()  # our own fresh addresses are not "removed from outside"
            assert w.repaired == 0
            lab.ip(lab.a, "addr", "del", f"{VIPS[1]}/32", "dev", "eth1")
            t0 = trio.current_time()
            await wait_for(lambda: f"{VIPS[1]}/32" in lab.addrs())
            repaired_in = trio.current_time() - t0
            assert repaired_in < 2.0
            # A managed IP nobody asked for is removed; an unmanaged one stays.
            lab.ip(lab.a, "addr", "add", f"{VIPS[9]}/32", "dev", "eth1")
            lab.ip(lab.a, "addr", "add", "10.9.1.201/32", "dev", "eth1")
            await wait_for(lambda: f"{VIPS[9]}/32" not in lab.addrs())
            assert "10.9.1.201/32" in lab.addrs()
            await w.remove(frozenset(VIPS[:4]))
            assert lab.addrs() == {"10.9.0.1/24", "10.9.1.201/32"}


def arp_capture(ns: str) -> trio.socket.SocketType:
    s = open_socket(ns, socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0806))
    s.bind(("eth1", 0))
    s.setblocking(False)
    return trio.socket.from_stdlib_socket(s)


async def collect(
    sock: trio.socket.SocketType, duration: float
) -> list[tuple[bytes, int, bytes, IPv4Address, IPv4Address]]:
    """(dst mac, op, sender mac, sender ip, target ip) of every ARP frame seen."""
    out = []
    with trio.move_on_after(duration):
        while True:
            f = await sock.recv(2048)
            dst, op, sha, spa, tpa = struct.unpack_from("!6s12x2xH6s4s6x4s", f)
            out.append((dst, op, sha, IPv4Address(spa), IPv4Address(tpa)))
    return out


async def test_garp_moves_peer_neighbour_entry(lab: Lab) -> None:
    vip = VIPS[0]
    lab.ip(
        lab.b,
        "neigh",
        "replace",
        str(vip),
        "lladdr",
        "02:00:00:00:00:01",
        "dev",
        "eth1",
        "nud",
        "stale",
    )
    mac_a = bytes.fromhex(lab.mac(lab.a).replace(":", ""))
    cap = arp_capture(lab.b)
    try:
        with trio.fail_after(20):
            async with worker_in(lab, cache=False, garp_count=3) as (_p, w):
                assert await w.ensure(frozenset({vip})) == {vip}
                frames = [f for f in await collect(cap, 0.5) if f[3] == vip]
    finally:
        cap.close()
    assert frames == [(b"\xff" * 6, 1, mac_a, vip, vip)] * 3
    assert lab.mac(lab.a) in lab.ip(lab.b, "neigh", "show", str(vip))


async def test_unicast_arp_only_to_known_neighbours(lab: Lab) -> None:
    mac_b = lab.mac(lab.b)
    lab.ip(lab.a, "neigh", "replace", "10.9.0.2", "lladdr", mac_b, "dev", "eth1", "nud", "stale")
    lab.ip(
        lab.a,
        "neigh",
        "replace",
        "10.9.0.77",
        "lladdr",
        "02:00:00:00:00:77",
        "dev",
        "eth1",
        "nud",
        "stale",
    )
    cap = arp_capture(lab.b)
    try:
        with trio.fail_after(20):
            async with worker_in(lab, cache=False, all_hosts=False) as (_p, w):
                assert await w.ensure(frozenset(VIPS[:2])) == frozenset(VIPS[:2])
                frames = [f for f in await collect(cap, 0.5) if f[3] in VIPS]
    finally:
        cap.close()
    peers = {
        bytes.fromhex(mac_b.replace(":", "")): IPv4Address("10.9.0.2"),
        bytes.fromhex("020000000077"): IPv4Address("10.9.0.77"),
    }
    assert len(frames) == 4
    assert {(f[0], f[3]) for f in frames} == {(m, v) for m in peers for v in VIPS[:2]}
    for dst, op, _sha, _spa, tpa in frames:
        assert op == 2 and dst != b"\xff" * 6 and tpa == peers[dst]


def kernel_addrs(lab: Lab) -> set[IPv4Address]:
    return {IPv4Address(a.split("/")[0]) for a in lab.addrs()}


async def test_iflist_cache_through_burst(lab: Lab) -> None:
    net = IPv4Network("10.10.0.0/16")
    ips = [net[i + 1] for i in range(10_240)]
    every = frozenset(ips)
    with trio.fail_after(40):
        async with open_netlink_plumber(netns=lab.a, use_iflist_cache=True) as p:
            assert p.cache is not None
            res = await p.plumb([pl(ip) for ip in ips])
            assert set(res.values()) == {None}
            await wait_for(lambda: p.cache is not None and p.cache.present(every) == every)
            # External burst: delete half, add some back with another prefix length.
            await trio.run_process(
                ["ip", "-n", lab.a, "-batch", "-"],
                stdin="".join(f"addr del {ip}/32 dev eth1\n" for ip in ips[::2]).encode(),
            )
            lab.batch(lab.a, [f"addr add {ip}/28 dev eth1" for ip in ips[:64:2]])
            truth = kernel_addrs(lab) & every
            assert len(truth) == 5_120 + 32
            await wait_for(lambda: p.cache is not None and p.cache.present(every) == truth)
            assert await p.present(every) == truth
            res = await p.unplumb([pl(ip) for ip in ips])
            assert set(res.values()) == {None}
            assert kernel_addrs(lab) == {IPv4Address("10.9.0.1")}
            await wait_for(lambda: p.cache is not None and not p.cache.present(every))


async def test_cache_resyncs_after_enobufs(lab: Lab) -> None:
    """A tiny event buffer and a blocked reader force ENOBUFS: drain, re-dump, stay right."""
    events = open_route_socket(lab.a, groups=rtnl.RTMGRP_IPV4_IFADDR)
    events.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    nl = NetlinkSocket(open_route_socket(lab.a))
    cache = AddressCache()
    changed = trio_util.AsyncValue(0)
    ips = [IPv4Address("10.11.0.0") + i for i in range(1, 2001)]
    try:
        with trio.fail_after(20):
            async with trio.open_nursery() as n:
                await n.start(run_cache, cache, events, nl, changed)
                # Blocking on purpose: the reader cannot run, the events overflow.
                lab.batch(lab.a, [f"addr add {ip}/32 dev eth1" for ip in ips])
                lab.batch(lab.a, [f"addr del {ip}/32 dev eth1" for ip in ips[:500]])
                await wait_for(
                    lambda: cache.resyncs >= 1 and cache.present(ips) == frozenset(ips[500:])
                )
                lab.ip(lab.a, "addr", "del", f"{ips[-1]}/32", "dev", "eth1")
                await wait_for(lambda: ips[-1] not in cache.present(ips))
                n.cancel_scope.cancel()
    finally:
        nl.close()
        events.close()


def test_no_lab_namespace_left_behind() -> None:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
    assert not [line for line in out.splitlines() if line.startswith(f"dvp{os.getpid()}")]


async def test_garp_pacing(lab: Lab, autojump_clock: trio.testing.MockClock) -> None:
    """500 frames at 1,000/s take 0.5 s of (virtual) time; at 1e9/s no sleeping."""
    mac = bytes.fromhex(lab.mac(lab.a).replace(":", ""))
    frames = [("eth1", garp_request(mac, IPv4Address("10.12.0.0") + i)) for i in range(500)]
    sender = GarpSender(lab.a, rate=1000.0)
    try:
        with trio.fail_after(10):
            t0 = trio.current_time()
            assert await sender.send(frames) == 500
            assert 0.47 <= trio.current_time() - t0 <= 0.5
            sender.rate = 1e9
            t0 = trio.current_time()
            assert await sender.send(frames) == 500
            assert trio.current_time() - t0 < 0.01
            assert sender.sent == 1000
    finally:
        sender.close()
