"""Issue 17, control socket: hostile request lines and unauthorised peers.

Every crash input is answered with an error, counted, and the server keeps
answering. Peer credentials are checked with real Unix sockets: the refused
client is a forked child that dropped to ``nobody`` before connecting, since
``SO_PEERCRED`` records the credentials of the ``connect()`` call.
"""

from __future__ import annotations

import contextlib
import grp
import json
import os
import re
import select
import shutil
import signal
import socket
import stat
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio
from hypothesis import given, settings
from hypothesis import strategies as st

from duravip.config import check_text
from duravip.control.protocol import (
    MAX_REQUEST_DEPTH,
    MAX_REQUEST_LINE,
    CommandRegistry,
    LineBuffer,
    LineTooLong,
    ProtocolError,
    Reply,
    Request,
)
from duravip.control.server import PeerCred, peer_allowed, serve

REPO = Path(__file__).resolve().parent.parent.parent
NOBODY = 65534

# --- the sans-IO decoder -------------------------------------------------------


def _decodes_or_protocol_error(line: bytes) -> None:
    try:
        req = Request.from_line(line)
    except ProtocolError:
        return
    assert isinstance(req.words, tuple) and all(isinstance(w, str) for w in req.words)
    assert isinstance(req.json, bool)


@pytest.mark.parametrize(
    "line",
    [
        b"[" * 60_000,
        b"{" * 60_000,
        b'{"cmd":' * 9_000,
        b'{"cmd":"x","args":' + b"[" * 30_000 + b"]" * 30_000 + b"}",
        b"[" * (MAX_REQUEST_DEPTH + 1) + b"]" * (MAX_REQUEST_DEPTH + 1),
    ],
    ids=["brackets", "braces", "keys", "balanced-args", "just-too-deep"],
)
def test_deep_nesting_is_a_protocol_error(line: bytes) -> None:
    with pytest.raises(ProtocolError, match="nest"):
        Request.from_line(line)


@pytest.mark.parametrize(
    "line",
    [
        b"\xff\xfe{}",  # not UTF-8 (json would guess UTF-16 from the bytes)
        b'{"cmd":"\xc3"}',  # truncated UTF-8 sequence
        b"[]",  # a list where an object is expected
        b'"cluster info"',
        b"null",
        b"1" * 5000,  # beyond int_max_str_digits
        b'{"cmd":' + b"9" * 5000 + b"}",
        b'{"cmd":1e999}',
        b'{"cmd":"x","args":"a"}',
        b'{"cmd":"x","args":[1]}',
        b'{"cmd":"x","args":[["a"]]}',
        b'{"cmd":"x","json":1}',
        b'{"cmd":"x","json":NaN}',
        b'{"cmd":"\\ud800"}',  # a lone surrogate: not a Unicode string
        b'{"cmd":"x","args":["\\udfff"]}',
        b'{"cmd":["cluster","info"]}',
    ],
)
def test_malformed_requests_are_protocol_errors(line: bytes) -> None:
    with pytest.raises(ProtocolError):
        Request.from_line(line)


def test_brackets_inside_strings_do_not_count_as_nesting() -> None:
    words = ["[" * 5000, "{" * 5000, '\\"[[[', "]]]"]
    line = json.dumps({"cmd": "x", "args": words}).encode()
    assert Request.from_line(line).words == ("x", *words)


_TOKENS = [b"[", b"{", b"]", b"}", b'"', b"\\", b":", b",", b"9", b'{"cmd":', b'"args":[']
#: Arbitrary bytes, plus runs of JSON punctuation long enough to reach any recursion limit.
_lines = st.binary(max_size=2048) | st.lists(
    st.tuples(st.sampled_from(_TOKENS) | st.binary(min_size=1, max_size=4), st.integers(1, 3000)),
    max_size=6,
).map(lambda parts: b"".join(tok * n for tok, n in parts))


@given(_lines)
@settings(max_examples=500, deadline=None)
def test_arbitrary_bytes_never_raise_anything_else(line: bytes) -> None:
    _decodes_or_protocol_error(line)


_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=8), kids,
                                                                max_size=4),
    max_leaves=30,
)


