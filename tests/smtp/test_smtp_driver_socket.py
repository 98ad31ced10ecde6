"""The driver's plain-socket path (``read(2)``/``write(2)`` on the fd, one scheduler trip
per command) on real loopback connections: timeouts, shutdown, fairness, cost."""

from __future__ import annotations

import socket
from functools import partial

import trio
import trio.lowlevel

from duravip.config import SmtpLimits
from duravip.smtp.driver import handle_connection
from duravip.smtp.server import ServerSettings
from duravip.smtp.types import Envelope

HOST = "node-s"


class Sink:
    def __init__(self) -> None:
        self.envelopes: list[Envelope] = []

    async def accept(self, envelope: Envelope) -> str:
        await trio.lowlevel.checkpoint()
        self.envelopes.append(envelope)
        return f"Q{len(self.envelopes)}"


async def _serve(
    nursery: trio.Nursery,
    sink: Sink,
    settings: ServerSettings,
    *,
    shutdown: trio.Event | None = None,
    counters: dict[str, int] | None = None,
    tasks: list[trio.lowlevel.Task] | None = None,
) -> int:
    async def handler(stream: trio.SocketStream) -> None:
        if tasks is not None:
            tasks.append(trio.lowlevel.current_task())
        await handle_connection(
            stream,
            settings=settings,
            sink=sink,
            peer=("127.0.0.1", 1),
            local=("127.0.0.1", 25),
            shutdown=shutdown,
            counters=counters,
        )

    listeners = await nursery.start(partial(trio.serve_tcp, handler, 0, host="127.0.0.1"))
    return int(listeners[0].socket.getsockname()[1])


async def _reply(stream: trio.SocketStream, buf: bytearray) -> bytes:
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


async def _rest(stream: trio.SocketStream) -> bytes:
    out = bytearray()
    while data := await stream.receive_some(65536):
        out += data
    return bytes(out)


async def test_command_timeout_over_tcp() -> None:
    settings = ServerSettings(HOST, limits=SmtpLimits(command_timeout=0.3, data_timeout=5))
    counters: dict[str, int] = {}
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            port = await _serve(nursery, Sink(), settings, counters=counters)
            stream = await trio.open_tcp_stream("127.0.0.1", port)
            buf = bytearray()
            await _reply(stream, buf)
            await stream.send_all(b"EHLO c\r\n")
            await _reply(stream, buf)
            start = trio.current_time()
            out = await _rest(stream)
            elapsed = trio.current_time() - start
            nursery.cancel_scope.cancel()
    assert bytes(buf) + out == b"421 4.4.2 node-s Error: timeout exceeded\r\n"
    assert 0.25 < elapsed < 3
    assert counters == {"timeouts": 1}


async def test_timeout_is_rearmed_by_every_command_over_tcp() -> None:
    """A client that answers within the timeout each time is never cut off."""
    settings = ServerSettings(HOST, limits=SmtpLimits(command_timeout=1.0, data_timeout=5))
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            port = await _serve(nursery, Sink(), settings)
            stream = await trio.open_tcp_stream("127.0.0.1", port)
            buf = bytearray()
            await _reply(stream, buf)
            for _ in range(5):  # 5 x 0.3 s: longer than one timeout in all
                await trio.sleep(0.3)
                await stream.send_all(b"NOOP\r\n")
                assert (await _reply(stream, buf)) == b"250 2.0.0 Ok\r\n"
            await stream.send_all(b"QUIT\r\n")
            assert bytes(buf) + await _rest(stream) == b"221 2.0.0 Bye\r\n"
            nursery.cancel_scope.cancel()


async def test_shutdown_of_an_idle_tcp_session_is_immediate_and_busy_one_finishes() -> None:
    shutdown = trio.Event()
    sink = Sink()
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            port = await _serve(nursery, sink, ServerSettings(HOST), shutdown=shutdown)
            idle = await trio.open_tcp_stream("127.0.0.1", port)
            busy = await trio.open_tcp_stream("127.0.0.1", port)
            ib, bb = bytearray(), bytearray()
            await _reply(idle, ib)
            await _reply(busy, bb)
            await busy.send_all(b"HELO c\r\nMAIL FROM:<a>\r\n")
            await _reply(busy, bb)
            await _reply(busy, bb)
            shutdown.set()
            assert bytes(ib) + await _rest(idle) == b"421 4.3.2 node-s Service shutting down\r\n"
            await busy.send_all(b"RCPT TO:<b>\r\nDATA\r\nhi\r\n.\r\n")
            out = bytes(bb) + await _rest(busy)
            nursery.cancel_scope.cancel()
    assert out == (
        b"250 2.1.5 Ok\r\n354 End data with <CR><LF>.<CR><LF>\r\n"
        b"250 2.0.0 Ok: queued as Q1\r\n421 4.3.2 node-s Service shutting down\r\n"
    )


