"""The lab's network: namespaces, the bridge in its own switch namespace, veths, addresses.

Safety lives here: every namespace is named after the lab, and veth pairs
are created inside the switch namespace with the member end moved straight
into its namespace, so nothing ever appears in the root network namespace.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import shlex
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

from .base import (
    CLIENT_IP,
    CLIENT_IP6,
    DURAVIP_NETS,
    LAN6_PREFIXLEN,
    NAME_RE,
    SINK_IP,
    SINK_IP6,
    STATE_ROOT,
    LabError,
    LabSpec,
    in_duravip_ranges,
    list_namespaces,
    node_ip,
    node_ip6,
    run,
)


class Topology:
    """Names, paths and the wiring of one lab; knows nothing of the processes in it."""

    def __init__(self, name: str | None = None, state_root: Path | str | None = None) -> None:
        name = name or os.environ.get("LAB_NAME") or "dvl"
        if not NAME_RE.match(name):
            raise LabError(f"bad lab name {name!r}: want [a-z][a-z0-9]{{0,11}}")
        self.name = name
        self.state_root = Path(state_root) if state_root is not None else STATE_ROOT
        self.state_dir = self.state_root / name
        self._spec: LabSpec | None = None

    # --- naming ---

    @property
    def spec(self) -> LabSpec:
        if self._spec is None:
            try:
                data = json.loads((self.state_dir / "lab.json").read_text())
            except FileNotFoundError:
                raise LabError(
                    f"lab {self.name!r} is not up (no {self.state_dir}/lab.json)"
                ) from None
            self._spec = LabSpec(**data)
        return self._spec

    @property
    def nodes(self) -> list[str]:
        return [f"n{i}" for i in range(1, self.spec.nodes + 1)]

    @property
    def members(self) -> list[str]:
        """Everything plugged into the switch."""
        return [*self.nodes, "client", "sink"]

    def ns(self, member: str) -> str:
        """Namespace name of ``member`` (a node, ``client``, ``sink`` or ``sw``)."""
        if member not in (*self.members, "sw"):
            raise LabError(f"unknown member {member!r}; have {', '.join(self.members)}")
        return f"{self.name}-{member}"

    def ip(self, member: str) -> str:
        if member == "client":
            return CLIENT_IP
        if member == "sink":
            return SINK_IP
        self.ns(member)
        return node_ip(int(member[1:]))

    def ip6(self, member: str) -> str:
        """The member's IPv6 address on the bridge (every member is dual-stack)."""
        if member == "client":
            return CLIENT_IP6
        if member == "sink":
            return SINK_IP6
        self.ns(member)
        return node_ip6(int(member[1:]))

    def config_path(self, node: str) -> Path:
        self._node(node)
        return self.state_dir / node / f"{node}.conf"

    def control_socket(self, node: str) -> Path:
        self._node(node)
        return self.state_dir / node / "control.sock"

    def log_path(self, member: str) -> Path:
        return self.state_dir / member / ("sink.log" if member == "sink" else "daemon.log")

    @property
    def sink_log_path(self) -> Path:
        return self.state_dir / "sink" / "messages.jsonl"

    def _node(self, node: str) -> None:
        if node not in self.nodes:
            raise LabError(f"unknown node {node!r}; have {', '.join(self.nodes)}")

    def _owned_namespaces(self) -> list[str]:
        pat = re.compile(rf"^{re.escape(self.name)}-(sw|client|sink|n\d+)$")
        return [ns for ns in list_namespaces() if pat.match(ns)]

    def exists(self) -> bool:
        return self.state_dir.exists() or bool(self._owned_namespaces())

    # --- wiring ---

    def build_network(self) -> None:
        """Namespaces, ``br0`` in ``<name>-sw``, one veth per member, addresses, links up."""
        sw = self.ns("sw")
        for m in ("sw", *self.members):
            run(["ip", "netns", "add", self.ns(m)])
        batch = ["link set lo up", "link add br0 type bridge", "link set br0 up"]
        for m in self.members:
            batch += [
                f"link add p-{m} type veth peer name eth1 netns {self.ns(m)}",
                f"link set p-{m} master br0",
                f"link set p-{m} up",
            ]
        run(["ip", "-n", sw, "-batch", "-"], input="\n".join(batch) + "\n")
        # IPv6 inside the lab only: no DAD (an address is usable at once, as DuraVIPs
        # are with IFA_F_NODAD), and the bridge neither routes nor autoconfigures.
        self._sysctl(sw, "net.ipv6.conf.all.accept_dad=0", "net.ipv6.conf.default.accept_dad=0")
        for m in self.members:
            self._sysctl(
                self.ns(m),
                "net.ipv6.conf.all.accept_dad=0",
                "net.ipv6.conf.default.accept_dad=0",
                "net.ipv6.conf.eth1.accept_dad=0",
                "net.ipv6.conf.eth1.accept_ra=0",
                # Carrier loss (``link down``, the lab's crash) must not flush the
                # member's own IPv6 address and its on-link route, as Linux does by
                # default; IPv4 addresses stay too. Without it a revived node holds
                # its IPv6 VIPs but cannot answer the client.
                "net.ipv6.conf.eth1.keep_addr_on_down=1",
            )
            cmds = [
                "link set lo up",
                f"addr add {self.ip(m)}/16 dev eth1",
                f"addr add {self.ip6(m)}/{LAN6_PREFIXLEN} dev eth1 nodad",
                "link set eth1 up",
            ]
            run(["ip", "-n", self.ns(m), "-batch", "-"], input="\n".join(cmds) + "\n")

    def _sysctl(self, ns: str, *settings: str) -> None:
        """``sysctl -w`` inside ``ns`` (net.* is per namespace; never the root one)."""
        run(["ip", "netns", "exec", ns, "sysctl", "-q", "-w", *settings])

    def delete_namespaces(self) -> list[str]:
        """Delete exactly the namespaces named after this lab; returns the errors."""
        errors = []
        for ns in self._owned_namespaces():
            p = run(["ip", "netns", "delete", ns], check=False)
            if p.returncode != 0:
                errors.append(f"{ns}: {p.stderr.strip()}")
        return errors

    def link(self, member: str, up: bool) -> None:
        """Carrier on/off for the member; after ``up``, waits until the bridge forwards."""
        run(["ip", "-n", self.ns(member), "link", "set", "eth1", "up" if up else "down"])
        deadline = time.monotonic() + 3
        while up and self._port_state(member) != "forwarding":
            if time.monotonic() > deadline:
                raise LabError(f"bridge port p-{member} not forwarding 3 s after link up")
            time.sleep(0.005)

    def _port_state(self, member: str) -> str | None:
        out = run(["bridge", "-n", self.ns("sw"), "-j", "link", "show", "dev", f"p-{member}"])
        ports = json.loads(out.stdout or "[]")
        return str(ports[0].get("state")) if ports else None

    def link_up(self, member: str) -> bool:
        out = run(["ip", "-n", self.ns(member), "-j", "link", "show", "dev", "eth1"]).stdout
        return "UP" in json.loads(out)[0].get("flags", [])

    def flush_duravips(self, member: str) -> None:
        """Remove every DuraVIP-range address from the member's eth1 (as a reboot would)."""
        for net in DURAVIP_NETS:
            run(["ip", "-n", self.ns(member), "addr", "flush", "dev", "eth1", "to", str(net)])

    def holds(self, member: str) -> list[str]:
        """DuraVIP-range addresses (IPv4 first, then IPv6) present on the member's eth1."""
        out = run(["ip", "-n", self.ns(member), "-j", "addr", "show", "dev", "eth1"]).stdout
        found = []
        for link in json.loads(out or "[]"):
            for a in link.get("addr_info", []):
                if in_duravip_ranges(a["local"]):
                    found.append(a["local"])
        return sorted(found, key=lambda a: (":" in a, ipaddress.ip_address(a)))

    # --- running things inside ---

    def exec(
        self,
        member: str,
        argv: Sequence[str],
        *,
        check: bool = False,
        timeout: float | None = 60.0,
        capture: bool = True,
        input: str | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run ``argv`` inside the member's namespace and wait for it."""
        args = ["ip", "netns", "exec", self.ns(member), *argv]
        p = subprocess.run(
            args, text=True, capture_output=capture, timeout=timeout, input=input, check=False
        )
        if check and p.returncode != 0:
            raise LabError(f"{shlex.join(args)} failed ({p.returncode}): {p.stderr}")
        return p

    def nft(self, member: str, script: str) -> None:
        run(["ip", "netns", "exec", self.ns(member), "nft", "-f", "-"], input=script + "\n")
