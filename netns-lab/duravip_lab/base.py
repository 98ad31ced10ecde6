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
DURAVIP_NETS = (ipaddress.ip_network("10.1.1.0/24"), ipaddress.ip_network("10.1.2.0/24"))
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


def node_ip(i: int) -> str:
    """Main address of node ``n<i>``."""
    return f"10.1.0.{10 + i}"


def vip_ip(i: int) -> str:
    """Address of binding ``duravip-<i>``."""
    return f"10.1.1.{i}"


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
