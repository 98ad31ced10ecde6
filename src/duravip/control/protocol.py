"""Control protocol: command table, prefix matching and the line-JSON wire format.

Sans-IO: no trio here, so the matching rules and framing are tested directly
and both the Trio server and the blocking console share one definition.

Wire format: one JSON object per line each way, UTF-8, ``\\n`` terminated.

Request: ``{"cmd": "cluster duravip show", "args": [...], "json": false}``.
``cmd`` is split on whitespace and ``args`` appended verbatim (for arguments
that contain spaces); the longest registered command that is a prefix of the
words wins, case-insensitively, and the remaining words go to the handler.

Response: ``{"ok": true, "text": "...", "data": ..., "error": ""}``. With
``"json": true`` the server leaves ``text`` empty (machines read ``data``).
"""

from __future__ import annotations

import difflib
import itertools
import json
import logging
import re
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from ipaddress import IPv4Network
from pathlib import PurePath
from typing import Any

from attrs import frozen

from duravip.ipaddr import IPAddress

log = logging.getLogger(__name__)

#: Longest request line the server accepts (bytes, ``\r\n`` or ``\n`` excluded).
MAX_REQUEST_LINE = 64 * 1024
#: Deepest nesting of arrays and objects a request may have; a real one has 2.
#: Checked before ``json.loads``, whose C scanner recurses once per level and
#: raises ``RecursionError`` near ``sys.getrecursionlimit()``.
MAX_REQUEST_DEPTH = 32
#: Longest response line a client accepts; ``show tables`` for 10,240 IPs is a few MB.
MAX_RESPONSE_LINE = 64 * 1024 * 1024


@frozen
class Reply:
    """What a handler returns: a human rendering and the same facts as JSON-able data."""

    text: str = ""
    data: Any = None


