"""Sans-IO rtnetlink codec: the messages the plumber sends and reads.

Address add/delete and address parsing sit on the hot path (10,240 at once),
so they are packed and unpacked with ``struct`` (checked byte for byte against
pyroute2's encoder in the tests); links and neighbours, which are few, are
parsed with pyroute2's ``MarshalRtnl``.
"""

from __future__ import annotations

import socket
import struct
from collections.abc import Iterator
from ipaddress import ip_address

import attrs
from pyroute2.netlink.rtnl.ifaddrmsg import ifaddrmsg
from pyroute2.netlink.rtnl.ifinfmsg import ifinfmsg
from pyroute2.netlink.rtnl.marshal import MarshalRtnl
from pyroute2.netlink.rtnl.ndmsg import ndmsg

from duravip.ipaddr import IPAddress

NLMSG_ERROR = 2
NLMSG_DONE = 3
NLMSG_OVERRUN = 4
RTM_NEWLINK = 16
RTM_DELLINK = 17
RTM_GETLINK = 18
RTM_NEWADDR = 20
RTM_DELADDR = 21
RTM_GETADDR = 22
RTM_NEWNEIGH = 28
RTM_GETNEIGH = 30

NLM_F_REQUEST = 0x1
NLM_F_ACK = 0x4
NLM_F_EXCL = 0x200
NLM_F_CREATE = 0x400
NLM_F_DUMP = 0x300

IFA_ADDRESS = 1
IFA_LOCAL = 2

RTMGRP_LINK = 0x1
RTMGRP_IPV4_IFADDR = 0x10
RTMGRP_IPV6_IFADDR = 0x100

#: ``ifa_flags``: no duplicate address detection (the address is usable at once).
IFA_F_NODAD = 0x02
IFA_F_TENTATIVE = 0x40
#: No prefix route for the address (needs the 32-bit ``IFA_FLAGS`` attribute).
IFA_F_NOPREFIXROUTE = 0x200
IFA_FLAGS = 8

#: Socket options (linux/netlink.h, SOL_NETLINK = 270).
SOL_NETLINK = 270
NETLINK_CAP_ACK = 10
NETLINK_EXT_ACK = 11

IFF_UP = 0x1
IFF_RUNNING = 0x40

_HDR = struct.Struct("=IHHII")
_ADDR_ADD = struct.Struct("=IHHIIBBBBIHH4sHH4s")
_ADDR_DEL = struct.Struct("=IHHIIBBBBIHH4s")
_ADDR6_ADD = struct.Struct("=IHHIIBBBBIHH16sHHI")
_ADDR6_DEL = struct.Struct("=IHHIIBBBBIHH16s")
_IFADDR = struct.Struct("=BBBBI")
_RTA = struct.Struct("=HH")
_ERR = struct.Struct("=i")


def encode_addr_add(seq: int, ip: bytes, prefixlen: int, index: int) -> bytes:
    """RTM_NEWADDR with IFA_LOCAL = IFA_ADDRESS = ip; EXCL so EEXIST reports "already there".

    A 16-byte ``ip`` is IPv6: IFA_ADDRESS only, with ``IFA_F_NODAD`` so the
    address is usable at once (no tentative state while DAD runs, which would
    make a takeover wait about a second and let the node refuse to bind). A
    ``/128`` also gets ``IFA_F_NOPREFIXROUTE``: like an IPv4 ``/32`` it needs
    no route of its own (the local table has it), and the kernel adds 10,240
    IPv6 addresses about 40% faster without one prefix route each.
    """
    if len(ip) == 16:
        flags = IFA_F_NODAD | (IFA_F_NOPREFIXROUTE if prefixlen == 128 else 0)
        return _ADDR6_ADD.pack(
            _ADDR6_ADD.size,
            RTM_NEWADDR,
            NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL,
            seq,
            0,
            socket.AF_INET6,
            prefixlen,
            IFA_F_NODAD,
            0,
            index,
            20,
            IFA_ADDRESS,
            ip,
            8,
            IFA_FLAGS,
            flags,
        )
    return _ADDR_ADD.pack(
        _ADDR_ADD.size,
        RTM_NEWADDR,
        NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL,
        seq,
        0,
        socket.AF_INET,
        prefixlen,
        0,
        0,
        index,
        8,
        IFA_LOCAL,
        ip,
        8,
        IFA_ADDRESS,
        ip,
    )


def encode_addr_del(seq: int, ip: bytes, index: int, prefixlen: int = 128) -> bytes:
    """RTM_DELADDR matching on IFA_LOCAL only, so any prefix length is removed.

    IPv6 (16-byte ``ip``) is different: the kernel deletes an IPv6 address only
    when ``prefixlen`` matches too (ignored for IPv4).
    """
    if len(ip) == 16:
        return _ADDR6_DEL.pack(
            _ADDR6_DEL.size,
            RTM_DELADDR,
            NLM_F_REQUEST | NLM_F_ACK,
            seq,
            0,
            socket.AF_INET6,
            prefixlen,
            0,
            0,
            index,
            20,
            IFA_ADDRESS,
            ip,
        )
    return _ADDR_DEL.pack(
        _ADDR_DEL.size,
        RTM_DELADDR,
        NLM_F_REQUEST | NLM_F_ACK,
        seq,
        0,
        socket.AF_INET,
        0,
        0,
        0,
        index,
        8,
        IFA_LOCAL,
        ip,
    )


