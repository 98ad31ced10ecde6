"""Reply formatting of the SMTP core."""

from __future__ import annotations

from duravip.smtp.replies import (
    OK,
    OK_RECIPIENT,
    OK_SENDER,
    START_MAIL_INPUT,
    ehlo_reply,
    greeting,
    reply,
    shutting_down,
    timed_out,
    too_many_connections,
    too_many_errors,
)


def test_reply_line() -> None:
    assert reply(250, "2.1.0", "Ok") == b"250 2.1.0 Ok\r\n"
    # A lone surrogate (never from the wire: lines are decoded latin-1) cannot crash it.
    assert reply(550, "5.0.0", "x\udcff") == b"550 5.0.0 x?\r\n"


def test_ehlo_reply_continues_every_line_but_the_last() -> None:
    assert ehlo_reply("h", ("PIPELINING", "SIZE 10")) == (
        b"250-h\r\n250-PIPELINING\r\n250 SIZE 10\r\n"
    )
    assert ehlo_reply("h", ()) == b"250 h\r\n"


def test_fixed_lines_name_the_host() -> None:
    assert greeting("n1") == b"220 n1 ESMTP duravip\r\n"
    assert shutting_down("n1") == b"421 4.3.2 n1 Service shutting down\r\n"
    assert timed_out("n1") == b"421 4.4.2 n1 Error: timeout exceeded\r\n"
    assert too_many_errors("n1") == b"421 4.7.0 n1 Error: too many errors\r\n"
    assert too_many_connections("n1").startswith(b"421 4.7.0 n1 ")


def test_precomputed_replies_equal_their_formatted_form() -> None:
    assert OK == reply(250, "2.0.0", "Ok") == b"250 2.0.0 Ok\r\n"
    assert OK_SENDER == b"250 2.1.0 Ok\r\n" and OK_RECIPIENT == b"250 2.1.5 Ok\r\n"
    assert START_MAIL_INPUT == b"354 End data with <CR><LF>.<CR><LF>\r\n"