class CommandError(Exception):
    """Raised by a handler (or the matcher) for a failure the operator should read."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class ProtocolError(Exception):
    """A request or response line that does not follow the wire format."""


Handler = Callable[[list[str]], Awaitable[Reply]]


@frozen
class Command:
    words: tuple[str, ...]
    handler: Handler
    help: str
    usage: str

    @property
    def name(self) -> str:
        return " ".join(self.words)


@frozen
class Request:
    words: tuple[str, ...]
    json: bool = False

    def to_line(self) -> bytes:
        """Encode for the wire; words with whitespace go to ``args`` so they survive."""
        head: list[str] = []
        rest = list(self.words)
        while rest and not any(c.isspace() for c in rest[0]) and rest[0]:
            head.append(rest.pop(0))
        obj = {"cmd": " ".join(head), "args": rest, "json": self.json}
        return json.dumps(obj, separators=(",", ":")).encode() + b"\n"

    @classmethod
    def from_line(cls, line: bytes) -> Request:
        """Decode one request line; any malformed input is a :class:`ProtocolError`.

        The line comes from whoever may connect, so nothing else may escape:
        an exception here would end the control server and with it the daemon.
        """
        if len(line) > MAX_REQUEST_LINE:
            raise ProtocolError(f"request longer than {MAX_REQUEST_LINE} bytes")
        try:
            # strictly UTF-8: json.loads(bytes) would also guess UTF-16/32
            text = line.decode("utf-8")
        except UnicodeDecodeError as e:
            raise ProtocolError(f"request is not UTF-8: {e}") from e
        if nests_deeper_than(text, MAX_REQUEST_DEPTH):
            raise ProtocolError(f"request nests deeper than {MAX_REQUEST_DEPTH} levels")
        try:
            obj = json.loads(text)
        except (ValueError, RecursionError) as e:  # RecursionError: belt and braces
            raise ProtocolError(f"request is not JSON: {e}") from e
        if not isinstance(obj, dict):
            raise ProtocolError("request must be a JSON object")
        cmd = obj.get("cmd", "")
        args = obj.get("args", [])
        as_json = obj.get("json", False)
        if not isinstance(cmd, str):
            raise ProtocolError("'cmd' must be a string")
        if not isinstance(args, list) or not all(isinstance(a, str) for a in args):
            raise ProtocolError("'args' must be a list of strings")
        if not isinstance(as_json, bool):
            raise ProtocolError("'json' must be a boolean")
        words = (*cmd.split(), *args)
        for w in words:
            # a "\ud800" escape decodes to a lone surrogate: not text any handler,
            # log line or reply encoder should have to cope with
            try:
                w.encode("utf-8")
            except UnicodeEncodeError as e:
                raise ProtocolError(f"request holds an invalid Unicode string: {e}") from e
        return cls(words=words, json=as_json)


@frozen
class Response:
    ok: bool
    text: str = ""
    data: Any = None
    error: str = ""

    def to_line(self) -> bytes:
        """Encode for the wire; data that JSON cannot hold becomes an error response."""
        obj = {"ok": self.ok, "text": self.text, "data": self.data, "error": self.error}
        try:
            return json.dumps(obj, default=_jsonable, separators=(",", ":")).encode() + b"\n"
        except (TypeError, ValueError) as e:
            log.error("control reply is not JSON-serialisable: %s", e)
            err = {"ok": False, "text": "", "data": None,
                   "error": f"internal error: reply is not JSON-serialisable: {e}"}
            return json.dumps(err, separators=(",", ":")).encode() + b"\n"

    @classmethod
    def from_line(cls, line: bytes) -> Response:
        try:
            obj = json.loads(line)
        except (ValueError, RecursionError) as e:
            raise ProtocolError(f"response is not JSON: {e}") from e
        if not isinstance(obj, dict) or not isinstance(obj.get("ok"), bool):
            raise ProtocolError("response must be an object with a boolean 'ok'")
        return cls(
            ok=obj["ok"],
            text=str(obj.get("text") or ""),
            data=obj.get("data"),
            error=str(obj.get("error") or ""),
        )


def _jsonable(o: object) -> Any:
    """Let handlers return addresses, paths and sets without converting them."""
    if isinstance(o, IPAddress | IPv4Network | PurePath):
        return str(o)
    if isinstance(o, set | frozenset):
        return sorted(o, key=str)
    if isinstance(o, tuple):
        return list(o)
    raise TypeError(f"{type(o).__name__} is not JSON serialisable")


#: A JSON string literal (an unterminated one runs to the end of the text).
#: Unrolled so that it never backtracks: one linear pass over any input.
_JSON_STRING = re.compile(r'"[^"\\]*(?:\\[\s\S][^"\\]*)*"?')
_NOT_BRACKET = re.compile(r"[^\[\]{}]+")
_STEP = {"[": 1, "{": 1, "]": -1, "}": -1}


def nests_deeper_than(text: str, limit: int) -> bool:
    """Whether the arrays and objects of ``text`` nest more than ``limit`` deep.

    Linear and without recursion (C loops only: about 2 ms for a 64 KiB line
    of brackets). Sound for ``json.loads``: string literals are dropped as
    JSON defines them; wherever this view of the text departs from the
    parser's (a stray quote, a bad escape, a close after the top-level value)
    the parser has already failed, so it never descends deeper than the
    deepest running count of opens minus closes. Lines with few brackets,
    i.e. every real request, skip the scan.
    """
    if text.count("[") + text.count("{") <= limit:
        return False
    brackets = _NOT_BRACKET.sub("", _JSON_STRING.sub("", text))
    if len(brackets) <= limit:
        return False
    return max(itertools.accumulate(map(_STEP.__getitem__, brackets))) > limit


class LineTooLong(ProtocolError):
    """A peer sent more than the line bound without a newline."""


class LineBuffer:
    """Splits a byte stream into lines, refusing any line longer than ``limit``."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._buf = bytearray()
        #: How much of ``_buf`` is known to hold no newline: bytes trickled in
        #: one at a time are then scanned once, not once per read.
        self._scanned = 0

    def feed(self, data: bytes) -> list[bytes]:
        """Add received bytes; return the complete lines (without ``\\n``, ``\\r`` stripped).

        ``limit`` counts the line without its terminator (``\\n`` or ``\\r\\n``),
        so a line of exactly ``limit`` bytes is accepted in either form.
        """
        self._buf += data
        lines: list[bytes] = []
        start = 0
        while (nl := self._buf.find(b"\n", max(start, self._scanned))) >= 0:
            end = nl - 1 if nl > start and self._buf[nl - 1] == 0x0D else nl
            if end - start > self.limit:
                raise LineTooLong(f"line longer than {self.limit} bytes")
            lines.append(bytes(self._buf[start:end]).rstrip(b"\r"))
            start = nl + 1
        del self._buf[:start]
        self._scanned = len(self._buf)
        pending = len(self._buf)
        if pending and self._buf[-1] == 0x0D:
            pending -= 1  # may be the first half of CRLF
        if pending > self.limit:
            raise LineTooLong(f"line longer than {self.limit} bytes")
        return lines

    @property
    def pending(self) -> int:
        return len(self._buf)


