"""systemd readiness notification (``sd_notify``) without libsystemd.

The protocol is one datagram of ``KEY=VALUE`` lines to the Unix socket named
by ``$NOTIFY_SOCKET``; that is small enough not to justify a dependency. The
daemon sends ``READY=1`` once mature, ``STATUS=...`` on changes and
``STOPPING=1`` when it starts its graceful leave.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Mapping

log = logging.getLogger(__name__)


def _address(value: str) -> str | None:
    """The ``sendto`` address for a ``$NOTIFY_SOCKET`` value (``@`` is abstract)."""
    if value.startswith("@"):
        return "\0" + value[1:]
    if value.startswith("/"):
        return value
    return None  # e.g. vsock: addresses, which we do not speak


def notify(state: str, *, environ: Mapping[str, str] | None = None) -> bool:
    """Send ``state`` (e.g. ``"READY=1"``) to the service manager.

    Returns False, doing nothing, when not started by systemd (no
    ``$NOTIFY_SOCKET``); also False, with a warning, if sending fails: a
    notification is never worth crashing the daemon for. Never blocks.
    """
    env: Mapping[str, str] = os.environ if environ is None else environ
    value = env.get("NOTIFY_SOCKET", "")
    if not value:
        return False
    addr = _address(value)
    if addr is None:
        log.warning("unsupported NOTIFY_SOCKET %r; not notifying", value)
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.sendto(state.encode(), socket.MSG_DONTWAIT, addr)
    except OSError as e:
        log.warning("sd_notify %r to %s failed: %s", state, value, e)
        return False
    return True
