"""The Trio driver: in-memory streams under the autojump clock, and real clients on loopback."""

from __future__ import annotations

import shutil
import smtplib
import subprocess
from email.message import EmailMessage
from functools import partial

import pytest
import trio
import trio.testing

from duravip.config import SmtpLimits
from duravip.smtp.driver import handle_connection
from duravip.smtp.server import ServerSettings
from duravip.smtp.types import Envelope, PermanentFailure, TemporaryFailure

HOST = "node-d"
SETTINGS = ServerSettings(hostname=HOST)
PEER = ("192.0.2.1", 4000)
LOCAL = ("192.0.2.2", 25)


class RecordingSink:
    """Keeps every envelope; can be told to fail or to take its time."""

    def __init__(self, fail: BaseException | None = None, delay: float = 0.0) -> None:
        self.envelopes: list[Envelope] = []
        self.fail = fail
        self.delay = delay

    async def accept(self, envelope: Envelope) -> str:
        if self.delay:
            await trio.sleep(self.delay)
        if self.fail is not None:
            raise self.fail
        self.envelopes.append(envelope)
        return f"ID{len(self.envelopes)}"


async def read_reply(stream: trio.abc.Stream, buf: bytearray) -> bytes:
    """Read one (possibly multi-line) reply."""
    while True:
        start = 0
        while (nl := buf.find(b"\r\n", start)) >= 0:
            line = bytes(buf[start:nl])
            if line[3:4] == b" ":
                reply = bytes(buf[: nl + 2])
                del buf[: nl + 2]
                return reply
            start = nl + 2
        data = await stream.receive_some(65536)
        if not data:
            raise EOFError(bytes(buf))
        buf += data


async def read_all(stream: trio.abc.Stream) -> bytes:
    out = bytearray()
    while data := await stream.receive_some(65536):
        out += data
    return bytes(out)


# ---------------------------------------------------- in-memory streams


async def test_session_over_memory_stream(autojump_clock: trio.testing.MockClock) -> None:
    client, server_stream = trio.testing.memory_stream_pair()
    sink = RecordingSink()
    counters: dict[str, int] = {}
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(
                lambda: handle_connection(
                    server_stream,
                    settings=SETTINGS,
                    sink=sink,
                    peer=PEER,
                    local=LOCAL,
                    counters=counters,
                )
            )
            await client.send_all(
                b"EHLO c\r\nMAIL FROM:<a@x>\r\nRCPT TO:<b@y>\r\nDATA\r\nhello\r\n.\r\nQUIT\r\n"
            )
            out = await read_all(client)
    assert out.startswith(b"220 node-d ESMTP duravip\r\n")
    assert b"250 2.0.0 Ok: queued as ID1\r\n" in out and out.endswith(b"221 2.0.0 Bye\r\n")
    (env,) = sink.envelopes
    assert (env.mail_from, env.rcpt_to, env.data) == ("a@x", ("b@y",), b"hello\r\n")
    assert (env.peer, env.local, env.helo) == (PEER, LOCAL, "c")
    assert counters == {"messages": 1}


@pytest.mark.parametrize(
    ("fail", "reply", "key"),
    [
        (TemporaryFailure("disk full"), b"451 4.3.0 disk full\r\n", "rejects"),
        (PermanentFailure(), b"554 5.6.0 Error: message refused\r\n", "rejects"),
        (RuntimeError("bug"), b"451 4.3.0 Error: local error in processing\r\n", "sink_errors"),
    ],
)
async def test_sink_failures_become_replies_and_session_continues(
    autojump_clock: trio.testing.MockClock, fail: BaseException, reply: bytes, key: str
) -> None:
    client, server_stream = trio.testing.memory_stream_pair()
    counters: dict[str, int] = {}
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(
                lambda: handle_connection(
                    server_stream,
                    settings=SETTINGS,
                    sink=RecordingSink(fail=fail),
                    peer=PEER,
                    local=LOCAL,
                    counters=counters,
                )
            )
            await client.send_all(
                b"HELO c\r\nMAIL FROM:<a>\r\nRCPT TO:<b>\r\nDATA\r\nx\r\n.\r\nNOOP\r\nQUIT\r\n"
            )
            out = await read_all(client)
    assert out.endswith(reply + b"250 2.0.0 Ok\r\n221 2.0.0 Bye\r\n")
    assert counters == {key: 1}


