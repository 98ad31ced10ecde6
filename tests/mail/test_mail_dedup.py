"""Delivery exactly once: the Message-ID dedup window, in-doubt deliveries, pending moves in mailq."""

from __future__ import annotations

import contextlib
from ipaddress import IPv4Address
from pathlib import Path

import trio
from hypothesis import given
from hypothesis import strategies as st

from duravip.config import loads
from duravip.config.model import HostPort
from duravip.daemon.commands.mail import MailContext, mailq
from duravip.mail.dedup import DedupWindow, dedup_key, message_id
from duravip.mail.delivery import Deliverer
from duravip.mail.mailq import mailq_rows
from duravip.mail.router import PENDING, MailqRow
from duravip.mail.spool import NewMessage, Spool
from duravip.mail.spool_format import DELIVERED, QueuedMessage

from .conftest import Recorder, mail_config

MSG = b"From: a@x\r\nMessage-ID: <one@x>\r\nSubject: s\r\n\r\nbody\r\n"


def _new(data: bytes = MSG, rcpt: tuple[str, ...] = ("r@y",)) -> NewMessage:
    return NewMessage("a@x", rcpt, data, binding="b1", requested="b1", origin="n1")


def _deliverer(spool: Spool, counters: dict[str, int], **kw: float) -> Deliverer:
    return Deliverer(
        spool, counters, helo="n1", retry_base=0.05, retry_max=0.5, dedup=DedupWindow(**kw)
    )


def test_message_id_scan() -> None:
    assert message_id(MSG) == "<one@x>"
    assert message_id(b"message-ID:\r\n <folded@x>\r\nA: b\r\n\r\n") == "<folded@x>"
    assert message_id(b"Subject: s\r\n\r\nMessage-ID: <in-body@x>\r\n") is None


@given(st.lists(st.text(min_size=1, max_size=8), min_size=1, max_size=4, unique=True))
def test_dedup_key_is_per_envelope_not_per_recipient_order(rcpts: list[str]) -> None:
    m = QueuedMessage("q", "a@x", tuple(rcpts), "b1", "b1", "n1", "q", 1, 0.0)
    rev = QueuedMessage("q2", "a@x", tuple(reversed(rcpts)), "b1", "b1", "n1", "q2", 1, 0.0)
    other = QueuedMessage("q3", "a@x", (*rcpts, "extra"), "b1", "b1", "n1", "q3", 1, 0.0)
    assert dedup_key(m, MSG) == dedup_key(rev, MSG) != dedup_key(other, MSG)


async def test_second_copy_within_the_window_is_not_sent_even_after_a_restart(
    tmp_path: Path, smarthost: tuple[HostPort, Recorder]
) -> None:
    addr, rec = smarthost
    counters: dict[str, int] = {}
    with trio.fail_after(10):
        sp = Spool.open(tmp_path / "s")
        q1 = await sp.store(_new())
        await _deliverer(sp, counters).deliver_batch(addr, None, [sp.get(q1)])
        sp.close()
        sp = Spool.open(tmp_path / "s")  # the window is durable
        q2 = await sp.store(_new())  # the client resubmitted the same message
        q3 = await sp.store(_new(rcpt=("other@y",)))  # same Message-ID, another envelope
        await _deliverer(sp, counters).deliver_batch(addr, None, [sp.get(q2), sp.get(q3)])
        assert len(sp) == 0
        sp.close()
    assert [e.rcpt_to for e in rec.messages] == [("r@y",), ("other@y",)]
    assert counters["delivery_dup_suppressed"] == 1


async def test_window_zero_disables_and_the_window_expires(
    tmp_path: Path, smarthost: tuple[HostPort, Recorder]
) -> None:
    addr, rec = smarthost
    counters: dict[str, int] = {}
    with trio.fail_after(10):
        sp = Spool.open(tmp_path / "s")
        for _ in range(2):
            q = await sp.store(_new())
            await _deliverer(sp, counters, window=0).deliver_batch(addr, None, [sp.get(q)])
        q = await sp.store(_new())
        await _deliverer(sp, counters, window=60).deliver_batch(addr, None, [sp.get(q)])
        # Age the mark beyond a 60 s window: the next copy goes out again.
        (k,) = [k for k in sp.state.seen if k.startswith(DELIVERED)]
        sp.state.seen[k] -= 61
        q = await sp.store(_new())
        await _deliverer(sp, counters, window=60).deliver_batch(addr, None, [sp.get(q)])
        sp.close()
    assert len(rec.messages) == 4
    assert counters.get("delivery_dup_suppressed", 0) == 0


def test_prune_bounds_age_and_count() -> None:
    seen = {f"{DELIVERED}k{i}": 1000.0 + i for i in range(10)} | {"c:t": 0.0, "x/y": 0.0}
    w = DedupWindow(window=5.0, max_entries=3)
    assert w.prune(seen, now=1009.5) == 7  # k0-k3 too old, then the oldest beyond 3
    assert sorted(seen) == ["c:t", f"{DELIVERED}k7", f"{DELIVERED}k8", f"{DELIVERED}k9", "x/y"]
    assert w.prune(seen, now=1010.0) == 0  # at most once a minute


