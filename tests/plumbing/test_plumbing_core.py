"""Sans-IO parts: topology match, rtnetlink codec, ARP frames, address cache."""

from __future__ import annotations

import socket
import struct
from ipaddress import IPv4Address, IPv4Network

from hypothesis import given
from hypothesis import strategies as st
from pyroute2.netlink.rtnl.ifaddrmsg import ifaddrmsg

from duravip.config.model import ClusterConfig, Config, HostPort, Topology
from duravip.plumbing import rtnl
from duravip.plumbing.base import Placement, place
from duravip.plumbing.cache import AddressCache
from duravip.plumbing.garp import BROADCAST, garp_request, plan_frames, unicast_reply
from duravip.plumbing.rtnl import LinkInfo, NeighInfo
from duravip.plumbing.worker import backoff_delay

ips = st.integers(0, 2**32 - 1).map(IPv4Address)
nets = st.builds(
    lambda a, p: IPv4Network((int(a) & (0xFFFFFFFF << (32 - p)) & 0xFFFFFFFF, p)),
    ips,
    st.integers(0, 32),
)


def test_place_longest_prefix() -> None:
    topo = [
        Topology(IPv4Network("10.0.0.0/8"), "eth0", 8),
        Topology(IPv4Network("10.9.0.0/16"), "eth1", 24),
        Topology(IPv4Network("10.9.1.0/24"), "eth2"),
    ]
    assert place(IPv4Address("10.9.1.5"), topo) == Placement(IPv4Address("10.9.1.5"), "eth2", 32)
    assert place(IPv4Address("10.9.2.5"), topo) == Placement(IPv4Address("10.9.2.5"), "eth1", 24)
    assert place(IPv4Address("10.1.1.1"), topo) == Placement(IPv4Address("10.1.1.1"), "eth0", 8)
    assert place(IPv4Address("192.168.1.1"), topo) is None


@given(ip=ips, networks=st.lists(nets, max_size=6))
def test_place_agrees_with_config(ip: IPv4Address, networks: list[IPv4Network]) -> None:
    topo = tuple(Topology(n, f"if{i}", 32) for i, n in enumerate(networks))
    cfg = Config(ClusterConfig("c", "n", HostPort(IPv4Address("10.0.0.1"), 1), topology=topo))
    best = cfg.topology_for(ip)
    got = place(ip, topo)
    assert (got is None) == (best is None)
    if got is not None and best is not None:
        assert got.interface == best.interface
        assert all(not (ip in n and n.prefixlen > best.network.prefixlen) for n in networks)


def _pyroute2_add(seq: int, ip: str, prefixlen: int, index: int) -> bytes:
    m = ifaddrmsg()
    m["family"] = socket.AF_INET
    m["prefixlen"] = prefixlen
    m["index"] = index
    m["attrs"] = [("IFA_LOCAL", ip), ("IFA_ADDRESS", ip)]
    m["header"]["type"] = rtnl.RTM_NEWADDR
    m["header"]["flags"] = rtnl.NLM_F_REQUEST | rtnl.NLM_F_ACK | rtnl.NLM_F_CREATE | rtnl.NLM_F_EXCL
    m["header"]["sequence_number"] = seq
    m.encode()
    return bytes(m.data)


@given(
    seq=st.integers(1, 2**31 - 1),
    ip=ips,
    prefixlen=st.integers(0, 32),
    index=st.integers(1, 2**31 - 1),
)
def test_encode_add_matches_pyroute2(seq: int, ip: IPv4Address, prefixlen: int, index: int) -> None:
    assert rtnl.encode_addr_add(seq, ip.packed, prefixlen, index) == _pyroute2_add(
        seq, str(ip), prefixlen, index
    )


@given(seq=st.integers(1, 2**31 - 1), ip=ips, index=st.integers(1, 2**31 - 1))
def test_encode_del_and_parse_roundtrip(seq: int, ip: IPv4Address, index: int) -> None:
    buf = rtnl.encode_addr_del(seq, ip.packed, index) + rtnl.encode_addr_add(
        seq + 1, ip.packed, 24, index
    )
    headers = list(rtnl.iter_messages(buf))
    assert [(h.type, h.seq) for h in headers] == [
        (rtnl.RTM_DELADDR, seq),
        (rtnl.RTM_NEWADDR, seq + 1),
    ]
    assert rtnl.parse_addr(buf, headers[0]) == rtnl.AddrInfo(ip, index, 0)
    assert rtnl.parse_addr(buf, headers[1]) == rtnl.AddrInfo(ip, index, 24)


