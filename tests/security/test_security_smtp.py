"""Hostile input to the SMTP side never takes a node down, nor smuggles downstream (issue 17).

* accept(2) failing with a capacity error (fd exhaustion) pauses the accept
  loop and retries, as ``trio.serve_listeners`` does; any other accept error
  stops only that listener, counted and reported, never the manager;
* concurrent sessions are capped, in total and per client IP (``421 4.7.0``);
* a body with a bare LF or CR is refused (``bare_newline = reject``) or
  normalised; outbound delivery and mmove always write canonical CRLF with
  correct dot-stuffing, so a stored body can never inject a command.
"""

from __future__ import annotations

import errno
import logging
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from functools import partial
from ipaddress import IPv4Address
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing
from hypothesis import given, settings
from hypothesis import strategies as st

from duravip.config import ClusterConfig, Config, HostPort, Listener, SmtpLimits
from duravip.mail.mmove import Receiver, move_batch, serve_listener
from duravip.mail.smtpclient import SmtpSession
from duravip.mail.spool import NewMessage, Spool
from duravip.smtp.listeners import ListenerManager, serve
from duravip.smtp.server import (
    ConnectionClosed,
    MessageReceived,
    NeedData,
    ServerSettings,
    SmtpServer,
)
from duravip.smtp.types import Envelope

HOST = "node-s"
IP1 = IPv4Address("127.0.0.1")
VIP = IPv4Address("127.0.0.2")


class Sink:
    def __init__(self) -> None:
        self.envelopes: list[Envelope] = []

    async def accept(self, envelope: Envelope) -> str:
        self.envelopes.append(envelope)
        return f"S{len(self.envelopes)}"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def make_config(*listeners: Listener, smtp: SmtpLimits | None = None) -> Config:
    return Config(
        cluster=ClusterConfig(
            name="t", node_name=HOST, gossip_address=HostPort(IPv4Address("127.0.0.1"), 1)
        ),
        listeners=listeners,
        smtp=smtp or SmtpLimits(),
    )


async def read_reply(stream: trio.abc.Stream, buf: bytearray) -> bytes:
    while (nl := buf.find(b"\r\n")) < 0:
        data = await stream.receive_some(4096)
        if not data:
            raise EOFError(bytes(buf))
        buf += data
    line = bytes(buf[: nl + 2])
    del buf[: nl + 2]
    return line


async def read_to_eof(stream: trio.abc.Stream) -> bytes:
    got = b""
    while True:
        try:
            chunk = await stream.receive_some(4096)
        except trio.BrokenResourceError:
            return got
        if not chunk:
            return got
        got += chunk


async def one_message(ip: IPv4Address, port: int, source: str | None = None) -> bytes:
    """A whole SMTP transaction; returns the reply to the final dot."""
    stream = await trio.open_tcp_stream(str(ip), port, local_address=source)
    buf = bytearray()
    banner = await read_reply(stream, buf)
    assert banner.startswith(b"220 "), banner
    await stream.send_all(b"HELO c\r\nMAIL FROM:<a>\r\nRCPT TO:<b>\r\nDATA\r\nx\r\n.\r\nQUIT\r\n")
    replies = [await read_reply(stream, buf) for _ in range(6)]
    await stream.aclose()
    return replies[4]


# ------------------------------------------------------ accept under pressure


class FlakyListener:
    """Wraps the manager's real listener; the next ``fails`` accepts raise ``error``."""

    def __init__(self, real: trio.SocketListener, fails: int, error: int) -> None:
        self.real = real
        self.fails = fails
        self.error = error
        self.calls = 0

    async def accept(self) -> trio.SocketStream:
        self.calls += 1
        if self.fails > 0:
            self.fails -= 1
            await trio.lowlevel.checkpoint()
            raise OSError(self.error, os.strerror(self.error))
        return await self.real.accept()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.real, name)


