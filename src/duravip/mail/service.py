"""The mail service the daemon runs: ingest sink, rebind, delivery and mmove scheduling.

One scheduler task looks at the spool whenever something changes (a message
arrived, a batch finished, the holders changed) or a retry falls due, and
starts bounded workers: at most ``delivery.concurrency`` smarthost
connections and ``MMOVE_CONNECTIONS`` mmove connections per peer. An arrival
only makes the scheduler look at that message; holders changes, finished
moves and due retries make it rescan the queue. Every decision is taken from
the durable spool state, so a restart simply resumes.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, MutableMapping, Sequence
from functools import partial
from ipaddress import ip_address

import trio

from duravip.config.model import Config, HostPort, SmtpLimits
from duravip.mail import router
from duravip.mail.dedup import DedupWindow
from duravip.mail.delivery import Deliverer, backoff
from duravip.mail.mailq import COUNTERS, mailq_rows
from duravip.mail.mmove import SERVICE, MoveFailed, Receiver, move_batch, serve_listener
from duravip.mail.mmove_resolve import serve_resolver
from duravip.mail.outbound import Outbound, StallWatch
from duravip.mail.router import DEFAULT, MailqRow
from duravip.mail.spool import NewMessage, Spool, SpoolError, new_queue_id
from duravip.mail.spool_format import QueuedMessage, RecordTooLarge
from duravip.mail.transfer_state import TransferState
from duravip.smtp.types import Envelope, MessageSink, PermanentFailure, TemporaryFailure

log = logging.getLogger(__name__)

#: Messages per smarthost connection, and per mmove connection.
DELIVERY_BATCH = 50
MMOVE_BATCH = 200
#: Parallel mmove connections per peer (the receiver group-commits across them),
#: and the fewest messages that justify opening another one.
MMOVE_CONNECTIONS = 4
MMOVE_MIN_PER_CONNECTION = 16
#: Lets a burst of arrivals gather before the scheduler rescans the queue.
SCHEDULE_DEBOUNCE = 0.02
#: Longest sleep of the scheduler when nothing is due (a safety net).
IDLE_RESCAN = 30.0


def duravip_bindings(config: Config) -> frozenset[str]:
    """Bindings whose ``Bind_Address`` is a DuraVIP: only its holder may send from it."""
    names = {b.name for b in config.bindings if b.enable_duravip}
    names.update(d.binding for d in config.duravips.values() if d.binding is not None)
    return frozenset(names)


class _IngestSink:
    def __init__(self, service: MailService) -> None:
        self.service = service

    async def accept(self, envelope: Envelope) -> str:
        return await self.service.ingest(envelope)


class MailService:
    """See ``docs/mail.md``; built and started by :func:`serve`."""

    def __init__(
        self,
        *,
        config: Config,
        node_name: str,
        spool: Spool,
        keyring_keys: Callable[[], Sequence[bytes]],
    ) -> None:
        self.config = config
        self.node_name = node_name
        self.spool = spool
        self.keyring_keys = keyring_keys
        self.counters: MutableMapping[str, int] = dict.fromkeys(COUNTERS, 0)
        self.counters.update(spool.recovery.counters())
        self.sink: MessageSink = _IngestSink(self)
        self.holders: dict[str, str | None] = {}
        self.peers: dict[str, HostPort] = {}
        #: Where the mmove listener really listens (port 0 in config: the kernel's pick).
        self.cluster_address: HostPort | None = None
        self._dv = duravip_bindings(config)
        self._wake = trio.Event()
        self._inflight: set[str] = set()
        #: Deliveries running per binding; bindings whose IP is being released.
        self.outbound = Outbound()
        self.stall_watch = StallWatch()
        #: Open mmove connections per node.
        self._moving: dict[str, int] = defaultdict(int)
        self._node_retry_at: dict[str, float] = {}
        self._node_failures: dict[str, int] = defaultdict(int)
        self._rebind_all = False
        self._rebind_moved: set[str] = set()
        #: Full rescan needed (holders, config, a move finished), else only ``_dirty`` ids.
        self._full = True
        self._dirty: set[str] = set()
        self._next_scan_at = 0.0
        #: This node's own mmove attempts in flight (answers the receivers' queries).
        self.transfers = TransferState(window=spool.seen_ttl)
        self.receiver = Receiver(
            spool, self.counters, on_stored=self.wake, transfers=self.transfers
        )
        self._deliverer = self._make_deliverer()

    def _make_deliverer(self) -> Deliverer:
        d = self.config.delivery
        return Deliverer(
            self.spool,
            self.counters,
            helo=self.node_name,
            retry_base=d.retry_base,
            retry_max=d.retry_max,
            dedup=DedupWindow(window=d.dedup_window, max_entries=d.dedup_max),
            stalled_since=self.stall_watch.stalled_since,
        )

    # ---- daemon-facing API ----------------------------------------------

    def wake(self, qid: str | None = None) -> None:
        """Ask the scheduler to look at ``qid`` (cheap), or at the whole queue (``None``)."""
        if qid is None:
            self._full = True
        else:
            self._dirty.add(qid)
        self._wake.set()

    def set_config(self, config: Config) -> None:
        """Reload: new bindings/groups/smarthost apply to the next scheduling pass."""
        self.config = config
        self._dv = duravip_bindings(config)
        self._deliverer = self._make_deliverer()
        self._rebind_all = True
        self.wake()

    def set_holders(
        self, holders: Mapping[str, str | None], *, local: str, peers: Mapping[str, HostPort]
    ) -> None:
        """Binding -> holding node (None: nobody); triggers rebind, delivery and moves."""
        new = dict(holders)
        moved = {b for b in set(new) | set(self.holders) if new.get(b) != self.holders.get(b)}
        self.holders = new
        self.node_name = local
        self.peers = dict(peers)
        if moved:
            self._rebind_moved |= moved
            if self.config.cluster.unconditional_rebind:
                self._rebind_all = True
            # A peer that just took a binding deserves a fresh attempt.
            for b in moved:
                node = new.get(b)
                if node is not None:
                    self._node_retry_at.pop(node, None)
                if self.route_of(b)[0] != "local":
                    # Its IP leaves: stop its deliveries (each before its next
                    # transaction) so the queue can follow the binding.
                    self.outbound.stop(b)
        self.wake()

    def held_here(self) -> frozenset[str]:
        return frozenset(
            b.name for b in self.config.bindings if self.route_of(b.name)[0] == "local"
        )

    def available(self) -> frozenset[str]:
        """Bindings some node can send from now (held here, held elsewhere, or static)."""
        return frozenset(b.name for b in self.config.bindings if self.route_of(b.name)[0] != "wait")

    def route_of(self, binding: str) -> router.Route:
        if binding != DEFAULT and binding not in self._dv:
            return ("local", None)
        hold = {binding: self.holders.get(binding)} if binding in self._dv else {}
        return router.route(binding, hold, self.node_name)

    def mailq(self) -> list[MailqRow]:
        """Per group/binding active and delayed counts; ``default/#mmove`` for moves,
        ``default/#pending`` (count and age) for moved copies awaiting their commit."""
        return mailq_rows(self.spool.iter(), self.route_of, self.config, self._node_retry_at)

    def quiesce_ips(self, ips: Iterable[object]) -> contextlib.AbstractAsyncContextManager[None]:
        """Around an unplumb of ``ips``: see :mod:`duravip.mail.outbound`."""
        want = {str(ip) for ip in ips}
        names = [b.name for b in self.config.bindings if str(b.bind_address) in want]
        return self.outbound.quiesce(names)

    async def hand_over(self, timeout: float) -> None:
        """Graceful shutdown: move every message whose binding is held elsewhere, within ``timeout``."""
        with trio.move_on_after(timeout):
            while True:
                await self._rebind()
                self._node_retry_at.clear()
                plan = self._plan_moves(self.spool.iter(), time.time(), ignore_backoff=True)
                if not plan:
                    if not self._moving:
                        return
                    await trio.sleep(0.01)
                    continue
                async with trio.open_nursery() as nursery:
                    for node, batches in plan.items():
                        for msgs in batches:
                            self._start_move(nursery, node, msgs)
                if all(self._node_failures.get(n, 0) for n in plan):
                    await trio.sleep(0.05)

    # ---- ingest ------------------------------------------------------------

    async def ingest(self, env: Envelope) -> str:
        """Assign a binding, store durably, return the queue id (the SMTP ``250``)."""
        qid = new_queue_id()
        requested = router.requested_for(self.config, env.local, env.data)
        group = requested != router.DEFAULT and self.config.binding(requested) is None
        held, up = (self.held_here(), self.available()) if group else ((), None)  # O(bindings)
        binding = router.resolve(self.config, requested, held_here=held, key=qid, available=up)
        try:
            await self.spool.store(
                NewMessage(
                    mail_from=env.mail_from,
                    rcpt_to=env.rcpt_to,
                    data=env.data,
                    binding=binding,
                    requested=requested,
                    origin=self.node_name,
                    queue_id=qid,
                )
            )
        except RecordTooLarge as exc:
            raise PermanentFailure("message envelope too large to queue") from exc
        except SpoolError as exc:
            raise TemporaryFailure("queue write failed, try again later") from exc
        self.counters["received"] += 1
        log.debug("queued %s binding %s (requested %s)", qid, binding, requested)
        self.wake(qid)
        return qid

    # ---- scheduling --------------------------------------------------------

    async def _rebind(self) -> None:
        if not self._rebind_all and not self._rebind_moved:
            return
        everything, moved = self._rebind_all, frozenset(self._rebind_moved)
        self._rebind_all = False
        self._rebind_moved = set()
        held = self.held_here()
        up = self.available()
        changes: list[tuple[str, str]] = []
        skipped = False
        for m in self.spool.iter():
            if m.id in self._inflight:
                skipped = True
                continue
            new = router.reassign(
                self.config,
                requested=m.requested,
                current=m.binding,
                moved=moved,
                held_here=held,
                key=m.mmove_id,
                unconditional=everything,
                available=up,
            )
            if new != m.binding:
                changes.append((m.id, new))
        if skipped:
            # In-flight messages are re-assigned once their worker is done (it wakes us).
            self._rebind_all |= everything
            self._rebind_moved |= moved
        if not changes:
            return
        log.info("rebind: %d message(s) re-assigned", len(changes))
        self._full = True

        async def one(qid: str, binding: str) -> None:
            # Delivered or moved meanwhile: nothing left to re-assign.
            with contextlib.suppress(KeyError):
                await self.spool.update(qid, binding=binding)

        # Concurrent updates share group-committed flushes.
        for i in range(0, len(changes), 512):
            async with trio.open_nursery() as nursery:
                for qid, binding in changes[i : i + 512]:
                    nursery.start_soon(one, qid, binding)

    def _plan_moves(
        self, candidates: Iterable[QueuedMessage], now: float, *, ignore_backoff: bool = False
    ) -> dict[str, list[list[QueuedMessage]]]:
        """Per node, up to ``MMOVE_CONNECTIONS`` batches of messages to move now."""
        per_node: dict[str, list[QueuedMessage]] = defaultdict(list)
        for m in candidates:
            if m.id in self._inflight or m.pending is not None:
                continue
            kind, node = self.route_of(m.binding)
            if kind != "move" or node is None or node not in self.peers:
                continue
            if not ignore_backoff and self._node_retry_at.get(node, 0.0) > now:
                continue
            per_node[node].append(m)
        plan: dict[str, list[list[QueuedMessage]]] = {}
        for node, msgs in per_node.items():
            free = MMOVE_CONNECTIONS - self._moving.get(node, 0)
            if free <= 0:
                continue
            n = min(free, -(-len(msgs) // MMOVE_MIN_PER_CONNECTION))
            size = min(MMOVE_BATCH, -(-len(msgs) // n))
            plan[node] = [msgs[i * size : (i + 1) * size] for i in range(n) if msgs[i * size :]]
        return plan

    def _start_move(self, nursery: trio.Nursery, node: str, msgs: list[QueuedMessage]) -> None:
        self._moving[node] += 1
        self._inflight.update(m.id for m in msgs)
        nursery.start_soon(self._move_worker, node, msgs)

    async def _move_worker(self, node: str, msgs: list[QueuedMessage]) -> None:
        try:
            keys = self.keyring_keys()
            address = self.peers.get(node)
            if not keys or address is None:
                raise MoveFailed(f"no keyring key or no address for {node}")
            await move_batch(
                self.spool,
                msgs,
                address=address,
                key=keys[0],
                cluster=self.config.cluster.name,
                helo=self.node_name,
                counters=self.counters,
                node=node,
                transfers=self.transfers,
            )
            self._node_failures.pop(node, None)
            self._node_retry_at.pop(node, None)
        except MoveFailed as exc:
            self._node_failures[node] += 1
            self.counters["mmove_failed"] += 1
            delay = backoff(
                self._node_failures[node],
                self.config.delivery.retry_base,
                self.config.delivery.retry_max,
            )
            self._node_retry_at[node] = time.time() + delay
            log.warning("%s: %s (retry in %.1fs)", SERVICE, exc, delay)
        finally:
            self._moving[node] -= 1
            if self._moving[node] <= 0:
                del self._moving[node]
            self._inflight.difference_update(m.id for m in msgs)
            self.wake()

    async def _deliver_worker(
        self, limiter: trio.CapacityLimiter, binding: str, msgs: list[QueuedMessage]
    ) -> None:
        scope = trio.CancelScope()
        self.outbound.add(binding, scope)
        try:
            with scope:
                await self._deliver_batch(limiter, binding, msgs)
        finally:
            self.outbound.discard(binding, scope)
            self._inflight.difference_update(m.id for m in msgs)
            self._dirty.update(m.id for m in msgs)
            self._wake.set()

    async def _deliver_batch(
        self, limiter: trio.CapacityLimiter, binding: str, msgs: list[QueuedMessage]
    ) -> None:
        try:
            async with limiter:
                b = self.config.binding(binding) if binding != DEFAULT else None
                bind = str(b.bind_address) if b is not None and b.bind_address else None
                smarthost = self.config.delivery.smarthost
                if b is not None and b.bind_address and b.bind_address.version == 6:
                    smarthost = self.config.delivery.smarthost6 or smarthost  # same family
                if smarthost is None:
                    for m in msgs:
                        await self._deliverer.defer(m, "no smarthost configured")
                    return
                await self._deliverer.deliver_batch(smarthost, bind, msgs)
        except SpoolError as exc:
            log.error("delivery: spool write failed: %s", exc)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """The scheduler loop: rebind, then start deliveries and moves that are due."""
        limiter = trio.CapacityLimiter(max(1, self.config.delivery.concurrency))
        async with trio.open_nursery() as nursery:
            await nursery.start(self.stall_watch.run)
            task_status.started()
            while True:
                self._wake = trio.Event()
                await self._rebind()
                now = time.time()
                candidates: Iterable[QueuedMessage]
                if self._full or now >= self._next_scan_at:
                    self._full = False
                    self._dirty.clear()
                    candidates = self.spool.iter()
                    next_at = now + IDLE_RESCAN
                else:
                    ids, self._dirty = self._dirty, set()
                    candidates = [m for i in ids if (m := self.spool.get(i)) is not None]
                    next_at = self._next_scan_at
                local: dict[str, list[QueuedMessage]] = defaultdict(list)
                moves: list[QueuedMessage] = []
                for m in candidates:
                    # A pending copy (two-phase mmove) waits for its commit.
                    if m.id in self._inflight or m.pending is not None:
                        continue
                    kind, _node = self.route_of(m.binding)
                    if kind == "move":
                        moves.append(m)
                    if kind != "local" or self.outbound.blocked(m.binding):
                        continue
                    if m.next_at > now:
                        next_at = min(next_at, m.next_at)
                        continue
                    local[m.binding].append(m)
                for binding, msgs in local.items():
                    for i in range(0, len(msgs), DELIVERY_BATCH):
                        chunk = msgs[i : i + DELIVERY_BATCH]
                        self._inflight.update(m.id for m in chunk)
                        nursery.start_soon(self._deliver_worker, limiter, binding, chunk)
                for node, batches in self._plan_moves(moves, now).items():
                    for chunk in batches:
                        self._start_move(nursery, node, chunk)
                for t in self._node_retry_at.values():
                    if t > now:
                        next_at = min(next_at, t)
                self._next_scan_at = next_at
                with trio.move_on_after(max(0.0, next_at - time.time())):
                    await self._wake.wait()
                await trio.sleep(SCHEDULE_DEBOUNCE)


async def serve(
    *,
    config: Config,
    node_name: str,
    keyring_keys: Callable[[], Sequence[bytes]],
    task_status: trio.TaskStatus[MailService] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Open (recover) the spool, start the mmove listener and the scheduler, then report ready."""
    spool = await trio.to_thread.run_sync(
        partial(Spool.open, config.spool.path, preallocate=Spool.DAEMON_PREALLOCATE)
    )
    try:
        service = MailService(
            config=config, node_name=node_name, spool=spool, keyring_keys=keyring_keys
        )
        log.info("mail: spool %s recovered %d message(s)", config.spool.path, len(spool))
        async with trio.open_nursery() as nursery:
            addr = config.cluster_listener
            if addr is not None:
                limits = SmtpLimits(
                    max_message_size=config.smtp.max_message_size,
                    max_recipients=1_000_000,
                    max_line_length=config.smtp.max_line_length,
                    command_timeout=config.smtp.command_timeout,
                    data_timeout=config.smtp.data_timeout,
                )
                bound = await nursery.start(
                    partial(
                        serve_listener,
                        service.receiver,
                        addr,
                        node_name=node_name,
                        cluster=config.cluster.name,
                        keys=keyring_keys,
                        limits=limits,
                    )
                )
                host, port = bound[0].socket.getsockname()[:2]
                service.cluster_address = HostPort(ip_address(host), port)
            await nursery.start(service.run)
            await nursery.start(
                partial(
                    serve_resolver,
                    service.receiver,
                    peers=lambda: service.peers,
                    keys=keyring_keys,
                    cluster=config.cluster.name,
                    helo=lambda: service.node_name,
                )
            )
            task_status.started(service)
    finally:
        spool.close()
