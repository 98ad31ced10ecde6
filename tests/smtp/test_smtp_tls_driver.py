"""STARTTLS in the driver and the listener manager: real handshakes on loopback."""

from __future__ import annotations

import smtplib
import ssl
from functools import partial
from ipaddress import IPv4Address
from pathlib import Path

import pytest
import trio
import trio.testing

from duravip.config import ClusterConfig, Config, HostPort, Listener, SmtpLimits
from duravip.smtp.driver import handle_connection
from duravip.smtp.listeners import ListenerManager, serve
from duravip.smtp.server import ServerSettings
from duravip.smtp.settings import TlsMode
from duravip.smtp.tls import server_context
from duravip.smtp.types import Envelope

from .certs import ServerFiles, TestCA, peer_serial

HOST = "node-s"
IP = IPv4Address("127.0.0.1")


class Sink:
    def __init__(self) -> None:
        self.envelopes: list[Envelope] = []

    async def accept(self, envelope: Envelope) -> str:
        self.envelopes.append(envelope)
        return f"T{len(self.envelopes)}"


@pytest.fixture
def ca(tmp_path: Path) -> TestCA:
    return TestCA(tmp_path)


async def read_reply(stream: trio.abc.Stream, buf: bytearray) -> bytes:
    """One reply, multi-line included."""
    while True:
        start = 0
        while (nl := buf.find(b"\r\n", start)) >= 0:
            if buf[start + 3 : start + 4] == b" ":
                out = bytes(buf[: nl + 2])
                del buf[: nl + 2]
                return out
            start = nl + 2
        data = await stream.receive_some(65536)
        if not data:
            raise EOFError(bytes(buf))
        buf += data


async def read_to_eof(stream: trio.abc.Stream) -> bytes:
    out = bytearray()
    try:
        while data := await stream.receive_some(65536):
            out += data
    except trio.BrokenResourceError:
        pass
    return bytes(out)


async def serve_one_port(
    nursery: trio.Nursery,
    sink: Sink,
    ctx: ssl.SSLContext,
    tls: TlsMode,
    counters: dict[str, int],
    limits: SmtpLimits | None = None,
) -> int:
    settings = ServerSettings(hostname=HOST, limits=limits or SmtpLimits(), tls=tls)

    async def handler(stream: trio.SocketStream) -> None:
        await handle_connection(
            stream,
            settings=settings,
            sink=sink,
            peer=("127.0.0.1", 1),
            local=("127.0.0.1", 2),
            counters=counters,
            ssl_context=ctx,
        )

    listeners = await nursery.start(partial(trio.serve_tcp, handler, 0, host="127.0.0.1"))
    return int(listeners[0].socket.getsockname()[1])


async def plain_client(port: int) -> tuple[trio.SocketStream, bytearray]:
    """Connect and EHLO in plaintext; STARTTLS must be offered."""
    raw = await trio.open_tcp_stream("127.0.0.1", port)
    buf = bytearray()
    assert (await read_reply(raw, buf)).startswith(b"220 node-s ")
    await raw.send_all(b"EHLO c\r\n")
    assert b"250 STARTTLS\r\n" in await read_reply(raw, buf)
    return raw, buf


async def tls_client(
    port: int, client_ctx: ssl.SSLContext
) -> tuple[trio.SSLStream[trio.SocketStream], bytearray]:
    """Connect, EHLO, STARTTLS, handshake: the caller continues inside TLS."""
    raw, buf = await plain_client(port)
    await raw.send_all(b"STARTTLS\r\n")
    assert await read_reply(raw, buf) == b"220 2.0.0 Ready to start TLS\r\n"
    assert not buf
    tls = trio.SSLStream(raw, client_ctx, server_hostname="127.0.0.1")
    await tls.do_handshake()
    return tls, bytearray()


async def send_message(tls: trio.abc.Stream, buf: bytearray, text: bytes) -> bytes:
    await tls.send_all(b"EHLO c\r\nMAIL FROM:<a@x>\r\nRCPT TO:<b@y>\r\nDATA\r\n")
    ehlo = await read_reply(tls, buf)
    assert b"STARTTLS" not in ehlo
    for _ in range(3):
        await read_reply(tls, buf)
    await tls.send_all(text + b"\r\n.\r\n")
    return await read_reply(tls, buf)


