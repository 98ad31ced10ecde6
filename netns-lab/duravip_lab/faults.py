"""The faults a lab injects: kill, crash, revive, pause, resume; partition and loss via nftables.

Each recipe imitates what really happens to a host or a network (see
docs/lab.md for why each is built the way it is). nftables tables exist only
inside the lab's own namespaces: the partition in the switch, loss on a node.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Iterable

from .base import LOSS_TABLE, PART_TABLE, LabError, run
from .cluster import Cluster


class Faults(Cluster):
    """Process and network faults, on top of the lab's processes and topology."""

    # --- process faults ---

    def kill(self, node: str) -> None:
        """SIGKILL the node's whole process group and wait until it is gone."""
        self._node(node)
        self._kill(node)

    def crash(self, node: str) -> None:
        """The host is gone: SIGKILL, then carrier loss on its link."""
        self.kill(node)
        self.link(node, up=False)

    def revive(self, node: str) -> dict[str, int]:
        """As after a reboot: flush the DuraVIP addresses left behind, link up, start."""
        self._node(node)
        if self.running(node):
            raise LabError(f"{node} is running; kill or crash it first")
        self.flush_duravips(node)
        self.link(node, up=True)
        return self.start(node)

    def pause(self, node: str) -> None:
        """SIGSTOP the node's (or the sink's) process group; returns once it shows stopped."""
        if node != "sink":
            self._node(node)
        if not self._signal_group(node, signal.SIGSTOP):
            raise LabError(f"{node} is not running")
        deadline = time.monotonic() + 2
        while self.proc_state(node) not in ("T", None) and time.monotonic() < deadline:
            time.sleep(0.002)

    def resume(self, node: str) -> None:
        if node != "sink":
            self._node(node)
        if not self._signal_group(node, signal.SIGCONT):
            raise LabError(f"{node} is not running")

    # --- network faults ---

    def carrier(self, node: str, up: bool) -> None:
        """Carrier loss on the node's eth1, the node untouched (its switch port goes down).

        Unlike ``link`` (the node's own side), eth1 stays administratively up
        and shows NO-CARRIER, as when a cable is pulled or a switch port dies.
        """
        self._node(node)
        run(["ip", "-n", self.ns("sw"), "link", "set", f"p-{node}", "up" if up else "down"])
        deadline = time.monotonic() + 3
        while up and self._port_state(node) != "forwarding":
            if time.monotonic() > deadline:
                raise LabError(f"bridge port p-{node} not forwarding 3 s after carrier up")
            time.sleep(0.005)

    def partition(self, *groups: Iterable[str]) -> None:
        """Silently drop frames between every pair of groups, on the bridge.

        Bridge-family rules in the switch namespace also stop what nodes send
        through AF_PACKET (gratuitous ARP), which inet rules on a node would not.
        Replaces any previous partition.
        """
        sets = [sorted(set(g)) for g in groups]
        if len(sets) < 2 or any(not s for s in sets):
            raise LabError("partition needs at least two non-empty groups")
        seen: set[str] = set()
        for s in sets:
            for m in s:
                self.ns(m)
                if m in seen:
                    raise LabError(f"{m} is in two groups")
                seen.add(m)
        rules = []
        for a in range(len(sets)):
            for b in range(len(sets)):
                if a != b:
                    ia = ", ".join(f'"p-{m}"' for m in sets[a])
                    ob = ", ".join(f'"p-{m}"' for m in sets[b])
                    rules.append(f"    iifname {{ {ia} }} oifname {{ {ob} }} counter drop")
        script = "\n".join(
            [
                f"add table bridge {PART_TABLE}",
                f"delete table bridge {PART_TABLE}",
                f"table bridge {PART_TABLE} {{",
                "  chain forward {",
                "    type filter hook forward priority 0; policy accept;",
                *rules,
                "  }",
                "}",
            ]
        )
        self.nft("sw", script)

    def loss(self, percent: int, *members: str) -> None:
        """Drop ``percent``% of what arrives on eth1 (input hook) of ``members`` (all nodes)."""
        if not 0 <= percent <= 100:
            raise LabError("loss percent must be 0..100")
        for m in members or self.nodes:
            lines = [f"add table inet {LOSS_TABLE}", f"delete table inet {LOSS_TABLE}"]
            if percent > 0:
                lines += [
                    f"table inet {LOSS_TABLE} {{",
                    "  chain input {",
                    "    type filter hook input priority -300; policy accept;",
                    f'    iifname "eth1" numgen random mod 100 < {percent} counter drop',
                    "  }",
                    "}",
                ]
            self.nft(m, "\n".join(lines))

    def heal(self) -> None:
        """Undo every partition and loss rule."""
        self.nft("sw", f"add table bridge {PART_TABLE}\ndelete table bridge {PART_TABLE}")
        for m in self.members:
            self.nft(m, f"add table inet {LOSS_TABLE}\ndelete table inet {LOSS_TABLE}")