@pytest.mark.parametrize("code", [errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS])
async def test_accept_loop_fed_emfile_keeps_serving(
    code: int, caplog: pytest.LogCaptureFixture
) -> None:
    port = free_port()
    sink = Sink()
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            manager: ListenerManager = await nursery.start(
                partial(
                    serve,
                    config=make_config(Listener(HostPort(IP1, port))),
                    sink=sink,
                    settings=ServerSettings(hostname=HOST),
                )
            )
            running = manager._running[("127.0.0.1", port)]
            flaky = FlakyListener(running.listener, fails=5, error=code)
            running.listener = flaky  # type: ignore[assignment]
            # This connection is taken by the accept already waiting on the real
            # listener; the next five accepts fail with a capacity error.
            assert (await one_message(IP1, port)).startswith(b"250 ")
            start = trio.current_time()
            assert (await one_message(IP1, port)).startswith(b"250 ")
            # Paused 100 ms per error, like trio.serve_listeners.
            assert trio.current_time() - start >= 0.4
            assert flaky.calls >= 7
            assert manager.running() == {("127.0.0.1", port)}
            assert manager.counters["accept_capacity_errors"] == 5
            assert manager.counters.get("listener_failures", 0) == 0
            nursery.cancel_scope.cancel()
    assert len(sink.envelopes) == 2
    # Rate-limited: five errors in half a second log once.
    logged = [
        r for r in caplog.records if "accept" in r.getMessage() and r.levelno >= logging.ERROR
    ]
    assert len(logged) == 1


