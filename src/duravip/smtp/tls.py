"""TLS contexts of the ESMTP listeners (STARTTLS, RFC 3207): built once per config load.

Each listener with a certificate gets a server :class:`ssl.SSLContext` when a
config is loaded or reloaded, never per session: a session keeps the context
it started with, so a reload (SIGHUP, ``config reload``) changes the
certificate for new sessions only and drops none. Listeners naming the same
files share one context within a load (10,240 DuraVIP listeners cost one
``load_cert_chain``). The sans-IO core never sees these objects; it only
knows the listener's mode (``ServerSettings.tls``).
"""

from __future__ import annotations

import logging
import ssl
from collections.abc import Iterable
from pathlib import Path
from typing import Protocol

import attrs
from attrs import frozen

from duravip.smtp.settings import ServerSettings, TlsMode

__all__ = [
    "NO_TLS",
    "ListenerTls",
    "TlsTable",
    "build_listener_tls",
    "server_context",
    "settings_by_mode",
]

log = logging.getLogger("duravip.smtp.tls")
Addr = tuple[str, int]


def server_context(certificate: Path, key: Path | None = None) -> ssl.SSLContext:
    """A server context: TLS 1.2 at least, the stdlib's default ciphers, no client certs.

    Raises ``OSError`` (``ssl.SSLError`` is one) if a file is missing or does not load.
    """
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    # No compression (CRIME), no renegotiation by the client, a fresh key per session.
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION | ssl.OP_SINGLE_ECDH_USE
    ctx.load_cert_chain(str(certificate), str(key) if key is not None else None)
    return ctx


@frozen
class ListenerTls:
    """What one listener offers: its mode, and the context when TLS is on."""

    mode: TlsMode = "off"
    context: ssl.SSLContext | None = None

    @property
    def offered(self) -> TlsMode:
        """The mode the sans-IO core sees (``off`` when there is no context)."""
        return self.mode if self.context is not None else "off"


NO_TLS = ListenerTls()


class _Source(Protocol):
    """What a config listener carries about TLS (``duravip.config.Listener``)."""

    @property
    def tls(self) -> TlsMode: ...
    @property
    def tls_certificate(self) -> Path | None: ...
    @property
    def tls_key(self) -> Path | None: ...


def build_listener_tls(
    listeners: Iterable[tuple[tuple[str, int], _Source]],
) -> tuple[dict[tuple[str, int], ListenerTls], dict[tuple[str, int], OSError]]:
    """TLS of every listener address, and the addresses whose files did not load.

    A listener without a certificate or with ``tls = off`` gets :data:`NO_TLS`.
    """
    cache: dict[tuple[Path, Path | None], ssl.SSLContext | OSError] = {}
    out: dict[tuple[str, int], ListenerTls] = {}
    errors: dict[tuple[str, int], OSError] = {}
    for addr, lst in listeners:
        if lst.tls == "off" or lst.tls_certificate is None:
            out[addr] = NO_TLS
            continue
        files = (lst.tls_certificate, lst.tls_key)
        ctx = cache.get(files)
        if ctx is None:
            try:
                ctx = server_context(*files)
            except OSError as exc:
                ctx = exc
            cache[files] = ctx
        if isinstance(ctx, OSError):
            errors[addr] = ctx
        else:
            out[addr] = ListenerTls(mode=lst.tls, context=ctx)
    return out, errors


class TlsTable:
    """The TLS of every listener address, rebuilt at each config load.

    A listener whose files fail to load keeps its previous entry (a reload
    must not turn TLS off under a running listener); one with no previous
    entry has none, and :meth:`error` says why it must not start.
    """

    def __init__(self) -> None:
        self._tls: dict[Addr, ListenerTls] = {}
        self._errors: dict[Addr, OSError] = {}

    def load(self, listeners: Iterable[tuple[Addr, _Source]]) -> int:
        """Rebuild from ``(address, listener)`` pairs; returns how many failed to load."""
        tls, errors = build_listener_tls(listeners)
        for addr, exc in errors.items():
            old = self._tls.get(addr)
            if old is not None:
                tls[addr] = old
            log.error(
                "TLS certificate of listener %s:%d does not load: %s%s",
                *addr,
                exc,
                "; it keeps the previous one" if old is not None else "",
            )
        self._tls = tls
        self._errors = {a: e for a, e in errors.items() if a not in tls}
        return len(errors)

    def get(self, addr: Addr) -> ListenerTls:
        return self._tls.get(addr, NO_TLS)

    def error(self, addr: Addr) -> OSError | None:
        return self._errors.get(addr)


def settings_by_mode(settings: ServerSettings) -> dict[TlsMode, ServerSettings]:
    """The session settings for each TLS mode (evolved once per reload, not per session)."""
    modes: tuple[TlsMode, ...] = ("off", "optional", "required")
    return {m: attrs.evolve(settings, tls=m) for m in modes}
