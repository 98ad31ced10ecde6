"""Two whole nodes in one Trio run: real gossip, SMTP and control sockets on
loopback, the fake plumber instead of the kernel's addresses.

127.0.0.0/8 is local in full, so a listener can bind a "DuraVIP" such as
127.0.1.2 whether or not the fake plumbed it: these tests check the daemon's
wiring (start order, election, handover, console, shutdown), not the kernel;
tests/e2e/ does the same in network namespaces with real addresses.
"""

from __future__ import annotations

import json
import socket
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
        gossip_port = _free_port()
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
    short = Path(f"/tmp/dvd{tmp_path.name[-6:]}")  # Unix socket paths must stay short
    short.mkdir(exist_ok=True)
    try:
        yield Cluster(short)
    finally:
        import shutil

        shutil.rmtree(short, ignore_errors=True)


async def test_two_nodes_elect_serve_fail_over_and_stop(cluster: Cluster) -> None:
    with trio.fail_after(40):
        async with trio.open_nursery() as nursery:
            await nursery.start(cluster.run, "n1")
            await nursery.start(cluster.run, "n2")
            # Preferences honoured; the follow listener goes with its binding.
            await cluster.wait_holders({VIP1: "n1", VIP2: "n2", FOLLOW: "n1"})
            assert "n1" in await banner(VIP1, cluster.smtp_port)
            assert "n2" in await banner(VIP2, cluster.smtp_port)

            show = await cluster.console("n1", "cluster", "duravip", "show")
            rows = {d["ip"]: d for d in show["data"]["duravips"]}  # type: ignore[index]
            assert rows[str(VIP2)]["owner"] == "n2" and rows[str(VIP2)]["holders"] == ["n2"]
            explain = await cluster.console("n2", "cluster", "duravip", "explain", str(VIP1))
            assert explain["ok"] and explain["data"]["decision"]["owner"] == "n1"  # type: ignore[index]

            # n2 dies without a word (its scope is cancelled: no leave, no release
            # announcement); its exit guard unplumbs, n1 detects it and takes VIP2.
            cluster.scopes["n2"].cancel()
            await cluster.wait_holders({VIP1: "n1", VIP2: "n1", FOLLOW: "n1"}, timeout=10)
            assert "n1" in await banner(VIP2, cluster.smtp_port)
            members = await cluster.console("n1", "cluster", "membership")
            states = {m["name"]: m["state"] for m in members["data"]["members"]}  # type: ignore[index]
            assert states["n2"] in ("dead", "suspect")

            # Graceful stop through the console: everything released, clean exit.
            reply = await cluster.console("n1", "shutdown")
            assert reply["ok"]
    assert cluster.plumbers["n1"].addresses == {}
    assert not (cluster.tmp / "n1" / "control.sock").exists()


async def test_reload_rejects_a_bad_config_and_keeps_running(cluster: Cluster) -> None:
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            await nursery.start(cluster.run, "n1")
            await cluster.wait_holders({VIP1: "n1", VIP2: "n1"})
            path = cluster.paths["n1"]
            good = path.read_text()
            path.write_text(good.replace('Enable_Duravip = true  Bind_Address = "127.0.1.2"', "Bogus_Key = 1"))
            reply = await cluster.console("n1", "config", "reload")
            assert not reply["ok"] and "Bogus_Key" in str(reply["error"])
            assert "n1" in await banner(VIP2, cluster.smtp_port)
            # Drop VIP2 from the config: the reload releases it.
            path.write_text(good.replace(f'  Listen "{VIP2}:{cluster.smtp_port}" {{ Enable_Duravip = true }}\n', "")
                            .replace('Binding "b2" { Enable_Duravip = true  Bind_Address = "127.0.1.2"  Duravip_Preference = "n2" }', ""))
            reply = await cluster.console("n1", "config", "reload")
            assert reply["ok"], reply
            with trio.fail_after(5):
                while VIP2 in cluster.plumbers["n1"].addresses:
                    await trio.sleep(0.02)
            nursery.cancel_scope.cancel()