@given(
    obj=st.fixed_dictionaries({}, optional={"cmd": _json, "args": _json, "json": _json}) | _json,
    depth=st.integers(0, 3000),
    tail=st.binary(max_size=16),
)
@settings(max_examples=300, deadline=None)
def test_json_shaped_garbage_never_raises_anything_else(obj: Any, depth: int, tail: bytes) -> None:
    body = json.dumps(obj).encode()
    _decodes_or_protocol_error(body)
    _decodes_or_protocol_error(b"[" * depth + body + b"]" * depth)
    _decodes_or_protocol_error(b'{"cmd":"x","args":' + b"[" * depth + body + tail)


def test_line_buffer_at_the_limit() -> None:
    limit = 100
    buf = LineBuffer(limit)
    assert buf.feed(b"a" * limit) == []  # exactly the limit, no newline yet: wait
    assert buf.feed(b"\r") == []  # a CR may still be the first half of CRLF
    assert buf.feed(b"\n") == [b"a" * limit]
    assert buf.feed(b"b" * limit + b"\r\n" + b"c" * limit + b"\n") == [b"b" * limit, b"c" * limit]
    with pytest.raises(LineTooLong):
        LineBuffer(limit).feed(b"d" * (limit + 1) + b"\n")
    with pytest.raises(LineTooLong):
        LineBuffer(limit).feed(b"d" * (limit + 1))
    with pytest.raises(LineTooLong):
        LineBuffer(limit).feed(b"d" * limit + b"\rx")


def test_line_buffer_trickled_bytes_are_not_rescanned() -> None:
    """One byte per read up to the limit must stay linear, not quadratic."""
    buf = LineBuffer(MAX_REQUEST_LINE)
    t0 = time.perf_counter()
    for _ in range(MAX_REQUEST_LINE):
        buf.feed(b"x")
    assert time.perf_counter() - t0 < 2.0
    assert buf.feed(b"\n") == [b"x" * MAX_REQUEST_LINE]


# --- the real server over a real Unix socket -----------------------------------


@pytest.fixture
def sockdir() -> Iterator[Path]:
    """Short (``sun_path`` is 108 bytes) and traversable by ``nobody``."""
    d = Path(tempfile.mkdtemp(prefix="dvs-"))
    os.chmod(d, 0o711)
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def _registry() -> CommandRegistry:
    r = CommandRegistry()

    async def info(args: list[str]) -> Reply:
        return Reply(text="cluster t, node n1", data={"node": "n1", "args": args})

    r.add("cluster info", info, "this node")
    return r


@asynccontextmanager
async def running(path: Path, counters: dict[str, int], **kw: Any) -> AsyncIterator[None]:
    async with trio.open_nursery() as n:
        await n.start(lambda task_status: serve(path=path, registry=_registry(),
                                                counters=counters, task_status=task_status,
                                                **kw))
        yield
        n.cancel_scope.cancel()


class Client:
    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.buf = b""

    @classmethod
    async def open(cls, path: Path) -> Client:
        return cls(await trio.open_unix_socket(os.fspath(path)))

    async def line(self) -> dict[str, Any] | None:
        while b"\n" not in self.buf:
            try:
                chunk = await self.stream.receive_some(65536)
            except trio.BrokenResourceError:  # reset: the server closed with our bytes unread
                return None
            if not chunk:
                return None
            self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        obj: dict[str, Any] = json.loads(line)
        return obj

    async def ask(self, raw: bytes) -> dict[str, Any]:
        await self.stream.send_all(raw)
        resp = await self.line()
        assert resp is not None
        return resp


GOOD = b'{"cmd":"cluster info","json":true}\n'


