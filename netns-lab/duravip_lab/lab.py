"""``Lab``: one named lab, its whole life cycle (up, down) and what an operator looks at.

The layers below it are split by concern: ``topology`` (namespaces, bridge,
addresses), ``cluster`` (state dir, configs, processes), ``faults``
(process and nftables faults). ``Lab`` adds building and tearing down the
whole, probing from the client and the status report.
"""

from __future__ import annotations

import ipaddress
import json
import os
import shutil
import sys
from typing import Any

from .base import (
    CLIENT_IP,
    MAX_NODES,
    MAX_VIPS,
    PKG_DIR,
    SINK_IP,
    LabError,
    LabSpec,
    hostport,
    vip_for,
)
from .config import scan_config
from .faults import Faults


class Lab(Faults):
    """One named lab. Cheap to construct; ``up`` builds it, ``down`` removes it."""

    def up(
        self,
        nodes: int = 3,
        vips: int = 3,
        profile: str = "fast",
        quorum: str = "none",
        daemon_cmd: str | None = None,
        python: str | None = None,
        family: int = 4,
    ) -> Lab:
        """Build namespaces, bridge, configs and keyring, and start the sink.

        The network is always dual-stack; ``family=6`` adds IPv6 DuraVIPs to the
        configs (``duravip6-<k>`` at ``2001:db8:1::<k>``, see ``vip``).

        On any failure everything made so far is removed before the error propagates.
        """
        if not 1 <= nodes <= MAX_NODES:
            raise LabError(f"--nodes must be 1..{MAX_NODES}")
        if not 1 <= vips <= MAX_VIPS:
            raise LabError(f"--vips must be 1..{MAX_VIPS}")
        if profile not in ("fast", "lan", "wan"):
            raise LabError("--profile must be fast, lan or wan")
        if quorum not in ("none", "majority"):
            raise LabError("--quorum must be none or majority")
        if family not in (4, 6):
            raise LabError("--family must be 4 or 6")
        if os.geteuid() != 0:
            raise LabError("the lab needs root (network namespaces)")
        if self.exists():
            raise LabError(f"lab {self.name!r} already exists; run `lab down --name {self.name}`")
        spec = LabSpec(
            self.name, nodes, vips, profile, quorum, daemon_cmd, python or sys.executable, family
        )
        try:
            self.write_state(spec)
            self.build_network()
            self.start_sink()
        except BaseException:
            self.down()
            raise
        return self

    def down(self) -> None:
        """Remove everything this lab made. Safe twice and after a half-failed ``up``."""
        self.kill_all()
        errors = self.delete_namespaces()
        if self.state_dir.exists():
            shutil.rmtree(self.state_dir)
        self._spec = None
        if errors:
            raise LabError("could not delete namespaces: " + "; ".join(errors))

    def probe(
        self,
        ip: str,
        port: int = 25,
        interval: float = 0.02,
        seconds: float = 5.0,
        timeout: float = 0.5,
        until_ok: bool = False,
    ) -> list[dict[str, Any]]:
        """From the client: connect every ``interval`` for ``seconds``, read the banner.

        ``ip`` may be IPv6 (e.g. ``lab.vip(1, family=6)``).
        """
        argv = [
            self.spec.python, str(PKG_DIR / "probe.py"), hostport(ip, port),
            "--interval", str(interval), "--seconds", str(seconds), "--timeout", str(timeout),
            *(["--until-ok"] if until_ok else []),
        ]  # fmt: skip
        p = self.exec("client", argv, check=True, timeout=seconds + timeout + 30)
        recs = [json.loads(line) for line in p.stdout.splitlines() if line.strip()]
        return sorted(recs, key=lambda r: r["t"])  # concurrent tries finish out of order

    def vip(self, k: int = 1, family: int | None = None) -> str:
        """The ``k``-th DuraVIP (binding ``duravip-<k>``, or ``duravip6-<k>`` for family 6).

        ``family`` defaults to the lab's: a script given ``--family 6`` builds the lab with
        ``up(family=6)`` and then probes ``lab.vip(1)`` and crashes its holder.
        """
        fam = self.spec.family if family is None else family
        if fam == 6 and self.spec.family != 6:
            raise LabError("this lab has no IPv6 DuraVIPs; build it with up(family=6)")
        return vip_for(k, fam)

    def status(self) -> dict[str, Any]:
        spec = self.spec
        bindings: dict[str, str] = {}
        listeners: dict[str, dict[str, Any]] = {}
        vips: set[str] = set()
        nodes: dict[str, Any] = {}
        for node in self.nodes:
            try:
                scanned = scan_config(self.config_path(node).read_text())
            except FileNotFoundError:
                scanned = {"bindings": {}, "listeners": {}, "vips": set()}
            bindings.update(scanned["bindings"])
            listeners.update(scanned["listeners"])
            vips |= scanned["vips"]
            pid = self.pid(node)
            nodes[node] = {
                "ip": self.ip(node),
                "running": pid is not None,
                "pid": pid,
                "state": self.proc_state(node),
                "link_up": self.link_up(node),
                "holds": self.holds(node),
            }
        return {
            "name": self.name,
            "state_dir": str(self.state_dir),
            "profile": spec.profile,
            "quorum": spec.quorum,
            "nodes": nodes,
            "sink": {"ip": SINK_IP, "running": self.running("sink"), "pid": self.pid("sink")},
            "client": {"ip": CLIENT_IP},
            "family": spec.family,
            "vips": sorted(vips, key=lambda a: (":" in a, ipaddress.ip_address(a))),
            "bindings": bindings,
            "listeners": listeners,
        }