def test_error_code_and_truncation() -> None:
    ack = struct.pack("=IHHIIi", 36, rtnl.NLMSG_ERROR, 0, 7, 0, -17) + b"\0" * 16
    (h,) = rtnl.iter_messages(ack)
    assert h.seq == 7 and rtnl.error_code(ack, h) == 17
    assert list(rtnl.iter_messages(ack[:20])) == []  # truncated message is not yielded


def test_dump_request_is_built() -> None:
    for t in (rtnl.RTM_GETLINK, rtnl.RTM_GETADDR, rtnl.RTM_GETNEIGH):
        (h,) = rtnl.iter_messages(rtnl.encode_dump(t, 42))
        assert (h.type, h.seq, h.flags & rtnl.NLM_F_DUMP) == (t, 42, rtnl.NLM_F_DUMP)


MAC = bytes.fromhex("020000000001")


def test_garp_request_layout() -> None:
    f = garp_request(MAC, IPv4Address("10.9.1.5"))
    assert len(f) == 60
    dst, src, etype, op, sha, spa, tha, tpa = struct.unpack_from("!6s6sH6xH6s4s6s4s", f)
    assert (dst, src, etype, op, sha) == (BROADCAST, MAC, 0x0806, 1, MAC)
    assert spa == tpa == IPv4Address("10.9.1.5").packed
    assert tha == b"\0" * 6


def test_plan_frames_modes() -> None:
    link = LinkInfo(3, "eth1", True, MAC)
    peers = [
        NeighInfo(3, IPv4Address("10.9.0.2"), bytes.fromhex("02aabbccddee")),
        NeighInfo(3, IPv4Address("10.9.0.3"), bytes.fromhex("02aabbccddef")),
    ]
    ps = [Placement(IPv4Address("10.9.1.5"), "eth1"), Placement(IPv4Address("10.9.1.6"), "eth9")]
    frames, skipped = plan_frames(ps, {"eth1": link}, {3: peers}, all_hosts=True)
    assert [f[1][:6] for f in frames] == [BROADCAST] and skipped == [ps[1]]
    frames, skipped = plan_frames(ps, {"eth1": link}, {3: peers}, all_hosts=False)
    assert [f[1] for f in frames] == [unicast_reply(MAC, ps[0].ip, p) for p in peers]
    assert {f[1][:6] for f in frames} == {p.mac for p in peers}


@given(st.lists(st.tuples(st.booleans(), st.integers(0, 15), st.integers(1, 3)), max_size=200))
def test_cache_matches_model(events: list[tuple[bool, int, int]]) -> None:
    cache = AddressCache()
    cache.replace([])
    model: set[tuple[IPv4Address, int]] = set()
    base = int(IPv4Address("10.9.1.0"))
    for add, n, index in events:
        ip = IPv4Address(base + n)
        buf = (rtnl.encode_addr_add if add else lambda s, p, _l, i: rtnl.encode_addr_del(s, p, i))(
            1, ip.packed, 32, index
        )
        cache.apply(buf)
        (model.add if add else model.discard)((ip, index))
    managed = [IPv4Address(base + n) for n in range(16)]
    assert cache.present(managed) == frozenset(ip for ip, _ in model)
    assert cache.present(managed[:3]) == frozenset(ip for ip, _ in model if ip in managed[:3])


def test_cache_link_deleted() -> None:
    cache = AddressCache()
    cache.replace(
        [
            rtnl.AddrInfo(IPv4Address("10.9.1.5"), 3, 32),
            rtnl.AddrInfo(IPv4Address("10.9.1.6"), 4, 32),
        ]
    )
    dellink = struct.pack("=IHHIIBxHiII", 32, rtnl.RTM_DELLINK, 0, 0, 0, 0, 0, 3, 0, 0)
    assert cache.apply(dellink) == [3]
    assert cache.present([IPv4Address("10.9.1.5"), IPv4Address("10.9.1.6")]) == {
        IPv4Address("10.9.1.6")
    }


def test_backoff_delay() -> None:
    assert [backoff_delay(n, 0.5, 30.0) for n in range(1, 9)] == [0.5, 1, 2, 4, 8, 16, 30, 30]
