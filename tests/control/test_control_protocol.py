"""The sans-IO control protocol: matching, dispatch, framing, JSON encoding."""

from __future__ import annotations

import json
from ipaddress import IPv4Address

import pytest
import trio
from hypothesis import given
from hypothesis import strategies as st

from duravip.control.protocol import (
    CommandError,
    CommandRegistry,
    LineBuffer,
    LineTooLong,
    ProtocolError,
    Reply,
    Request,
    Response,
)


def _echo(tag: str):  # type: ignore[no-untyped-def]
    async def handler(args: list[str]) -> Reply:
        return Reply(text=f"{tag} {' '.join(args)}".strip(), data={"tag": tag, "args": args})

    return handler


def make_registry() -> CommandRegistry:
    r = CommandRegistry()
    r.add("cluster duravip show", _echo("show"), "show DuraVIPs")
    r.add("cluster duravip show tables", _echo("tables"), "show as JSON tables")
    r.add("cluster duravip explain", _echo("explain"), "explain one IP",
          "cluster duravip explain IP")
    r.add("broadcast cluster duravip move", _echo("move"), "move an IP",
          "broadcast cluster duravip move IP to NODE")
    return r


def test_longest_prefix_wins() -> None:
    r = make_registry()
    cmd, args = r.match(["cluster", "duravip", "show", "tables"])
    assert cmd.name == "cluster duravip show tables" and args == []
    cmd, args = r.match(["cluster", "duravip", "show"])
    assert cmd.name == "cluster duravip show" and args == []
    cmd, args = r.match(["cluster", "duravip", "show", "10.1.1.1"])
    assert cmd.name == "cluster duravip show" and args == ["10.1.1.1"]


def test_case_insensitive_words_args_keep_case() -> None:
    r = make_registry()
    cmd, args = r.match(["BROADCAST", "Cluster", "duraVIP", "move", "10.1.1.1", "to", "Node-A"])
    assert cmd.name == "broadcast cluster duravip move"
    assert args == ["10.1.1.1", "to", "Node-A"]


def test_unknown_and_empty_commands() -> None:
    r = make_registry()
    with pytest.raises(CommandError, match="did you mean 'cluster duravip show'"):
        r.match(["cluster", "duravip", "shwo"])
    with pytest.raises(CommandError, match="try 'help'"):
        r.match(["frobnicate"])
    with pytest.raises(CommandError, match="empty"):
        r.match([])
    # a registered command's prefix alone is not a command
    with pytest.raises(CommandError):
        r.match(["cluster", "duravip"])


def test_duplicate_and_empty_registration() -> None:
    r = make_registry()
    with pytest.raises(ValueError, match="already"):
        r.add("Cluster  DuraVIP show", _echo("x"), "dup")
    with pytest.raises(ValueError, match="empty"):
        r.add("   ", _echo("x"), "empty")
    with pytest.raises(ValueError, match="already"):
        r.add("help", _echo("x"), "help is built in")


async def test_dispatch_ok_error_and_crash() -> None:
    r = make_registry()

    async def fails(args: list[str]) -> Reply:
        raise CommandError("no such IP: " + args[0])

    async def crashes(args: list[str]) -> Reply:
        raise RuntimeError("boom")

    r.add("fails", fails, "always fails")
    r.add("crashes", crashes, "handler bug")
    ok = await r.dispatch(Request(("cluster", "duravip", "explain", "10.1.1.1")))
    assert ok == Response(ok=True, text="explain 10.1.1.1",
                          data={"tag": "explain", "args": ["10.1.1.1"]})
    as_json = await r.dispatch(Request(("cluster", "duravip", "show"), json=True))
    assert as_json.ok and as_json.text == "" and as_json.data == {"tag": "show", "args": []}
    bad = await r.dispatch(Request(("fails", "1.2.3.4")))
    assert bad == Response(ok=False, error="no such IP: 1.2.3.4")
    crash = await r.dispatch(Request(("crashes",)))
    assert not crash.ok and "RuntimeError: boom" in crash.error
    unknown = await r.dispatch(Request(("nope",)))
    assert not unknown.ok and "unknown command 'nope'" in unknown.error


async def test_help_lists_commands_with_usage() -> None:
    r = make_registry()
    resp = await r.dispatch(Request(("help",)))
    assert resp.ok
    names = [d["command"] for d in resp.data]
    assert names == sorted(names)
    assert "help" in names and "cluster duravip show tables" in names
    lines = resp.text.splitlines()
    assert any(
        ln.startswith("broadcast cluster duravip move IP to NODE") and ln.endswith("move an IP")
        for ln in lines
    )
    # usage column aligned: every help text starts at the same column
    starts = {ln.index(d["help"]) for ln, d in zip(lines, resp.data, strict=True)}
    assert len(starts) == 1
    sub = await r.dispatch(Request(("HELP", "cluster", "duravip")))
    assert {d["command"] for d in sub.data} == {
        "cluster duravip show", "cluster duravip show tables", "cluster duravip explain"}
    none = await r.dispatch(Request(("help", "zzz")))
    assert not none.ok