# ------------------------------------------------------------- smtplib


def _smtplib_starttls(port: int, client_ctx: ssl.SSLContext) -> tuple[str | None, int]:
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
        client.ehlo("tester")
        assert client.has_extn("starttls")
        code, _ = client.starttls(context=client_ctx)
        assert code == 220
        client.ehlo("tester")
        assert not client.has_extn("starttls")
        sock = client.sock
        assert isinstance(sock, ssl.SSLSocket)
        version, serial = sock.version(), peer_serial(sock)
        client.sendmail("a@example.com", ["b@example.com"], b"Subject: s\r\n\r\nover tls\r\n")
    return version, serial


async def test_smtplib_starttls_delivers(ca: TestCA) -> None:
    files = ca.issue("server")
    sink, counters = Sink(), dict[str, int]()
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            port = await serve_one_port(
                nursery, sink, server_context(files.certificate, files.key), "optional", counters
            )
            version, serial = await trio.to_thread.run_sync(
                _smtplib_starttls, port, ca.client_context()
            )
            nursery.cancel_scope.cancel()
    assert version in ("TLSv1.2", "TLSv1.3") and serial == files.serial
    (env,) = sink.envelopes
    assert env.helo == "tester" and env.data == b"Subject: s\r\n\r\nover tls\r\n"
    assert counters["tls_sessions"] == 1 and "tls_handshake_failures" not in counters


def _smtplib_plain_mail(port: int) -> tuple[int, bytes]:
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
        try:
            client.sendmail("a@example.com", ["b@example.com"], b"plain\r\n")
        except smtplib.SMTPSenderRefused as exc:
            return exc.smtp_code, exc.smtp_error
    raise AssertionError("accepted without TLS")


async def test_required_refuses_plaintext_mail(ca: TestCA) -> None:
    files = ca.issue("server")
    sink, counters = Sink(), dict[str, int]()
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            port = await serve_one_port(
                nursery, sink, server_context(files.certificate, files.key), "required", counters
            )
            code, text = await trio.to_thread.run_sync(_smtplib_plain_mail, port)
            # ... and the same server delivers once the client uses STARTTLS.
            await trio.to_thread.run_sync(_smtplib_starttls, port, ca.client_context())
            nursery.cancel_scope.cancel()
    assert (code, text) == (530, b"5.7.0 Must issue a STARTTLS command first")
    assert len(sink.envelopes) == 1


# ----------------------------------------------------- raw clients


async def test_pipelined_command_after_starttls_is_refused_on_the_wire(ca: TestCA) -> None:
    """CVE-2011-0411 over a socket: one write 'STARTTLS + MAIL' gets 554 and EOF, no TLS."""
    files = ca.issue("server")
    sink, counters = Sink(), dict[str, int]()
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            port = await serve_one_port(
                nursery, sink, server_context(files.certificate, files.key), "optional", counters
            )
            raw, buf = await plain_client(port)
            await raw.send_all(b"STARTTLS\r\nMAIL FROM:<evil@x>\r\nRCPT TO:<v@y>\r\n")
            rest = bytes(buf) + await read_to_eof(raw)
            await raw.aclose()
            nursery.cancel_scope.cancel()
    assert rest == b"554 5.5.1 Error: command pipelined after STARTTLS\r\n"
    assert counters["starttls_pipelining_rejects"] == 1
    assert "tls_sessions" not in counters and sink.envelopes == []


async def test_starttls_twice_over_tls_is_503(ca: TestCA) -> None:
    files = ca.issue("server")
    counters: dict[str, int] = {}
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            port = await serve_one_port(
                nursery, Sink(), server_context(files.certificate, files.key), "optional", counters
            )
            tls, buf = await tls_client(port, ca.client_context())
            await tls.send_all(b"EHLO c\r\n")
            await read_reply(tls, buf)
            await tls.send_all(b"STARTTLS\r\n")
            assert await read_reply(tls, buf) == b"503 5.5.1 Error: TLS already active\r\n"
            await tls.send_all(b"QUIT\r\n")
            assert await read_reply(tls, buf) == b"221 2.0.0 Bye\r\n"
            await trio.aclose_forcefully(tls)
            nursery.cancel_scope.cancel()


