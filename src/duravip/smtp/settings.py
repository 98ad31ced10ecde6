"""Settings of the sans-IO SMTP server, as its own small attrs classes (no config import).

The core never imports the config package: the daemon's ``SmtpLimits`` (or
anything else with the same fields, see :class:`LimitsSource`) is copied into
a :class:`SessionLimits` once, when a :class:`ServerSettings` is built or
evolved (a reload), never per session.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Literal, Protocol

from attrs import field, frozen

__all__ = [
    "BareNewline",
    "LimitsSource",
    "ServerSettings",
    "SessionLimits",
    "TlsMode",
    "session_limits",
]

#: What to do with a body holding a bare LF or CR (SMTP smuggling): refuse, or rewrite to CRLF.
BareNewline = Literal["reject", "normalize"]
#: STARTTLS on a listener: offered, offered and needed before MAIL, or not offered.
TlsMode = Literal["optional", "required", "off"]


class LimitsSource(Protocol):
    """Whatever carries the session limits, e.g. ``duravip.config.SmtpLimits``."""

    @property
    def max_message_size(self) -> int: ...
    @property
    def max_recipients(self) -> int: ...
    @property
    def max_line_length(self) -> int: ...
    @property
    def max_errors(self) -> int: ...
    @property
    def command_timeout(self) -> float: ...
    @property
    def data_timeout(self) -> float: ...
    @property
    def session_timeout(self) -> float: ...
    @property
    def bare_newline(self) -> BareNewline: ...


@frozen
class SessionLimits:
    """Limits of one SMTP session: the state machine's, plus the driver's timeouts.

    Defaults equal those of ``Smtp_Limits`` in the configuration (a test holds
    them together). Session caps (``max_sessions``) are the listeners' business.
    """

    max_message_size: int = 20 * 1024 * 1024
    max_recipients: int = 100
    max_line_length: int = 1000
    max_errors: int = 10
    #: Idle time allowed between commands, and while a body arrives (seconds; driver).
    command_timeout: float = 300.0
    data_timeout: float = 600.0
    #: Wall time a whole session may last, however busy (seconds; driver). A
    #: client trickling one command just inside ``command_timeout`` cannot hold
    #: a session slot for ever.
    session_timeout: float = 3600.0
    bare_newline: BareNewline = "reject"


def session_limits(source: LimitsSource) -> SessionLimits:
    """``source`` as :class:`SessionLimits` (returned as is if it already is one)."""
    if isinstance(source, SessionLimits):
        return source
    return SessionLimits(
        max_message_size=source.max_message_size,
        max_recipients=source.max_recipients,
        max_line_length=source.max_line_length,
        max_errors=source.max_errors,
        command_timeout=source.command_timeout,
        data_timeout=source.data_timeout,
        session_timeout=source.session_timeout,
        bare_newline=source.bare_newline,
    )


def _upper_set(names: Iterable[str]) -> frozenset[str]:
    return frozenset(n.upper() for n in names)


@frozen
class ServerSettings:
    """What a listener tells the state machine: its name, limits and extensions."""

    hostname: str
    #: Converted on construction: ``SmtpLimits`` from the config is accepted as is.
    limits: SessionLimits = field(default=SessionLimits(), converter=session_limits)
    #: MAIL FROM parameters accepted besides SIZE and BODY (matched upper-cased).
    extra_mail_params: frozenset[str] = field(default=frozenset(), converter=_upper_set)
    #: Extra EHLO keywords (e.g. ``"XMMOVE"``), advertised after the standard ones.
    extra_ehlo: tuple[str, ...] = ()
    #: STARTTLS: ``off`` (not offered), ``optional`` or ``required`` (MAIL needs
    #: TLS first). The driver holds the TLS context; the core only the mode.
    tls: TlsMode = "off"
