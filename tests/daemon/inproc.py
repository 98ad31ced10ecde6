"""Two whole nodes in one Trio run (the harness the daemon tests share): real
gossip, SMTP and control sockets on loopback, the fake plumber instead of the
kernel's addresses.

127.0.0.0/8 is local in full, so a listener can bind a "DuraVIP" such as
127.0.1.2 whether or not the fake plumbed it: these tests check the daemon's
wiring (start order, election, handover, console, shutdown), not the kernel;
tests/e2e/ does the same in network namespaces with real addresses.
"""

from __future__ import annotations

import json
import socket
import tempfile
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from ipaddress import IPv4Address
from pathlib import Path

import pytest
import trio

from duravip import config as cfg
from duravip.daemon.node import Node
from duravip.plumbing.fake import FakePlumber
from duravip.swim.crypto import Keyring

VIP1, VIP2, FOLLOW = IPv4Address("127.0.1.1"), IPv4Address("127.0.1.2"), IPv4Address("127.0.2.1")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def node_config(tmp: Path, i: int, smtp_port: int, gossip_port: int) -> str:
    me = f"127.0.0.{10 + i}"
    other = f"127.0.0.{10 + (3 - i)}"
    d = tmp / f"n{i}"
    d.mkdir(exist_ok=True)
    return f"""
cluster {{
  name = "inproc"
  node_name = "n{i}"
  gossip_address = "{me}:{gossip_port}"
  peers = ( "{other}:{gossip_port}" )
  keyring = "{tmp / "keyring"}"
  profile = "fast"
  view_mature_time = 0.3
  Topology "127.0.1.0/24" {{ interface = "lo" }}
  Topology "127.0.2.0/24" {{ interface = "lo" }}
}}
Spool {{ path = "{d / "spool"}" }}
Control_Listener {{ Listen "{d / "control.sock"}" {{ mode = "0600" }} }}
ESMTP_Listener {{
  Listen "{VIP1}:{smtp_port}" {{ Enable_Duravip = true }}
  Listen "{VIP2}:{smtp_port}" {{ Enable_Duravip = true }}
  Listen "{FOLLOW}:{smtp_port}" {{ Duravip_Follow = "b1" }}
}}
Binding "b1" {{ Enable_Duravip = true  Bind_Address = "{VIP1}"  Duravip_Preference = "n1" }}
Binding "b2" {{ Enable_Duravip = true  Bind_Address = "{VIP2}"  Duravip_Preference = "n2" }}
"""


class Cluster:
    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.smtp_port = _free_port()
        self.gossip_port = gossip_port = _free_port()
        (tmp / "keyring").write_text(Keyring.generate().dumps())
        self.paths = {}
        for i in (1, 2):
            p = tmp / f"n{i}.conf"
            p.write_text(node_config(tmp, i, self.smtp_port, gossip_port))
            self.paths[f"n{i}"] = p
        self.plumbers = {n: FakePlumber(interfaces=("lo",)) for n in self.paths}
        self.nodes: dict[str, Node] = {}
        self.scopes: dict[str, trio.CancelScope] = {}

    def factory(self, name: str) -> Callable[[cfg.Config], object]:
        @asynccontextmanager
        async def open_fake(c: cfg.Config) -> AsyncIterator[FakePlumber]:
            yield self.plumbers[name]

        return open_fake

    async def run(self, name: str, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        config = cfg.load(self.paths[name])
        node = Node(
            config,
            self.paths[name],
            plumber=self.factory(name),  # type: ignore[arg-type]
            handle_signals=False,  # two nodes in one process: no process-wide handlers
        )
        self.nodes[name] = node
        with trio.CancelScope() as scope:
            self.scopes[name] = scope
            task_status.started()
            await node.run()

    def holders(self) -> dict[IPv4Address, list[str]]:
        out: dict[IPv4Address, list[str]] = {}
        for n, p in self.plumbers.items():
            for ip in p.addresses:
                out.setdefault(ip, []).append(n)
        return out

    async def wait_holders(self, want: dict[IPv4Address, str], timeout: float = 10) -> None:
        with trio.fail_after(timeout):
            while {ip: hs for ip, hs in self.holders().items() if ip in want} != {
                ip: [n] for ip, n in want.items()
            }:
                await trio.sleep(0.02)

    async def console(self, name: str, *words: str) -> dict[str, object]:
        path = self.tmp / name / "control.sock"
        stream = await trio.open_unix_socket(str(path))
        async with stream:
            req = {"cmd": " ".join(words), "args": [], "json": True}
            await stream.send_all((json.dumps(req) + "\n").encode())
            buf = b""
            while not buf.endswith(b"\n"):
                chunk = await stream.receive_some(65536)
                if not chunk:
                    break
                buf += chunk
        reply: dict[str, object] = json.loads(buf)
        return reply


async def banner(ip: IPv4Address, port: int) -> str:
    with trio.fail_after(3):
        stream = await trio.open_tcp_stream(str(ip), port)
        async with stream:
            data = b""
            while b"\r\n" not in data:
                data += await stream.receive_some(1024)
            return data.decode().split("\r\n")[0]


@pytest.fixture
def cluster(tmp_path: Path) -> Cluster:
    # Unix socket paths must stay short; unique, so concurrent runs never share one.
    short = Path(tempfile.mkdtemp(prefix="dvd", dir="/tmp"))
    try:
        yield Cluster(short)
    finally:
        import shutil

        shutil.rmtree(short, ignore_errors=True)
