"""Command argument parsing of the SMTP core, without a session."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from duravip.smtp.parsing import (
    Refusal,
    parse_mail_from,
    parse_path,
    parse_rcpt_to,
    split_command,
)

MAX = 1000


def mail(arg: str, extra: frozenset[str] = frozenset()) -> tuple[str, dict[str, str]] | Refusal:
    return parse_mail_from(arg, max_size=MAX, extra_params=extra)


def test_split_command_upper_cases_the_verb_only() -> None:
    assert split_command("mail FROM:<a@b>  ") == ("MAIL", "FROM:<a@b>")
    assert split_command("noop") == ("NOOP", "")
    assert split_command("") == ("", "")


@pytest.mark.parametrize(
    ("text", "want"),
    [
        ("<a@b>", ("a@b", "")),
        ("a@b", ("a@b", "")),
        (" <a@b>  SIZE=1 ", ("a@b", "SIZE=1")),
        ("<>", ("", "")),
        ("<@relay1,@relay2:user@d>", ("user@d", "")),
        ("<a@b", None),
        ("<a@b>SIZE=1", None),
        ("<@relay-without-colon>", None),
        ("<a b@c>", None),
        ("<a\x7f@b>", None),
        ("<\u00e9@b>", None),
    ],
)
def test_parse_path(text: str, want: tuple[str, str] | None) -> None:
    assert parse_path(text) == want


@given(st.text(max_size=40))
def test_parse_path_never_returns_a_forbidden_character(text: str) -> None:
    got = parse_path(text)
    if got is not None:
        addr = got[0]
        assert addr.isascii()
        assert not any(c in addr for c in "<> \x7f") and all(ord(c) > 0x20 for c in addr)


def test_mail_from_parameters() -> None:
    assert mail("FROM:<a@b> size=10 body=8bitmime") == ("a@b", {"SIZE": "10", "BODY": "8BITMIME"})
    assert mail("from:<>") == ("", {})
    assert mail("FROM:<a@b> XBINDING=b1", frozenset({"XBINDING"})) == ("a@b", {"XBINDING": "b1"})


@pytest.mark.parametrize(
    ("arg", "code", "enhanced"),
    [
        ("TO:<a@b>", 501, "5.5.4"),
        ("FROM:<a@b", 501, "5.1.7"),
        ("FROM:<a@b> SIZE=1 SIZE=2", 501, "5.5.4"),
        ("FROM:<a@b> SIZE=x", 501, "5.5.4"),
        ("FROM:<a@b> SIZE", 501, "5.5.4"),
        ("FROM:<a@b> BODY=BINARYMIME", 501, "5.5.4"),
        ("FROM:<a@b> XBINDING=b1", 555, "5.5.4"),
    ],
)
def test_mail_from_errors_count_as_client_errors(arg: str, code: int, enhanced: str) -> None:
    got = mail(arg)
    assert isinstance(got, Refusal)
    assert (got.code, got.enhanced, got.is_error) == (code, enhanced, True)


def test_declared_size_over_the_limit_is_a_policy_refusal_not_an_error() -> None:
    assert mail(f"FROM:<a@b> SIZE={MAX}") == ("a@b", {"SIZE": str(MAX)})
    got = mail(f"FROM:<a@b> SIZE={MAX + 1}")
    assert isinstance(got, Refusal)
    assert (got.code, got.enhanced, got.is_error) == (552, "5.3.4", False)


def test_rcpt_to() -> None:
    assert parse_rcpt_to("to:<c@d>") == "c@d"
    for arg, code in (("FROM:<c@d>", 501), ("TO:<>", 501), ("TO:<c@d> NOTIFY=NEVER", 555)):
        got = parse_rcpt_to(arg)
        assert isinstance(got, Refusal) and got.code == code and got.is_error