async def test_a_listener_that_fails_for_good_is_counted_and_reported(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    port = free_port()
    failed: list[IPv4Address] = []
    config = make_config(
        Listener(HostPort(IP1, port)), Listener(HostPort(VIP, port), enable_duravip=True)
    )

    def no_fds(fd: int) -> int:
        raise OSError(errno.EMFILE, "Too many open files")

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            manager: ListenerManager = await nursery.start(
                partial(
                    serve,
                    config=config,
                    sink=Sink(),
                    settings=ServerSettings(hostname=HOST),
                    on_listener_failed=failed.append,
                )
            )
            await manager.start_ip(VIP)
            running = manager._running[(str(VIP), port)]
            # Fd exhaustion everywhere: the error path must not allocate.
            monkeypatch.setattr(os, "dup", no_fds)
            running.listener = FlakyListener(running.listener, 1, errno.EINVAL)  # type: ignore[assignment]
            # Wake the pending accept so that the loop meets the failing one.
            idle = await trio.open_tcp_stream(str(VIP), port)
            buf = bytearray()
            assert (await read_reply(idle, buf)).startswith(b"220 ")
            with trio.fail_after(2):
                while not failed:
                    await trio.sleep(0.01)
            monkeypatch.undo()
            assert failed == [VIP]
            # Reported at once; its sessions are drained as on a stop.
            assert (await read_reply(idle, buf)).startswith(b"421 4.3.2 ")
            await idle.aclose()
            assert manager.counters["listener_failures"] == 1
            assert manager.running() == {("127.0.0.1", port)}
            # The manager and its other listeners are unharmed.
            assert (await one_message(IP1, port)).startswith(b"250 ")
            await manager.stop_ip(VIP, drain_timeout=0.5)
            # The IP may come back: its listener starts again.
            await manager.start_ip(VIP)
            assert (await one_message(VIP, port)).startswith(b"250 ")
            nursery.cancel_scope.cancel()


# ------------------------------------------------------------- session caps


async def test_sessions_are_capped_in_total_and_per_client_ip() -> None:
    port = free_port()
    limits = SmtpLimits(max_sessions=3, max_sessions_per_ip=2)
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            manager: ListenerManager = await nursery.start(
                partial(
                    serve,
                    config=make_config(Listener(HostPort(IP1, port)), smtp=limits),
                    sink=Sink(),
                    settings=ServerSettings(hostname=HOST, limits=limits),
                )
            )
            held: list[trio.SocketStream] = []

            async def open_from(source: str) -> bytes:
                stream = await trio.open_tcp_stream("127.0.0.1", port, local_address=source)
                line = await read_reply(stream, bytearray())
                held.append(stream)
                return line

            assert (await open_from("127.0.0.7")).startswith(b"220 ")
            assert (await open_from("127.0.0.7")).startswith(b"220 ")
            # A third from the same client: per-IP cap.
            third = await trio.open_tcp_stream("127.0.0.1", port, local_address="127.0.0.7")
            got = await read_to_eof(third)
            assert got.startswith(b"421 4.7.0 ") and b"too many connections" in got
            assert got.count(b"\r\n") == 1
            await third.aclose()
            # Another client fits under the total cap, the next one does not.
            assert (await open_from("127.0.0.8")).startswith(b"220 ")
            over = await trio.open_tcp_stream("127.0.0.1", port, local_address="127.0.0.9")
            got = await read_to_eof(over)
            assert got.startswith(b"421 4.7.0 ") and b"too many connections" in got
            await over.aclose()
            assert manager.counters["sessions_refused_per_ip"] == 1
            assert manager.counters["sessions_refused_total"] == 1
            assert manager.counters["sessions_active"] == 3
            # A session ends: room again, for that client too.
            await held.pop(0).aclose()
            while manager.counters["sessions_active"] != 2:
                await trio.sleep(0.01)
            assert (await one_message(IP1, port, source="127.0.0.7")).startswith(b"250 ")
            for s in held:
                await s.aclose()
            nursery.cancel_scope.cancel()


async def test_session_caps_follow_a_reload() -> None:
    port = free_port()
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            config = make_config(Listener(HostPort(IP1, port)))
            manager: ListenerManager = await nursery.start(
                partial(serve, config=config, sink=Sink(), settings=ServerSettings(hostname=HOST))
            )
            manager.set_config(make_config(config.listeners[0], smtp=SmtpLimits(max_sessions=1)))
            first = await trio.open_tcp_stream("127.0.0.1", port)
            assert (await read_reply(first, bytearray())).startswith(b"220 ")
            second = await trio.open_tcp_stream("127.0.0.1", port)
            assert (await read_to_eof(second)).startswith(b"421 4.7.0 ")
            for s in (first, second):
                await s.aclose()
            nursery.cancel_scope.cancel()


# ---------------------------------------------- bare LF / CR, sans-IO server

#: The published SMTP smuggling end-of-data variants (2023), each followed by
#: a smuggled transaction, inside an otherwise valid body.
SMUGGLE = [b"\n.\n", b"\r\n.\n", b"\n.\r\n", b"\r.\r", b"\r\r\n", b"\r\n.\r", b"\n", b"\r"]
HEAD = b"EHLO c\r\nMAIL FROM:<a@x>\r\nRCPT TO:<b@y>\r\nDATA\r\n"


def _smuggling_body(seq: bytes) -> bytes:
    return (
        b"Subject: t\r\n\r\nx"
        + seq
        + b"MAIL FROM:<evil@x>\r\nRCPT TO:<victim@y>\r\nDATA\r\nsmuggled\r\n"
    )


def _drive(stream: bytes, limits: SmtpLimits) -> tuple[bytes, list[MessageReceived]]:
    server = SmtpServer(ServerSettings(hostname=HOST, limits=limits))
    server.receive_data(stream)
    server.receive_data(b"")
    msgs: list[MessageReceived] = []
    out = server.data_to_send()
    while True:
        ev = server.next_event()
        out += server.data_to_send()
        if isinstance(ev, MessageReceived):
            msgs.append(ev)
            server.accept_message(f"Q{len(msgs)}")
            continue
        assert isinstance(ev, NeedData | ConnectionClosed)
        if isinstance(ev, ConnectionClosed):
            return out + server.data_to_send(), msgs


def _canonical(data: bytes) -> bool:
    return data.count(b"\n") == data.count(b"\r\n") == data.count(b"\r")


@pytest.mark.parametrize("seq", SMUGGLE)
def test_bare_newline_is_rejected_by_default(seq: bytes) -> None:
    assert SmtpLimits().bare_newline == "reject"
    stream = HEAD + _smuggling_body(seq) + b".\r\nMAIL FROM:<ok@x>\r\nRCPT TO:<b@y>\r\n"
    stream += b"DATA\r\nclean\r\n.\r\nQUIT\r\n"
    out, msgs = _drive(stream, SmtpLimits())
    assert b"550 5.5.2 " in out
    # The session goes on: the next, clean message is accepted.
    assert [m.mail_from for m in msgs] == ["ok@x"]
    assert msgs[0].data == b"clean\r\n"


@pytest.mark.parametrize("seq", SMUGGLE)
def test_bare_newline_normalize_gives_one_canonical_message(seq: bytes) -> None:
    out, msgs = _drive(
        HEAD + _smuggling_body(seq) + b".\r\nQUIT\r\n", SmtpLimits(bare_newline="normalize")
    )
    assert len(msgs) == 1 and msgs[0].mail_from == "a@x"
    assert _canonical(msgs[0].data)
    assert b"MAIL FROM:<evil@x>" in msgs[0].data  # still body, never a command
    assert b"550" not in out


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from([b"a", b".", b"\r", b"\n", b"\r\n", b"..", b" "]), max_size=40))
def test_any_body_is_refused_or_canonical(parts: list[bytes]) -> None:
    body = b"".join(parts).replace(b"\r\n.\r\n", b"\r\n..\r\n") + b"\r\n"
    if body.startswith(b".\r\n"):
        body = b"." + body
    stream = HEAD + body + b".\r\nQUIT\r\n"
    out_r, msgs_r = _drive(stream, SmtpLimits())
    _, msgs_n = _drive(stream, SmtpLimits(bare_newline="normalize"))
    for m in msgs_r + msgs_n:
        assert _canonical(m.data)
    if _canonical(body):
        assert len(msgs_r) == 1 and msgs_r[0].data == msgs_n[0].data
    else:
        assert msgs_r == [] and b"550 5.5.2 " in out_r
        assert len(msgs_n) == 1


