"""One name for "an IPv4 or IPv6 address" (DuraVIPs come in both families).

A leaf module (imports nothing from duravip) so every layer, including the
sans-IO cores, can use it. Mixed families do not compare (``IPv4Address <
IPv6Address`` raises), so sort address collections with :func:`ip_key`.
"""

from __future__ import annotations

from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network, ip_address

IPAddress = IPv4Address | IPv6Address
IPNetwork = IPv4Network | IPv6Network

__all__ = ["IPAddress", "IPNetwork", "ip_key", "parse_ip"]


def ip_key(ip: IPAddress) -> tuple[int, int]:
    """Sort key: IPv4 before IPv6, then numerically."""
    return (ip.version, int(ip))


def parse_ip(text: str) -> IPAddress:
    """``10.1.1.1`` or ``2001:db8::1`` (``[2001:db8::1]`` too); ValueError otherwise."""
    t = text.strip()
    if t.startswith("[") and t.endswith("]"):
        t = t[1:-1]
    return ip_address(t)
