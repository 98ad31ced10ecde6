"""The plumbing worker: keeps the kernel's DuraVIPs equal to the desired set.

The resolver (through the actuator) calls :meth:`PlumbingWorker.ensure` and
:meth:`PlumbingWorker.remove`; a reconcile loop compares desired with actual
every ``reconcile_interval`` (and soon after any iflist-cache event), puts back
what was removed from outside, removes managed addresses nobody wants, and
retries failures with exponential backoff. Only managed, non-forbidden IPs are
ever touched.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence

import attrs
import trio
import trio_util

from duravip.config.model import Topology
from duravip.ipaddr import IPAddress, ip_key
from duravip.plumbing.base import Placement, Plumber, place

log = logging.getLogger("duravip.plumbing")

#: Minimum spacing of event-triggered reconciles (a burst of events costs one pass).
DEBOUNCE = 0.05


@attrs.define
class Backoff:
    """Retry state of one IP whose last plumb or unplumb failed."""

    attempts: int
    due: float
    error: str


def backoff_delay(attempts: int, base: float, cap: float) -> float:
    """``base * 2**(attempts-1)`` capped: 0.5, 1, 2, 4, ... 30 s by default."""
    return float(min(cap, base * (2 ** max(0, attempts - 1))))


class PlumbingWorker:
    """Handle returned by :func:`serve` through ``task_status.started()``."""

    def __init__(
        self,
        *,
        plumber: Plumber,
        managed: frozenset[IPAddress],
        topology: Sequence[Topology],
        forbidden: frozenset[IPAddress],
        announce_all_hosts: bool,
        garp_count: int,
        garp_interval: float,
        nursery: trio.Nursery,
        reconcile_interval: float = 1.0,
        backoff_base: float = 0.5,
        backoff_max: float = 30.0,
    ) -> None:
        self._plumber = plumber
        self._forbidden = forbidden
        self._managed = managed - forbidden
        self._topology = tuple(topology)
        self._all_hosts = announce_all_hosts
        self._garp_count = garp_count
        self._garp_interval = garp_interval
        self._nursery = nursery
        self.reconcile_interval = reconcile_interval
        self._backoff_base = backoff_base
        self._backoff_max = backoff_max
        self._desired: set[IPAddress] = set()
        self._retire: set[IPAddress] = set()
        self._lock = trio.Lock()
        self._wake = trio.Event()
        #: What is on the interfaces now (managed IPs only).
        self.present: trio_util.AsyncValue[frozenset[IPAddress]] = trio_util.AsyncValue(
            frozenset()
        )
        #: IPs whose last attempt failed, with the retry schedule and the error.
        self.failures: dict[IPAddress, Backoff] = {}
        self.reconciles = 0
        self.repaired = 0
        #: Wall-clock stamps of the last ``ensure`` per IP: address added, first GARP
        #: round sent (the takeover latency budget; one float per managed IP at most).
        self.plumbed_at: dict[IPAddress, float] = {}
        self.garp_at: dict[IPAddress, float] = {}

    # -- public API ----------------------------------------------------------
    @property
    def desired(self) -> frozenset[IPAddress]:
        return frozenset(self._desired)

    @property
    def managed(self) -> frozenset[IPAddress]:
        return self._managed

    async def ensure(self, ips: Iterable[IPAddress]) -> frozenset[IPAddress]:
        """Plumb ``ips`` (idempotent), announce them, return those now present."""
        async with self._lock:
            placements = self._placements(ips, "plumb")
            self._desired.update(p.ip for p in placements)
            got = await self._plumb(placements)
            self.present.value = self.present.value | got
        if got:
            now = time.time()
            for ip in got:
                self.plumbed_at[ip] = now
            wanted = [p for p in placements if p.ip in got]
            await self._announce_round(wanted)
            now = time.time()
            for p in wanted:
                self.garp_at[p.ip] = now
            if self._garp_count > 1:
                self._nursery.start_soon(self._announce_rest, wanted)
        return frozenset(got)

    async def announce(self, ips: Iterable[IPAddress]) -> None:
        """Gratuitous ARP again for IPs held here (after a heal or a rival's release)."""
        placements = self._placements([ip for ip in ips if ip in self._desired], "announce")
        if placements:
            await self._announce_round(placements)
            if self._garp_count > 1:
                self._nursery.start_soon(self._announce_rest, placements)

    async def remove(self, ips: Iterable[IPAddress]) -> None:
        """Unplumb ``ips``; failures are retried by the reconcile loop."""
        async with self._lock:
            placements = self._placements(ips, "unplumb")
            for p in placements:
                self._desired.discard(p.ip)
                self.failures.pop(p.ip, None)
            gone = await self._unplumb(placements)
            self.present.value = self.present.value - gone

    def set_desired(self, ips: Iterable[IPAddress]) -> None:
        """Replace the desired set; the reconcile loop does the work."""
        self._desired = {p.ip for p in self._placements(ips, "plumb")}
        self.poke()

    def set_managed(self, managed: frozenset[IPAddress], topology: Sequence[Topology]) -> None:
        """Reload: IPs no longer managed are removed once, then never touched again."""
        new = managed - self._forbidden
        self._retire = (self._retire | (self._managed - new)) - new
        self._managed = new
        self._topology = tuple(topology)
        self._desired &= new
        for ip in list(self.failures):
            if ip not in new:
                del self.failures[ip]
        self.poke()

    def poke(self) -> None:
        """Reconcile soon."""
        self._wake.set()

    # -- reconcile -------------------------------------------------------------
    async def reconcile_once(self) -> None:
        """One pass: desired vs actual; plumb what is missing, remove what is extra."""
        announce: list[Placement] = []
        async with self._lock:
            self.reconciles += 1
            scope = self._managed | self._retire
            actual = await self._plumber.present(scope)
            now = trio.current_time()
            previously = self.present.value
            missing = self._desired - actual
            outside = missing & previously
            for ip in sorted(outside, key=ip_key):
                log.warning("%s was removed from outside; putting it back", ip)
            self.repaired += len(outside)
            due_missing = [ip for ip in sorted(missing, key=ip_key) if self._due(ip, now)]
            to_plumb = self._placements(due_missing, "plumb", quiet=True)
            extra = (actual & self._managed) - self._desired
            retire = actual & self._retire
            due_extra = [ip for ip in sorted(extra | retire, key=ip_key) if self._due(ip, now)]
            to_unplumb = [place(ip, self._topology) or Placement(ip, "", 32) for ip in due_extra]
            for ip in sorted(extra, key=ip_key):
                if ip not in self.failures:
                    log.info("%s is plumbed but not wanted here; removing it", ip)
            got = await self._plumb(to_plumb) if to_plumb else set()
            gone = await self._unplumb(to_unplumb) if to_unplumb else set()
            self._retire -= (self._retire - actual) | gone
            self.present.value = frozenset(((actual | got) - gone) & self._managed)
            announce = [p for p in to_plumb if p.ip in got]
        if announce:
            await self._announce_round(announce)
            if self._garp_count > 1:
                self._nursery.start_soon(self._announce_rest, announce)

    async def run(self) -> None:
        """Reconcile forever: every interval, at the next retry, or on a poke."""
        async with trio.open_nursery() as nursery:
            changed = getattr(self._plumber, "changed", None)
            if isinstance(changed, trio_util.AsyncValue):
                nursery.start_soon(self._watch, changed)
            while True:
                self._wake = trio.Event()
                await self.reconcile_once()
                await trio.sleep(DEBOUNCE)
                now = trio.current_time()
                deadline = now - DEBOUNCE + self.reconcile_interval
                if self.failures:
                    deadline = min(deadline, min(b.due for b in self.failures.values()))
                with trio.move_on_at(max(deadline, now)):
                    await self._wake.wait()

    async def _watch(self, changed: trio_util.AsyncValue[int]) -> None:
        while True:
            await changed.wait_transition()
            self.poke()

    # -- helpers -----------------------------------------------------------------
    def _placements(
        self, ips: Iterable[IPAddress], op: str, *, quiet: bool = False
    ) -> list[Placement]:
        out: list[Placement] = []
        for ip in sorted(ips, key=ip_key):  # deterministic order: logs, batches and tests
            if ip in self._forbidden:
                log.error("refusing to %s %s: it is this node's main address", op, ip)
            elif ip not in self._managed:
                if not quiet:
                    log.error("refusing to %s %s: not a managed DuraVIP", op, ip)
            else:
                p = place(ip, self._topology)
                if p is None:
                    log.error("refusing to %s %s: no Topology block contains it", op, ip)
                else:
                    out.append(p)
        return out

    def _due(self, ip: IPAddress, now: float) -> bool:
        b = self.failures.get(ip)
        return b is None or b.due <= now

    def _failed(self, op: str, p: Placement, error: str) -> None:
        prev = self.failures.get(p.ip)
        attempts = 1 if prev is None else prev.attempts + 1
        delay = backoff_delay(attempts, self._backoff_base, self._backoff_max)
        self.failures[p.ip] = Backoff(attempts, trio.current_time() + delay, error)
        log.warning(
            "%s %s on %s failed (attempt %d): %s; retrying in %.1f s",
            op,
            p.ip,
            p.interface or "?",
            attempts,
            error,
            delay,
        )

    def _succeeded(self, op: str, p: Placement) -> None:
        prev = self.failures.pop(p.ip, None)
        if prev is not None:
            log.info("%s %s succeeded after %d failed attempts", op, p.ip, prev.attempts)

    async def _plumb(self, placements: Sequence[Placement]) -> set[IPAddress]:
        return await self._apply("plumb", self._plumber.plumb, placements)

    async def _unplumb(self, placements: Sequence[Placement]) -> set[IPAddress]:
        return await self._apply("unplumb", self._plumber.unplumb, placements)

    async def _apply(
        self,
        op: str,
        call: Callable[[Sequence[Placement]], Awaitable[Mapping[IPAddress, str | None]]],
        placements: Sequence[Placement],
    ) -> set[IPAddress]:
        """One batched plumber call; per-IP outcome recorded for retry and logs."""
        if not placements:
            return set()
        try:
            results = await call(placements)
        except OSError as exc:
            results = {p.ip: f"{op} call failed: {exc}" for p in placements}
        done: set[IPAddress] = set()
        for p in placements:
            err = results.get(p.ip, "no result")
            if err is None:
                done.add(p.ip)
                self._succeeded(op, p)
            else:
                self._failed(op, p, err)
        return done

    async def _announce_round(self, placements: Sequence[Placement]) -> None:
        wanted = [p for p in placements if p.ip in self._desired]
        if not wanted:
            return
        try:
            await self._plumber.announce(wanted, all_hosts=self._all_hosts)
        except OSError as exc:
            log.warning("gratuitous ARP for %d IPs failed: %s", len(wanted), exc)

    async def _announce_rest(self, placements: Sequence[Placement]) -> None:
        for _ in range(self._garp_count - 1):
            await trio.sleep(self._garp_interval)
            await self._announce_round(placements)


async def clean_slate(
    plumber: Plumber, managed: frozenset[IPAddress], topology: Sequence[Topology] = ()
) -> frozenset[IPAddress]:
    """Remove every managed IP present anywhere (start-up); return what was removed."""
    found = await plumber.present(managed)
    if not found:
        return frozenset()
    placements = [place(ip, topology) or Placement(ip, "", ip.max_prefixlen) for ip in sorted(found, key=ip_key)]
    results = await plumber.unplumb(placements)
    removed = frozenset(ip for ip in found if results.get(ip, "no result") is None)
    for ip in sorted(found - removed, key=ip_key):
        log.error("clean slate: could not remove %s: %s", ip, results.get(ip, "no result"))
    log.info("clean slate: removed %d lingering DuraVIPs", len(removed))
    return removed


async def serve(
    *,
    plumber: Plumber,
    managed: frozenset[IPAddress],
    topology: Sequence[Topology],
    forbidden: frozenset[IPAddress],
    announce_all_hosts: bool,
    garp_count: int,
    garp_interval: float,
    reconcile_interval: float = 1.0,
    clean_start: bool = True,
    task_status: trio.TaskStatus[PlumbingWorker] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run the worker: clean slate first (``clean_start``), then reconcile forever."""
    async with trio.open_nursery() as nursery:
        worker = PlumbingWorker(
            plumber=plumber,
            managed=managed,
            topology=topology,
            forbidden=forbidden,
            announce_all_hosts=announce_all_hosts,
            garp_count=garp_count,
            garp_interval=garp_interval,
            nursery=nursery,
            reconcile_interval=reconcile_interval,
        )
        if clean_start:
            await clean_slate(plumber, worker.managed, topology)
        await worker.reconcile_once()
        nursery.start_soon(worker.run)
        task_status.started(worker)
