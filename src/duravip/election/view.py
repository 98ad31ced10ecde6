"""What one node announces about the DuraVIPs it manages, and its wire form.

A view is gossiped as SWIM meta and fetched over TCP when stale, so the
encoding must stay small for 10,240 DuraVIPs: IPs are sorted and
delta-coded, identical per-IP claims share one entry of a claim table, and the
whole body is zlib-compressed (see ``docs/election.md`` for measured sizes).

Views decoded from nodes with the same DuraVIP configuration share one
``vips`` mapping object (interned by content digest); the election uses that
identity to check claims once per distinct configuration instead of once per
node.
"""

from __future__ import annotations

import struct
import sys
import zlib
from array import array
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from ipaddress import IPv6Address, ip_address
from types import MappingProxyType

import xxhash
from attrs import Factory, frozen

from duravip.config import Config, HostPort
from duravip.ipaddr import IPAddress

__all__ = [
    "NodeView",
    "Override",
    "ViewDecodeError",
    "VipClaim",
    "build_view",
    "decode",
    "encode",
]

_MAGIC = b"DVV\x01"
#: Refuse to inflate more than this (a zip bomb must not eat the daemon).
_MAX_INFLATED = 16 * 1024 * 1024
_LITTLE = sys.byteorder == "little"
_VIPS_CACHE_SIZE = 64


class ViewDecodeError(ValueError):
    """The bytes are not a valid encoded view (any kind of damage)."""


@frozen
class VipClaim:
    """What one node's config says about one DuraVIP (mirrors ``config.DuraVip``)."""

    listener_ports: tuple[int, ...] = ()
    binding: str | None = None
    preference: str | None = None
    #: Binding name (or IP text) a ``Duravip_Follow`` listener on this IP follows.
    follows: str | None = None


@frozen
class Override:
    """An admin ``move IP to NODE``: honoured while ``target`` is a candidate.

    Across views the override with the highest ``seq`` wins (ties: the greater
    announcing node name).
    """

    target: str
    seq: int


@frozen
class NodeView:
    """One node's announcement. ``vips`` must be treated as immutable."""

    node: str
    version: int
    mature: bool
    held: frozenset[IPAddress]
    vips: Mapping[IPAddress, VipClaim]
    mmove_addr: HostPort | None = None
    overrides: Mapping[IPAddress, Override] = Factory(dict)
    #: Wall-clock time (``time.time()``) the node loaded its current config.
    config_stable_since: float = 0.0
    #: Wall-clock time the node's daemon started.
    booted_at: float = 0.0
    #: Why a started node is no candidate (``drained``, ``unhealthy: smtp``);
    #: empty when it is one or only immature. For the console of every node.
    status: str = ""
    #: IPs this candidate does not take from a live holder now (``preempt``).
    yields: frozenset[IPAddress] = frozenset()
    #: Wall-clock time its delayed yields end (0: none pending).
    failback_at: float = 0.0


# ---------------------------------------------------------------- building


_VIPS_CACHE: OrderedDict[bytes, Mapping[IPAddress, VipClaim]] = OrderedDict()


def _intern_vips(
    section: bytes, make: Mapping[IPAddress, VipClaim] | None
) -> Mapping[IPAddress, VipClaim] | None:
    """Return the shared mapping for this vips section (or store ``make``)."""
    key = xxhash.xxh3_128_digest(section)
    hit = _VIPS_CACHE.get(key)
    if hit is not None:
        _VIPS_CACHE.move_to_end(key)
        return hit
    if make is not None:
        make = MappingProxyType(dict(make))  # shared between views: read-only
        _VIPS_CACHE[key] = make
        while len(_VIPS_CACHE) > _VIPS_CACHE_SIZE:
            _VIPS_CACHE.popitem(last=False)
    return make


def intern_vips(vips: Mapping[IPAddress, VipClaim]) -> Mapping[IPAddress, VipClaim]:
    """The shared mapping object equal to ``vips`` (so views can share it).

    Equal claims inside the result are one object, as after :func:`decode`.
    """
    section = _encode_vips(vips)
    shared = _intern_vips(section, None)
    if shared is None:
        shared = _intern_vips(section, _decode_vips(_Reader(section)))
    assert shared is not None
    return shared


