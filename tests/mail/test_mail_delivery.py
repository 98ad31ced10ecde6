"""Delivery to a recording smarthost: source address, retry with backoff, bounce, mailq."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import trio

from duravip.config.model import HostPort
from duravip.mail.delivery import Deliverer, backoff
from duravip.mail.router import MailqRow
from duravip.mail.service import MailService, serve
from duravip.mail.spool import NewMessage, Spool
from duravip.smtp.types import PermanentFailure, TemporaryFailure

from .conftest import Recorder, closed_port, envelope, mail_config


def test_backoff_grows_and_caps() -> None:
    assert backoff(0, 1, 300) == 0
    assert [backoff(n, 1, 10) for n in range(1, 7)] == [1, 2, 4, 8, 10, 10]
    assert backoff(10_000, 0.5, 300) == 300


async def _start(
    nursery: trio.Nursery,
    tmp: Path,
    smarthost: HostPort | None,
    keys: Callable[[], list[bytes]],
    **kw: object,
) -> MailService:
    cfg = mail_config(tmp, node="n1", smarthost=smarthost, **kw)
    svc: MailService = await nursery.start(
        lambda task_status: serve(
            config=cfg, node_name="n1", keyring_keys=keys, task_status=task_status
        )
    )
    return svc


async def _until(pred: Callable[[], bool]) -> None:
    while not pred():
        await trio.sleep(0.01)


async def test_binding_source_address_and_several_per_connection(
    tmp_path: Path, smarthost: tuple[HostPort, Recorder], keys: Callable[[], list[bytes]]
) -> None:
    addr, rec = smarthost
    with trio.fail_after(15):
        async with trio.open_nursery() as n:
            svc = await _start(n, tmp_path, addr, keys)
            svc.set_holders({"b1": "n1", "ga": None, "gb": None}, local="n1", peers={})
            for _ in range(3):
                await svc.sink.accept(envelope("b1", rcpt=2))
            await svc.sink.accept(envelope(None))  # default: no bind
            await svc.sink.accept(envelope("st"))  # static binding: delivered here from its IP
            await rec.wait_for(5)
            await _until(lambda: len(svc.spool) == 0)
            n.cancel_scope.cancel()
    peers = sorted(m.peer[0] for m in rec.messages)
    # 127.0.0.6 is the static binding; default leaves from the usual 127.0.0.1.
    assert peers == ["127.0.0.1", "127.0.0.2", "127.0.0.2", "127.0.0.2", "127.0.0.6"]
    b1 = [m for m in rec.messages if m.peer[0] == "127.0.0.2"]
    assert all(m.rcpt_to == ("r0@example.net", "r1@example.net") for m in b1)
    assert b"X-Binding: b1" in b1[0].data
    assert svc.counters["delivered"] == 5 and svc.counters["received"] == 5


async def test_temporary_failure_retries_then_succeeds(
    tmp_path: Path, smarthost: tuple[HostPort, Recorder], keys: Callable[[], list[bytes]]
) -> None:
    addr, rec = smarthost
    rec.script = [TemporaryFailure("busy"), TemporaryFailure("busy")]
    with trio.fail_after(15):
        async with trio.open_nursery() as n:
            svc = await _start(n, tmp_path, addr, keys)
            qid = await svc.sink.accept(envelope(None))
            await _until(lambda: svc.counters["deferred"] >= 1)
            m = svc.spool.get(qid)
            assert m is not None and m.attempts >= 1 and m.next_at > 0
            await rec.wait_for(1)
            await _until(lambda: len(svc.spool) == 0)
            n.cancel_scope.cancel()
    assert svc.counters["deferred"] == 2
    assert svc.counters["delivered"] == 1
    assert len(rec.messages) == 1


async def test_connect_error_defers(tmp_path: Path, keys: Callable[[], list[bytes]]) -> None:
    with trio.fail_after(15):
        async with trio.open_nursery() as n:
            svc = await _start(n, tmp_path, closed_port(), keys, retry_base=5.0, retry_max=5.0)
            qid = await svc.sink.accept(envelope(None))
            await _until(lambda: svc.counters["deferred"] >= 1)
            m = svc.spool.get(qid)
            assert m is not None and m.attempts == 1
            assert svc.mailq() == [
                MailqRow("default", "#mmove", 0, 0),
                MailqRow("default", "default", 0, 1),
            ]
            n.cancel_scope.cancel()


async def test_permanent_failure_bounces(
    tmp_path: Path, smarthost: tuple[HostPort, Recorder], keys: Callable[[], list[bytes]]
) -> None:
    addr, rec = smarthost
    rec.script = [PermanentFailure("no such user")]
    with trio.fail_after(15):
        async with trio.open_nursery() as n:
            svc = await _start(n, tmp_path, addr, keys)
            qid = await svc.sink.accept(envelope(None, body=b"bounce me\r\n"))
            await _until(lambda: svc.counters["bounced"] == 1 and len(svc.spool) == 0)
            n.cancel_scope.cancel()
    files = list((tmp_path / "bounces").glob("*.bounce"))
    assert len(files) == 1
    head, _, body = files[0].read_bytes().partition(b"\n\n")
    meta = json.loads(head)
    assert meta["queue_id"] == qid and meta["reason"].startswith("554")
    assert body.endswith(b"bounce me\r\n")
    assert rec.messages == []


async def test_deliverer_dot_stuffing_and_raw_bytes(
    tmp_path: Path, smarthost: tuple[HostPort, Recorder]
) -> None:
    addr, rec = smarthost
    data = b".leading dot\r\nSubject: =?utf-8?q?x?=\r\n\r\n.\r\n..two\r\nno final crlf"
    with trio.fail_after(10):
        sp = Spool.open(tmp_path)
        qid = await sp.store(NewMessage("a@x.org", ("b@y.org",), data, "default", "default", "n1"))
        d = Deliverer(sp, {}, helo="n1", retry_base=1, retry_max=1)
        m = sp.get(qid)
        assert m is not None
        await d.deliver_batch(addr, None, [m])
        sp.close()
    assert rec.messages[0].data == data + b"\r\n"


async def test_a_stored_bare_lf_body_reaches_the_smarthost_as_one_canonical_message(
    tmp_path: Path, smarthost: tuple[HostPort, Recorder]
) -> None:
    """The downstream half of SMTP smuggling: ``x LF . CRLF MAIL FROM:...`` in a
    stored body must not end the message early at a lenient smarthost. The
    recording smarthost refuses bare newlines (the default), so the old
    as-stored relay got a 550 and a bounce; now the body leaves as CRLF."""
    addr, rec = smarthost
    data = b"Subject: t\r\n\r\nx\n.\r\nMAIL FROM:<evil@x>\r\nRCPT TO:<v@y>\r\nDATA\r\n"
    with trio.fail_after(10):
        sp = Spool.open(tmp_path)
        qid = await sp.store(NewMessage("a@x.org", ("b@y.org",), data, "default", "default", "n1"))
        counters: dict[str, int] = {}
        d = Deliverer(sp, counters, helo="n1", retry_base=1, retry_max=1)
        m = sp.get(qid)
        assert m is not None
        await d.deliver_batch(addr, None, [m])
        sp.close()
    assert counters.get("bounced", 0) == 0 and counters["delivered"] == 1
    assert [(r.mail_from, r.rcpt_to) for r in rec.messages] == [("a@x.org", ("b@y.org",))]
    assert rec.messages[0].data == data.replace(b"x\n.", b"x\r\n.")


async def test_mailq_counts_waiting_and_groups(
    tmp_path: Path, keys: Callable[[], list[bytes]]
) -> None:
    with trio.fail_after(15):
        async with trio.open_nursery() as n:
            svc = await _start(n, tmp_path, closed_port(), keys, retry_base=5.0)
            # Nobody holds the pool members, n2 holds b1 but is not a known peer yet.
            svc.set_holders({"b1": "n2", "ga": None, "gb": None}, local="n1", peers={})
            await svc.sink.accept(envelope("pool"))
            await svc.sink.accept(envelope("b1"))
            await svc.sink.accept(envelope("b1"))
            rows = svc.mailq()
            n.cancel_scope.cancel()
    assert MailqRow("default", "#mmove", 2, 0) in rows
    pool_rows = [r for r in rows if r.group == "pool"]
    assert len(pool_rows) == 1 and pool_rows[0].delayed == 1


async def _rebind_case(tmp: Path, keys: Callable[[], list[bytes]], unconditional: bool) -> set[str]:
    async with trio.open_nursery() as n:
        svc = await _start(
            n, tmp, closed_port(), keys, retry_base=30.0, unconditional_rebind=unconditional
        )
        svc.set_holders({"b1": None, "ga": "n1", "gb": None}, local="n1", peers={})
        for _ in range(40):
            await svc.sink.accept(envelope("pool"))
        assert {m.binding for m in svc.spool.iter()} == {"ga"}
        await _until(lambda: svc.counters["deferred"] >= 40)
        # gb appears here too; ga did not move.
        svc.set_holders({"b1": None, "ga": "n1", "gb": "n1"}, local="n1", peers={})
        await trio.sleep(0.3)
        got = {m.binding for m in svc.spool.iter()}
        n.cancel_scope.cancel()
    return got


async def test_unconditional_rebind_reassigns_every_message(
    tmp_path: Path, keys: Callable[[], list[bytes]]
) -> None:
    with trio.fail_after(15):
        assert await _rebind_case(tmp_path / "on", keys, True) == {"ga", "gb"}
        assert await _rebind_case(tmp_path / "off", keys, False) == {"ga"}


async def test_smtp_ingest_is_durable_before_250(
    tmp_path: Path, keys: Callable[[], list[bytes]]
) -> None:
    """Through the real SMTP driver: the id in the 250 reply is on disk after a restart."""
    from functools import partial

    from duravip.mail.smtpclient import SmtpSession, open_tcp
    from duravip.smtp.driver import handle_connection
    from duravip.smtp.server import ServerSettings

    with trio.fail_after(15):
        async with trio.open_nursery() as n:
            svc = await _start(n, tmp_path, closed_port(), keys, retry_base=30.0)
            svc.set_holders({"b1": None, "ga": None, "gb": None}, local="n1", peers={})

            async def handler(stream: trio.SocketStream) -> None:
                await handle_connection(
                    stream,
                    settings=ServerSettings("n1"),
                    sink=svc.sink,
                    peer=stream.socket.getpeername()[:2],
                    local=("127.0.0.5", 25),  # the listener that follows b1
                )

            listeners = await n.start(partial(trio.serve_tcp, handler, 0, host="127.0.0.1"))
            port = listeners[0].socket.getsockname()[1]
            sess = SmtpSession(await open_tcp("127.0.0.1", port))
            await sess.start("client")
            replies = [
                await sess.send("a@x.org", ["b@y.org"], b"Subject: %d\r\n\r\nhi\r\n" % i)
                for i in range(3)
            ]
            await sess.quit()
            n.cancel_scope.cancel()
    assert all(r.code == 250 for r in replies)
    sp = Spool.open(tmp_path)
    try:
        queued = {m.id: m for m in sp.iter()}
        for r in replies:
            qid = next(q for q in queued if q in r.message)
            assert queued[qid].binding == "b1" and queued[qid].requested == "b1"
        assert len(queued) == 3
    finally:
        sp.close()
