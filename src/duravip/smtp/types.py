"""Types shared by the SMTP server, its driver and whoever consumes the mail.

Kept free of trio so the sans-IO server core can import them.
"""

from __future__ import annotations

from collections.abc import Mapping
from ipaddress import ip_address
from typing import Protocol

from attrs import Factory, frozen

from duravip.ipaddr import IPAddress


@frozen
class Envelope:
    """One accepted SMTP transaction, as handed to a :class:`MessageSink`."""

    mail_from: str
    rcpt_to: tuple[str, ...]
    #: The message as received, dot-unstuffed, CRLF line endings, no final ``.``.
    data: bytes
    helo: str = ""
    peer: tuple[str, int] = ("", 0)
    #: The address and port the client connected to (the listener).
    local: tuple[str, int] = ("", 0)
    #: ESMTP parameters of MAIL FROM, upper-cased keys (``SIZE``, ``BODY``, extras).
    mail_params: Mapping[str, str] = Factory(dict)

    @property
    def local_ip(self) -> IPAddress:
        return ip_address(self.local[0])


class TemporaryFailure(Exception):
    """Raised by a sink: the server answers ``451`` and keeps the session."""


class PermanentFailure(Exception):
    """Raised by a sink: the server answers ``554`` and keeps the session."""


class MessageSink(Protocol):
    """Receives accepted messages. ``accept`` returns only once the message is durable.

    The server replies ``250 ... queued as <id>`` with the returned queue id.
    """

    async def accept(self, envelope: Envelope) -> str: ...