def build_view(
    config: Config,
    *,
    version: int,
    mature: bool,
    held: Iterable[IPAddress] = (),
    overrides: Mapping[IPAddress, Override] | None = None,
    config_stable_since: float = 0.0,
    booted_at: float = 0.0,
) -> NodeView:
    """This node's view from its configuration (``config.duravips``)."""
    vips = {
        ip: VipClaim(
            listener_ports=tuple(sorted(d.listener_ports)),
            binding=d.binding,
            preference=d.preference,
            follows=d.follows,
        )
        for ip, d in config.duravips.items()
    }
    return NodeView(
        node=config.cluster.node_name,
        version=version,
        mature=mature,
        held=frozenset(held),
        vips=intern_vips(vips),
        mmove_addr=config.cluster_listener,
        overrides=dict(overrides or {}),
        config_stable_since=config_stable_since,
        booted_at=booted_at,
    )


# ---------------------------------------------------------------- encoding


def _u32_array(values: Iterable[int]) -> bytes:
    arr = array("I", values)
    if not _LITTLE:
        arr.byteswap()
    return arr.tobytes()


def _deltas(ips: Iterable[IPAddress]) -> list[int]:
    out: list[int] = []
    prev = 0
    for n in sorted(int(ip) for ip in ips):
        out.append(n - prev)
        prev = n
    return out


def _split(ips: Iterable[IPAddress]) -> tuple[list[IPAddress], list[IPAddress]]:
    """(IPv4, IPv6), each sorted. IPv6 travels in extra sections old decoders never see."""
    v4: list[IPAddress] = []
    v6: list[IPAddress] = []
    for ip in ips:
        (v4 if ip.version == 4 else v6).append(ip)
    return sorted(v4, key=int), sorted(v6, key=int)


def _v6_array(ips: list[IPAddress]) -> bytes:
    return struct.pack("<I", len(ips)) + b"".join(ip.packed for ip in ips)


def _put_str(out: list[bytes], s: str) -> None:
    raw = s.encode()
    if len(raw) > 0xFFFF:
        raise ValueError("string too long for a view")
    out.append(struct.pack("<H", len(raw)))
    out.append(raw)


def _encode_vips(vips: Mapping[IPAddress, VipClaim]) -> bytes:
    strings: dict[str, int] = {}
    claims: dict[VipClaim, int] = {}

    def sidx(s: str | None) -> int:
        if s is None:
            return 0
        return strings.setdefault(s, len(strings)) + 1

    order, order6 = _split(vips)
    claim_idx: list[int] = []
    for ip in order + order6:
        c = vips[ip]
        i = claims.get(c)
        if i is None:
            i = claims[c] = len(claims)
        claim_idx.append(i)
    claim_rows: list[bytes] = []
    for c in claims:
        if len(c.listener_ports) > 255:
            raise ValueError("too many listener ports on one DuraVIP")
        claim_rows.append(
            struct.pack(
                f"<B{len(c.listener_ports)}HIII",
                len(c.listener_ports),
                *c.listener_ports,
                sidx(c.binding),
                sidx(c.preference),
                sidx(c.follows),
            )
        )
    out: list[bytes] = [struct.pack("<I", len(strings))]
    for s in strings:
        _put_str(out, s)
    out.append(struct.pack("<I", len(claims)))
    out.extend(claim_rows)
    out.append(struct.pack("<I", len(order)))
    out.append(_u32_array(_deltas(order)))
    out.append(_u32_array(claim_idx[: len(order)]))
    if order6:  # IPv6 DuraVIPs: a tail after the IPv4 ones (absent when there are none)
        out.append(_v6_array(order6))
        out.append(_u32_array(claim_idx[len(order) :]))
    return b"".join(out)