# ------------------------------------------ outbound: the bytes on the wire

STORED = [
    b"x\n.\r\nMAIL FROM:<evil@x>\r\n",
    b"x\r\n.\nMAIL FROM:<evil@x>\r\n",
    b"x\n.\nMAIL FROM:<evil@x>\n",
    b"x\r.\rMAIL FROM:<evil@x>\r",
    b"x\r\r\n.\r\r\nMAIL FROM:<evil@x>",
    b".\nfirst line is a dot",
    b"x\r\n.\r\nMAIL FROM:<evil@x>\r\n",  # a lone-dot line: must be stuffed
]
WIRE = [
    b"x\r\n..\r\nMAIL FROM:<evil@x>\r\n.\r\n",
    b"x\r\n..\r\nMAIL FROM:<evil@x>\r\n.\r\n",
    b"x\r\n..\r\nMAIL FROM:<evil@x>\r\n.\r\n",
    b"x\r\n..\r\nMAIL FROM:<evil@x>\r\n.\r\n",
    b"x\r\n\r\n..\r\n\r\nMAIL FROM:<evil@x>\r\n.\r\n",
    b"..\r\nfirst line is a dot\r\n.\r\n",
    b"x\r\n..\r\nMAIL FROM:<evil@x>\r\n.\r\n",
]


class Capture:
    """A scripted smarthost on a memory stream: records every byte the client writes."""

    def __init__(self) -> None:
        self.wire = bytearray()
        self.messages: list[MessageReceived] = []

    async def serve(self, stream: trio.abc.Stream) -> None:
        server = SmtpServer(
            ServerSettings(hostname="cap", limits=SmtpLimits(bare_newline="normalize"))
        )
        while True:
            ev = server.next_event()
            out = server.data_to_send()
            if out:
                await stream.send_all(out)
            if isinstance(ev, ConnectionClosed):
                await stream.aclose()
                return
            if isinstance(ev, MessageReceived):
                self.messages.append(ev)
                server.accept_message("C1")
                continue
            data = await stream.receive_some(65536)
            self.wire += data
            server.receive_data(data)

    def data_section(self) -> bytes:
        start = self.wire.index(b"DATA\r\n") + len(b"DATA\r\n")
        if self.wire.startswith(b".\r\n", start):  # an empty message
            return b".\r\n"
        end = self.wire.index(b"\r\n.\r\n", start) + len(b"\r\n.\r\n")
        return bytes(self.wire[start:end])


