"""Views with IPv6 DuraVIPs: round trip, and IPv4-only views keep their old bytes."""

from __future__ import annotations

from ipaddress import ip_address

from duravip.config import HostPort
from duravip.election.view import NodeView, Override, VipClaim, decode, encode

V4 = [ip_address(f"10.1.1.{i}") for i in range(1, 4)]
V6 = [ip_address(f"2001:db8:1::{i:x}") for i in range(1, 4)]


def view(**kw: object) -> NodeView:
    base: dict[str, object] = {
        "node": "n1",
        "version": 7,
        "mature": True,
        "held": frozenset(),
        "vips": {},
    }
    base.update(kw)
    return NodeView(**base)  # type: ignore[arg-type]


def test_dual_stack_round_trip() -> None:
    claim = VipClaim((25,), "b6", "n1", None)
    follow = VipClaim((25,), None, None, "b6")
    v = view(
        held=frozenset([V4[0], V6[0], V6[2]]),
        vips={**dict.fromkeys(V4, follow), **dict.fromkeys(V6, claim)},
        mmove_addr=HostPort(ip_address("2001:db8::11"), 4802),
        overrides={V6[1]: Override("n2", 3), V4[1]: Override("n3", 4)},
        status="draining",
        yields=frozenset([V6[1], V4[2]]),
    )
    back = decode(encode(v))
    assert back.held == v.held
    assert dict(back.vips) == v.vips
    assert back.mmove_addr == v.mmove_addr
    assert dict(back.overrides) == v.overrides
    assert back.yields == v.yields


def test_ipv6_only_round_trip() -> None:
    v = view(held=frozenset(V6), vips=dict.fromkeys(V6, VipClaim((25,))))
    back = decode(encode(v))
    assert back.held == v.held and dict(back.vips) == v.vips and back.mmove_addr is None


def test_ipv4_only_view_has_no_ipv6_flag() -> None:
    v = view(
        held=frozenset(V4),
        vips=dict.fromkeys(V4, VipClaim((25,))),
        mmove_addr=HostPort(V4[0], 4802),
    )
    import zlib

    body = zlib.decompress(encode(v)[4:])
    # node name (2 + 2 bytes), then version (8) and the flags byte
    assert body[4 + 8] & 8 == 0
    assert decode(encode(v)).mmove_addr == HostPort(V4[0], 4802)
