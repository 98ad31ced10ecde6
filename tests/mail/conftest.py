"""Fixtures for mail tests: a recording smarthost on loopback built on the SMTP driver."""

from __future__ import annotations

import os
from collections.abc import Callable
from functools import partial
from ipaddress import IPv4Address
from pathlib import Path

import pytest
import trio

from duravip.config.model import (
    Binding,
    BindingGroup,
    ClusterConfig,
    Config,
    DeliveryConfig,
    DuraVip,
    HostPort,
    Listener,
    SpoolConfig,
)
from duravip.smtp.driver import handle_connection
from duravip.smtp.server import ServerSettings
from duravip.smtp.types import Envelope


class Recorder:
    """A MessageSink that records; ``script`` lists exceptions to raise for the next messages."""

    def __init__(self) -> None:
        self.messages: list[Envelope] = []
        self.script: list[Exception | None] = []
        self.arrived = trio.Event()

    async def accept(self, envelope: Envelope) -> str:
        if self.script:
            exc = self.script.pop(0)
            if exc is not None:
                raise exc
        self.messages.append(envelope)
        self.arrived.set()
        self.arrived = trio.Event()
        return f"r{len(self.messages)}"

    async def wait_for(self, n: int) -> None:
        while len(self.messages) < n:
            await self.arrived.wait()


@pytest.fixture
async def smarthost(nursery: trio.Nursery) -> tuple[HostPort, Recorder]:
    rec = Recorder()

    async def handler(stream: trio.SocketStream) -> None:
        peer = stream.socket.getpeername()
        local = stream.socket.getsockname()
        await handle_connection(
            stream,
            settings=ServerSettings("sink"),
            sink=rec,
            peer=(peer[0], peer[1]),
            local=(local[0], local[1]),
        )

    listeners = await nursery.start(partial(trio.serve_tcp, handler, 0, host="127.0.0.1"))
    port = listeners[0].socket.getsockname()[1]
    return HostPort(IPv4Address("127.0.0.1"), port), rec


def closed_port() -> HostPort:
    """A loopback port nobody listens on (connect is refused)."""
    import socket

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return HostPort(IPv4Address("127.0.0.1"), port)


def mail_config(
    spool: Path,
    *,
    node: str,
    smarthost: HostPort | None,
    cluster_ip: str | None = None,
    retry_base: float = 0.05,
    retry_max: float = 0.5,
    unconditional_rebind: bool = True,
) -> Config:
    """Bindings: b1 (DuraVIP, 127.0.0.2), pool = {ga (127.0.0.3), gb (127.0.0.4)}, static st."""
    return Config(
        cluster=ClusterConfig(
            name="mailtest",
            node_name=node,
            gossip_address=HostPort(IPv4Address("127.0.0.1"), 1),
            unconditional_rebind=unconditional_rebind,
        ),
        spool=SpoolConfig(spool),
        cluster_listener=None if cluster_ip is None else HostPort(IPv4Address(cluster_ip), 0),
        delivery=DeliveryConfig(
            smarthost=smarthost, retry_base=retry_base, retry_max=retry_max, concurrency=2
        ),
        listeners=(Listener(HostPort(IPv4Address("127.0.0.5"), 25), duravip_follow="b1"),),
        bindings=(
            Binding("b1", IPv4Address("127.0.0.2"), enable_duravip=True),
            Binding("ga", IPv4Address("127.0.0.3"), enable_duravip=True, group="pool"),
            Binding("gb", IPv4Address("127.0.0.4"), enable_duravip=True, group="pool"),
            Binding("st", IPv4Address("127.0.0.6")),
        ),
        groups=(BindingGroup("pool", ("ga", "gb")),),
        duravips={
            IPv4Address("127.0.0.2"): DuraVip(IPv4Address("127.0.0.2"), binding="b1"),
            IPv4Address("127.0.0.3"): DuraVip(IPv4Address("127.0.0.3"), binding="ga"),
            IPv4Address("127.0.0.4"): DuraVip(IPv4Address("127.0.0.4"), binding="gb"),
        },
    )


def envelope(binding: str | None = None, *, body: bytes = b"hello\r\n", rcpt: int = 1) -> Envelope:
    head = b"From: a@example.org\r\nSubject: t\r\n"
    if binding is not None:
        head += b"X-Binding: " + binding.encode() + b"\r\n"
    return Envelope(
        mail_from="a@example.org",
        rcpt_to=tuple(f"r{i}@example.net" for i in range(rcpt)),
        data=head + b"\r\n" + body,
        peer=("127.0.0.9", 4000),
        local=("127.0.0.1", 25),
    )


@pytest.fixture
def keys() -> Callable[[], list[bytes]]:
    k = [os.urandom(32)]
    return lambda: k
