"""Hypothesis strategies and builders shared by the election tests."""

from __future__ import annotations

from collections.abc import Mapping
from ipaddress import IPv4Address

from hypothesis import strategies as st

from duravip.election import NodeView, Override, VipClaim

NODES = [f"n{i}" for i in range(6)]
IPS = [IPv4Address(f"10.1.1.{i}") for i in range(1, 13)]


def view(
    node: str,
    vips: Mapping[IPv4Address, VipClaim],
    *,
    mature: bool = True,
    held: frozenset[IPv4Address] = frozenset(),
    overrides: Mapping[IPv4Address, Override] | None = None,
    version: int = 1,
) -> NodeView:
    return NodeView(
        node=node,
        version=version,
        mature=mature,
        held=held,
        vips=dict(vips),
        overrides=dict(overrides or {}),
    )


def uniform_claims(ips: list[IPv4Address], *, pref: Mapping[IPv4Address, str] | None = None):
    """One consistent claim per IP: IP i is binding "b<i>" with port 25."""
    pref = pref or {}
    return {
        ip: VipClaim(listener_ports=(25,), binding=f"b{int(ip) & 0xFF}", preference=pref.get(ip))
        for ip in ips
    }


claims_st = st.builds(
    VipClaim,
    listener_ports=st.sampled_from([(), (25,), (25, 587)]),
    binding=st.sampled_from([None, "alpha", "beta"]),
    preference=st.sampled_from([None, *NODES[:4], "ghost"]),
    follows=st.sampled_from([None, None, None, "alpha", "beta", "10.1.1.1"]),
)


@st.composite
def world(draw: st.DrawFn, *, consistent: bool = False, with_overrides: bool = True):
    """Random views and alive set. ``consistent``: nodes never disagree on a claim."""
    nodes = draw(st.lists(st.sampled_from(NODES), min_size=1, max_size=6, unique=True))
    base = {ip: draw(claims_st) for ip in IPS}
    if consistent:
        # keep binding names unique per IP so follows resolve to one IP
        base = {
            ip: VipClaim(
                c.listener_ports,
                None if c.binding is None else f"{c.binding}{int(ip) & 0xFF}",
                c.preference,
                None if c.follows is None else ("alpha1" if int(ip) & 0xFF != 1 else None),
            )
            for ip, c in base.items()
        }
    views: dict[str, NodeView] = {}
    for n in nodes:
        ips = draw(st.lists(st.sampled_from(IPS), unique=True, max_size=len(IPS)))
        vips = {
            ip: base[ip] if consistent or draw(st.booleans()) else draw(claims_st) for ip in ips
        }
        overrides: dict[IPv4Address, Override] = {}
        if with_overrides and draw(st.integers(0, 3)) == 0:
            ip = draw(st.sampled_from(IPS))
            overrides[ip] = Override(draw(st.sampled_from(NODES)), draw(st.integers(1, 3)))
        views[n] = view(n, vips, mature=draw(st.integers(0, 4)) > 0, overrides=overrides)
    alive = draw(st.lists(st.sampled_from(nodes), unique=True))
    return views, alive