async def test_handshake_garbage_ends_only_that_session(ca: TestCA) -> None:
    files = ca.issue("server")
    sink, counters = Sink(), dict[str, int]()
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            port = await serve_one_port(
                nursery, sink, server_context(files.certificate, files.key), "optional", counters
            )
            raw, buf = await plain_client(port)
            await raw.send_all(b"STARTTLS\r\n")
            await read_reply(raw, buf)
            await raw.send_all(b"MAIL FROM:<not-a-client-hello@x>\r\n")
            rest = await read_to_eof(raw)
            await raw.aclose()
            assert b"MAIL" not in rest and b"250" not in rest
            # The listener still serves: a second client delivers over TLS.
            tls, buf = await tls_client(port, ca.client_context())
            assert (await send_message(tls, buf, b"second")).startswith(b"250 2.0.0 Ok")
            await trio.aclose_forcefully(tls)
            nursery.cancel_scope.cancel()
    assert counters["tls_handshake_failures"] == 1 and counters["tls_sessions"] == 1
    assert [e.data for e in sink.envelopes] == [b"second\r\n"]


async def test_a_client_that_never_starts_the_handshake_times_out(
    ca: TestCA, autojump_clock: trio.testing.MockClock
) -> None:
    files = ca.issue("server")
    counters: dict[str, int] = {}
    client, server_side = trio.testing.memory_stream_pair()
    limits = SmtpLimits(command_timeout=30.0)
    with trio.fail_after(100):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(
                partial(
                    handle_connection,
                    server_side,
                    settings=ServerSettings(hostname=HOST, limits=limits, tls="optional"),
                    sink=Sink(),
                    peer=("127.0.0.1", 1),
                    local=("127.0.0.1", 2),
                    counters=counters,
                    ssl_context=server_context(files.certificate, files.key),
                )
            )
            buf = bytearray()
            await read_reply(client, buf)
            await client.send_all(b"EHLO c\r\nSTARTTLS\r\n")
            await read_reply(client, buf)
            assert await read_reply(client, buf) == b"220 2.0.0 Ready to start TLS\r\n"
            start = trio.current_time()
            assert await read_to_eof(client) == b""  # closed, nothing in plaintext
            assert trio.current_time() - start == pytest.approx(30.0)
    assert counters == {"tls_handshake_failures": 1}


def test_tls_mode_without_a_context_is_refused() -> None:
    _client, server_side = trio.testing.memory_stream_pair()

    async def main() -> None:
        await handle_connection(
            server_side,
            settings=ServerSettings(hostname=HOST, tls="required"),
            sink=Sink(),
            peer=("127.0.0.1", 1),
            local=("127.0.0.1", 2),
        )

    with pytest.raises(ValueError, match="needs an ssl_context"):
        trio.run(main)


# ------------------------------------------------------------- reload


def tls_config(port: int, files: ServerFiles, tls: TlsMode = "optional") -> Config:
    return Config(
        cluster=ClusterConfig(name="t", node_name=HOST, gossip_address=HostPort(IP, 1)),
        listeners=(
            Listener(
                address=HostPort(IP, port),
                tls_certificate=files.certificate,
                tls_key=files.key,
                tls=tls,
            ),
        ),
    )


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_reload_swaps_the_certificate_for_new_sessions_only(ca: TestCA) -> None:
    old, new = ca.issue("old"), ca.issue("new")
    port = free_port()
    sink = Sink()
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            manager: ListenerManager = await nursery.start(
                partial(
                    serve,
                    config=tls_config(port, old),
                    sink=sink,
                    settings=ServerSettings(hostname=HOST),
                )
            )
            first, buf1 = await tls_client(port, ca.client_context())
            assert peer_serial(first._ssl_object) == old.serial
            manager.set_config(tls_config(port, new))
            # The session opened before the reload is not dropped and completes.
            assert (await send_message(first, buf1, b"one")).startswith(b"250 2.0.0 Ok")
            second, buf2 = await tls_client(port, ca.client_context())
            assert peer_serial(second._ssl_object) == new.serial
            assert (await send_message(second, buf2, b"two")).startswith(b"250 2.0.0 Ok")
            assert peer_serial(first._ssl_object) == old.serial
            for s in (first, second):
                await trio.aclose_forcefully(s)
            assert manager.counters["tls_sessions"] == 2
            nursery.cancel_scope.cancel()
    assert sorted(e.data for e in sink.envelopes) == [b"one\r\n", b"two\r\n"]