@pytest.mark.parametrize(("stored", "wire"), list(zip(STORED, WIRE, strict=True)))
async def test_outbound_writes_canonical_crlf_and_stuffs_dots(stored: bytes, wire: bytes) -> None:
    client, server = trio.testing.memory_stream_pair()
    cap = Capture()
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(cap.serve, server)
            session = SmtpSession(client, timeout=2)
            await session.start("me")
            res = await session.send("a@x", ["b@y"], stored)
            assert res.code == 250
            await session.quit()
    assert cap.data_section() == wire
    # Exactly one transaction reached the smarthost: nothing was injected.
    assert [m.rcpt_to for m in cap.messages] == [("b@y",)]
    assert cap.wire.count(b"RCPT TO:") == 1


@settings(max_examples=200, deadline=None)
@given(st.lists(st.sampled_from([b"a", b".", b"\r", b"\n", b"\r\n", b"..", b"MAIL"]), max_size=30))
async def test_any_stored_body_is_one_canonical_transaction(parts: list[bytes]) -> None:
    stored = b"".join(parts)
    client, server = trio.testing.memory_stream_pair()
    cap = Capture()
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(cap.serve, server)
            session = SmtpSession(client, timeout=2)
            await session.start("me")
            assert (await session.send("a@x", ["b@y"], stored)).code == 250
            await session.quit()
    section = cap.data_section()
    assert _canonical(section)
    # Every line that starts with a dot is stuffed, and only the end is a lone dot.
    lines = section.split(b"\r\n")
    assert lines[-2:] == [b".", b""]
    assert len(cap.messages) == 1
    assert all(not line.startswith(b".") or line.startswith(b"..") for line in lines[:-2])


# ------------------------------------------ mmove: an old stored bare LF body


@pytest.fixture
def spools(tmp_path: Path) -> Iterator[tuple[Spool, Spool]]:
    a = Spool.open(tmp_path / "a")
    b = Spool.open(tmp_path / "b")
    yield a, b
    a.close()
    b.close()


async def test_mmove_sends_canonical_crlf(spools: tuple[Spool, Spool]) -> None:
    sender, target = spools
    key = os.urandom(32)
    counters: dict[str, int] = {}
    receiver = Receiver(target, counters)
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            listeners = await nursery.start(
                partial(
                    serve_listener,
                    receiver,
                    HostPort(IPv4Address("127.0.0.1"), 0),
                    node_name="rx",
                    cluster="c",
                    keys=lambda: [key],
                    limits=SmtpLimits(),  # bare_newline = reject
                )
            )
            port = listeners[0].socket.getsockname()[1]
            # A body stored before bare newlines were refused (or by a bug).
            await sender.store(
                NewMessage(
                    mail_from="a@x",
                    rcpt_to=("b@y",),
                    data=b"x\n.\r\nMAIL FROM:<evil@x>\r\n",
                    binding="b1",
                    requested="b1",
                    origin="tx",
                )
            )
            moved = await move_batch(
                sender,
                list(sender.iter()),
                address=HostPort(IPv4Address("127.0.0.1"), port),
                key=key,
                cluster="c",
                helo="tx",
                counters={},
                node="rx",
            )
            nursery.cancel_scope.cancel()
    assert moved == 1 and len(sender) == 0
    (msg,) = list(target.iter())
    assert target.read_data(msg.id) == b"x\r\n.\r\nMAIL FROM:<evil@x>\r\n"


# ------------------------------------- real fd exhaustion, in a subprocess

