"""Quiesce before a binding's IP leaves: the delivery in its data phase reads its 250 first."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from ipaddress import IPv4Address
from pathlib import Path
from typing import Any

import trio

from duravip.config.model import HostPort
from duravip.mail.outbound import Outbound, QuiescingPlumbing, StallWatch
from duravip.mail.service import MailService, serve
from duravip.smtp.types import Envelope

from .conftest import Recorder, envelope, mail_config


class SlowRecorder(Recorder):
    """Takes the first message, then waits ``delay`` before its ``250`` goes out."""

    def __init__(self, delay: float) -> None:
        super().__init__()
        self.delay = delay
        self.in_data = trio.Event()

    async def accept(self, env: Envelope) -> str:
        qid = await super().accept(env)
        if len(self.messages) == 1:
            self.in_data.set()
            await trio.sleep(self.delay)
        return qid


async def _service(nursery: trio.Nursery, tmp: Path, addr: HostPort, keys: Any) -> MailService:
    cfg = mail_config(tmp, node="n1", smarthost=addr)
    svc: MailService = await nursery.start(
        lambda task_status: serve(
            config=cfg, node_name="n1", keyring_keys=keys, task_status=task_status
        )
    )
    return svc


async def test_quiesce_waits_for_the_reply_and_starts_nothing_more(
    tmp_path: Path, nursery: trio.Nursery, keys: Callable[[], list[bytes]]
) -> None:
    rec = SlowRecorder(0.4)

    async def handler(stream: trio.SocketStream) -> None:
        from duravip.smtp.driver import handle_connection
        from duravip.smtp.server import ServerSettings

        peer, local = stream.socket.getpeername(), stream.socket.getsockname()
        await handle_connection(
            stream,
            settings=ServerSettings("sink"),
            sink=rec,
            peer=(peer[0], peer[1]),
            local=(local[0], local[1]),
        )

    lst = await nursery.start(partial(trio.serve_tcp, handler, 0, host="127.0.0.1"))
    addr = HostPort(IPv4Address("127.0.0.1"), lst[0].socket.getsockname()[1])
    with trio.fail_after(15):
        async with trio.open_nursery() as n:
            svc = await _service(n, tmp_path, addr, keys)
            # Three messages queued before the binding is held: one batch, one session.
            qids = [await svc.sink.accept(envelope("b1")) for _ in range(3)]
            svc.set_holders({"b1": "n1", "ga": None, "gb": None}, local="n1", peers={})
            await rec.in_data.wait()  # the first message's data is in, its 250 not yet out
            removed: list[frozenset[Any]] = []

            class Inner:
                async def remove(self, ips: Any) -> None:
                    # The unplumb: by now the first 250 was read and recorded.
                    assert svc.spool.get(qids[0]) is None
                    assert svc.outbound.blocked("b1") and svc.outbound.running("b1") == 0
                    removed.append(frozenset(ips))

            t0 = trio.current_time()
            await QuiescingPlumbing(Inner(), svc.quiesce_ips).remove([IPv4Address("127.0.0.2")])
            assert trio.current_time() - t0 < 3.0
            assert removed == [frozenset({IPv4Address("127.0.0.2")})]
            assert not svc.outbound.blocked("b1")
            assert len(rec.messages) == 1 and svc.counters["delivered"] == 1
            # The rest of the batch was never sent: not marked as in delivery.
            rest = [svc.spool.get(q) for q in qids[1:]]
            assert all(m is not None and not m.delivering for m in rest)
            # The IP stays (this test's loopback): the rest goes out, none of it in doubt.
            svc.wake()
            while len(svc.spool):
                await trio.sleep(0.02)
            assert len(rec.messages) == 3
            assert svc.counters["delivery_in_doubt"] == 0
            n.cancel_scope.cancel()


async def test_quiesce_is_bounded() -> None:
    out = Outbound()
    stuck = trio.CancelScope(shield=True)
    out.add("b", stuck)
    with trio.fail_after(5):
        t0 = trio.current_time()
        async with out.quiesce(["b"], timeout=0.2):
            assert out.blocked("b")
        assert 0.2 <= trio.current_time() - t0 < 2.0
    assert not out.blocked("b")


async def test_a_stall_before_the_data_gives_the_transaction_up(
    tmp_path: Path,
    smarthost: tuple[HostPort, Recorder],
    keys: Callable[[], list[bytes]],
) -> None:
    """Stopped between ``DATA`` and the data: nothing is sent, and the copy is not in doubt."""
    from duravip.mail.delivery import Deliverer
    from duravip.mail.spool import NewMessage, Spool

    addr, rec = smarthost
    sp = Spool.open(tmp_path / "spool")
    try:
        env = envelope(None)
        qid = await sp.store(
            NewMessage(env.mail_from, env.rcpt_to, env.data, "default", "default", "n1")
        )
        counters: dict[str, int] = {}
        d = Deliverer(
            sp, counters, helo="n1", retry_base=0.01, retry_max=0.01, stalled_since=lambda t: True
        )
        await d.deliver_batch(addr, None, [sp.get(qid)])
        m = sp.get(qid)
        assert m is not None and m.attempts == 1 and not m.delivering
        assert rec.messages == [] and counters.get("deferred") == 1
        d.stalled_since = lambda t: False
        await d.deliver_batch(addr, None, [m])
        assert len(rec.messages) == 1 and sp.get(qid) is None
        assert counters.get("delivery_in_doubt", 0) == 0
    finally:
        sp.close()


async def test_stall_watch_sees_a_stopped_loop() -> None:
    import time as _time

    w = StallWatch(tick=0.01, limit=0.1)
    assert not w.stalled_since(0.0)  # not running
    async with trio.open_nursery() as n:
        await n.start(w.run)
        await trio.sleep(0.05)
        t0 = _time.monotonic()
        assert not w.stalled_since(t0)
        _time.sleep(0.2)  # the whole loop stands still, as under SIGSTOP
        assert w.stalled_since(t0)  # seen at once, before the watch has ticked again
        await trio.sleep(0.05)
        assert w.stalled_since(t0) and w.stalls == 1
        assert not w.stalled_since(_time.monotonic())
        n.cancel_scope.cancel()


class DelayedRecorder(Recorder):
    """Every ``250`` to the data goes out ``delay`` late (a reply held up on the wire)."""

    def __init__(self, delay: float) -> None:
        super().__init__()
        self.delay = delay

    async def accept(self, env: Envelope) -> str:
        qid = await super().accept(env)
        await trio.sleep(self.delay)
        return qid


async def test_a_late_250_is_nudged_and_the_session_goes_on(nursery: trio.Nursery) -> None:
    """A NOOP pipelined after the data; its reply is read before the next command."""
    from duravip.mail.smtpclient import NUDGE_AFTER, NUDGES, SmtpSession, open_tcp
    from duravip.smtp.driver import handle_connection
    from duravip.smtp.server import ServerSettings

    rec = DelayedRecorder(4 * NUDGE_AFTER)  # NOOPs at 1x and 3x NUDGE_AFTER, not at 7x

    async def handler(stream: trio.SocketStream) -> None:
        peer, local = stream.socket.getpeername(), stream.socket.getsockname()
        await handle_connection(
            stream,
            settings=ServerSettings("sink"),
            sink=rec,
            peer=(peer[0], peer[1]),
            local=(local[0], local[1]),
        )

    lst = await nursery.start(partial(trio.serve_tcp, handler, 0, host="127.0.0.1"))
    with trio.fail_after(10):
        stream = await open_tcp("127.0.0.1", lst[0].socket.getsockname()[1])
        s = SmtpSession(stream, timeout=5)
        await s.start("n1")
        env = envelope(None)
        for i in range(3):
            r = await s.send(env.mail_from, env.rcpt_to, env.data, nudge=True)
            assert r.code == 250 and s.nudges == 2 * (i + 1)
        rec.delay = 20 * NUDGE_AFTER
        r = await s.send(env.mail_from, env.rcpt_to, env.data, nudge=True)
        assert r.code == 250 and s.nudges == 6 + NUDGES  # at most NUDGES per message
        rec.delay = 0
        r = await s.send(env.mail_from, env.rcpt_to, env.data, nudge=True)
        assert r.code == 250 and s.nudges == 6 + NUDGES  # a prompt 250: no NOOP
        await s.quit()
    assert len(rec.messages) == 5
