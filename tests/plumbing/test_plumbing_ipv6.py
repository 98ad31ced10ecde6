"""IPv6 DuraVIPs on a real kernel (lab namespaces): NODAD plumbing, the cache, NA.

Everything runs inside the ``dvp<pid>`` namespaces of the ``lab`` fixture.
"""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from ipaddress import ip_address, ip_network

import pytest
import trio

from duravip.config.model import Topology
from duravip.plumbing import rtnl
from duravip.plumbing.base import Placement
from duravip.plumbing.ndisc import NA_OVERRIDE, NA_ROUTER, na_message, parse_na
from duravip.plumbing.netlink import open_netlink_plumber
from duravip.plumbing.worker import clean_slate

from .conftest import Lab

pytestmark = pytest.mark.lab

V6 = [ip_address(f"2001:db8:9::{i:x}") for i in range(5, 21)]
V4 = [ip_address(f"10.9.1.{i}") for i in range(5, 9)]
TOPO = (
    Topology(ip_network("10.9.1.0/24"), "eth1"),
    Topology(ip_network("2001:db8:9::/64"), "eth1", 128),
)


def pl(ip: object, prefixlen: int = 128) -> Placement:
    return Placement(ip_address(str(ip)), "eth1", prefixlen)


def addrs6(lab: Lab, ns: str) -> dict[str, str]:
    """``ip/prefix`` -> the rest of the line for global IPv6 addresses on eth1."""
    out = lab.ip(ns, "-6", "-o", "addr", "show", "dev", "eth1", "scope", "global")
    return {line.split()[3]: line for line in out.splitlines()}


def v6_up(lab: Lab) -> None:
    for ns in (lab.a, lab.b):
        lab.ip(
            ns,
            "addr",
            "add",
            f"2001:db8:9::ff00:{1 if ns == lab.a else 2}/64",
            "dev",
            "eth1",
            "nodad",
        )


async def wait_for(pred: Callable[[], bool], timeout: float = 5.0) -> None:
    with trio.fail_after(timeout):
        while not pred():
            await trio.sleep(0.02)


def test_na_message_layout() -> None:
    mac = bytes.fromhex("020000000001")
    msg = na_message(V6[0], mac)
    assert len(msg) == 32
    target, flags, lladdr = parse_na(msg)
    assert (target, flags, lladdr) == (V6[0], NA_OVERRIDE, mac)
    assert parse_na(na_message(V6[0], mac, router=True))[1] == NA_OVERRIDE | NA_ROUTER


def test_rtnl_v6_add_is_nodad_and_parses_back() -> None:
    buf = rtnl.encode_addr_add(7, V6[0].packed, 128, 3)
    h = next(rtnl.iter_messages(buf))
    assert h.type == rtnl.RTM_NEWADDR and h.seq == 7
    family, plen, flags, _scope, index = buf[16], buf[17], buf[18], buf[19], buf[20]
    assert (family, plen, flags & rtnl.IFA_F_NODAD, index) == (10, 128, rtnl.IFA_F_NODAD, 3)
    a = rtnl.parse_addr(buf, h)
    assert a == rtnl.AddrInfo(V6[0], 3, 128)
    d = rtnl.encode_addr_del(8, V6[0].packed, 3, 64)
    assert d[17] == 64 and d[16] == 10


@pytest.mark.parametrize("cached", [False, True])
async def test_plumb_unplumb_v6_and_v4(lab: Lab, cached: bool) -> None:
    with trio.fail_after(20):
        async with open_netlink_plumber(netns=lab.a, use_iflist_cache=cached) as p:
            wanted = [pl(ip) for ip in V6] + [pl(ip, 32) for ip in V4]
            assert set((await p.plumb(wanted)).values()) == {None}
            got = addrs6(lab, lab.a)
            assert set(got) == {f"{ip}/128" for ip in V6}
            assert all("tentative" not in line and "nodad" in line for line in got.values())
            assert all("noprefixroute" in line for line in got.values())
            assert lab.addrs() >= {f"{ip}/32" for ip in V4}
            managed = frozenset(V6) | frozenset(V4)
            assert await p.present(managed) == managed
            assert set((await p.plumb(wanted[:3])).values()) == {None}  # EEXIST
            # a managed IPv6 address added by hand with another prefix is still removed
            lab.ip(lab.a, "addr", "add", "2001:db8:9::99/64", "dev", "eth1", "nodad")
            extra = ip_address("2001:db8:9::99")
            if cached:
                await wait_for(lambda: p.cache is not None and extra in p.cache.present({extra}))
            assert set((await p.unplumb([*wanted, pl(extra)])).values()) == {None}
            assert addrs6(lab, lab.a) == {}
            assert await p.present(managed | {extra}) == frozenset()
            assert set((await p.unplumb(wanted)).values()) == {None}  # EADDRNOTAVAIL


