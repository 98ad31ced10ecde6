"""The Trio control socket server over a real Unix socket in a temp directory.

Real sockets, so these run on the real clock (the autojump clock would jump
while the kernel delivers bytes); each test is bounded by ``fail_after``.
"""

from __future__ import annotations

import json
import os
import socket
import stat
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio
from hypothesis import given, settings
from hypothesis import strategies as st

from duravip.control.protocol import MAX_REQUEST_LINE, CommandRegistry, Reply
from duravip.control.server import ControlSocketError, serve

from .conftest import ServerThread, sample_registry


@asynccontextmanager
async def running(path: Path, registry: CommandRegistry, mode: int = 0o600) -> AsyncIterator[None]:
    async with trio.open_nursery() as n:
        await n.start(lambda task_status: serve(path=path, mode=mode, registry=registry,
                                                task_status=task_status))
        yield
        n.cancel_scope.cancel()


class Client:
    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.buf = b""

    @classmethod
    async def open(cls, path: Path) -> Client:
        return cls(await trio.open_unix_socket(os.fspath(path)))

    async def send(self, raw: bytes) -> None:
        await self.stream.send_all(raw)

    async def line(self) -> dict[str, Any] | None:
        while b"\n" not in self.buf:
            chunk = await self.stream.receive_some(65536)
            if not chunk:
                return None
            self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        obj: dict[str, Any] = json.loads(line)
        return obj

    async def ask(self, cmd: str, *args: str, as_json: bool = False) -> dict[str, Any]:
        await self.send(json.dumps({"cmd": cmd, "args": list(args), "json": as_json}).encode()
                        + b"\n")
        resp = await self.line()
        assert resp is not None
        return resp


async def test_commands_errors_and_help(sockdir: Path) -> None:
    path = sockdir / "control.sock"
    with trio.fail_after(10):
        async with running(path, sample_registry()):
            c = await Client.open(path)
            show = await c.ask("cluster duravip show")
            assert show == {"ok": True, "text": "IP        owner\n10.1.1.1  n1",
                            "data": [{"ip": "10.1.1.1", "owner": "n1"}], "error": ""}
            jshow = await c.ask("CLUSTER DuraVIP show", as_json=True)
            assert jshow["ok"] and jshow["text"] == "" and jshow["data"][0]["owner"] == "n1"
            expl = await c.ask("cluster duravip explain", "10.1.1.1")
            assert expl["ok"] and expl["data"] == {"ip": "10.1.1.1", "owner": "n1"}
            in_cmd = await c.ask("cluster duravip explain 10.1.1.1")
            assert in_cmd["data"] == expl["data"]
            err = await c.ask("cluster duravip explain 10.9.9.9")
            assert err == {"ok": False, "text": "", "data": None,
                           "error": "10.9.9.9 is not a DuraVIP"}
            unknown = await c.ask("cluster membrship")
            assert not unknown["ok"] and "unknown command" in unknown["error"]
            helped = await c.ask("help")
            assert {d["command"] for d in helped["data"]} == {
                "help", "cluster duravip show", "cluster duravip explain", "cluster info"}
            await c.stream.aclose()


async def test_bad_lines_get_errors_and_the_connection_survives(sockdir: Path) -> None:
    path = sockdir / "c.sock"
    with trio.fail_after(10):
        async with running(path, sample_registry()):
            c = await Client.open(path)
            # two requests and garbage in one write: answered in order
            await c.send(b'{"cmd":"cluster info"}\nnot json\n\n{"cmd":"cluster info","json":true}\n')
            first, second, third = await c.line(), await c.line(), await c.line()
            assert first is not None and first["ok"] and first["text"].startswith("cluster mta")
            assert second is not None and not second["ok"] and "not JSON" in second["error"]
            assert third is not None and third["ok"] and third["text"] == ""
            # over-long line: an error, then the server closes this connection
            await c.send(b"x" * (MAX_REQUEST_LINE + 10))
            too_long = await c.line()
            assert too_long is not None and "longer than" in too_long["error"]
            assert await c.line() is None
            # the server is unharmed
            c2 = await Client.open(path)
            assert (await c2.ask("cluster info"))["ok"]
            await c2.stream.aclose()


async def test_many_concurrent_clients(sockdir: Path) -> None:
    path = sockdir / "c.sock"
    registry = CommandRegistry()
    everyone_in = trio.Event()
    arrived = 0
    n_clients = 30

    async def barrier(args: list[str]) -> Reply:
        # only completes once every client is inside a handler at the same time
        nonlocal arrived
        arrived += 1
        if arrived == n_clients:
            everyone_in.set()
        await everyone_in.wait()
        return Reply(text=args[0], data=int(args[0]))

    registry.add("barrier", barrier, "waits for all clients")
    got: dict[int, list[int]] = {}
    with trio.fail_after(15):
        async with running(path, registry):
            async def one(i: int) -> None:
                c = await Client.open(path)
                got[i] = []
                for j in range(3):
                    resp = await c.ask("barrier", str(i * 100 + j))
                    got[i].append(resp["data"])
                await c.stream.aclose()

            async with trio.open_nursery() as n:
                for i in range(n_clients):
                    n.start_soon(one, i)
    assert got == {i: [i * 100, i * 100 + 1, i * 100 + 2] for i in range(n_clients)}


