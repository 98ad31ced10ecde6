"""Opening kernel sockets in a network namespace, and the root-namespace guard.

The daemon runs inside its namespace and opens sockets where it stands; tests
name a namespace so the test process itself never moves (pyroute2 opens the
socket in a short-lived child and passes the descriptor back).
"""

from __future__ import annotations

import os
import socket

from pyroute2 import netns as pr_netns

#: Set to 1 (tests do) to refuse any kernel plumbing in the root namespace.
REQUIRE_NETNS_ENV = "DURAVIP_REQUIRE_NETNS"


class RootNamespaceError(RuntimeError):
    """Raised instead of touching the root network namespace under the guard."""


def _ns_inode(path: str) -> int:
    return os.stat(path).st_ino


#: The kernel's fixed inode number of the initial network namespace (PROC_NET_INIT_INO).
INIT_NET_INODE = 0xEFFFFFF9


def root_inode() -> int:
    """Inode of the root namespace: PID 1's, else kthreadd's (kernel threads live in init_net)."""
    for path in ("/proc/1/ns/net", "/proc/2/ns/net"):
        try:
            return _ns_inode(path)
        except PermissionError:
            continue
    return INIT_NET_INODE


def target_path(netns: str | None) -> str:
    if netns is None:
        return "/proc/thread-self/ns/net"
    return netns if netns.startswith("/") else f"/run/netns/{netns}"


def check_netns(netns: str | None) -> None:
    """Refuse the root namespace when ``DURAVIP_REQUIRE_NETNS=1``."""
    if os.environ.get(REQUIRE_NETNS_ENV) != "1":
        return
    if _ns_inode(target_path(netns)) == root_inode():
        raise RootNamespaceError(
            f"{REQUIRE_NETNS_ENV}=1 and the plumber would run in the root network namespace"
        )


def open_socket(netns: str | None, family: int, type_: int, proto: int = 0) -> socket.socket:
    """A socket in ``netns`` (None: the current namespace), guard checked first."""
    check_netns(netns)
    if netns is None:
        return socket.socket(family, type_, proto)
    sock = pr_netns.create_socket(netns, family=family, socket_type=type_, proto=proto, flags=0)
    assert isinstance(sock, socket.socket)
    return sock
