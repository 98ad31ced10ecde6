"""Outbound deliveries per binding, and the quiesce that lets a binding's IP leave cleanly.

Why: a delivery session between the final ``.`` and the smarthost's ``250``
must keep its source IP until the reply is read. If the IP is unplumbed (a
fail-back, a planned move, a drain, a graceful stop) in that window, the
reply goes to the new holder (which resets it) or nowhere: the smarthost has
the message, this node does not know it, and the copy is sent again (a
duplicate, counted ``delivery_in_doubt``). So the release path asks the mail
service to *quiesce* the IP first: no new delivery starts from it, the ones
running are cancelled (which stops them before their next transaction; the
data phase and the recording of its reply are shielded), and the release
waits, bounded, until they are gone. Only then is the IP unplumbed.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Callable, Collection, Iterable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any

import trio

log = logging.getLogger(__name__)

#: How long a release waits for the deliveries from its IPs to read their last reply.
QUIESCE_TIMEOUT = 3.0


class Outbound:
    """Cancel scopes of the deliveries running per binding; bindings being quiesced."""

    def __init__(self) -> None:
        self._running: dict[str, set[trio.CancelScope]] = {}
        #: Bindings whose IP is being released: the scheduler starts nothing from them.
        self.quiescing: dict[str, int] = {}
        self._changed = trio.Event()

    def blocked(self, binding: str) -> bool:
        return binding in self.quiescing

    def running(self, binding: str) -> int:
        return len(self._running.get(binding, ()))

    def add(self, binding: str, scope: trio.CancelScope) -> None:
        self._running.setdefault(binding, set()).add(scope)

    def discard(self, binding: str, scope: trio.CancelScope) -> None:
        scopes = self._running.get(binding)
        if scopes is not None:
            scopes.discard(scope)
            if not scopes:
                del self._running[binding]
        self._changed.set()
        self._changed = trio.Event()

    def stop(self, binding: str) -> None:
        """Cancel the deliveries from ``binding`` (each ends before its next transaction)."""
        for scope in self._running.get(binding, ()):
            scope.cancel()

    @asynccontextmanager
    async def quiesce(
        self, bindings: Collection[str], timeout: float = QUIESCE_TIMEOUT
    ) -> AsyncIterator[None]:
        """Hold ``bindings`` still for the body (the unplumb): nothing new starts from
        them, and the body runs only once the running deliveries ended (or ``timeout``)."""
        for b in bindings:
            self.quiescing[b] = self.quiescing.get(b, 0) + 1
        try:
            start = time.monotonic()
            busy = [b for b in bindings if self.running(b)]
            for b in busy:
                self.stop(b)
            with trio.move_on_after(timeout) as scope:
                while any(self.running(b) for b in bindings):
                    await self._changed.wait()
            if busy:
                left = sum(self.running(b) for b in bindings)
                (log.warning if scope.cancelled_caught else log.info)(
                    "quiesce %s: %s after %.0f ms (%d delivery session(s) still open)",
                    ",".join(sorted(busy)),
                    "timed out" if scope.cancelled_caught else "deliveries done",
                    (time.monotonic() - start) * 1000,
                    left,
                )
            yield
        finally:
            for b in bindings:
                n = self.quiescing.get(b, 0) - 1
                if n <= 0:
                    self.quiescing.pop(b, None)
                else:
                    self.quiescing[b] = n


class QuiescingPlumbing:
    """The actuator's plumbing, with the mail service's quiesce around every unplumb."""

    def __init__(
        self, inner: Any, quiesce: Callable[[frozenset[Any]], AbstractAsyncContextManager[None]]
    ) -> None:
        self.inner = inner
        self._quiesce = quiesce

    async def ensure(self, ips: Iterable[Any]) -> frozenset[Any]:
        result: frozenset[Any] = await self.inner.ensure(ips)
        return result

    async def remove(self, ips: Iterable[Any]) -> None:
        ips = frozenset(ips)
        async with self._quiesce(ips):
            await self.inner.remove(ips)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


#: The stall watch ticks this often; a gap between ticks this long is a stall.
STALL_TICK = 0.02
STALL_LIMIT = 0.15


class StallWatch:
    """Notices when this process was stopped (SIGSTOP, a VM freeze) or its loop starved.

    Why: a node stopped for longer than crash detection (~250 ms with the
    ``fast`` timers) has had its IPs taken over while it was away, without
    knowing it. If it then resumes a delivery and writes the message data, the
    smarthost takes the message but sends its ``250`` to the IP's new holder
    (which resets it): a copy in doubt, sent again later. So a delivery checks,
    just before its data, that no stall happened since it sent ``DATA``, and if
    one did gives the transaction up (a plain deferral: nothing was sent).
    """

    def __init__(self, tick: float = STALL_TICK, limit: float = STALL_LIMIT) -> None:
        self.tick = tick
        self.limit = limit
        self._last: float | None = None
        self._stall_at = float("-inf")
        self.stalls = 0

    def stalled_since(self, t: float) -> bool:
        """Whether a stall was seen at or after monotonic time ``t`` (or is going on)."""
        if self._last is None:
            return False  # not running (tests, the in-process harness)
        now = time.monotonic()
        return self._stall_at >= t or now - self._last >= self.limit

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        self._last = time.monotonic()
        task_status.started()
        try:
            while True:
                await trio.sleep(self.tick)
                now = time.monotonic()
                if now - self._last >= self.limit:
                    self._stall_at = now
                    self.stalls += 1
                    gap = now - self._last
                    (log.warning if gap >= 1.0 else log.info)(
                        "mail: this process stood still for %.0f ms", gap * 1000
                    )
                self._last = now
        finally:
            self._last = None
