"""Resolving pending mmove copies whose commit never came: ask their sender.

A copy stored by the two-phase mmove stays pending (not deliverable, not
movable) until its sender confirms it. If the confirmation is lost (the
connection broke, either node crashed or paused), this node asks the sender,
by transfer id, on a new authenticated mmove connection (``XMMOVEQ``), as soon
as the sender is reachable again. The sender answers from its durable spool:
committed (it removed its copy with that id: make ours live) or aborted (it
still owns the message or gave that attempt up: drop ours). "Wait" and
"unknown" leave the copy pending. See :mod:`duravip.mail.transfer_state`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, MutableMapping, Sequence
from typing import TYPE_CHECKING

import trio

from duravip.config.model import HostPort
from duravip.mail import transfer_state as ts
from duravip.mail.mmove_preamble import (
    PREAMBLE_TIMEOUT,
    SERVICE,
    MoveFailed,
    _frame_rejected,
    client_preamble,
)
from duravip.mail.smtpclient import SmtpError, SmtpSession, open_tcp
from duravip.mail.spool import Spool, SpoolError
from duravip.mail.transfer_state import Answer

if TYPE_CHECKING:
    from duravip.mail.mmove import Receiver

log = logging.getLogger("duravip.mail.ECmmove2")

#: A pending copy this old (seconds) without its commit is asked about.
RESOLVE_AFTER = 5.0
#: How often the resolver looks for such copies.
RESOLVE_INTERVAL = 2.0
#: Per operation of a query connection (a paused sender is asked again next round).
QUERY_TIMEOUT = 10.0


def due(spool: Spool, now: float, older_than: float) -> dict[str, list[tuple[str, str]]]:
    """Pending copies to ask about, per sending node: ``[(transfer id, queue id)]``."""
    out: dict[str, list[tuple[str, str]]] = {}
    for m in spool.iter():
        if m.pending is not None and m.transfer_key is not None and now - m.received_at >= older_than:
            out.setdefault(m.pending, []).append((m.transfer_key, m.id))
    return out


async def resolve_with(
    receiver: Receiver,
    node: str,
    items: Sequence[tuple[str, str]],
    *,
    address: HostPort,
    key: bytes,
    cluster: str,
    helo: str,
    counters: MutableMapping[str, int],
    timeout: float = 30.0,
) -> int:
    """Ask ``node`` about ``items`` and apply its answers; returns how many were settled."""
    fault = receiver.transfers.fault
    settled = 0
    try:
        stream = await open_tcp(str(address.host), address.port, timeout=timeout)
    except (OSError, trio.TooSlowError) as exc:
        raise MoveFailed(f"connect to {node} at {address}: {exc!r}") from exc
    session: SmtpSession | None = None
    try:
        with trio.fail_after(PREAMBLE_TIMEOUT):
            sealed = await client_preamble(
                stream, key, cluster, on_reject=_frame_rejected(counters, node)
            )
        session = SmtpSession(sealed, timeout=timeout)
        await session.start(helo)
        for i in range(0, len(items), ts.QUERY_CHUNK):
            chunk = items[i : i + ts.QUERY_CHUNK]
            fault(ts.RESOLVE_BEFORE_QUERY, chunk[0][0])
            res = await session.send(
                "", (ts.CONTROL_RCPT,), ts.encode_ids(t for t, _ in chunk), [f"{ts.QUERY_PARAM}=1"]
            )
            if not 200 <= res.code < 300:
                raise MoveFailed(f"{node} refused the query: {res.code} {res.message}")
            answers = ts.parse_answers(res.message)
            for tid, qid in chunk:
                answer = answers.get(tid, Answer.WAIT)
                if answer is Answer.UNKNOWN:
                    log.error(
                        "%s: %s does not remember transfer %s (pending copy %s): left pending",
                        SERVICE,
                        node,
                        tid,
                        qid,
                    )
                fault(ts.RESOLVE_BEFORE_APPLY, tid)
                if await receiver.settle(tid, qid, answer):
                    settled += 1
                fault(ts.RESOLVE_AFTER_APPLY, tid)
    except (SmtpError, trio.TooSlowError, trio.BrokenResourceError, OSError, SpoolError) as exc:
        if session is not None:
            await session.abort()
        else:
            await trio.aclose_forcefully(stream)
        raise MoveFailed(f"resolving with {node}: {exc!r}") from exc
    except BaseException:
        await trio.aclose_forcefully(stream)
        raise
    await session.quit()
    return settled


async def serve_resolver(
    receiver: Receiver,
    *,
    peers: Callable[[], Mapping[str, HostPort]],
    keys: Callable[[], Sequence[bytes]],
    cluster: str,
    helo: Callable[[], str],
    older_than: float | None = None,
    interval: float | None = None,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Every ``interval``, ask each reachable sender about its overdue pending copies."""
    counters = receiver.counters

    async def with_node(node: str, items: list[tuple[str, str]]) -> None:
        address = peers().get(node)
        k = keys()
        if address is None or not k:
            return
        try:
            n = await resolve_with(
                receiver, node, items, address=address, key=k[0], cluster=cluster,
                helo=helo(), counters=counters, timeout=QUERY_TIMEOUT,
            )
        except MoveFailed as exc:
            counters["mmove_resolve_failed"] = counters.get("mmove_resolve_failed", 0) + 1
            log.warning("%s: %s (retried)", SERVICE, exc)
            return
        if n:
            log.info("%s: %d pending copy(ies) from %s resolved", SERVICE, n, node)

    task_status.started()
    while True:
        wait = RESOLVE_INTERVAL if interval is None else interval
        after = RESOLVE_AFTER if older_than is None else older_than
        # One sender paused or unreachable must not hold up the others.
        async with trio.open_nursery() as nursery:
            for node, items in due(receiver.spool, time.time(), after).items():
                nursery.start_soon(with_node, node, items)
        await trio.sleep(wait)