async def test_refuses_foreign_file(sockdir: Path) -> None:
    path = sockdir / "control.sock"
    path.write_text("precious")
    with trio.fail_after(10), pytest.raises(ControlSocketError, match="not a socket"):
        await serve(path=path, registry=sample_registry())
    assert path.read_text() == "precious"


async def test_refuses_when_a_live_daemon_answers(sockdir: Path) -> None:
    path = sockdir / "control.sock"
    with trio.fail_after(10):
        async with running(path, sample_registry()):
            inode = os.lstat(path).st_ino
            with pytest.raises(ControlSocketError, match="already answering"):
                await serve(path=path, registry=sample_registry())
            assert os.lstat(path).st_ino == inode
            c = await Client.open(path)
            assert (await c.ask("cluster info"))["ok"]
            await c.stream.aclose()


async def test_replaces_stale_socket_and_unlinks_on_exit(sockdir: Path) -> None:
    path = sockdir / "control.sock"
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(os.fspath(path))
    stale.close()  # the file stays, nobody listens: a crashed daemon's leftover
    assert stat.S_ISSOCK(os.lstat(path).st_mode)
    with trio.fail_after(10):
        async with running(path, sample_registry()):
            c = await Client.open(path)
            assert (await c.ask("cluster info"))["ok"]
            await c.stream.aclose()
    assert not path.exists()
    assert sorted(os.listdir(sockdir)) == []  # no temporary bind name left behind


async def test_does_not_unlink_a_socket_it_no_longer_owns(sockdir: Path) -> None:
    path = sockdir / "control.sock"
    with trio.fail_after(10):
        async with running(path, sample_registry()):
            path.unlink()
            path.write_text("someone else's")
    assert path.read_text() == "someone else's"


@pytest.mark.parametrize("mode", [0o600, 0o660])
async def test_mode_bits_and_parent_dir(sockdir: Path, mode: int) -> None:
    path = sockdir / "run" / "duravip" / "control.sock"
    old_umask = os.umask(0o022)
    try:
        with trio.fail_after(10):
            async with running(path, sample_registry(), mode=mode):
                assert stat.S_ISSOCK(os.lstat(path).st_mode)
                assert stat.S_IMODE(os.lstat(path).st_mode) == mode
                assert stat.S_IMODE(os.stat(path.parent).st_mode) == 0o755
    finally:
        os.umask(old_umask)


async def test_path_too_long(sockdir: Path) -> None:
    path = sockdir / ("x" * 120) / "control.sock"
    with trio.fail_after(10), pytest.raises(ControlSocketError, match="too long"):
        await serve(path=path, registry=sample_registry())


async def test_a_bug_in_request_handling_costs_one_connection_not_the_server(
    sockdir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import duravip.control.server as server_mod
    from duravip.control.protocol import Request

    class Exploding:
        @staticmethod
        def from_line(line: bytes) -> Request:
            raise KeyError("a decoder bug")

    path = sockdir / "c.sock"
    counters: dict[str, int] = {}
    with trio.fail_after(10):
        async with trio.open_nursery() as n:
            await n.start(lambda task_status: serve(
                path=path, registry=sample_registry(), counters=counters,
                task_status=task_status))
            monkeypatch.setattr(server_mod, "Request", Exploding)
            c = await Client.open(path)
            await c.send(b'{"cmd":"cluster info"}\n')
            assert await c.line() is None  # this connection is closed ...
            monkeypatch.undo()
            c2 = await Client.open(path)  # ... and the server still answers
            assert (await c2.ask("cluster info"))["ok"]
            await c2.stream.aclose()
            n.cancel_scope.cancel()
    assert counters["internal_error"] == 1 and counters["connections"] == 2


_GARBAGE_TOKENS = [b"[", b"{", b"]", b"}", b'"', b"\\", b":", b",", b"9", b"\xff", b'{"cmd":']


_GARBAGE = st.binary(max_size=512) | st.lists(
    st.tuples(st.sampled_from(_GARBAGE_TOKENS), st.integers(1, 5000)), max_size=4
).map(lambda parts: b"".join(tok * n for tok, n in parts))


def test_server_answers_the_next_request_after_any_garbage(sockdir: Path) -> None:
    """Whatever one line holds, the real server answers it and then the next one."""
    path = sockdir / "h.sock"
    with ServerThread(path, sample_registry()):

        @given(garbage=_GARBAGE)
        @settings(max_examples=150, deadline=None)
        def check(garbage: bytes) -> None:
            line = garbage.replace(b"\n", b" ")[:MAX_REQUEST_LINE]
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                s.settimeout(10)
                s.connect(os.fspath(path))
                s.sendall(line + b"\n" + b'{"cmd":"cluster info","json":true}\n')
                s.shutdown(socket.SHUT_WR)
                got = b""
                while chunk := s.recv(65536):
                    got += chunk
            answers = [json.loads(x) for x in got.splitlines()]
            assert 1 <= len(answers) <= 2
            assert answers[-1] == {"ok": True, "text": "", "error": "",
                                   "data": {"cluster": "mta-east", "node": "n1"}}

        check()
