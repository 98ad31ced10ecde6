"""The duravip netns lab: a whole cluster on one host, built from network namespaces.

Why a package and not only a command: pytest fixtures, the demo, the chaos
run and the benchmarks drive the same ``Lab`` class the ``lab`` command uses,
so what a test does by hand an operator can redo from a shell, step for step.
It is installed with the project (``pip install -e .[test]``), so
``import duravip_lab`` works from anywhere, with no path tricks.

Modules, by concern:

- ``base``: the address plan, ``LabError``, ``LabSpec``, process helpers;
- ``config``: the node configs, generated and scanned back (no root);
- ``topology``: namespaces, the bridge in its own switch namespace, veths, addresses;
- ``cluster``: state dir, keyring, daemons and sink started and stopped by PID;
- ``faults``: kill, crash, revive, pause; partition and loss via nftables;
- ``lab``: ``Lab``, the whole life cycle, probe and status;
- ``cli``: the ``lab`` command;
- ``scenario``: watching a running lab (holders, convergence, probes, mail);
- ``bench``: what the benchmarks and the chaos run share, and their in-namespace helpers;
- ``sink``, ``probe``, ``standin``: standard-library-only helpers run inside namespaces.

Everything the lab creates carries its name as a prefix (namespaces
``<name>-sw``, ``<name>-n1``..., ``<name>-client``, ``<name>-sink``) and its
state lives in ``/run/duravip-lab/<name>/``. Nothing is ever added to the root
network namespace.
"""

from __future__ import annotations

from .base import (
    CLIENT_IP,
    CLUSTER_PORT,
    DURAVIP_NETS,
    FOLLOW_IP,
    GOSSIP_PORT,
    LOSS_TABLE,
    MAX_NODES,
    MAX_VIPS,
    METRICS_PORT,
    PART_TABLE,
    POOL,
    SINK_IP,
    STATE_ROOT,
    LabError,
    LabSpec,
    in_duravip_ranges,
    list_namespaces,
    node_ip,
    vip_ip,
)
from .cli import build_parser, main
from .config import render_config, scan_config
from .lab import Lab

__all__ = [
    "CLIENT_IP",
    "CLUSTER_PORT",
    "DURAVIP_NETS",
    "FOLLOW_IP",
    "GOSSIP_PORT",
    "LOSS_TABLE",
    "MAX_NODES",
    "MAX_VIPS",
    "METRICS_PORT",
    "PART_TABLE",
    "POOL",
    "SINK_IP",
    "STATE_ROOT",
    "Lab",
    "LabError",
    "LabSpec",
    "build_parser",
    "in_duravip_ranges",
    "list_namespaces",
    "main",
    "node_ip",
    "render_config",
    "scan_config",
    "vip_ip",
]
