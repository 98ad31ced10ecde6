"""The listener manager on 127.0.0.x (all of 127/8 is local: no plumbing needed)."""

from __future__ import annotations

import errno
import socket
from functools import partial
from ipaddress import IPv4Address

import attrs
import pytest
import trio

from duravip.config import ClusterConfig, Config, DuraVip, HostPort, Listener
from duravip.smtp.listeners import ListenerManager, serve
from duravip.smtp.server import ServerSettings
from duravip.smtp.types import Envelope

HOST = "node-l"
SETTINGS = ServerSettings(hostname=HOST)
IP1 = IPv4Address("127.0.0.1")
VIP = IPv4Address("127.0.0.2")
VIP2 = IPv4Address("127.0.0.3")


class Sink:
    def __init__(self) -> None:
        self.envelopes: list[Envelope] = []

    async def accept(self, envelope: Envelope) -> str:
        self.envelopes.append(envelope)
        return f"L{len(self.envelopes)}"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def make_config(*listeners: Listener, duravips: tuple[IPv4Address, ...] = ()) -> Config:
    return Config(
        cluster=ClusterConfig(
            name="t", node_name=HOST, gossip_address=HostPort(IPv4Address("127.0.0.1"), 1)
        ),
        listeners=listeners,
        duravips={ip: DuraVip(ip=ip) for ip in duravips},
    )


def plain(ip: IPv4Address, port: int) -> Listener:
    return Listener(address=HostPort(ip, port))


def vip(ip: IPv4Address, port: int) -> Listener:
    return Listener(address=HostPort(ip, port), enable_duravip=True)


async def connect(ip: IPv4Address, port: int) -> tuple[trio.SocketStream, bytearray, bytes]:
    stream = await trio.open_tcp_stream(str(ip), port)
    buf = bytearray()
    return stream, buf, await read_reply(stream, buf)


async def read_reply(stream: trio.abc.Stream, buf: bytearray) -> bytes:
    while (nl := buf.find(b"\r\n")) < 0:
        data = await stream.receive_some(4096)
        if not data:
            raise EOFError(bytes(buf))
        buf += data
    line = bytes(buf[: nl + 2])
    del buf[: nl + 2]
    return line


async def refused(ip: IPv4Address, port: int) -> bool:
    try:
        stream = await trio.open_tcp_stream(str(ip), port)
    except OSError:
        return True
    await stream.aclose()
    return False


async def test_plain_listeners_run_duravip_ones_wait_for_start_ip() -> None:
    port = free_port()
    config = make_config(plain(IP1, port), vip(VIP, port))
    sink = Sink()
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            manager: ListenerManager = await nursery.start(
                partial(serve, config=config, sink=sink, settings=SETTINGS)
            )
            assert manager.running() == {("127.0.0.1", port)}
            assert await refused(VIP, port)
            stream, _, banner = await connect(IP1, port)
            assert banner == b"220 node-l ESMTP duravip\r\n"
            await stream.aclose()

            await manager.start_ip(VIP)
            assert manager.running() == {("127.0.0.1", port), ("127.0.0.2", port)}
            await manager.start_ip(VIP)  # idempotent
            stream, buf, banner = await connect(VIP, port)
            assert banner.startswith(b"220 node-l ")
            await stream.send_all(
                b"HELO c\r\nMAIL FROM:<a>\r\nRCPT TO:<b>\r\nDATA\r\nx\r\n.\r\nQUIT\r\n"
            )
            for _ in range(5):
                await read_reply(stream, buf)
            assert (await read_reply(stream, buf)) == b"221 2.0.0 Bye\r\n"
            await stream.aclose()
            assert sink.envelopes[0].local == ("127.0.0.2", port)

            await manager.stop_ip(VIP, drain_timeout=1.0)
            assert manager.running() == {("127.0.0.1", port)}
            assert await refused(VIP, port)
            assert manager.counters["sessions"] == 2
            assert manager.counters["messages"] == 1
            assert manager.counters["sessions_active"] == 0
            nursery.cancel_scope.cancel()
    assert await refused(IP1, port)


async def mid_data(ip: IPv4Address, port: int) -> tuple[trio.SocketStream, bytearray]:
    """A session stopped in the middle of its message's data (a transaction in progress)."""
    sock, buf, _ = await connect(ip, port)
    await sock.send_all(b"HELO c\r\nMAIL FROM:<a>\r\nRCPT TO:<b>\r\nDATA\r\nhalf\r\n")
    for _ in range(4):
        await read_reply(sock, buf)
    return sock, buf


