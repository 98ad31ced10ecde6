"""In-memory plumber for the tests of everything above plumbing.

It keeps a table of addresses per interface, records every call, and lets a
test inject failures per IP (for the next N calls or forever) or for whole
calls, remove addresses "from outside", and take interfaces down or away.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence

import attrs
import trio
import trio_util

from duravip.ipaddr import IPAddress
from duravip.plumbing.base import Carrier, Placement, Results


@attrs.define
class Call:
    op: str  # "plumb" | "unplumb" | "present" | "announce"
    ips: tuple[IPAddress, ...]
    all_hosts: bool | None = None


class FakePlumber:
    """:class:`~duravip.plumbing.base.Plumber` on a dict."""

    def __init__(self, interfaces: Collection[str] = ("eth1",)) -> None:
        self.interfaces: dict[str, bool] = dict.fromkeys(interfaces, True)  # name -> up
        self.addresses: dict[IPAddress, str] = {}
        self.calls: list[Call] = []
        self.announced: list[IPAddress] = []
        #: ip -> (error text, remaining times; None = forever)
        self._ip_failures: dict[IPAddress, tuple[str, int | None]] = {}
        #: op -> list of exceptions raised by the next calls of that op
        self._call_failures: dict[str, list[BaseException]] = {}
        self.changed = trio_util.AsyncValue(0)
        #: Carrier per interface (``set_carrier``); reported by ``watch_carrier``.
        self.carrier: trio_util.AsyncValue[dict[str, bool]] = trio_util.AsyncValue(
            dict.fromkeys(interfaces, True)
        )
        self.closed = False

    # -- fault injection -------------------------------------------------
    def fail_ip(
        self, ip: IPAddress, error: str = "injected failure", times: int | None = 1
    ) -> None:
        """Make plumb/unplumb of ``ip`` fail ``times`` times (None: until cleared)."""
        self._ip_failures[ip] = (error, times)

    def clear_failures(self) -> None:
        self._ip_failures.clear()
        self._call_failures.clear()

    def fail_next_call(self, op: str, exc: BaseException | None = None) -> None:
        """Make the next call of ``op`` raise (default: OSError)."""
        self._call_failures.setdefault(op, []).append(exc or OSError(5, "injected call failure"))

    def remove_externally(self, *ips: IPAddress) -> None:
        """Someone ran ``ip addr del``."""
        for ip in ips:
            self.addresses.pop(ip, None)
        self.changed.value += 1

    def add_externally(self, ip: IPAddress, interface: str = "eth1") -> None:
        self.addresses[ip] = interface
        self.changed.value += 1

    def set_interface(self, name: str, *, up: bool = True, exists: bool = True) -> None:
        """Take an interface down/up, or delete it (its addresses go with it)."""
        if not exists:
            self.interfaces.pop(name, None)
            for ip in [ip for ip, i in self.addresses.items() if i == name]:
                del self.addresses[ip]
        else:
            self.interfaces[name] = up
        self.changed.value += 1

    def set_carrier(self, name: str, up: bool) -> None:
        """The cable was pulled (``up=False``) or plugged back; addresses stay."""
        self.carrier.value = {**self.carrier.value, name: up}

    # -- Plumber ------------------------------------------------------------
    async def watch_carrier(
        self,
        report: Callable[[Carrier], None],
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        current = self.carrier.value
        report(dict(current))
        task_status.started()
        while True:
            current = await self.carrier.wait_value(lambda v, c=current: v is not c)
            report(dict(current))

    def _check_call(self, op: str) -> None:
        pending = self._call_failures.get(op)
        if pending:
            raise pending.pop(0)

    def _ip_error(self, ip: IPAddress) -> str | None:
        entry = self._ip_failures.get(ip)
        if entry is None:
            return None
        error, times = entry
        if times is not None:
            if times <= 1:
                del self._ip_failures[ip]
            else:
                self._ip_failures[ip] = (error, times - 1)
        return error

    async def plumb(self, placements: Sequence[Placement]) -> Results:
        await trio.lowlevel.checkpoint()
        self.calls.append(Call("plumb", tuple(p.ip for p in placements)))
        self._check_call("plumb")
        out: dict[IPAddress, str | None] = {}
        for p in placements:
            up = self.interfaces.get(p.interface)
            err = self._ip_error(p.ip)
            if up is None:
                out[p.ip] = f"interface {p.interface} not found"
            elif not up:
                out[p.ip] = f"interface {p.interface} is down"
            elif err is not None:
                out[p.ip] = err
            else:
                self.addresses[p.ip] = p.interface
                out[p.ip] = None
        return out

    async def unplumb(self, placements: Sequence[Placement]) -> Results:
        await trio.lowlevel.checkpoint()
        self.calls.append(Call("unplumb", tuple(p.ip for p in placements)))
        self._check_call("unplumb")
        out: dict[IPAddress, str | None] = {}
        for p in placements:
            err = self._ip_error(p.ip)
            if err is not None:
                out[p.ip] = err
            else:
                self.addresses.pop(p.ip, None)
                out[p.ip] = None
        return out

    async def present(self, managed: Collection[IPAddress]) -> frozenset[IPAddress]:
        await trio.lowlevel.checkpoint()
        self.calls.append(Call("present", ()))
        self._check_call("present")
        return frozenset(ip for ip in managed if ip in self.addresses)

    async def announce(self, placements: Sequence[Placement], *, all_hosts: bool) -> None:
        await trio.lowlevel.checkpoint()
        self.calls.append(Call("announce", tuple(p.ip for p in placements), all_hosts))
        self._check_call("announce")
        self.announced.extend(p.ip for p in placements)

    async def aclose(self) -> None:
        self.closed = True

    def ops(self, op: str) -> list[Call]:
        return [c for c in self.calls if c.op == op]