async def test_command_timeout_gives_421(autojump_clock: trio.testing.MockClock) -> None:
    client, server_stream = trio.testing.memory_stream_pair()
    s = ServerSettings(hostname=HOST, limits=SmtpLimits(command_timeout=30, data_timeout=100))
    counters: dict[str, int] = {}
    with trio.fail_after(200):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(
                lambda: handle_connection(
                    server_stream,
                    settings=s,
                    sink=RecordingSink(),
                    peer=PEER,
                    local=LOCAL,
                    counters=counters,
                )
            )
            start = trio.current_time()
            out = await read_all(client)
            elapsed = trio.current_time() - start
    assert out == b"220 node-d ESMTP duravip\r\n421 4.4.2 node-d Error: timeout exceeded\r\n"
    assert 30 <= elapsed < 31
    assert counters == {"timeouts": 1}


async def test_data_timeout_applies_during_body(autojump_clock: trio.testing.MockClock) -> None:
    client, server_stream = trio.testing.memory_stream_pair()
    s = ServerSettings(hostname=HOST, limits=SmtpLimits(command_timeout=30, data_timeout=100))
    with trio.fail_after(500):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(
                lambda: handle_connection(
                    server_stream, settings=s, sink=RecordingSink(), peer=PEER, local=LOCAL
                )
            )
            await client.send_all(b"HELO c\r\nMAIL FROM:<a>\r\nRCPT TO:<b>\r\nDATA\r\npart")
            start = trio.current_time()
            out = await read_all(client)
            elapsed = trio.current_time() - start
    assert out.endswith(
        b"354 End data with <CR><LF>.<CR><LF>\r\n421 4.4.2 node-d Error: timeout exceeded\r\n"
    )
    assert 100 <= elapsed < 101


async def _trickle(
    autojump_clock: trio.testing.MockClock, prefix: bytes, drip: bytes
) -> tuple[bytes, float, dict[str, int]]:
    """Send ``prefix``, then ``drip`` every 20 s (inside every idle timeout) until closed."""
    client, server_stream = trio.testing.memory_stream_pair()
    limits = SmtpLimits(command_timeout=30, data_timeout=100, session_timeout=300)
    s = ServerSettings(hostname=HOST, limits=limits)
    counters: dict[str, int] = {}
    out = bytearray()
    with trio.fail_after(1000):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(
                lambda: handle_connection(
                    server_stream,
                    settings=s,
                    sink=RecordingSink(),
                    peer=PEER,
                    local=LOCAL,
                    counters=counters,
                )
            )
            start = trio.current_time()
            await client.send_all(prefix)

            async def drip_forever() -> None:
                try:
                    while True:
                        await trio.sleep(20)
                        await client.send_all(drip)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    return

            nursery.start_soon(drip_forever)
            out += await read_all(client)
            elapsed = trio.current_time() - start
            nursery.cancel_scope.cancel()
    return bytes(out), elapsed, counters


async def test_session_timeout_ends_a_client_that_trickles_commands(
    autojump_clock: trio.testing.MockClock,
) -> None:
    out, elapsed, counters = await _trickle(autojump_clock, b"HELO c\r\n", b"NOOP\r\n")
    assert out.endswith(b"250 2.0.0 Ok\r\n421 4.4.2 node-d Error: session time limit exceeded\r\n")
    assert 300 <= elapsed < 301
    assert counters == {"session_timeouts": 1}


async def test_session_timeout_ends_a_body_that_trickles(
    autojump_clock: trio.testing.MockClock,
) -> None:
    head = b"HELO c\r\nMAIL FROM:<a>\r\nRCPT TO:<b>\r\nDATA\r\n"
    out, elapsed, counters = await _trickle(autojump_clock, head, b"x")
    assert out.endswith(
        b"354 End data with <CR><LF>.<CR><LF>\r\n"
        b"421 4.4.2 node-d Error: session time limit exceeded\r\n"
    )
    assert 300 <= elapsed < 301
    assert counters == {"session_timeouts": 1}


async def test_shutdown_idle_session_gets_421_at_once(
    autojump_clock: trio.testing.MockClock,
) -> None:
    client, server_stream = trio.testing.memory_stream_pair()
    shutdown = trio.Event()
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(
                lambda: handle_connection(
                    server_stream,
                    settings=SETTINGS,
                    sink=RecordingSink(),
                    peer=PEER,
                    local=LOCAL,
                    shutdown=shutdown,
                )
            )
            buf = bytearray()
            assert (await read_reply(client, buf)).startswith(b"220 ")
            await client.send_all(b"EHLO c\r\n")
            await read_reply(client, buf)
            await trio.sleep(5)
            start = trio.current_time()
            shutdown.set()
            out = await read_all(client)
            assert trio.current_time() - start < 0.01
    assert out == b"421 4.3.2 node-d Service shutting down\r\n"