async def test_stop_ip_drains_a_transaction_in_progress() -> None:
    port = free_port()
    config = make_config(vip(VIP, port))
    sink = Sink()
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            manager: ListenerManager = await nursery.start(
                partial(serve, config=config, sink=sink, settings=SETTINGS)
            )
            await manager.start_ip(VIP)
            busy, busy_buf = await mid_data(VIP, port)
            idle, idle_buf, _ = await connect(VIP, port)

            stopped = trio.Event()

            async def stop() -> None:
                await manager.stop_ip(VIP, drain_timeout=5.0)
                stopped.set()

            nursery.start_soon(stop)
            # The idle session is told at once; new connections are refused at once.
            assert (await read_reply(idle, idle_buf)).startswith(b"421 4.3.2 node-l ")
            assert await refused(VIP, port)
            assert manager.running() == frozenset()
            await trio.sleep(0.2)
            assert not stopped.is_set()
            # The busy one finishes its message, gets 250, then 421.
            await busy.send_all(b"rest\r\n.\r\n")
            assert (await read_reply(busy, busy_buf)) == b"250 2.0.0 Ok: queued as L1\r\n"
            assert (await read_reply(busy, busy_buf)).startswith(b"421 4.3.2 ")
            with trio.fail_after(2):
                await stopped.wait()
            assert sink.envelopes[0].data == b"half\r\nrest\r\n"
            for s in (busy, idle):
                await s.aclose()
            nursery.cancel_scope.cancel()


async def test_quiesce_ip_drains_while_still_accepting_then_close_ip_closes() -> None:
    port = free_port()
    config = make_config(vip(VIP, port))
    sink = Sink()
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            manager: ListenerManager = await nursery.start(
                partial(serve, config=config, sink=sink, settings=SETTINGS)
            )
            await manager.start_ip(VIP)
            busy, busy_buf = await mid_data(VIP, port)
            quiesced = trio.Event()

            async def quiesce() -> None:
                await manager.quiesce_ip(VIP, drain_timeout=5.0)
                quiesced.set()

            nursery.start_soon(quiesce)
            await trio.sleep(0.05)
            # A client connecting during the drain gets a banner and 421, not a reset.
            late, late_buf, banner = await connect(VIP, port)
            assert banner.startswith(b"220 ")
            assert (await read_reply(late, late_buf)).startswith(b"421 4.3.2 ")
            await late.aclose()
            await trio.sleep(0.1)
            assert not quiesced.is_set()  # the transaction in DATA is not cut
            await busy.send_all(b"rest\r\n.\r\n")
            assert (await read_reply(busy, busy_buf)) == b"250 2.0.0 Ok: queued as L1\r\n"
            assert (await read_reply(busy, busy_buf)).startswith(b"421 4.3.2 ")
            await busy.aclose()
            with trio.fail_after(2):
                await quiesced.wait()
            assert manager.running() == frozenset({(str(VIP), port)})  # still open
            manager.close_ip(VIP, grace=0.2)
            assert manager.running() == frozenset()  # at once, nothing awaited
            await trio.sleep(0.05)
            assert await refused(VIP, port)
            await manager.start_ip(VIP)  # and the IP can come back right away
            assert manager.running() == frozenset({(str(VIP), port)})
            nursery.cancel_scope.cancel()


async def test_stop_ip_cuts_a_stalled_transaction_after_the_drain_timeout() -> None:
    port = free_port()
    config = make_config(vip(VIP, port))
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            manager: ListenerManager = await nursery.start(
                partial(serve, config=config, sink=Sink(), settings=SETTINGS)
            )
            await manager.start_ip(VIP)
            stream, buf, _ = await connect(VIP, port)
            await stream.send_all(b"HELO c\r\nMAIL FROM:<a>\r\n")
            for _ in range(2):
                await read_reply(stream, buf)
            start = trio.current_time()
            await manager.stop_ip(VIP, drain_timeout=0.3)
            assert 0.3 <= trio.current_time() - start < 1.5
            assert (await read_reply(stream, buf)).startswith(b"421 4.3.2 ")
            assert manager.counters["sessions_active"] == 0
            await stream.aclose()
            nursery.cancel_scope.cancel()


