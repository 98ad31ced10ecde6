"""Lab fixture for the plumbing tests: two namespaces joined by a veth pair.

Everything is created with the ``dvp<pid>`` prefix and removed in ``finally``;
nothing is added to the root namespace (the veth is created inside ``a``).
"""

from __future__ import annotations

import itertools
import os
import subprocess
from collections.abc import Iterator

import attrs
import pytest

_counter = itertools.count()


def sh(*args: str) -> str:
    return subprocess.run(args, check=True, capture_output=True, text=True).stdout


@attrs.frozen
class Lab:
    a: str
    b: str

    def addrs(self, ns: str | None = None) -> set[str]:
        """``ip/prefix`` strings on eth1 of ``ns`` (default a)."""
        out = sh("ip", "-n", ns or self.a, "-4", "-o", "addr", "show", "dev", "eth1")
        return {line.split()[3] for line in out.splitlines()}

    def mac(self, ns: str) -> str:
        return sh("ip", "-n", ns, "-o", "link", "show", "eth1").split("link/ether ")[1].split()[0]

    def ip(self, ns: str, *args: str) -> str:
        return sh("ip", "-n", ns, *args)

    def batch(self, ns: str, lines: list[str]) -> None:
        subprocess.run(
            ["ip", "-n", ns, "-batch", "-"],
            input="".join(s + "\n" for s in lines),
            check=True,
            text=True,
            capture_output=True,
        )


@pytest.fixture
def lab(monkeypatch: pytest.MonkeyPatch) -> Iterator[Lab]:
    if os.geteuid() != 0:
        pytest.skip("needs root for network namespaces")
    monkeypatch.setenv("DURAVIP_REQUIRE_NETNS", "1")
    tag = f"dvp{os.getpid()}{next(_counter)}"
    lab = Lab(f"{tag}-a", f"{tag}-b")
    try:
        sh("ip", "netns", "add", lab.a)
        sh("ip", "netns", "add", lab.b)
        sh(
            "ip",
            "-n",
            lab.a,
            "link",
            "add",
            "eth1",
            "type",
            "veth",
            "peer",
            "name",
            "eth1",
            "netns",
            lab.b,
        )
        for ns, addr in ((lab.a, "10.9.0.1/24"), (lab.b, "10.9.0.2/24")):
            sh("ip", "-n", ns, "addr", "add", addr, "dev", "eth1")
            sh("ip", "-n", ns, "link", "set", "eth1", "up")
            sh("ip", "-n", ns, "link", "set", "lo", "up")
        yield lab
    finally:
        for ns in (lab.a, lab.b):
            subprocess.run(["ip", "netns", "del", ns], check=False, capture_output=True)
