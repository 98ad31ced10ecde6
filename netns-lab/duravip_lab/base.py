"""What every part of the lab shares: the address plan, the error type, process helpers.

Kept apart so that the config generator (no root, no namespaces) and the
topology, cluster and fault layers agree on one address plan without
importing each other.
"""

from __future__ import annotations

import ipaddress
import os
import re
import shlex
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

STATE_ROOT = Path(os.environ.get("LAB_STATE_ROOT", "/run/duravip-lab"))
#: The package directory: the stdlib-only helpers (sink, probe, standin) are
#: started from here by path, so they run under any interpreter.
PKG_DIR = Path(__file__).resolve().parent

#: The address ranges DuraVIPs live in; ``holds`` and ``revive`` look only here.
DURAVIP_NETS = (
    ipaddress.ip_network("10.1.1.0/24"),
    ipaddress.ip_network("10.1.2.0/24"),
    ipaddress.ip_network("2001:db8:1::/64"),
    ipaddress.ip_network("2001:db8:2::/64"),
)
#: IPv6 on the same bridge (every member is dual-stack): ``2001:db8::/32`` is on-link
#: (like 10.1.0.0/16), so the VIP networks 2001:db8:1::/64 and :2::/64 need no router.
LAN6_PREFIXLEN = 32
CLIENT_IP6 = "2001:db8::2"
SINK_IP6 = "2001:db8::3"
FOLLOW_IP6 = "2001:db8:2::1"
#: An IPv6 listener that follows the IPv4 binding duravip-1: ``Duravip_Follow`` across
#: families (``family=6`` labs).
CROSS_FOLLOW_IP6 = "2001:db8:2::4"
#: ... and an IPv4 listener that follows the IPv6 binding duravip6-1.
CROSS_FOLLOW_IP = "10.1.2.6"
POOL6 = (("pool6-a", "2001:db8:1::101"), ("pool6-b", "2001:db8:1::102"))
CLIENT_IP = "10.1.0.2"
SINK_IP = "10.1.0.3"
FOLLOW_IP = "10.1.2.1"
POOL = (("pool-a", "10.1.1.101"), ("pool-b", "10.1.1.102"))
GOSSIP_PORT = 4801
CLUSTER_PORT = 4802
METRICS_PORT = 9100

#: nftables tables the lab owns (inside its own namespaces only).
PART_TABLE = "dvlab_part"
LOSS_TABLE = "dvlab_loss"

NAME_RE = re.compile(r"^[a-z][a-z0-9]{0,11}$")
MAX_NODES = 200
MAX_VIPS = 100  # 10.1.1.1..100; 101 and 102 belong to the pool


class LabError(Exception):
    """A lab operation failed; the message says what and why."""


@dataclass
class LabSpec:
    """What ``lab up`` was asked for; stored as ``lab.json`` in the state dir."""

    name: str
    nodes: int = 3
    vips: int = 3
    profile: str = "fast"
    quorum: str = "none"
    daemon_cmd: str | None = None
    python: str = sys.executable
    #: 4: the IPv4 lab. 6: dual-stack DuraVIPs too: IPv6 VIPs, bindings ``duravip6-<k>``,
    #: IPv6 listeners and Topology (the network is always dual-stack; gossip stays IPv4).
    family: int = 4


def node_ip(i: int) -> str:
    """Main address of node ``n<i>``."""
    return f"10.1.0.{10 + i}"


def node_ip6(i: int) -> str:
    """IPv6 address of node ``n<i>`` on the bridge (not a DuraVIP)."""
    return f"2001:db8::{10 + i}"


def vip_ip(i: int) -> str:
    """Address of binding ``duravip-<i>``."""
    return f"10.1.1.{i}"


def vip_ip6(i: int) -> str:
    """Address of binding ``duravip6-<i>`` (``family=6`` labs)."""
    return f"2001:db8:1::{i}"


def vip_for(i: int, family: int = 4) -> str:
    """The ``i``-th DuraVIP of a family: what a script probes or crashes the holder of."""
    return vip_ip6(i) if family == 6 else vip_ip(i)


def hostport(ip: str, port: int) -> str:
    """``ip:port``, with brackets for IPv6 (the probe and the configs take this form)."""
    return f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"


def in_duravip_ranges(ip: str) -> bool:
    addr = ipaddress.ip_address(ip)
    return any(addr in net for net in DURAVIP_NETS)


def run(
    args: Sequence[str], *, check: bool = True, input: str | None = None, timeout: float = 30.0
) -> subprocess.CompletedProcess[str]:
    """Run a short tool (ip, nft, bridge) and raise ``LabError`` with its stderr on failure."""
    p = subprocess.run(
        list(args), input=input, text=True, capture_output=True, timeout=timeout, check=False
    )
    if check and p.returncode != 0:
        raise LabError(f"{shlex.join(args)} failed ({p.returncode}): {p.stderr.strip()}")
    return p


def proc_stat(pid: int) -> tuple[str, int] | None:
    """(state letter, start time in ticks) of a process, or None if it is gone.

    The start time is what makes a PID file safe: a recycled PID has another.
    """
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    fields = raw[raw.rindex(")") + 2 :].split()
    return fields[0], int(fields[19])


def list_namespaces() -> list[str]:
    """Names from ``ip netns list`` (first word of each line)."""
    out = run(["ip", "netns", "list"]).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]