async def test_cache_sees_external_v6_changes(lab: Lab) -> None:
    with trio.fail_after(20):
        async with open_netlink_plumber(netns=lab.a, use_iflist_cache=True) as p:
            assert p.cache is not None
            await p.plumb([pl(V6[0])])
            lab.ip(lab.a, "addr", "del", f"{V6[0]}/128", "dev", "eth1")
            await wait_for(lambda: p.cache is not None and not p.cache.present({V6[0]}))
            lab.ip(lab.a, "addr", "add", f"{V6[1]}/128", "dev", "eth1", "nodad")
            await wait_for(lambda: p.cache is not None and bool(p.cache.present({V6[1]})))


async def test_clean_slate_removes_v6(lab: Lab) -> None:
    lab.ip(lab.a, "addr", "add", f"{V6[2]}/128", "dev", "eth1", "nodad")
    lab.ip(lab.a, "addr", "add", f"{V4[0]}/32", "dev", "eth1")
    with trio.fail_after(20):
        async with open_netlink_plumber(netns=lab.a) as p:
            removed = await clean_slate(p, frozenset(V6) | frozenset(V4), TOPO)
            assert set(removed) == {V6[2], V4[0]}
    assert addrs6(lab, lab.a) == {}


def neigh_mac(lab: Lab, ns: str, ip: object) -> str | None:
    out = lab.ip(ns, "-6", "neigh", "show", str(ip), "dev", "eth1")
    parts = out.split()
    return parts[parts.index("lladdr") + 1] if "lladdr" in parts else None


@pytest.mark.parametrize("all_hosts", [True, False])
async def test_unsolicited_na_moves_a_peer_entry(lab: Lab, all_hosts: bool) -> None:
    v6_up(lab)
    stale = "02:00:00:00:be:ef"
    for ip in V6[:4]:
        lab.ip(lab.b, "-6", "neigh", "add", str(ip), "lladdr", stale, "dev", "eth1", "nud", "stale")
    if not all_hosts:  # a knows b (unicast mode announces to known neighbours)
        lab.ip(
            lab.a,
            "-6",
            "neigh",
            "replace",
            "2001:db8:9::ff00:2",
            "lladdr",
            lab.mac(lab.b),
            "dev",
            "eth1",
            "nud",
            "reachable",
        )
    with trio.fail_after(20):
        async with open_netlink_plumber(netns=lab.a) as p:
            wanted = [pl(ip) for ip in V6[:4]]
            await p.plumb(wanted)
            await p.announce(wanted, all_hosts=all_hosts)
            assert p.garp_sent == 4
            mac_a = lab.mac(lab.a)
            await wait_for(lambda: all(neigh_mac(lab, lab.b, ip) == mac_a for ip in V6[:4]))


async def test_na_reaches_the_wire_with_hop_limit_255(lab: Lab) -> None:
    """Capture in b with tcpdump: ICMPv6 type 136 to ff02::1, hop limit 255, override set."""
    v6_up(lab)
    cap = subprocess.Popen(
        [
            "ip",
            "netns",
            "exec",
            lab.b,
            "tcpdump",
            "-l",
            "-n",
            "-v",
            "-c",
            "1",
            "-i",
            "eth1",
            "icmp6 and ip6[40] == 136",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        await trio.sleep(0.8)
        async with open_netlink_plumber(netns=lab.a, na_router=True) as p:
            await p.plumb([pl(V6[0])])
            with trio.fail_after(5):
                while cap.poll() is None:
                    await p.announce([pl(V6[0])], all_hosts=True)
                    await trio.sleep(0.2)
        out = cap.stdout.read() if cap.stdout else ""
    finally:
        if cap.poll() is None:
            cap.kill()
        cap.wait()
    assert "hlim 255" in out and "ff02::1" in out and f"{V6[0]} > ff02::1" in out, out
    assert "neighbor advertisement" in out and "Flags [router, override]" in out, out
