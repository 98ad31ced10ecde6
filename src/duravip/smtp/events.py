"""What :meth:`SmtpServer.next_event` returns (no trio, no I/O)."""

from __future__ import annotations

from collections.abc import Mapping

from attrs import Factory, frozen

from duravip.smtp.types import Envelope

__all__ = [
    "CLOSED",
    "NEED_DATA",
    "START_TLS",
    "ConnectionClosed",
    "Event",
    "MessageReceived",
    "NeedData",
    "StartTLS",
]


@frozen
class NeedData:
    """Nothing more can happen until :meth:`SmtpServer.receive_data` is called."""


@frozen
class ConnectionClosed:
    """The session is over (QUIT, 421, EOF): flush :meth:`data_to_send` and close."""


@frozen
class StartTLS:
    """``220 Ready to start TLS`` is queued: flush it, then run the TLS handshake.

    The driver owns the handshake; afterwards it calls
    :meth:`SmtpServer.tls_started` (the session restarts, RFC 3207 4.2) or,
    if the handshake failed, closes the connection.
    """


@frozen
class MessageReceived:
    """A complete transaction; answer with ``accept_message`` or ``reject_message``."""

    mail_from: str
    rcpt_to: tuple[str, ...]
    #: Dot-unstuffed body with CRLF line endings, without the final ``.``.
    data: bytes
    helo: str = ""
    mail_params: Mapping[str, str] = Factory(dict)

    def envelope(self, peer: tuple[str, int], local: tuple[str, int]) -> Envelope:
        return Envelope(
            mail_from=self.mail_from,
            rcpt_to=self.rcpt_to,
            data=self.data,
            helo=self.helo,
            peer=peer,
            local=local,
            mail_params=dict(self.mail_params),
        )


Event = NeedData | ConnectionClosed | MessageReceived | StartTLS

#: The stateless events, allocated once (returned on every call that waits or ends).
NEED_DATA = NeedData()
CLOSED = ConnectionClosed()
START_TLS = StartTLS()