def _key(words: Iterable[str]) -> tuple[str, ...]:
    return tuple(w.lower() for w in words)


class CommandRegistry:
    """The command table the daemon fills; matching is by longest word prefix.

    A built-in ``help`` lists every command; its ``data`` is what the console
    uses for tab completion.
    """

    def __init__(self) -> None:
        self._commands: dict[tuple[str, ...], Command] = {}
        self.add("help", self._help, "list commands, or those starting with the given words",
                 "help [WORDS...]")

    def add(self, name: str, handler: Handler, help: str, usage: str = "") -> None:
        """Register ``handler`` for the words of ``name`` (case-insensitive)."""
        words = tuple(name.split())
        if not words:
            raise ValueError("command name is empty")
        key = _key(words)
        if key in self._commands:
            raise ValueError(f"command {name!r} is already registered")
        self._commands[key] = Command(words=words, handler=handler, help=help,
                                      usage=usage or name)

    def remove(self, name: str) -> None:
        del self._commands[_key(name.split())]

    @property
    def commands(self) -> Mapping[tuple[str, ...], Command]:
        return self._commands

    def match(self, words: Sequence[str]) -> tuple[Command, list[str]]:
        """The command whose words are the longest prefix of ``words``, and the rest."""
        key = _key(words)
        for n in range(len(key), 0, -1):
            cmd = self._commands.get(key[:n])
            if cmd is not None:
                return cmd, list(words[n:])
        if not words:
            raise CommandError("empty command; try 'help'")
        typed = " ".join(words)
        names = [c.name for c in self._commands.values()]
        close = difflib.get_close_matches(typed.lower(), names, n=1, cutoff=0.6)
        hint = f"; did you mean '{close[0]}'?" if close else "; try 'help'"
        raise CommandError(f"unknown command '{typed}'{hint}")

    async def dispatch(self, request: Request) -> Response:
        """Run the matched handler; every failure becomes an ``ok: false`` response."""
        try:
            cmd, args = self.match(request.words)
            reply = await cmd.handler(args)
        except CommandError as e:
            return Response(ok=False, error=e.message)
        except Exception as e:  # a handler bug must not take the control socket down
            log.exception("control command %r failed", " ".join(request.words))
            return Response(ok=False, error=f"internal error: {type(e).__name__}: {e}")
        return Response(ok=True, text="" if request.json else reply.text, data=reply.data)

    async def _help(self, args: list[str]) -> Reply:
        prefix = _key(args)
        cmds = sorted(
            (c for k, c in self._commands.items() if k[: len(prefix)] == prefix),
            key=lambda c: _key(c.words),
        )
        if not cmds:
            raise CommandError(f"no command starts with '{' '.join(args)}'")
        width = max(len(c.usage) for c in cmds)
        text = "\n".join(f"{c.usage.ljust(width)}  {c.help}" for c in cmds)
        data = [{"command": c.name, "usage": c.usage, "help": c.help} for c in cmds]
        return Reply(text=text, data=data)
