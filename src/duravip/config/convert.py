"""cattrs converters: config text values -> real types, and Config -> JSON.

One place knows how ``"10.1.0.11:4801"``, ``"500ms"``, ``"0600"`` or ``yes``
become Python values, so every stanza accepts the same spellings.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network, ip_address, ip_network
from pathlib import Path
from typing import Any, Final

import cattrs

from duravip.config.model import HostPort, SourceLoc
from duravip.ipaddr import IPAddress, IPNetwork

_TRUE: Final = frozenset({"true", "yes", "on", "1"})
_FALSE: Final = frozenset({"false", "no", "off", "0"})
_DURATION_RE: Final = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*(ms|s|m|h)?\s*$", re.IGNORECASE)
_UNIT_SECONDS: Final = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "": 1.0}
_INT_RE: Final = re.compile(r"^\s*[+-]?\d+\s*$")
_MODE_RE: Final = re.compile(r"^(?:0o?)?([0-7]{3,4})$", re.IGNORECASE)


def parse_bool(text: str) -> bool:
    low = text.strip().lower()
    if low in _TRUE:
        return True
    if low in _FALSE:
        return False
    raise ValueError(f"expected a boolean (true/false, yes/no, on/off, 1/0), got {text!r}")


def parse_duration(text: str) -> float:
    """Seconds: ``"2s"``, ``"500ms"``, ``"1.5"`` (bare numbers are seconds), ``"2m"``, ``"1h"``."""
    m = _DURATION_RE.match(text)
    if m is None:
        raise ValueError(f"expected a duration such as 2s, 500ms or 1.5, got {text!r}")
    return float(m.group(1)) * _UNIT_SECONDS[(m.group(2) or "").lower()]


def parse_int(text: str) -> int:
    if _INT_RE.match(text) is None:
        raise ValueError(f"expected an integer, got {text!r}")
    return int(text)


def parse_mode(text: str) -> int:
    """An octal file mode such as ``"0600"`` or ``"600"``."""
    m = _MODE_RE.match(text.strip())
    if m is None:
        raise ValueError(f"expected an octal file mode such as 0600, got {text!r}")
    return int(m.group(1), 8)


def parse_ipv4(text: str) -> IPAddress:
    """An IPv4 or IPv6 address (the name is kept for callers; both families are DuraVIPs).

    IPv6 addresses in ``::/96`` (IPv4-compatible, deprecated) are refused: the
    election keys IPs by their integer value, which would collide with IPv4.
    """
    t = text.strip()
    try:
        ip = ip_address(t)
    except ValueError as exc:
        raise ValueError(
            f"expected an IPv4 address such as 10.1.1.1 or an IPv6 address such as"
            f" 2001:db8::1, got {text!r}"
        ) from exc
    if ip.version == 6 and int(ip) >> 32 == 0:
        raise ValueError(f"IPv4-compatible IPv6 address {text!r} (in ::/96) is not supported")
    return ip


parse_ip = parse_ipv4


def parse_network(text: str) -> IPNetwork:
    try:
        return ip_network(text.strip())
    except ValueError as exc:
        try:
            ip_network(text.strip(), strict=False)
        except ValueError:
            raise ValueError(
                f"expected an IP network such as 10.1.1.0/24 or 2001:db8:1::/64, got {text!r}"
            ) from exc
        raise ValueError(f"{text!r} has host bits set; write the network address") from exc


def parse_hostport(text: str) -> HostPort:
    """``10.1.0.11:4801`` or ``[2001:db8::11]:4801`` (IPv6 needs the brackets)."""
    t = text.strip()
    if t.startswith("["):
        host, sep, port = t[1:].partition("]:")
        if not sep or not host:
            raise ValueError(f"expected [ipv6]:port such as [2001:db8::11]:4801, got {text!r}")
        if ":" not in host:
            raise ValueError(f"brackets are for IPv6 addresses only, got {text!r}")
    else:
        host, sep, port = t.rpartition(":")
        if not sep or not host:
            raise ValueError(f"expected ip:port such as 10.1.0.11:4801, got {text!r}")
        if ":" in host:
            raise ValueError(f"write an IPv6 endpoint as [address]:port, got {text!r}")
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"port must be 1..65535, got {port!r} in {text!r}")
    return HostPort(parse_ipv4(host), int(port))


def parse_path(text: str) -> Path:
    if not text.strip() or "\0" in text:
        raise ValueError(f"expected a file system path, got {text!r}")
    return Path(text)


def _hook(fn: Any) -> Any:
    def structure(value: Any, _type: Any) -> Any:
        if not isinstance(value, str):
            raise ValueError(f"expected a single value, got {value!r}")
        return fn(value)

    return structure


def _optional(hook: Any) -> Any:
    def structure(value: Any, type_: Any) -> Any:
        return None if value is None else hook(value, type_)

    return structure


def make_structure_converter() -> cattrs.Converter:
    """Converter from the raw strings of the stanza tree to typed values."""
    conv = cattrs.Converter()
    conv.register_structure_hook(bool, _hook(parse_bool))
    conv.register_structure_hook(float, _hook(parse_duration))
    conv.register_structure_hook(int, _hook(parse_int))
    ip_hook, net_hook = _hook(parse_ipv4), _hook(parse_network)
    conv.register_structure_hook_func(lambda t: t == IPAddress, ip_hook)
    conv.register_structure_hook_func(lambda t: t == IPAddress | None, _optional(ip_hook))
    conv.register_structure_hook_func(lambda t: t == IPNetwork, net_hook)
    for tp in (IPv4Address, IPv6Address):
        conv.register_structure_hook(tp, ip_hook)
    for net in (IPv4Network, IPv6Network):
        conv.register_structure_hook(net, net_hook)
    conv.register_structure_hook(HostPort, _hook(parse_hostport))
    conv.register_structure_hook(Path, _hook(parse_path))
    conv.register_structure_hook(str, _hook(str))
    return conv


def make_unstructure_converter() -> cattrs.Converter:
    """Converter from :class:`Config` to plain JSON types (IPs and paths as strings)."""
    conv = cattrs.Converter()
    for tp in (IPv4Address, IPv6Address, IPv4Network, IPv6Network, HostPort, Path, SourceLoc):
        conv.register_unstructure_hook(tp, str)
    conv.register_unstructure_hook_func(lambda t: t in (IPAddress, IPNetwork), str)

    def mapping(value: Mapping[Any, Any]) -> dict[str, Any]:
        return {str(k): conv.unstructure(v) for k, v in value.items()}

    conv.register_unstructure_hook_func(
        lambda t: (
            (isinstance(t, type) and issubclass(t, Mapping))
            or getattr(t, "__origin__", None) in (Mapping, dict)
        ),
        mapping,
    )
    return conv


STRUCTURE: Final = make_structure_converter()
UNSTRUCTURE: Final = make_unstructure_converter()
