"""``duravip console mailq`` shows moves in flight: the pending count and the oldest's age."""

from __future__ import annotations

from duravip.daemon.commands.mail import MailContext, mailq
from duravip.mail.router import MMOVE, PENDING, MailqRow


async def test_console_mailq_shows_pending_moves_with_count_and_age() -> None:
    rows = [
        MailqRow("default", MMOVE, 3, 1),
        MailqRow("default", "b1", 2, 0),
        MailqRow("default", PENDING, 4, 0, age=12.34),
    ]
    reply = await mailq(MailContext(lambda: rows), [])
    assert reply.data["pending"] == {"count": 4, "age": 12.3}
    assert "default/#pending" in reply.text and "pending moves: 4, oldest 12.3s" in reply.text
    assert {"group": "default", "binding": MMOVE, "active": 3, "delayed": 1} in reply.data["queues"]


async def test_console_mailq_without_pending_moves() -> None:
    reply = await mailq(MailContext(lambda: [MailqRow("default", MMOVE, 0, 0)]), [])
    assert reply.data["pending"] == {"count": 0, "age": 0.0}
    assert "pending moves" not in reply.text