async def test_start_ip_on_an_address_not_on_the_host_raises() -> None:
    port = free_port()
    absent = IPv4Address("192.0.2.77")  # TEST-NET-1: never configured here
    config = make_config(vip(absent, port), vip(VIP, port))
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            manager: ListenerManager = await nursery.start(
                partial(serve, config=config, sink=Sink(), settings=SETTINGS)
            )
            with pytest.raises(OSError) as info:
                await manager.start_ip(absent)
            assert info.value.errno == errno.EADDRNOTAVAIL
            assert manager.running() == frozenset()
            await manager.start_ip(VIP)  # the manager still works
            assert manager.running() == {("127.0.0.2", port)}
            nursery.cancel_scope.cancel()


async def test_start_ip_with_freebind_listens_before_the_address_exists() -> None:
    port = free_port()
    absent = IPv4Address("192.0.2.78")  # TEST-NET-1: never configured here
    config = make_config(vip(absent, port))
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            manager: ListenerManager = await nursery.start(
                partial(serve, config=config, sink=Sink(), settings=SETTINGS)
            )
            await manager.start_ip(absent, freebind=True)  # a takeover binds first
            assert manager.running() == {("192.0.2.78", port)}
            await manager.stop_ip(absent, drain_timeout=0.0)
            assert manager.running() == frozenset()
            nursery.cancel_scope.cancel()


async def test_listener_on_an_ip_that_is_duravip_elsewhere_follows_the_ip() -> None:
    port = free_port()
    config = make_config(plain(VIP, port), duravips=(VIP,))
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            manager: ListenerManager = await nursery.start(
                partial(serve, config=config, sink=Sink(), settings=SETTINGS)
            )
            assert manager.running() == frozenset()
            await manager.start_ip(VIP)
            assert manager.running() == {("127.0.0.2", port)}
            nursery.cancel_scope.cancel()


async def test_set_config_starts_and_stops_listeners() -> None:
    p1, p2 = free_port(), free_port()
    config = make_config(plain(IP1, p1), vip(VIP2, p1))
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            manager: ListenerManager = await nursery.start(
                partial(serve, config=config, sink=Sink(), settings=SETTINGS)
            )
            await manager.start_ip(VIP2)
            # Reload: the plain listener moves to p2, VIP2 gets a second port.
            new = make_config(plain(IP1, p2), vip(VIP2, p1), vip(VIP2, p2))
            new = attrs.evolve(new, smtp=attrs.evolve(new.smtp, max_recipients=7))
            manager.set_config(new)
            want = {("127.0.0.1", p2), ("127.0.0.3", p1), ("127.0.0.3", p2)}
            while manager.running() != want:
                await trio.sleep(0.01)
            assert await refused(IP1, p1)
            # New sessions use the reloaded limits.
            stream, buf, banner = await connect(VIP2, p2)
            assert banner.startswith(b"220 node-l ")
            await stream.send_all(b"HELO c\r\nMAIL FROM:<a>\r\n" + b"RCPT TO:<b>\r\n" * 8)
            replies = [await read_reply(stream, buf) for _ in range(10)]
            assert [r[:3] for r in replies[2:]] == [b"250"] * 7 + [b"452"]
            await stream.aclose()
            await manager.stop_ip(VIP2, drain_timeout=0.5)
            assert manager.running() == {("127.0.0.1", p2)}
            nursery.cancel_scope.cancel()


async def test_cancelling_serve_says_421_to_open_sessions() -> None:
    port = free_port()
    config = make_config(plain(IP1, port))
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            await nursery.start(partial(serve, config=config, sink=Sink(), settings=SETTINGS))
            stream, buf, _ = await connect(IP1, port)
            await stream.send_all(b"NOOP\r\n")
            await read_reply(stream, buf)
            nursery.cancel_scope.cancel()
        assert (await read_reply(stream, buf)).startswith(b"421 4.3.2 node-l ")
        await stream.aclose()


async def test_a_plain_listener_that_cannot_bind_is_skipped() -> None:
    busy_port, port = free_port(), free_port()
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", busy_port))
        squatter.listen(1)
        config = make_config(plain(IP1, busy_port), plain(IP1, port))
        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                manager: ListenerManager = await nursery.start(
                    partial(serve, config=config, sink=Sink(), settings=SETTINGS)
                )
                assert manager.running() == {("127.0.0.1", port)}
                nursery.cancel_scope.cancel()
