"""sd_notify against a temporary datagram socket, as systemd would provide it."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from duravip.sdnotify import notify


@pytest.fixture
def receiver(sockdir: Path) -> Iterator[tuple[socket.socket, str]]:
    path = sockdir / "notify"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(os.fspath(path))
    sock.settimeout(5)
    try:
        yield sock, os.fspath(path)
    finally:
        sock.close()


def test_unset_is_a_noop(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert notify("READY=1") is False
    assert notify("READY=1", environ={"NOTIFY_SOCKET": ""}) is False


def test_path_socket_from_environment(receiver: tuple[socket.socket, str],
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    sock, path = receiver
    monkeypatch.setenv("NOTIFY_SOCKET", path)
    assert notify("READY=1") is True
    assert sock.recv(4096) == b"READY=1"
    assert notify("STATUS=holding 3 IPs\nREADY=1") is True
    assert sock.recv(4096) == b"STATUS=holding 3 IPs\nREADY=1"


def test_abstract_socket() -> None:
    name = f"dvc-notify-{os.getpid()}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind("\0" + name)
    sock.settimeout(5)
    try:
        assert notify("STOPPING=1", environ={"NOTIFY_SOCKET": "@" + name}) is True
        assert sock.recv(4096) == b"STOPPING=1"
    finally:
        sock.close()


def test_failures_return_false(sockdir: Path) -> None:
    assert notify("READY=1", environ={"NOTIFY_SOCKET": str(sockdir / "missing")}) is False
    assert notify("READY=1", environ={"NOTIFY_SOCKET": "vsock:2:1234"}) is False
