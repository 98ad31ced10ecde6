"""Command-line parsing of the SMTP server: paths and MAIL/RCPT arguments (no trio).

Pure functions: they see only the argument text and the limits they are
given, never the session state, so the state machine keeps the order of the
checks (HELO first, no nested MAIL, ...) and these keep the syntax.
"""

from __future__ import annotations

import re
from collections.abc import Container

from attrs import frozen

__all__ = [
    "UNIMPLEMENTED",
    "Refusal",
    "parse_mail_from",
    "parse_path",
    "parse_rcpt_to",
    "split_command",
]

#: Characters never valid in an unquoted path: controls, space, DEL, brackets.
_BAD_ADDR_CHAR = re.compile(r"[\x00-\x20\x7f<>]")

#: Commands we recognise but do not implement: 502, not 500 (STARTTLS is the
#: server's own handler: 502 there too on a listener without TLS).
UNIMPLEMENTED = frozenset({"EXPN", "TURN", "ETRN", "AUTH", "BDAT", "ATRN", "SEND", "SOML", "SAML"})


@frozen
class Refusal:
    """The reply to a command argument that cannot be accepted."""

    code: int
    enhanced: str
    text: str
    #: Counts towards ``max_errors`` (a client error); False for a policy refusal
    #: such as a declared SIZE over the limit.
    is_error: bool = True


def split_command(line: str) -> tuple[str, str]:
    """``"mail FROM:<a>"`` -> ``("MAIL", "FROM:<a>")``: verb upper-cased, argument stripped."""
    verb, _, arg = line.partition(" ")
    return verb.upper(), arg.strip(" ")


def parse_path(text: str) -> tuple[str, str] | None:
    """Split ``<addr> params`` into (addr, params); None on bad syntax.

    Brackets are optional (lenient, like most MTAs); a source route
    (``<@a,@b:user@d>``) is dropped as RFC 5321 section 4.1.1.3 asks.
    """
    text = text.lstrip(" ")
    if text.startswith("<"):
        end = text.find(">")
        if end < 0:
            return None
        addr, rest = text[1:end], text[end + 1 :]
        if rest and not rest.startswith(" "):
            return None
    else:
        addr, _, rest = text.partition(" ")
    if addr.startswith("@"):
        colon = addr.find(":")
        if colon < 0:
            return None
        addr = addr[colon + 1 :]
    if not addr.isascii() or _BAD_ADDR_CHAR.search(addr):
        return None
    return addr, rest.strip(" ")


def parse_mail_from(
    arg: str, *, max_size: int, extra_params: Container[str]
) -> tuple[str, dict[str, str]] | Refusal:
    """``FROM:<addr> [SIZE=n] [BODY=7BIT|8BITMIME] [extras]`` -> (addr, params).

    Parameter keys are upper-cased, as is BODY's value; a key in
    ``extra_params`` is accepted with any value (the caller checks it).
    """
    if arg[:5].upper() != "FROM:":
        return Refusal(501, "5.5.4", "Syntax: MAIL FROM:<address>")
    parsed = parse_path(arg[5:])
    if parsed is None:
        return Refusal(501, "5.1.7", "Bad sender address syntax")
    addr, rest = parsed
    params: dict[str, str] = {}
    for token in rest.split():
        key, eq, value = token.partition("=")
        key = key.upper()
        if key in params:
            return Refusal(501, "5.5.4", f"Error: duplicate {key} parameter")
        if key == "SIZE":
            if not (eq and value.isdigit() and value.isascii()):
                return Refusal(501, "5.5.4", "Error: bad SIZE parameter")
            if int(value) > max_size:
                return Refusal(552, "5.3.4", "Error: message size exceeds fixed limit", False)
        elif key == "BODY":
            value = value.upper()
            if value not in ("7BIT", "8BITMIME"):
                return Refusal(501, "5.5.4", "Error: BODY must be 7BIT or 8BITMIME")
        elif key not in extra_params:
            return Refusal(555, "5.5.4", f"Error: unsupported parameter {key}")
        params[key] = value
    return addr, params


def parse_rcpt_to(arg: str) -> str | Refusal:
    """``TO:<addr>`` -> addr (never empty; no RCPT parameters are supported)."""
    if arg[:3].upper() != "TO:":
        return Refusal(501, "5.5.4", "Syntax: RCPT TO:<address>")
    parsed = parse_path(arg[3:])
    if parsed is None or not parsed[0]:
        return Refusal(501, "5.1.3", "Bad recipient address syntax")
    addr, rest = parsed
    if rest:
        return Refusal(555, "5.5.4", "Error: unsupported RCPT parameter")
    return addr
