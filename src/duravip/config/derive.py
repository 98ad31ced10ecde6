"""The DuraVIPs of a configuration, derived from its listeners and bindings (pure).

Which IPs are DuraVIPs, on which ports, for which binding, following whom
and with what preference; and which plain services are upgraded because
their IP is a DuraVIP for another service. No I/O and no diagnostics state:
the upgrades come back as ``info`` diagnostics.
"""

from __future__ import annotations

from ipaddress import ip_address

import attrs

from duravip.config.diagnostics import Diagnostic
from duravip.config.model import Binding, ClusterConfig, DuraVip, Listener
from duravip.ipaddr import IPAddress

__all__ = ["derive"]


def derive(
    listeners: list[Listener],
    bindings: list[Binding],
    cluster: ClusterConfig,
    held: set[IPAddress],
) -> tuple[list[Listener], list[Binding], dict[IPAddress, DuraVip], list[Diagnostic]]:
    """Work out every DuraVIP and upgrade the other services on its IP.

    Follow targets are resolved to binding names (by name or by IP);
    unresolvable ones are left as written for the validator to report.
    A plain service is upgraded only when its IP lies in a Topology block
    and is not one of the node's own addresses (``held``): otherwise the
    IP is the node's and the validator reports the clash instead. Each
    upgrade is returned as an ``info`` diagnostic.
    """
    notes: list[Diagnostic] = []
    nets = [t.network for t in cluster.topology]

    def upgradable(ip: IPAddress) -> bool:
        return ip not in held and any(ip in n for n in nets)

    by_name: dict[str, Binding] = {}
    for b in bindings:
        by_name.setdefault(b.name.lower(), b)
    by_ip: dict[IPAddress, Binding] = {}
    for b in bindings:
        if b.bind_address is not None:
            by_ip.setdefault(b.bind_address, b)

    resolved: list[Listener] = []
    for lst in listeners:
        follow = lst.duravip_follow
        if follow is not None:
            target = by_name.get(follow.lower())
            if target is None:
                try:
                    target = by_ip.get(ip_address(follow))
                except ValueError:
                    target = None
            if target is not None:
                lst = attrs.evolve(lst, duravip_follow=target.name)
        resolved.append(lst)

    vip_ips: set[IPAddress] = set()
    for lst in resolved:
        if lst.is_duravip:
            vip_ips.add(lst.address.host)
    for b in bindings:
        if b.enable_duravip and b.bind_address is not None:
            vip_ips.add(b.bind_address)

    out_listeners: list[Listener] = []
    ports: dict[IPAddress, list[int]] = {}
    follows: dict[IPAddress, str] = {}
    prefs: dict[IPAddress, str] = {}
    for lst in resolved:
        ip = lst.address.host
        if ip in vip_ips and (lst.is_duravip or upgradable(ip)):
            ports.setdefault(ip, []).append(lst.address.port)
            if not lst.is_duravip:
                notes.append(
                    Diagnostic(
                        "info",
                        lst.loc,
                        f"listener {lst.address} upgraded to DuraVIP: {ip} is a DuraVIP "
                        "for another service",
                    )
                )
                lst = attrs.evolve(lst, enable_duravip=True)
            if lst.duravip_follow is not None:
                follows.setdefault(ip, lst.duravip_follow)
            if lst.duravip_preference is not None:
                prefs.setdefault(ip, lst.duravip_preference)
        out_listeners.append(lst)

    out_bindings: list[Binding] = []
    names: dict[IPAddress, str] = {}
    for b in bindings:
        bip = b.bind_address
        if bip is not None and bip in vip_ips and (b.enable_duravip or upgradable(bip)):
            if not b.enable_duravip:
                notes.append(
                    Diagnostic(
                        "info",
                        b.loc,
                        f"binding '{b.name}' upgraded to DuraVIP: {bip} is a DuraVIP "
                        "for another service",
                    )
                )
                b = attrs.evolve(b, enable_duravip=True)
            names.setdefault(bip, b.name)
            if b.duravip_preference is not None:
                prefs[bip] = b.duravip_preference  # a binding's preference wins
        out_bindings.append(b)

    duravips = {
        ip: DuraVip(
            ip=ip,
            listener_ports=tuple(sorted(ports.get(ip, ()))),
            binding=names.get(ip),
            preference=prefs.get(ip),
            follows=follows.get(ip),
        )
        for ip in sorted(vip_ips, key=int)
    }
    return out_listeners, out_bindings, duravips, notes