async def test_shutdown_lets_transaction_finish(autojump_clock: trio.testing.MockClock) -> None:
    """Shutdown during DATA: the message is accepted (250), then 421, even if pipelined."""
    client, server_stream = trio.testing.memory_stream_pair()
    shutdown = trio.Event()
    sink = RecordingSink(delay=1.0)
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(
                lambda: handle_connection(
                    server_stream,
                    settings=SETTINGS,
                    sink=sink,
                    peer=PEER,
                    local=LOCAL,
                    shutdown=shutdown,
                )
            )
            await client.send_all(
                b"HELO c\r\nMAIL FROM:<a>\r\nRCPT TO:<b>\r\nDATA\r\nfirst half\r\n"
            )
            await trio.sleep(1)
            shutdown.set()
            await trio.sleep(1)
            await client.send_all(b".\r\nMAIL FROM:<next>\r\n")
            out = await read_all(client)
    assert out.endswith(
        b"354 End data with <CR><LF>.<CR><LF>\r\n250 2.0.0 Ok: queued as ID1\r\n"
        b"421 4.3.2 node-d Service shutting down\r\n"
    )
    assert [e.data for e in sink.envelopes] == [b"first half\r\n"]


async def test_cancelled_session_says_421(autojump_clock: trio.testing.MockClock) -> None:
    client, server_stream = trio.testing.memory_stream_pair()
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(
                lambda: handle_connection(
                    server_stream, settings=SETTINGS, sink=RecordingSink(), peer=PEER, local=LOCAL
                )
            )
            await client.send_all(b"HELO c\r\nMAIL FROM:<a>\r\n")
            await trio.sleep(1)
            nursery.cancel_scope.cancel()
        out = await read_all(client)
    assert out.endswith(b"250 2.1.0 Ok\r\n421 4.3.2 node-d Service shutting down\r\n")


async def test_initial_data_and_greeting_false(autojump_clock: trio.testing.MockClock) -> None:
    client, server_stream = trio.testing.memory_stream_pair()
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(
                lambda: handle_connection(
                    server_stream,
                    settings=SETTINGS,
                    sink=RecordingSink(),
                    peer=PEER,
                    local=LOCAL,
                    greeting=False,
                    initial_data=b"NOOP\r\n",
                )
            )
            await client.send_all(b"QUIT\r\n")
            out = await read_all(client)
    assert out == b"220 node-d ESMTP duravip\r\n250 2.0.0 Ok\r\n221 2.0.0 Bye\r\n"


async def test_client_vanishing_mid_data_is_quiet(autojump_clock: trio.testing.MockClock) -> None:
    client, server_stream = trio.testing.memory_stream_pair()
    sink = RecordingSink()
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(
                lambda: handle_connection(
                    server_stream, settings=SETTINGS, sink=sink, peer=PEER, local=LOCAL
                )
            )
            await client.send_all(b"HELO c\r\nMAIL FROM:<a>\r\nRCPT TO:<b>\r\nDATA\r\nhalf")
            await trio.sleep(1)
            await client.aclose()
    assert sink.envelopes == []


# ------------------------------------------------- real clients on loopback


async def _serve_loopback(
    nursery: trio.Nursery, sink: RecordingSink, settings: ServerSettings = SETTINGS
) -> int:
    async def handler(stream: trio.SocketStream) -> None:
        peer = stream.socket.getpeername()
        local = stream.socket.getsockname()
        await handle_connection(
            stream,
            settings=settings,
            sink=sink,
            peer=(peer[0], peer[1]),
            local=(local[0], local[1]),
        )

    listeners = await nursery.start(partial(trio.serve_tcp, handler, 0, host="127.0.0.1"))
    return int(listeners[0].socket.getsockname()[1])


def _smtplib_session(port: int, count: int) -> None:
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
        code, _ = client.ehlo("tester")
        assert code == 250
        assert client.has_extn("pipelining") and client.has_extn("8bitmime")
        assert client.has_extn("enhancedstatuscodes")
        assert int(client.esmtp_features["size"]) == SETTINGS.limits.max_message_size
        for i in range(count):
            msg = EmailMessage()
            msg["From"] = "a@example.com"
            msg["To"] = "b@example.com, c@example.com"
            msg["Subject"] = f"n{i}"
            msg.set_content(".starts with a dot\nline two\n")
            client.send_message(msg)
        code, _ = client.noop()
        assert code == 250