def encode(view: NodeView) -> bytes:
    """The compact wire form of ``view`` (see :func:`decode`)."""
    body: list[bytes] = []
    _put_str(body, view.node)
    operator = bool(view.status or view.yields or view.failback_at)
    mmove4 = view.mmove_addr is not None and view.mmove_addr.host.version == 4
    held4, held6 = _split(view.held)
    yields4, yields6 = _split(view.yields)
    ov4, ov6 = _split(view.overrides)
    v6 = bool(held6 or yields6 or ov6) or (view.mmove_addr is not None and not mmove4)
    flags = (
        (1 if view.mature else 0)
        | (2 if mmove4 else 0)
        | (4 if operator else 0)
        | (8 if v6 else 0)
    )
    body.append(struct.pack("<QB", view.version, flags))
    if view.mmove_addr is not None and mmove4:
        body.append(struct.pack("<IH", int(view.mmove_addr.host), view.mmove_addr.port))
    body.append(struct.pack("<dd", view.config_stable_since, view.booted_at))
    if operator:
        _put_str(body, view.status)
        body.append(struct.pack("<dI", view.failback_at, len(yields4)))
        body.append(_u32_array(_deltas(yields4)))
    section = _encode_vips(view.vips)
    body.append(struct.pack("<I", len(section)))
    body.append(section)
    body.append(struct.pack("<I", len(held4)))
    body.append(_u32_array(_deltas(held4)))
    body.append(struct.pack("<I", len(ov4)))
    for ip in ov4:
        ov = view.overrides[ip]
        body.append(struct.pack("<IQ", int(ip), ov.seq))
        _put_str(body, ov.target)
    if v6:  # flag 8: the IPv6 parts (mmove address, held, yields, overrides)
        m = view.mmove_addr
        if m is not None and not mmove4:
            body.append(struct.pack("<B16sH", 1, m.host.packed, m.port))
        else:
            body.append(b"\0")
        body.append(_v6_array(held6))
        body.append(_v6_array(yields6))
        body.append(struct.pack("<I", len(ov6)))
        for ip in ov6:
            ov = view.overrides[ip]
            body.append(struct.pack("<16sQ", ip.packed, ov.seq))
            _put_str(body, ov.target)
    return _MAGIC + zlib.compress(b"".join(body), 6)


# ---------------------------------------------------------------- decoding