async def test_a_flooding_client_does_not_starve_another_session() -> None:
    """Pipelined NOOPs arriving faster than they are answered: the other session still runs."""
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            port = await _serve(nursery, Sink(), ServerSettings(HOST))
            flood = await trio.open_tcp_stream("127.0.0.1", port)
            other = await trio.open_tcp_stream("127.0.0.1", port)
            fb, ob = bytearray(), bytearray()
            await _reply(flood, fb)
            await _reply(other, ob)
            stop = trio.Event()

            async def push() -> None:
                chunk = b"NOOP\r\n" * 2000
                while not stop.is_set():
                    await flood.send_all(chunk)

            async def drain() -> None:
                while not stop.is_set():
                    await flood.receive_some(1 << 20)

            nursery.start_soon(push)
            nursery.start_soon(drain)
            await trio.sleep(0.2)
            for _ in range(20):
                await other.send_all(b"NOOP\r\n")
                with trio.fail_after(3):  # starved, it would wait for the flood to stop
                    assert (await _reply(other, ob)) == b"250 2.0.0 Ok\r\n"
            stop.set()
            nursery.cancel_scope.cancel()


async def test_client_reset_ends_the_session_quietly() -> None:
    sink = Sink()
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            port = await _serve(nursery, sink, ServerSettings(HOST))
            s = socket.create_connection(("127.0.0.1", port))
            s.sendall(b"HELO c\r\nMAIL FROM:<a>\r\nRCPT TO:<b>\r\nDATA\r\nhalf")
            await trio.sleep(0.1)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
            s.close()  # RST
            await trio.sleep(0.2)
            # The listener is still fine.
            stream = await trio.open_tcp_stream("127.0.0.1", port)
            buf = bytearray()
            assert (await _reply(stream, buf)).startswith(b"220 ")
            await stream.aclose()
            nursery.cancel_scope.cancel()
    assert sink.envelopes == []


class _Steps(trio.abc.Instrument):
    def __init__(self, tasks: list[trio.lowlevel.Task]) -> None:
        self.tasks = tasks
        self.steps = 0

    def before_task_step(self, task: trio.lowlevel.Task) -> None:
        if task in self.tasks:
            self.steps += 1


async def test_a_lock_step_command_costs_one_scheduler_trip() -> None:
    """Per command: wait for the client, read, answer (no extra checkpoints on send
    or after a successful read); a message (MAIL, RCPT, DATA, body) about 4 trips plus
    the sink's. This is where most of the server's CPU per message went."""
    tasks: list[trio.lowlevel.Task] = []
    steps = _Steps(tasks)
    n = 50
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            port = await _serve(nursery, Sink(), ServerSettings(HOST), tasks=tasks)
            stream = await trio.open_tcp_stream("127.0.0.1", port)
            buf = bytearray()
            await _reply(stream, buf)
            await stream.send_all(b"EHLO c\r\n")
            await _reply(stream, buf)
            trio.lowlevel.add_instrument(steps)
            try:
                for _ in range(n):
                    for line in (b"MAIL FROM:<a>\r\n", b"RCPT TO:<b>\r\n", b"DATA\r\n"):
                        await stream.send_all(line)
                        await _reply(stream, buf)
                    await stream.send_all(b"body\r\n.\r\n")
                    assert (await _reply(stream, buf)).startswith(b"250 2.0.0 Ok: queued")
            finally:
                trio.lowlevel.remove_instrument(steps)
            await stream.aclose()
            nursery.cancel_scope.cancel()
    # 4 waits for the client + 1 for the sink's checkpoint = 5 a message (was 9).
    assert steps.steps / n <= 6


class _SlowSink(Sink):
    async def accept(self, envelope: Envelope) -> str:
        await trio.sleep(0.6)
        return await super().accept(envelope)


async def test_a_sink_slower_than_the_command_timeout_is_not_cut() -> None:
    """The receive deadline stays set after a read; it must be cleared before the sink."""
    settings = ServerSettings(HOST, limits=SmtpLimits(command_timeout=0.2, data_timeout=0.2))
    sink = _SlowSink()
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            port = await _serve(nursery, sink, settings)
            stream = await trio.open_tcp_stream("127.0.0.1", port)
            buf = bytearray()
            await _reply(stream, buf)
            await stream.send_all(b"HELO c\r\nMAIL FROM:<a>\r\nRCPT TO:<b>\r\nDATA\r\n")
            for _ in range(4):
                await _reply(stream, buf)
            await stream.send_all(b"hi\r\n.\r\nQUIT\r\n")
            out = bytes(buf) + await _rest(stream)
            nursery.cancel_scope.cancel()
    assert out == b"250 2.0.0 Ok: queued as Q1\r\n221 2.0.0 Bye\r\n"
    assert len(sink.envelopes) == 1