async def test_smtplib_many_messages_one_connection() -> None:
    sink = RecordingSink()
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            port = await _serve_loopback(nursery, sink)
            await trio.to_thread.run_sync(_smtplib_session, port, 20)
            nursery.cancel_scope.cancel()
    assert len(sink.envelopes) == 20
    env = sink.envelopes[7]
    assert env.rcpt_to == ("b@example.com", "c@example.com")
    assert b"Subject: n7\r\n" in env.data
    assert b"\r\n.starts with a dot\r\nline two\r\n" in env.data
    assert env.mail_params.get("SIZE") == str(len(env.data))
    assert env.local[0] == "127.0.0.1" and env.peer[0] == "127.0.0.1"


def _smtplib_too_big(port: int) -> tuple[int, bytes | str]:
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
        client.ehlo("tester")
        client.esmtp_features.pop("size")  # so smtplib does not refuse by itself
        try:
            client.sendmail("a@x", ["b@y"], b"Subject: big\r\n\r\n" + b"z" * 5000 + b"\r\n")
        except smtplib.SMTPDataError as exc:
            return exc.smtp_code, exc.smtp_error
        raise AssertionError("the big message was accepted")


async def test_smtplib_size_limit() -> None:
    sink = RecordingSink()
    s = ServerSettings(hostname=HOST, limits=SmtpLimits(max_message_size=1000))
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            port = await _serve_loopback(nursery, sink, s)
            code, text = await trio.to_thread.run_sync(_smtplib_too_big, port)
            nursery.cancel_scope.cancel()
    assert code == 552 and isinstance(text, bytes) and text.startswith(b"5.3.4")
    assert sink.envelopes == []


@pytest.mark.skipif(shutil.which("swaks") is None, reason="swaks not installed")
async def test_swaks() -> None:
    sink = RecordingSink()
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            port = await _serve_loopback(nursery, sink)
            result = await trio.run_process(
                [
                    "swaks",
                    "--server",
                    f"127.0.0.1:{port}",
                    "--to",
                    "rcpt@example.com",
                    "--from",
                    "sender@example.com",
                    "--pipeline",
                    "--body",
                    "via swaks",
                ],
                capture_stdout=True,
                capture_stderr=True,
                check=False,
            )
            nursery.cancel_scope.cancel()
    assert result.returncode == 0, result.stdout.decode() + result.stderr.decode()
    assert b"250 2.0.0 Ok: queued as ID1" in result.stdout
    (env,) = sink.envelopes
    assert env.mail_from == "sender@example.com" and env.rcpt_to == ("rcpt@example.com",)
    assert b"via swaks" in env.data


async def test_raw_pipelining_client() -> None:
    """Everything up to DATA in one write, then body plus the next transaction in one write."""
    sink = RecordingSink()
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            port = await _serve_loopback(nursery, sink)
            stream = await trio.open_tcp_stream("127.0.0.1", port)
            buf = bytearray()
            assert (await read_reply(stream, buf)).startswith(b"220 node-d ")
            await stream.send_all(
                b"EHLO p\r\nMAIL FROM:<a>\r\nRCPT TO:<b>\r\nRCPT TO:<c>\r\nDATA\r\n"
            )
            replies = [await read_reply(stream, buf) for _ in range(5)]
            assert [r[:4] for r in replies] == [b"250-", b"250 ", b"250 ", b"250 ", b"354 "]
            await stream.send_all(b"one\r\n.\r\nMAIL FROM:<d>\r\nRCPT TO:<e>\r\nDATA\r\n")
            replies = [await read_reply(stream, buf) for _ in range(4)]
            assert [r[:3] for r in replies] == [b"250", b"250", b"250", b"354"]
            await stream.send_all(b"two\r\n.\r\nQUIT\r\n")
            rest = await read_all(stream)
            assert bytes(buf) + rest == b"250 2.0.0 Ok: queued as ID2\r\n221 2.0.0 Bye\r\n"
            await stream.aclose()
            nursery.cancel_scope.cancel()
    assert [(e.mail_from, e.rcpt_to, e.data) for e in sink.envelopes] == [
        ("a", ("b", "c"), b"one\r\n"),
        ("d", ("e",), b"two\r\n"),
    ]


def test_swaks_subprocess_module_is_available() -> None:
    """Guard: the test above must not silently skip in CI."""
    assert shutil.which("swaks") is not None
    assert subprocess.run(["swaks", "--version"], capture_output=True, check=False).returncode == 0