def test_delivery_block_takes_the_dedup_keys(tmp_path: Path) -> None:
    from tests.config.conftest import LAB_N1

    cfg = loads(LAB_N1.replace(
        'Delivery { smarthost = "10.1.0.3:25" }',
        'Delivery { smarthost = "10.1.0.3:25" dedup_window = 600 dedup_max = 50 }',
    ))
    assert (cfg.delivery.dedup_window, cfg.delivery.dedup_max) == (600, 50)
    assert (loads(LAB_N1).delivery.dedup_window, loads(LAB_N1).delivery.dedup_max) == (86400, 100000)


async def test_a_delivery_cut_off_by_a_crash_is_flagged_in_doubt(
    tmp_path: Path, smarthost: tuple[HostPort, Recorder]
) -> None:
    addr, rec = smarthost
    counters: dict[str, int] = {}
    with trio.fail_after(10):
        sp = Spool.open(tmp_path / "s")
        q = await sp.store(_new())
        d = _deliverer(sp, counters)

        def crash(point: str, _key: str) -> None:
            if point == "deliver.after_250":
                raise RuntimeError("crash")

        d.fault = crash
        with contextlib.suppress(RuntimeError):
            await d.deliver_batch(addr, None, [sp.get(q)])
        sp.close()
        sp = Spool.open(tmp_path / "s")
        m = sp.get(q)
        assert m is not None and m.delivering > 0
        await _deliverer(sp, counters).deliver_batch(addr, None, [m])
        assert len(sp) == 0
        sp.close()
    assert len(rec.messages) == 2 and counters["delivery_in_doubt"] == 1


async def test_mailq_and_console_show_pending_moves() -> None:
    cfg = mail_config(Path("/nonexistent"), node="n2", smarthost=None)
    pend = [
        QueuedMessage(f"p{i}", "a@x", ("r@y",), "b1", "b1", "n1", f"p{i}", 1, 100.0 + i, pending="n1")
        for i in range(2)
    ]
    rows = mailq_rows(pend, lambda b: ("local", None), cfg, {}, now=130.0)
    assert rows[-1] == MailqRow("default", PENDING, 2, 0, age=30.0)
    assert mailq_rows([], lambda b: ("local", None), cfg, {}, now=1.0) == [
        MailqRow("default", "#mmove", 0, 0)
    ]
    reply = await mailq(MailContext(mailq=lambda: rows), [])
    assert reply.data["pending"] == {"count": 2, "age": 30.0}
    assert "pending moves: 2, oldest 30.0s" in reply.text


async def test_a_reply_lost_after_the_data_is_flagged_in_doubt(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    """The smarthost takes the message, then the connection breaks before its 250
    (packet loss, the source IP moving away): the resend is flagged, not silent."""
    got: list[bytes] = []

    async def handler(stream: trio.SocketStream) -> None:
        await stream.send_all(b"220 x\r\n")
        buf = b""
        while True:
            data = await stream.receive_some(4096)
            if not data:
                return
            buf += data
            while b"\r\n" in buf:
                line, _, buf = buf.partition(b"\r\n")
                if line.startswith(b"DATA"):
                    await stream.send_all(b"354 go\r\n")
                elif line == b".":
                    got.append(line)
                    if len(got) == 1:
                        await stream.aclose()  # took it, the 250 never leaves
                        return
                    await stream.send_all(b"250 ok\r\n")
                elif line[:4] in (b"EHLO", b"MAIL", b"RCPT", b"QUIT"):
                    await stream.send_all(b"250 ok\r\n")

    ls = await nursery.start(trio.serve_tcp, handler, 0)
    addr = HostPort(IPv4Address("127.0.0.1"), ls[0].socket.getsockname()[1])
    counters: dict[str, int] = {}
    with trio.fail_after(10):
        sp = Spool.open(tmp_path / "s")
        q = await sp.store(_new())
        await _deliverer(sp, counters).deliver_batch(addr, None, [sp.get(q)])
        m = sp.get(q)
        assert m is not None and m.delivering > 0 and counters["deferred"] == 1
        await _deliverer(sp, counters).deliver_batch(addr, None, [m])
        assert len(sp) == 0
        sp.close()
    assert len(got) == 2 and counters["delivery_in_doubt"] == 1


def test_check_config_refuses_a_bad_dedup_window() -> None:
    from tests.config.conftest import LAB_N1

    from duravip.config.loader import check_text

    res = check_text(LAB_N1.replace(
        'Delivery { smarthost = "10.1.0.3:25" }',
        'Delivery { smarthost = "10.1.0.3:25" dedup_max = 0 }',
    ))
    text = " ".join(str(d) for d in res.diagnostics)
    assert "dedup_max must be at least 1" in text and "<string>:19:" in text, text
