"""Lexer and parser for the stanza syntax, producing a raw tree with positions.

The grammar is the one the reference product uses::

    body    := item*
    item    := NAME "=" value
             | NAME [arg] "{" body "}"
             | NAME arg                 # a stanza without a block
    value   := scalar | "(" scalar* ")"
    scalar  := STRING | BARE
    arg     := scalar

Newlines carry no meaning, ``#`` starts a comment that runs to the end of the
line, ``;`` is accepted as a separator and ignored. The parser knows nothing
about which keys exist: that is the structurer's job, so it stays small and
every error it raises is about syntax only.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Final

from attrs import frozen

from duravip.config.diagnostics import ConfigError, Diagnostic
from duravip.config.model import SourceLoc

#: Deepest block nesting accepted; real configs use three levels.
MAX_DEPTH: Final = 64


@frozen
class Scalar:
    """A single value, quoted or bare, as written (quotes removed, escapes resolved)."""

    text: str
    quoted: bool
    loc: SourceLoc


@frozen
class ListValue:
    """``( a b c )``."""

    items: tuple[Scalar, ...]
    loc: SourceLoc


Value = Scalar | ListValue


@frozen
class Assign:
    """``key = value``; ``loc`` is where the key starts."""

    key: str
    value: Value
    loc: SourceLoc


@frozen
class Stanza:
    """``Name [arg] [{ body }]``; ``body`` is None when no block was written."""

    name: str
    arg: Scalar | None
    body: tuple[Node, ...] | None
    loc: SourceLoc


Node = Assign | Stanza


@frozen
class Document:
    """A parsed file: its top-level items and where it came from."""

    source: str
    items: tuple[Node, ...]


# One token after optional blanks, on a single line (no token spans lines).
# Groups by number: 1 comment, 2 string, 3 unterminated string, 4 punctuation,
# 5 bare word, 6 anything else; no group: end of line.
_TOKEN_RE: Final = re.compile(
    r"""[ \t\r\f\v;]*
    (?: (\#.*)
      | ("(?:[^"\\]|\\.)*")
      | (")
      | ([{}()=])
      | ([^\s{}()="\#;\x00-\x1f\x7f]+)
      | (.)
      | $ )""",
    re.VERBOSE,
)

_ESCAPES: Final = {'"': '"', "\\": "\\", "n": "\n", "t": "\t", "r": "\r", "'": "'"}
_ESCAPE_RE: Final = re.compile(r"\\(.)")

# Token kinds.
_STRING: Final = "string"
_BARE: Final = "bare"
_EOF: Final = "end of file"

_Token = tuple[str, str, int, int]  # kind, text, line, col


def _describe(tok: _Token) -> str:
    kind, text = tok[0], tok[1]
    if kind == _EOF:
        return "end of file"
    if kind == _STRING:
        return f'string "{text}"'
    if kind == _BARE:
        return f"'{text}'"
    return f"'{kind}'"


class _Lexer:
    def __init__(self, text: str, source: str) -> None:
        self.text = text
        self.source = source

    def error(self, line: int, col: int, message: str, hint: str | None = None) -> ConfigError:
        return ConfigError([Diagnostic("error", SourceLoc(self.source, line, col), message, hint)])

    def _unescape(self, raw: str, line: int, col: int) -> str:
        if "\\" not in raw:
            return raw

        def sub(m: re.Match[str]) -> str:
            ch = m.group(1)
            if ch not in _ESCAPES:
                raise self.error(
                    line,
                    col + 1 + m.start(),
                    f"unknown escape '\\{ch}' in string",
                    'use \\" \\\\ \\n \\t or \\r',
                )
            return _ESCAPES[ch]

        return _ESCAPE_RE.sub(sub, raw)

    def tokens(self) -> list[_Token]:
        out: list[_Token] = []
        append = out.append
        line = 0
        text = ""
        for line, text in enumerate(self.text.split("\n"), 1):
            for m in _TOKEN_RE.finditer(text):
                group = m.lastindex
                if group == 5:
                    append((_BARE, m.group(5), line, m.start(5) + 1))
                elif group == 2:
                    col = m.start(2) + 1
                    append((_STRING, self._unescape(m.group(2)[1:-1], line, col), line, col))
                elif group == 4:
                    punct = m.group(4)
                    append((punct, punct, line, m.start(4) + 1))
                elif group == 3:
                    raise self.error(
                        line,
                        m.start(3) + 1,
                        "unterminated string",
                        'close it with " on the same line',
                    )
                elif group == 6:
                    raise self.error(
                        line,
                        m.start(6) + 1,
                        f"unexpected character {m.group(6)!r}",
                        "quote values with odd characters",
                    )
                # group 1 (comment) and None (end of line) produce nothing
        append((_EOF, "", line, len(text) + 1))
        return out


class _Parser:
    def __init__(self, tokens: list[_Token], lexer: _Lexer) -> None:
        self.toks = tokens
        self.pos = 0
        self.lexer = lexer
        self.source = lexer.source

    def loc(self, tok: _Token) -> SourceLoc:
        return SourceLoc(self.source, tok[2], tok[3])

    def fail(self, tok: _Token, expected: str, hint: str | None = None) -> ConfigError:
        return self.lexer.error(
            tok[2], tok[3], f"expected {expected}, found {_describe(tok)}", hint
        )

    def body(self, depth: int, opener: _Token | None) -> tuple[Node, ...]:
        items: list[Node] = []
        toks = self.toks
        while True:
            tok = toks[self.pos]
            kind = tok[0]
            if kind == "}":
                if opener is None:
                    raise self.fail(tok, "a key or stanza name", "this '}' closes no block")
                self.pos += 1
                return tuple(items)
            if kind == _EOF:
                if opener is not None:
                    raise self.fail(
                        tok,
                        "'}'",
                        f"the block opened at line {opener[2]} col {opener[3]} is not closed",
                    )
                return tuple(items)
            if kind != _BARE:
                raise self.fail(tok, "a key or stanza name")
            self.pos += 1
            items.append(self.item(tok, depth))

    def scalar(self, tok: _Token) -> Scalar:
        return Scalar(tok[1], tok[0] == _STRING, self.loc(tok))

    def item(self, name: _Token, depth: int) -> Node:
        toks = self.toks
        tok = toks[self.pos]
        kind = tok[0]
        if kind == "=":
            self.pos += 1
            return Assign(name[1], self.value(name), self.loc(name))
        arg: Scalar | None = None
        if kind in (_STRING, _BARE):
            self.pos += 1
            arg = self.scalar(tok)
            tok = toks[self.pos]
            kind = tok[0]
            if kind != "{":
                return Stanza(name[1], arg, None, self.loc(name))
        if kind != "{":
            raise self.fail(tok, f"'=', '{{' or an argument after '{name[1]}'")
        if depth >= MAX_DEPTH:
            raise self.fail(tok, f"at most {MAX_DEPTH} nested blocks")
        self.pos += 1
        body = self.body(depth + 1, tok)
        return Stanza(name[1], arg, body, self.loc(name))

    def value(self, key: _Token) -> Value:
        tok = self.toks[self.pos]
        kind = tok[0]
        if kind in (_STRING, _BARE):
            self.pos += 1
            return self.scalar(tok)
        if kind == "(":
            self.pos += 1
            items: list[Scalar] = []
            while True:
                t = self.toks[self.pos]
                if t[0] == ")":
                    self.pos += 1
                    return ListValue(tuple(items), self.loc(tok))
                if t[0] != _STRING and t[0] != _BARE:
                    raise self.fail(t, "a list item or ')'")
                self.pos += 1
                items.append(self.scalar(t))
        raise self.fail(tok, f"a value after '{key[1]} ='", 'e.g. key = "value" or key = ( a b )')


def parse(text: str, source: str = "<string>") -> Document:
    """Parse ``text``; raise :class:`ConfigError` with ``file:line:col`` on bad syntax."""
    lexer = _Lexer(text, source)
    parser = _Parser(lexer.tokens(), lexer)
    return Document(source, parser.body(0, None))


def parse_file(path: str | Path) -> Document:
    """Read and parse one file; unreadable files become a :class:`ConfigError` too."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError([Diagnostic("error", None, f"cannot read {p}: {exc}")]) from exc
    return parse(text, str(p))