async def test_server_survives_every_crash_input(sockdir: Path) -> None:
    path = sockdir / "c.sock"
    counters: dict[str, int] = {}
    hostile = [
        b"[" * 60_000,
        b"{" * 60_000,
        b"\xff\xfe\x00[\x00",
        b"[1,2]",
        b'{"cmd":"x","args":[1,2]}',
        b'{"cmd":' + b"9" * 9000 + b"}",
        b'{"cmd":"\\ud800"}',
    ]
    with trio.fail_after(20):
        async with running(path, counters):
            c = await Client.open(path)
            for raw in hostile:
                bad = await c.ask(raw + b"\n")
                assert bad["ok"] is False and bad["error"].startswith("bad request"), raw[:20]
                ok = await c.ask(GOOD)  # the same connection answers the next request
                assert ok["ok"] is True and ok["data"]["node"] == "n1"
            await c.stream.aclose()
            c2 = await Client.open(path)
            assert (await c2.ask(GOOD))["ok"]
            await c2.stream.aclose()
    assert counters["bad_request"] == len(hostile)
    assert counters["connections"] == 2


async def test_server_line_limit_exactly(sockdir: Path) -> None:
    path = sockdir / "c.sock"
    counters: dict[str, int] = {}
    # a well-formed request padded with spaces to exactly the limit is served
    at_limit = GOOD[:-1] + b" " * (MAX_REQUEST_LINE - len(GOOD) + 1) + b"\n"
    assert len(at_limit) == MAX_REQUEST_LINE + 1
    with trio.fail_after(20):
        async with running(path, counters):
            c = await Client.open(path)
            assert (await c.ask(at_limit))["ok"]
            await c.stream.send_all(b" " + at_limit)
            too_long = await c.line()
            assert too_long is not None and "longer than" in too_long["error"]
            assert await c.line() is None  # then the connection is closed
            c2 = await Client.open(path)
            assert (await c2.ask(GOOD))["ok"]
            await c2.stream.aclose()
    assert counters["line_too_long"] == 1


def _as_user(path: Path, uid: int, gid: int, groups: list[int], timeout: float = 10) -> bytes:
    """Connect to ``path`` from a forked child running as ``uid``/``gid``; its bytes received.

    The child only uses modules already imported, writes what it read to a
    pipe and ``_exit``s; the parent kills it if it overstays ``timeout``.
    """
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
        code = 1
        try:
            os.close(r)
            os.setgroups(groups)
            os.setgid(gid)
            os.setuid(uid)
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.settimeout(timeout / 2)
            s.connect(os.fspath(path))
            with contextlib.suppress(BrokenPipeError):  # refused already: the answer is queued
                s.sendall(GOOD)
            got = b""
            while b"\n" not in got:
                chunk = s.recv(65536)
                if not chunk:
                    break
                got += chunk
            # report whether the server closed the connection after its answer
            s.settimeout(0.5)
            try:
                closed = s.recv(1) == b""
            except TimeoutError:
                closed = False
            except ConnectionResetError:  # closed with our request unread
                closed = True
            os.write(w, got + (b"CLOSED" if closed else b"OPEN"))
            code = 0
        except BaseException as e:  # noqa: BLE001 - a forked child must never unwind into pytest
            os.write(w, f"CHILD-ERROR {type(e).__name__}: {e}".encode())
        finally:
            os._exit(code)
    os.close(w)
    out = b""
    deadline = time.monotonic() + timeout
    try:
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([r], [], [], left)[0]:
                os.kill(pid, signal.SIGKILL)
                raise AssertionError("child client timed out")
            chunk = os.read(r, 65536)
            if not chunk:
                break
            out += chunk
    finally:
        os.close(r)
        os.waitpid(pid, 0)
    return out


def _reply(out: bytes) -> tuple[dict[str, Any], bool]:
    assert not out.startswith(b"CHILD-ERROR"), out
    line, _, tail = out.partition(b"\n")
    return json.loads(line), tail == b"CLOSED"


needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="dropping to nobody needs root")


@needs_root
async def test_peer_without_rights_is_refused_and_counted(sockdir: Path) -> None:
    path = sockdir / "c.sock"
    counters: dict[str, int] = {}
    with trio.fail_after(30):
        # mode 0666: the file system lets anyone connect, so only SO_PEERCRED stands guard
        async with running(path, counters, mode=0o666):
            out = await trio.to_thread.run_sync(_as_user, path, NOBODY, NOBODY, [])
            resp, closed = _reply(out)
            assert resp["ok"] is False and "not allowed" in resp["error"]
            assert f"uid {NOBODY}" in resp["error"]
            assert closed
            c = await Client.open(path)  # root (and the daemon's own uid) still get in
            assert (await c.ask(GOOD))["ok"]
            await c.stream.aclose()
    assert counters["refused_peer"] == 1
    assert counters["connections"] == 2