def encode_dump(msg_type: int, seq: int) -> bytes:
    """A dump request (links, addresses or neighbours of both families), built by pyroute2."""
    msg: ifinfmsg | ifaddrmsg | ndmsg
    if msg_type == RTM_GETLINK:
        msg = ifinfmsg()
        msg["family"] = socket.AF_UNSPEC
    elif msg_type == RTM_GETADDR:
        msg = ifaddrmsg()
        msg["family"] = socket.AF_UNSPEC
    elif msg_type == RTM_GETNEIGH:
        msg = ndmsg()
        msg["family"] = socket.AF_UNSPEC
    else:
        raise ValueError(f"no dump for message type {msg_type}")
    msg["header"]["type"] = msg_type
    msg["header"]["flags"] = NLM_F_REQUEST | NLM_F_DUMP
    msg["header"]["sequence_number"] = seq
    msg.encode()
    return bytes(msg.data)


@attrs.frozen
class Header:
    type: int
    flags: int
    seq: int
    start: int  # offset of the whole message in the buffer
    end: int


def iter_messages(buf: bytes) -> Iterator[Header]:
    """Split a datagram into netlink messages (stops at a truncated one)."""
    off = 0
    n = len(buf)
    while off + _HDR.size <= n:
        length, mtype, flags, seq, _pid = _HDR.unpack_from(buf, off)
        if length < _HDR.size or off + length > n:
            return
        yield Header(mtype, flags, seq, off, off + length)
        off += (length + 3) & ~3


def error_code(buf: bytes, h: Header) -> int:
    """The (positive) errno of an NLMSG_ERROR; 0 is an ack."""
    (err,) = _ERR.unpack_from(buf, h.start + _HDR.size)
    return -int(err)


@attrs.frozen
class AddrInfo:
    ip: IPAddress
    index: int
    prefixlen: int


def parse_addr(buf: bytes, h: Header) -> AddrInfo | None:
    """The local address of an RTM_NEWADDR/RTM_DELADDR (None if neither IPv4 nor IPv6)."""
    family, prefixlen, _flags, _scope, index = _IFADDR.unpack_from(buf, h.start + _HDR.size)
    if family == socket.AF_INET:
        alen = 8
    elif family == socket.AF_INET6:
        alen = 20
    else:
        return None
    off = h.start + _HDR.size + _IFADDR.size
    local: bytes | None = None
    address: bytes | None = None
    while off + _RTA.size <= h.end:
        rlen, rtype = _RTA.unpack_from(buf, off)
        if rlen < _RTA.size:
            break
        if rtype == IFA_LOCAL and rlen == alen:
            local = buf[off + 4 : off + alen]
        elif rtype == IFA_ADDRESS and rlen == alen:
            address = buf[off + 4 : off + alen]
        off += (rlen + 3) & ~3
    raw = local if local is not None else address
    if raw is None:
        return None
    return AddrInfo(ip_address(raw), index, prefixlen)


@attrs.frozen
class LinkInfo:
    index: int
    name: str
    up: bool
    mac: bytes
    #: ``IFF_RUNNING``: the kernel sees a carrier (operationally up).
    running: bool = False


def parse_links(chunks: list[bytes]) -> list[LinkInfo]:
    """Links from RTM_NEWLINK messages (dump replies or events)."""
    out: list[LinkInfo] = []
    marshal = MarshalRtnl()
    for chunk in chunks:
        for msg in marshal.parse(chunk):
            if msg["header"]["type"] != RTM_NEWLINK:
                continue
            name = msg.get_attr("IFLA_IFNAME")
            mac = msg.get_attr("IFLA_ADDRESS") or "00:00:00:00:00:00"
            if name is None:
                continue
            out.append(
                LinkInfo(
                    index=int(msg["index"]),
                    name=str(name),
                    up=bool(msg["flags"] & IFF_UP),
                    running=bool(msg["flags"] & IFF_RUNNING),
                    mac=bytes.fromhex(str(mac).replace(":", "")),
                )
            )
    return out


@attrs.frozen
class NeighInfo:
    index: int
    ip: IPAddress
    mac: bytes


#: NUD states that mean "a host answered at this MAC": REACHABLE, STALE, DELAY, PROBE, PERMANENT.
_NUD_KNOWN = 0x02 | 0x04 | 0x08 | 0x10 | 0x80


def parse_neighbours(chunks: list[bytes]) -> list[NeighInfo]:
    """Neighbours (ARP and NDP) with a link-layer address (failed/incomplete entries dropped)."""
    out: list[NeighInfo] = []
    marshal = MarshalRtnl()
    for chunk in chunks:
        for msg in marshal.parse(chunk):
            if msg["header"]["type"] != RTM_NEWNEIGH or msg["family"] not in (
                socket.AF_INET,
                socket.AF_INET6,
            ):
                continue
            if not msg["state"] & _NUD_KNOWN:
                continue
            dst = msg.get_attr("NDA_DST")
            lladdr = msg.get_attr("NDA_LLADDR")
            if dst is None or lladdr is None:
                continue
            mac = bytes.fromhex(str(lladdr).replace(":", ""))
            if len(mac) != 6:
                continue
            out.append(NeighInfo(index=int(msg["ifindex"]), ip=ip_address(str(dst)), mac=mac))
    return out
