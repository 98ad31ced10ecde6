"""``duravip check-config``: the ``nginx -t`` of duravip.

Prints a short summary of what the node would manage and exits 0, or prints
every error (and warning) as ``file:line:col: severity: message`` and exits 1.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Iterable, Iterator
from typing import TextIO

from duravip.config.diagnostics import Diagnostic
from duravip.config.loader import check, to_jsonable
from duravip.config.model import Config, DuraVip
from duravip.ipaddr import IPAddress

#: Above this many DuraVIPs the summary shows ranges instead of one line each.
DETAIL_LIMIT = 20


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("file", metavar="FILE", help="configuration file to check")
    parser.add_argument("--json", action="store_true", help="print the structured config as JSON")
    parser.add_argument(
        "--node-name", metavar="NAME", help="check as this node (default: node_name or hostname)"
    )


def run(args: argparse.Namespace) -> int:
    try:
        return _run(args)
    except BrokenPipeError:
        # Output piped into ``head`` and friends: stop quietly, like other tools.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 1


def _run(args: argparse.Namespace) -> int:
    result = check(args.file, node_name=args.node_name)
    shown = [d for d in result.diagnostics if d.severity != "info" or result.config is not None]
    if result.config is None:
        _print_diagnostics(shown, sys.stderr)
        n = len(result.errors)
        print(f"{args.file}: {n} error{'s' if n != 1 else ''}", file=sys.stderr)
        return 1
    if args.json:
        _print_diagnostics(shown, sys.stderr)
        json.dump(to_jsonable(result.config), sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        _print_diagnostics(shown, sys.stdout)
        for line in summary(result.config):
            print(line)
    return 0


def _print_diagnostics(diags: Iterable[Diagnostic], out: TextIO) -> None:
    for d in diags:
        print(d, file=out)


def summary(config: Config) -> Iterator[str]:
    """Human summary lines: node, cluster, then the DuraVIPs (ranges when many)."""
    c = config.cluster
    yield f"config {config.source}: ok"
    yield f"node {c.node_name} in cluster {c.name!r}, profile {c.profile}, quorum {c.quorum}"
    yield f"gossip {c.gossip_address}, peers: {' '.join(map(str, c.peers)) or '-'}"
    plain = [str(lst.address) for lst in config.listeners if not lst.is_duravip]
    yield f"plain listeners: {' '.join(plain) or '-'}"
    vips = list(config.duravips.values())
    yield f"{len(vips)} DuraVIPs"
    if len(vips) <= DETAIL_LIMIT:
        for d in vips:
            yield "  " + _vip_line(config, d)
    else:
        yield from ("  " + line for line in _ranges(config, vips))


def _iface(config: Config, ip: IPAddress) -> str:
    t = config.topology_for(ip)
    return f"{t.interface}/{t.cidrmask}" if t is not None else "no topology"


def _vip_line(config: Config, d: DuraVip) -> str:
    services = [f"smtp:{p}" for p in d.listener_ports]
    if d.binding is not None:
        services.append(f"binding {d.binding}")
    parts = [f"{d.ip!s:<15}", ", ".join(services) or "-"]
    if d.preference is not None:
        parts.append(f"prefer {d.preference}")
    if d.follows is not None:
        parts.append(f"follows {d.follows}")
    parts.append(f"on {_iface(config, d.ip)}")
    return "  ".join(parts)


def _ranges(config: Config, vips: list[DuraVip]) -> Iterator[str]:
    """Runs of consecutive IPs sharing an interface and kind of service."""

    def kind(d: DuraVip) -> tuple[str, str, bool, bool]:
        return (
            _iface(config, d.ip),
            ",".join(map(str, d.listener_ports)),
            d.binding is not None,
            d.follows is not None,
        )

    run: list[DuraVip] = []
    for d in vips:
        if run and (int(d.ip) != int(run[-1].ip) + 1 or kind(d) != kind(run[-1])):
            yield _range_line(run, kind(run[0]))
            run = []
        run.append(d)
    if run:
        yield _range_line(run, kind(run[0]))


def _range_line(run: list[DuraVip], k: tuple[str, str, bool, bool]) -> str:
    iface, ports, binding, follows = k
    span = str(run[0].ip) if len(run) == 1 else f"{run[0].ip}-{run[-1].ip}"
    what = []
    if ports:
        what.append(f"smtp:{ports}")
    if binding:
        what.append("bindings")
    if follows:
        what.append("follow")
    prefs = len({d.preference for d in run if d.preference is not None})
    pref = f", {prefs} preferred nodes" if prefs else ""
    return f"{span} ({len(run)}): {'+'.join(what) or '-'}{pref} on {iface}"