def _other_group() -> grp.struct_group:
    for g in grp.getgrall():
        if g.gr_gid not in (0, NOBODY):
            return g
    pytest.skip("no group other than root and nogroup on this host")


@needs_root
async def test_members_of_the_configured_group_are_let_in(sockdir: Path) -> None:
    path = sockdir / "c.sock"
    g = _other_group()
    counters: dict[str, int] = {}
    with trio.fail_after(30):
        async with running(path, counters, mode=0o666, group=g.gr_name):
            st_ = os.lstat(path)
            assert st_.st_gid == g.gr_gid and stat.S_IMODE(st_.st_mode) == 0o666
            # a supplementary member
            resp, closed = _reply(await trio.to_thread.run_sync(
                _as_user, path, NOBODY, NOBODY, [g.gr_gid]))
            assert resp["ok"] and resp["data"]["node"] == "n1" and not closed
            # the group as primary group
            resp, _ = _reply(await trio.to_thread.run_sync(_as_user, path, NOBODY, g.gr_gid, []))
            assert resp["ok"]
            # not a member
            resp, closed = _reply(await trio.to_thread.run_sync(
                _as_user, path, NOBODY, NOBODY, []))
            assert not resp["ok"] and "not allowed" in resp["error"] and closed
    assert counters["refused_peer"] == 1


async def test_unknown_group_is_refused_at_start(sockdir: Path) -> None:
    from duravip.control.server import ControlSocketError

    with trio.fail_after(10), pytest.raises(ControlSocketError, match="group"):
        await serve(path=sockdir / "c.sock", registry=_registry(),
                    group="no-such-group-duravip-test")
    assert os.listdir(sockdir) == []


def test_peer_allowed_rule() -> None:
    def cred(uid: int, gid: int = 100, groups: tuple[int, ...] = ()) -> PeerCred:
        return PeerCred(pid=1, uid=uid, gid=gid, groups=groups)

    assert peer_allowed(cred(0), own_uid=998, group_gid=None)
    assert peer_allowed(cred(998), own_uid=998, group_gid=None)
    assert not peer_allowed(cred(1000), own_uid=998, group_gid=None)
    assert not peer_allowed(cred(1000, gid=50), own_uid=998, group_gid=None)
    assert peer_allowed(cred(1000, gid=50), own_uid=998, group_gid=50)
    assert peer_allowed(cred(1000, groups=(7, 50)), own_uid=998, group_gid=50)
    assert not peer_allowed(cred(1000, groups=(7,)), own_uid=998, group_gid=50)


# --- check-config and the systemd unit -----------------------------------------

_BASE = """\
cluster { name = "t" node_name = "n1" gossip_address = "10.0.0.1:4801" keyring = "/k" }
"""


@pytest.mark.parametrize(
    ("listen", "warned"),
    [
        ('{ mode = "0600" }', False),
        ('{ mode = "0660" group = "duravip" }', False),
        ('{ mode = "0640" }', False),
        ('{ mode = "0666" }', True),
        ('{ mode = "0604" }', True),
        ('{ mode = "0662" group = "duravip" }', True),
        ('{ mode = "0660" }', True),  # group-write, but to whichever group the file gets
        ('{ mode = "0620" }', True),
    ],
)
def test_check_config_warns_on_a_wide_socket_mode(listen: str, warned: bool) -> None:
    text = _BASE + f'Control_Listener {{ Listen "/run/duravip/c.sock" {listen} }}\n'
    r = check_text(text, "s.conf")
    assert r.ok
    found = [str(d) for d in r.diagnostics if "control socket mode" in d.message]
    if warned:
        assert len(found) == 1 and re.match(r"s\.conf:2:\d+: warning: ", found[0]), found
    else:
        assert found == []


def test_systemd_unit_sets_a_private_umask() -> None:
    unit = (REPO / "docs" / "duravip.service").read_text()
    assert re.search(r"^UMask=0077$", unit, re.M)