class _Reader:
    """Bounds-checked cursor over the inflated body."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def take(self, n: int) -> bytes:
        if n < 0 or self.pos + n > len(self.data):
            raise ViewDecodeError("truncated view")
        out = self.data[self.pos : self.pos + n]
        self.pos += n
        return out

    def unpack(self, fmt: str) -> tuple[int | float, ...]:
        st = struct.Struct(fmt)
        return st.unpack(self.take(st.size))

    def u32(self) -> int:
        (v,) = struct.unpack("<I", self.take(4))
        return int(v)

    def text(self) -> str:
        (n,) = struct.unpack("<H", self.take(2))
        try:
            return self.take(int(n)).decode()
        except UnicodeDecodeError as exc:
            raise ViewDecodeError("bad UTF-8 in view") from exc

    def u32_array(self, count: int) -> list[int]:
        arr = array("I")
        arr.frombytes(self.take(4 * count))
        if not _LITTLE:
            arr.byteswap()
        return arr.tolist()


def _undelta(deltas: list[int]) -> list[IPAddress]:
    out: list[IPAddress] = []
    cur = 0
    for i, d in enumerate(deltas):
        if i > 0 and d == 0:
            raise ViewDecodeError("duplicate IP in view")
        cur += d
        if cur > 0xFFFFFFFF:
            raise ViewDecodeError("IP out of range")
        out.append(ip_address(cur))
    return out


def _v6_list(r: _Reader) -> list[IPAddress]:
    n = r.u32()
    if 16 * n > len(r.data):
        raise ViewDecodeError("IPv6 count too large")
    raw = r.take(16 * n)
    out: list[IPAddress] = [IPv6Address(raw[i : i + 16]) for i in range(0, 16 * n, 16)]
    if len(set(out)) != n:
        raise ViewDecodeError("duplicate IP in view")
    return out


def _decode_vips(r: _Reader) -> Mapping[IPAddress, VipClaim]:
    nstrings = r.u32()
    if nstrings > len(r.data):
        raise ViewDecodeError("string table too large")
    strings = [r.text() for _ in range(nstrings)]

    def sref(i: int) -> str | None:
        if i == 0:
            return None
        if i > nstrings:
            raise ViewDecodeError("bad string reference")
        return strings[i - 1]

    nclaims = r.u32()
    if nclaims > len(r.data):
        raise ViewDecodeError("claim table too large")
    claims: list[VipClaim] = []
    for _ in range(nclaims):
        (nports,) = r.unpack("<B")
        ports = tuple(int(p) for p in r.unpack(f"<{int(nports)}H"))
        b, p, f = (int(x) for x in r.unpack("<III"))
        claims.append(VipClaim(ports, sref(b), sref(p), sref(f)))
    nvips = r.u32()
    if 8 * nvips > len(r.data):
        raise ViewDecodeError("vip count too large")
    ips = _undelta(r.u32_array(nvips))
    idx = r.u32_array(nvips)
    if r.pos < len(r.data):  # the IPv6 tail
        ips6 = _v6_list(r)
        ips.extend(ips6)
        idx.extend(r.u32_array(len(ips6)))
    if idx and max(idx) >= nclaims:
        raise ViewDecodeError("bad claim reference")
    return dict(zip(ips, [claims[i] for i in idx], strict=True))


def decode(data: bytes) -> NodeView:
    """Parse :func:`encode` output; any damage raises :class:`ViewDecodeError`."""
    if not data.startswith(_MAGIC):
        raise ViewDecodeError("not a duravip view (bad magic)")
    inflater = zlib.decompressobj()
    try:
        body = inflater.decompress(data[len(_MAGIC) :], _MAX_INFLATED)
    except zlib.error as exc:
        raise ViewDecodeError(f"bad compression: {exc}") from exc
    if inflater.unconsumed_tail or not inflater.eof or inflater.unused_data:
        raise ViewDecodeError("view is truncated, too large or has trailing bytes")
    r = _Reader(body)
    node = r.text()
    version, flags = (int(x) for x in r.unpack("<QB"))
    if flags & ~15:
        raise ViewDecodeError("unknown view flags")
    mmove: HostPort | None = None
    if flags & 2:
        host, port = (int(x) for x in r.unpack("<IH"))
        mmove = HostPort(ip_address(host), port)
    stable_since, booted_at = (float(x) for x in r.unpack("<dd"))
    status, failback_at, yields = "", 0.0, frozenset[IPAddress]()
    if flags & 4:
        status = r.text()
        failback_at, nyields = r.unpack("<dI")
        if 4 * int(nyields) > len(body):
            raise ViewDecodeError("yield count too large")
        yields = frozenset(_undelta(r.u32_array(int(nyields))))
    section = r.take(r.u32())
    shared = _intern_vips(section, None)
    if shared is None:
        vr = _Reader(section)
        vips = _decode_vips(vr)
        if vr.pos != len(section):
            raise ViewDecodeError("trailing bytes in vips section")
        shared = _intern_vips(section, vips)
        assert shared is not None
    nheld = r.u32()
    if 4 * nheld > len(body):
        raise ViewDecodeError("held count too large")
    held = frozenset(_undelta(r.u32_array(nheld)))
    nov = r.u32()
    overrides: dict[IPAddress, Override] = {}
    for _ in range(nov):
        ip, seq = (int(x) for x in r.unpack("<IQ"))
        overrides[ip_address(ip)] = Override(r.text(), seq)
    if len(overrides) != nov:
        raise ViewDecodeError("duplicate override")
    if flags & 8:
        (has6,) = r.unpack("<B")
        if has6:
            raw6, port6 = r.unpack("<16sH")
            assert isinstance(raw6, bytes)
            mmove = HostPort(IPv6Address(raw6), int(port6))
        held = held | frozenset(_v6_list(r))
        yields = yields | frozenset(_v6_list(r))
        nov6 = r.u32()
        for _ in range(nov6):
            raw6, seq6 = r.unpack("<16sQ")
            assert isinstance(raw6, bytes)
            overrides[IPv6Address(raw6)] = Override(r.text(), int(seq6))
        if len(overrides) != nov + nov6:
            raise ViewDecodeError("duplicate override")
    if r.pos != len(body):
        raise ViewDecodeError("trailing bytes in view")
    return NodeView(
        node=node,
        version=version,
        mature=bool(flags & 1),
        held=held,
        vips=shared,
        mmove_addr=mmove,
        overrides=overrides,
        config_stable_since=stable_since,
        booted_at=booted_at,
        status=status,
        yields=yields,
        failback_at=float(failback_at),
    )