_EXHAUSTED_SERVER = r"""
import resource, sys
from functools import partial
from ipaddress import IPv4Address
import trio
from duravip.config import ClusterConfig, Config, HostPort, Listener
from duravip.smtp.listeners import serve
from duravip.smtp.server import ServerSettings

class Sink:
    async def accept(self, envelope):
        return "E1"

async def main():
    config = Config(
        cluster=ClusterConfig(name="t", node_name="ex", gossip_address=HostPort(IPv4Address("127.0.0.1"), 1)),
        listeners=(Listener(HostPort(IPv4Address("127.0.0.1"), int(sys.argv[1]))),),
    )
    async with trio.open_nursery() as nursery:
        manager = await nursery.start(partial(serve, config=config, sink=Sink(), settings=ServerSettings(hostname="ex")))
        # Few fds from here on: sessions soon meet EMFILE in accept(2).
        resource.setrlimit(resource.RLIMIT_NOFILE, (48, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
        print("ready", flush=True)
        while True:
            await trio.sleep(0.05)
            print("counters", manager.counters["accept_capacity_errors"], manager.counters["sessions_active"], flush=True)

trio.run(main)
"""


async def test_real_fd_exhaustion_in_a_subprocess_pauses_accept_and_recovers() -> None:
    """RLIMIT_NOFILE lowered in a child running the real manager: accept(2) meets
    EMFILE; once clients leave, the backlog is served and the daemon lives."""
    port = free_port()
    with trio.fail_after(30):
        proc = await trio.lowlevel.open_process(
            [sys.executable, "-c", _EXHAUSTED_SERVER, str(port)],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
        )
        assert proc.stdout is not None
        lines = bytearray()

        async def last_counters() -> tuple[int, int]:
            while True:
                chunk = await proc.stdout.receive_some(65536)  # type: ignore[union-attr]
                assert chunk, "the server died"
                lines.extend(chunk)
                text = lines.decode().strip().splitlines()
                if text and text[-1].startswith("counters") and lines.endswith(b"\n"):
                    _, errors, active = text[-1].split()
                    return int(errors), int(active)

        try:
            while b"ready" not in lines:
                lines.extend(await proc.stdout.receive_some(4096))
            clients = [await trio.open_tcp_stream("127.0.0.1", port) for _ in range(80)]
            while (await last_counters())[0] == 0:
                pass  # accept is now failing with EMFILE, and being retried
            assert proc.returncode is None
            for c in clients:
                await c.aclose()
            while (await last_counters())[1] != 0:
                pass
            # It serves again: a whole transaction.
            assert (await one_message(IP1, port)).startswith(b"250 ")
            assert proc.poll() is None
        finally:
            proc.kill()
            await proc.wait()


# ------------------------------------------------------------------ config


def test_session_caps_and_bare_newline_are_config_keys() -> None:
    from duravip.config import check_text, loads

    base = 'cluster { name = "c" gossip_address = "10.0.0.1:4801" node_name = "n" }\n'
    c = loads(
        base + "Smtp_Limits { max_sessions = 20 max_sessions_per_ip = 5 bare_newline = normalize }"
    )
    assert (c.smtp.max_sessions, c.smtp.max_sessions_per_ip, c.smtp.bare_newline) == (
        20,
        5,
        "normalize",
    )
    d = SmtpLimits()
    assert (d.max_sessions, d.max_sessions_per_ip, d.bare_newline) == (1000, 50, "reject")
    for text, want in (
        ("max_sessions = 0", "max_sessions must be at least 1"),
        ("max_sessions_per_ip = 0", "max_sessions_per_ip must be at least 1"),
        ("bare_newline = strip", "invalid value 'strip' for 'bare_newline'"),
    ):
        bad = check_text(base + "Smtp_Limits { " + text + " }")
        assert any(x.severity == "error" and want in x.message for x in bad.diagnostics), text
    warn = check_text(base + "Smtp_Limits { max_sessions = 10 max_sessions_per_ip = 20 }")
    assert any("max_sessions_per_ip (20) is above" in x.message for x in warn.diagnostics)
