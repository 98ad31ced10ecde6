"""Takeover guard: a freshly taken DuraVIP drops, not resets, TCP it has no connection for.

Why: a node that takes an IP from a holder it believes dead may be wrong (a
partition under ``quorum none``, a paused process, a false suspicion under
loss and CPU stalls). The live holder may be waiting for a reply on a
connection from that IP, typically the smarthost's ``250`` to a delivery's
final ``.``. Once the taker's gratuitous ARP is in, that reply reaches the
taker, whose kernel answers it with a reset: the smarthost's connection
dies, the holder never reads the ``250`` and later sends the message again
(a duplicate). With the guard, for ``hold`` seconds after an IP is acquired
its kernel silently drops every TCP segment that is neither a SYN nor a
reset and belongs to no connection it tracks (conntrack state *new*: no
local socket). The smarthost keeps retransmitting; when the rightful holder
keeps the IP and announces it again, the retransmission reaches the holder's
socket and the ``250`` is read. New connections (SYNs) are untouched, and
the taker's own connections from the IP are tracked from their SYN.

How: one nftables table ``inet duravip_guard`` in the daemon's own network
namespace, created at start and deleted on exit. Its sets hold every
configured DuraVIP that is *not settled*: an address leaves the set ``hold``
seconds after this node acquired it, and comes back when it is released.
So the guard is already in place when an IP is plumbed: nothing is added to
the takeover path. An unheld address in the set costs nothing (its packets
do not reach this host). A table left by a killed daemon is replaced at the
next start. Without ``nft`` the guard logs once and does nothing.

The price: for ``hold`` seconds after a real crash, a client whose
connection was on the dead holder is not reset by the new one; it sees its
retransmissions go unanswered until the guard ends (then the next one is
reset), instead of a reset at its first retransmission.
"""

from __future__ import annotations

import logging
import shutil
import subprocess
from collections.abc import Awaitable, Callable, Iterable
from ipaddress import IPv4Address

import trio

from duravip.ipaddr import IPAddress, ip_key
from duravip.plumbing.netns import check_netns

log = logging.getLogger(__name__)

TABLE = "duravip_guard"
#: Seconds a freshly acquired IP stays guarded (covers a 5 s partition or a 3 s
#: pause, the conflict's resolution and the holder's re-announcement).
DEFAULT_HOLD = 10.0

#: Runs one nft script (``nft -f -``); raises on failure.
Runner = Callable[[str], Awaitable[None]]


def _set(ip: IPAddress) -> str:
    return "fresh4" if isinstance(ip, IPv4Address) else "fresh6"


def elements(verb: str, ips: Iterable[IPAddress]) -> list[str]:
    """``add``/``delete`` element lines, one per set; ``delete`` tolerates absent ones."""
    by_set: dict[str, list[str]] = {}
    for ip in sorted(ips, key=ip_key):
        by_set.setdefault(_set(ip), []).append(str(ip))
    lines = []
    for name, addrs in sorted(by_set.items()):
        body = ", ".join(addrs)
        if verb == "delete":  # add first: deleting an absent element is an error
            lines.append(f"add element inet {TABLE} {name} {{ {body} }}")
        lines.append(f"{verb} element inet {TABLE} {name} {{ {body} }}")
    return lines


def ruleset(ips: Iterable[IPAddress]) -> str:
    """The whole table (replacing any earlier one), every IP in ``ips`` guarded."""
    lines = [
        f"add table inet {TABLE}",
        f"delete table inet {TABLE}",
        f"table inet {TABLE} {{",
        "  set fresh4 { type ipv4_addr; }",
        "  set fresh6 { type ipv6_addr; }",
        "  chain input {",
        "    type filter hook input priority filter - 5; policy accept;",
        "    ip daddr @fresh4 tcp flags & (syn | rst) == 0 ct state new counter drop",
        "    ip6 daddr @fresh6 tcp flags & (syn | rst) == 0 ct state new counter drop",
        "  }",
        "}",
        *elements("add", ips),
    ]
    return "\n".join(lines) + "\n"


async def run_nft(script: str) -> None:
    """``nft -f -`` in this process's namespace (refused in the root one under the test guard)."""
    check_netns(None)
    await trio.run_process(["nft", "-f", "-"], stdin=script.encode(), capture_stderr=True)


class TakeoverGuard:
    """Keeps the table's sets in step with what this node holds (see the module doc)."""

    def __init__(
        self, ips: Iterable[IPAddress], hold: float = DEFAULT_HOLD, runner: Runner = run_nft
    ) -> None:
        self.ips = frozenset(ips)
        self.hold = hold
        self._run = runner
        self._send, self._recv = trio.open_memory_channel[tuple[str, IPAddress]](1024)
        #: trio time at which each held IP settles (leaves the guard).
        self.settle_at: dict[IPAddress, float] = {}
        self.active = False
        self.errors = 0

    def on_held_change(self, kind: str, ip: IPAddress) -> None:
        """Resolver hook (``on_held_change``): must not block."""
        if not self.active:
            return
        try:
            self._send.send_nowait((kind, ip))
        except trio.WouldBlock:
            self.errors += 1

    async def _apply(self, script: str) -> bool:
        try:
            await self._run(script)
        except (OSError, subprocess.CalledProcessError) as e:
            self.errors += 1
            err = getattr(e, "stderr", b"") or b""
            log.warning("takeover guard: nft failed: %s %s", e, err.decode(errors="replace")[:200])
            return False
        return True

    async def serve(
        self, *, task_status: trio.TaskStatus[TakeoverGuard] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Install the table, follow acquisitions and releases; delete the table on exit."""
        if self.hold <= 0 or not self.ips:
            task_status.started(self)
            await trio.sleep_forever()
        self.active = await self._apply(ruleset(self.ips))
        if self.active:
            log.info(
                "takeover guard: %d IP(s), %.1f s after each acquisition", len(self.ips), self.hold
            )
        task_status.started(self)
        if not self.active:
            await trio.sleep_forever()
        try:
            await self._loop()
        finally:
            with trio.CancelScope(shield=True), trio.move_on_after(2.0):
                await self._apply(f"add table inet {TABLE}\ndelete table inet {TABLE}\n")

    async def _loop(self) -> None:
        while True:
            timeout = min(self.settle_at.values(), default=float("inf"))
            with trio.move_on_at(timeout):
                kind, ip = await self._recv.receive()
                if ip not in self.ips:
                    continue
                if kind == "acquire":
                    self.settle_at[ip] = trio.current_time() + self.hold
                elif kind == "release":
                    self.settle_at.pop(ip, None)
                    await self._apply("\n".join(elements("add", [ip])) + "\n")
                continue
            now = trio.current_time()
            due = [ip for ip, t in self.settle_at.items() if t <= now]
            for ip in due:
                del self.settle_at[ip]
            if due:
                await self._apply("\n".join(elements("delete", due)) + "\n")


def available() -> bool:
    """Whether ``nft`` is on PATH."""
    return shutil.which("nft") is not None