async def test_reload_with_a_broken_certificate_keeps_the_old_one(ca: TestCA) -> None:
    old = ca.issue("old")
    broken = ca.issue("broken")
    broken.certificate.write_text("not a certificate\n")
    port = free_port()
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            manager: ListenerManager = await nursery.start(
                partial(
                    serve,
                    config=tls_config(port, old),
                    sink=Sink(),
                    settings=ServerSettings(hostname=HOST),
                )
            )
            manager.set_config(tls_config(port, broken))
            assert manager.counters["tls_context_errors"] == 1
            tls, _ = await tls_client(port, ca.client_context())
            assert peer_serial(tls._ssl_object) == old.serial
            await trio.aclose_forcefully(tls)
            nursery.cancel_scope.cancel()


async def test_a_listener_whose_certificate_does_not_load_does_not_start(
    ca: TestCA, tmp_path: Path
) -> None:
    files = ca.issue("server")
    missing = ServerFiles(certificate=tmp_path / "nope.crt", key=files.key, serial=0)
    port = free_port()
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            manager: ListenerManager = await nursery.start(
                partial(
                    serve,
                    config=tls_config(port, missing, "required"),
                    sink=Sink(),
                    settings=ServerSettings(hostname=HOST),
                )
            )
            assert manager.running() == frozenset()
            assert manager.counters["tls_context_errors"] == 1
            nursery.cancel_scope.cancel()


def test_server_context_refuses_tls_1_1(ca: TestCA) -> None:
    files = ca.issue("server")
    ctx = server_context(files.certificate, files.key)
    assert ctx.minimum_version == ssl.TLSVersion.TLSv1_2


async def test_stopping_the_listener_says_421_inside_tls(ca: TestCA) -> None:
    """An idle TLS session at stop_ip gets its 421 over TLS, then the connection closes."""
    files = ca.issue("server")
    port = free_port()
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            manager: ListenerManager = await nursery.start(
                partial(
                    serve,
                    config=tls_config(port, files),
                    sink=Sink(),
                    settings=ServerSettings(hostname=HOST),
                )
            )
            tls, buf = await tls_client(port, ca.client_context())
            await tls.send_all(b"EHLO c\r\n")
            await read_reply(tls, buf)
            manager.set_config(
                Config(
                    cluster=ClusterConfig(name="t", node_name=HOST, gossip_address=HostPort(IP, 1))
                )
            )
            rest = bytes(buf) + await read_to_eof(tls)
            assert rest == b"421 4.3.2 node-s Service shutting down\r\n"
            await trio.aclose_forcefully(tls)
            nursery.cancel_scope.cancel()


def _starttls_ehlo_seconds(port: int, client_ctx: ssl.SSLContext, sessions: int) -> list[float]:
    import time

    out = []
    for _ in range(sessions):
        with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
            client.ehlo("tester")
            start = time.perf_counter()
            client.starttls(context=client_ctx)
            client.ehlo("tester")
            out.append(time.perf_counter() - start)
    return out


async def test_no_delayed_ack_stall_after_the_handshake(ca: TestCA) -> None:
    """A client without TCP_NODELAY (smtplib) sends EHLO at once after TLS 1.3, not 40 ms later."""
    files = ca.issue("server")
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            port = await serve_one_port(
                nursery, Sink(), server_context(files.certificate, files.key), "optional", {}
            )
            times = await trio.to_thread.run_sync(
                _starttls_ehlo_seconds, port, ca.client_context(), 5
            )
            nursery.cancel_scope.cancel()
    assert sorted(times)[len(times) // 2] < 0.030, times