def test_request_round_trip_keeps_words_with_spaces() -> None:
    req = Request(("config", "reload", "a file.conf", "x"), json=True)
    line = req.to_line()
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    obj = json.loads(line)
    assert obj == {"cmd": "config reload", "args": ["a file.conf", "x"], "json": True}
    assert Request.from_line(line) == req


@given(st.lists(st.text(min_size=1, max_size=12), max_size=8), st.booleans())
def test_request_round_trip_property(words: list[str], as_json: bool) -> None:
    req = Request(tuple(words), json=as_json)
    line = req.to_line()
    assert line.count(b"\n") == 1  # JSON escapes every newline inside strings
    decoded = Request.from_line(line[:-1])
    # whitespace-free leading words travel in cmd, the rest verbatim in args
    assert decoded == req


@pytest.mark.parametrize(
    "line",
    [b"not json", b"[1,2]", b'{"cmd": 3}', b'{"cmd": "x", "args": "y"}',
     b'{"cmd": "x", "args": [1]}', b'{"cmd": "x", "json": "yes"}', b"\xff\xfe"],
)
def test_bad_requests_raise_protocol_error(line: bytes) -> None:
    with pytest.raises(ProtocolError):
        Request.from_line(line)


def test_response_encodes_addresses_and_sets() -> None:
    resp = Response(ok=True, data={"ip": IPv4Address("10.1.1.1"), "held": {"b", "a"},
                                   "pair": (1, 2)})
    back = Response.from_line(resp.to_line())
    assert back.data == {"ip": "10.1.1.1", "held": ["a", "b"], "pair": [1, 2]}
    with pytest.raises(ProtocolError):
        Response.from_line(b'{"text": "no ok"}')


def test_unserialisable_reply_becomes_an_error_line() -> None:
    line = Response(ok=True, text="t", data={"x": object()}).to_line()
    assert line.count(b"\n") == 1
    back = Response.from_line(line)
    assert not back.ok and "not JSON-serialisable" in back.error
    mixed = Response.from_line(Response(ok=True, data={1, "a"}).to_line())
    assert mixed.ok and mixed.data == [1, "a"]


@given(st.lists(st.binary(max_size=40).map(lambda b: b.replace(b"\n", b"")), max_size=10),
       st.lists(st.integers(min_value=1, max_value=17), min_size=1, max_size=5))
def test_line_buffer_any_chunking(lines: list[bytes], cuts: list[int]) -> None:
    stream = b"".join(ln + b"\n" for ln in lines)
    buf = LineBuffer(limit=64)
    got: list[bytes] = []
    pos = 0
    i = 0
    while pos < len(stream):
        n = cuts[i % len(cuts)]
        got += buf.feed(stream[pos:pos + n])
        pos += n
        i += 1
    assert got == [ln.rstrip(b"\r") for ln in lines]
    assert buf.pending == 0


def test_line_buffer_bound() -> None:
    buf = LineBuffer(limit=10)
    assert buf.feed(b"0123456789\nab") == [b"0123456789"]
    with pytest.raises(LineTooLong):
        buf.feed(b"c" * 9)  # 11 pending bytes, no newline
    with pytest.raises(LineTooLong):
        LineBuffer(limit=4).feed(b"12345\n")


async def test_handlers_run_concurrently_with_registry() -> None:
    """dispatch holds no lock: a slow handler does not block another."""
    r = CommandRegistry()
    gate = trio.Event()

    async def slow(args: list[str]) -> Reply:
        await gate.wait()
        return Reply("slow")

    async def fast(args: list[str]) -> Reply:
        gate.set()
        return Reply("fast")

    r.add("slow", slow, "")
    r.add("fast", fast, "")
    results: list[str] = []
    with trio.fail_after(5):
        async with trio.open_nursery() as n:
            async def run(word: str) -> None:
                results.append((await r.dispatch(Request((word,)))).text)
            n.start_soon(run, "slow")
            await trio.sleep(0)
            n.start_soon(run, "fast")
    assert results == ["fast", "slow"]


def test_response_nesting_too_deep_is_a_protocol_error_for_the_console() -> None:
    with pytest.raises(ProtocolError):
        Response.from_line(b'{"ok":true,"data":' + b"[" * 100_000 + b"}")
