"""Listener manager: which ESMTP listeners run, and draining them on IP moves.

Plain listeners run from :func:`serve` start to its cancellation. DuraVIP
listeners (``Enable_Duravip``, ``Duravip_Follow``, or any listener on an IP
that is a DuraVIP for some other service) start only through
:meth:`ListenerManager.start_ip` (a takeover binds them with ``IP_FREEBIND``
just before it plumbs the IP), drain through :meth:`ListenerManager.quiesce_ip`
while still accepting, and close through :meth:`ListenerManager.stop_ip` once
the IP is unplumbed: no client SYN meets the address without a socket.

Hostile load: an accept(2) capacity error (EMFILE, ENFILE, ENOMEM, ENOBUFS)
pauses that accept loop for :data:`ACCEPT_RETRY_DELAY` and retries, as
``trio.serve_listeners`` does; any other accept error stops that listener only,
counted and reported through ``on_listener_failed`` so the node can release
the IP instead of holding it half-alive. Sessions are capped in total and per
client IP (``max_sessions``, ``max_sessions_per_ip``): beyond, ``421 4.7.0``.

STARTTLS: every listener's TLS context is built when a config is loaded
(:mod:`~duravip.smtp.tls`), and each session takes the one current when it
starts, so a reload swaps certificates for new sessions without touching
open ones.
"""

from __future__ import annotations

import errno
import logging
from collections.abc import Callable
from ipaddress import ip_address

import attrs
import trio

from duravip import bpf
from duravip.config import Config, Listener
from duravip.ipaddr import IPAddress
from duravip.smtp.driver import handle_connection
from duravip.smtp.server import ServerSettings, too_many_connections
from duravip.smtp.settings import session_limits
from duravip.smtp.sockets import (
    BACKLOG,
    Addr,
    CapacityLog,
    drain_backlog,
    open_listening_socket,
)
from duravip.smtp.tls import TlsTable, settings_by_mode
from duravip.smtp.types import MessageSink

__all__ = [
    "ACCEPT_CAPACITY_ERRNOS",
    "ACCEPT_RETRY_DELAY",
    "BACKLOG",
    "ListenerManager",
    "is_duravip_listener",
    "serve",
]

log = logging.getLogger("duravip.smtp.listeners")


#: accept(2) errors that mean "the system is out of something right now" (the set
#: trio.serve_listeners retries): pause and retry, never stop the listener.
ACCEPT_CAPACITY_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS})
#: The pause after such an error (trio's SLEEP_TIME): the loop neither spins nor stalls.
ACCEPT_RETRY_DELAY = 0.1
#: At most one capacity-error log line per this many seconds (see CapacityLog).
ACCEPT_LOG_INTERVAL = 10.0
#: How often :meth:`ListenerManager.quiesce_ip` looks whether the sessions are gone.
QUIESCE_POLL = 0.005
#: How long a refused connection may take to receive its one-line 421.
REFUSE_TIMEOUT = 1.0


def is_duravip_listener(config: Config, listener: Listener) -> bool:
    """A listener follows its IP if any service made that IP a DuraVIP."""
    return listener.is_duravip or listener.address.host in config.duravips


class _Running:
    """One bound listening socket, its accept loop and its sessions."""

    def __init__(self, addr: Addr, sock: trio.socket.SocketType) -> None:
        self.addr = addr
        self.listener = trio.SocketListener(sock)
        self.accept_scope = trio.CancelScope()
        #: Set when the listener stops: idle sessions get 421, busy ones finish.
        self.shutdown = trio.Event()
        #: Set once the listening socket is closed (the address may be rebound).
        self.socket_closed = trio.Event()
        #: Set once every session is gone.
        self.done = trio.Event()
        self.sessions: trio.Nursery | None = None


class ListenerManager:
    """Starts and stops listeners; every task lives in the nursery of :func:`serve`."""

    def __init__(
        self,
        *,
        config: Config,
        sink: MessageSink,
        settings: ServerSettings,
        nursery: trio.Nursery,
        on_listener_failed: Callable[[IPAddress], None] = lambda ip: None,
    ) -> None:
        self._config = config
        #: Called with the IP of a DuraVIP listener whose accept failed for good (not
        #: a capacity error): the node should release that IP rather than hold it
        #: without its service. Plain listeners are only logged and counted.
        self.on_listener_failed = on_listener_failed
        self._vip_index = _index_by_ip(config)
        self._sink = sink
        self._settings = settings
        self._tls_settings = settings_by_mode(settings)
        self._tls = TlsTable()
        self._nursery = nursery
        self._running: dict[Addr, _Running] = {}
        self._stopping: dict[Addr, _Running] = {}
        #: IPs handed to start_ip and not yet to stop_ip.
        self._ips: set[IPAddress] = set()
        #: Sessions per client IP (entries removed at zero: bounded by max_sessions).
        self._per_ip: dict[str, int] = {}
        self._capacity_log = CapacityLog(ACCEPT_LOG_INTERVAL, ACCEPT_RETRY_DELAY)
        self.counters: dict[str, int] = {
            "sessions": 0,
            "sessions_active": 0,
            "messages": 0,
            "rejects": 0,
            "timeouts": 0,
            "sink_errors": 0,
            "session_errors": 0,
            "sessions_refused_total": 0,
            "sessions_refused_per_ip": 0,
            "accept_capacity_errors": 0,
            "listener_failures": 0,
            "bare_newline_rejects": 0,
            "bare_newline_normalized": 0,
            "session_timeouts": 0,
            "tls_sessions": 0,
            "tls_handshake_failures": 0,
            "starttls_pipelining_rejects": 0,
            "tls_context_errors": 0,
        }
        self._load_tls(config)

    # ------------------------------------------------------------------ API

    def running(self) -> frozenset[tuple[str, int]]:
        """Addresses currently accepting connections."""
        return frozenset(self._running)

    async def start_ip(self, ip: IPAddress, *, freebind: bool = False) -> None:
        """Start every DuraVIP listener bound to ``ip`` (plumbed already, or ``freebind``).

        Raises ``OSError`` (EADDRNOTAVAIL if the IP is not on the host and not
        ``freebind``); then none of this IP's listeners started by this call is
        left running.
        """
        self._ips.add(ip)
        started: list[Addr] = []
        try:
            for addr in self._duravip_addrs(self._config, ip):
                if addr not in self._running:
                    await self._start(addr, freebind=freebind)
                    started.append(addr)
        except BaseException:
            self._ips.discard(ip)
            with trio.CancelScope(shield=True):
                for addr in started:
                    await self._stop(addr, 0.0)
            raise

    async def quiesce_ip(self, ip: IPAddress, drain_timeout: float) -> None:
        """Before a planned release: idle sessions get ``421``, busy ones ``drain_timeout``,
        while the sockets keep accepting (a new client gets banner and ``421``, never a
        reset); :meth:`close_ip` closes them after the unplumb."""
        mine = [self._running[a] for a in self._vip_index.get(ip, ()) if a in self._running]
        for running in mine:
            running.shutdown.set()
        with trio.move_on_after(drain_timeout):
            for running in mine:
                while running.sessions is not None and running.sessions.child_tasks:
                    await trio.sleep(QUIESCE_POLL)

    def gate_syns(self, ip: IPAddress) -> int:
        """From now on ``ip``'s listening sockets drop new SYNs silently (``bpf.SYN_GATE``):
        the last step before a planned unplumb. A connection accepted later could not
        get its banner out (the address goes), so its SYN is the handover relay's;
        handshakes already answered still complete. Returns the sockets gated."""
        gated = 0
        for addr in self._vip_index.get(ip, ()):
            running = self._running.get(addr)
            if running is None:
                continue
            try:
                bpf.attach(running.listener.socket, bpf.SYN_GATE)
            except OSError as exc:
                log.warning("cannot gate SYNs on %s:%d: %s", *addr, exc)
                continue
            gated += 1
        return gated

    def close_ip(self, ip: IPAddress, grace: float) -> None:
        """After the unplumb: close ``ip``'s sockets now; open sessions get ``grace`` in the
        background (nothing waits: the release is announced without waiting for them)."""
        self._ips.discard(ip)
        for addr in self._vip_index.get(ip, ()):
            running = self._begin_stop(addr)
            if running is not None:
                self._nursery.start_soon(self._drain, running, grace)

    async def stop_ip(self, ip: IPAddress, drain_timeout: float) -> None:
        """Stop accepting on ``ip`` now, drain sessions, then ``421`` the rest.

        Returns when every listening socket and session of ``ip`` is gone.
        """
        self._ips.discard(ip)
        mine = self._vip_index.get(ip, ())
        addrs = [a for a in mine if a in self._running]
        others = [self._stopping[a] for a in mine if a in self._stopping]
        async with trio.open_nursery() as nursery:
            for addr in addrs:
                nursery.start_soon(self._stop, addr, drain_timeout)
        for running in others:  # already stopping (a reload): wait for them too
            await running.done.wait()

    def set_config(self, config: Config) -> None:
        """Reload: start/stop listeners that appeared/disappeared (in the background).

        ``settings.limits`` becomes ``config.smtp`` for new sessions (converted
        to the core's own :class:`SessionLimits` here, once per reload).
        """
        self._config = config
        self._vip_index = _index_by_ip(config)
        self._settings = attrs.evolve(self._settings, limits=session_limits(config.smtp))
        self._tls_settings = settings_by_mode(self._settings)
        self._load_tls(config)
        want = self._wanted(config)
        for addr in set(self._running) - want:
            self._nursery.start_soon(self._stop, addr, config.cluster.drain_timeout)
        for addr in sorted(want - set(self._running)):
            self._nursery.start_soon(self._start_logged, addr)

    # ------------------------------------------------------------ internals

    def _load_tls(self, config: Config) -> None:
        """Every listener's TLS context, built now (a failed file: ``tls_context_errors``)."""
        pairs = ((lst.address.as_tuple(), lst) for lst in config.listeners)
        self.counters["tls_context_errors"] += self._tls.load(pairs)

    def _duravip_addrs(self, config: Config, ip: IPAddress) -> list[Addr]:
        index = self._vip_index if config is self._config else _index_by_ip(config)
        return list(index.get(ip, ()))

    def _plain_addrs(self, config: Config) -> list[Addr]:
        return [
            lst.address.as_tuple()
            for lst in config.listeners
            if not is_duravip_listener(config, lst)
        ]

    def _wanted(self, config: Config) -> set[Addr]:
        want = set(self._plain_addrs(config))
        index = _index_by_ip(config)
        for ip in self._ips:
            want.update(index.get(ip, ()))
        return want

    async def _start_plain(self) -> None:
        for addr in self._plain_addrs(self._config):
            await self._start_logged(addr)

    async def _start_logged(self, addr: Addr) -> None:
        try:
            await self._start(addr)
        except OSError as exc:
            log.error("cannot listen on %s:%d: %s", *addr, exc)

    async def _start(self, addr: Addr, *, freebind: bool = False) -> None:
        old = self._stopping.get(addr)
        if old is not None:
            await old.socket_closed.wait()
        if addr in self._running:
            return
        tls_error = self._tls.error(addr)
        if tls_error is not None:
            raise tls_error  # an OSError: "cannot listen", as for a bind error
        sock = await open_listening_socket(addr, freebind=freebind)
        running = _Running(addr, sock)
        self._running[addr] = running
        try:
            await self._nursery.start(self._run, running)
        except BaseException:
            self._running.pop(addr, None)
            sock.close()
            raise
        log.info("listening on %s:%d", *addr)

    async def _run(self, running: _Running, *, task_status: trio.TaskStatus[None]) -> None:
        """Accept loop plus the sessions' nursery of one listener.

        Nothing raised here may leave: this task lives in the manager's nursery,
        whose failure would end every listener and the daemon.
        """
        try:
            async with trio.open_nursery() as sessions:
                running.sessions = sessions
                failed = False
                with running.accept_scope:
                    task_status.started()
                    failed = not await self._accept_loop(running, sessions)
                if not failed:
                    self._drain_backlog(running, sessions)
                with trio.CancelScope(shield=True):
                    await running.listener.aclose()
                running.socket_closed.set()
                if failed:
                    self._failed(running)
        finally:
            running.socket_closed.set()
            running.done.set()
            if self._running.get(running.addr) is running:
                del self._running[running.addr]
            if self._stopping.get(running.addr) is running:
                del self._stopping[running.addr]

    async def _accept_loop(self, running: _Running, sessions: trio.Nursery) -> bool:
        """Accept until cancelled (returns True) or a non-capacity error (returns False)."""
        while True:
            try:
                stream = await running.listener.accept()
            except OSError as exc:
                if exc.errno not in ACCEPT_CAPACITY_ERRNOS:
                    log.error("accept failed on %s:%d; listener stops: %r", *running.addr, exc)
                    return False
                # Out of fds or memory: nothing may be allocated here (no dup, no
                # task); wait for sessions to end and free some, then retry.
                self.counters["accept_capacity_errors"] += 1
                self._capacity_log.error(running.addr, exc)
                await trio.sleep(ACCEPT_RETRY_DELAY)
                continue
            except trio.ClosedResourceError as exc:
                log.error("accept failed on %s:%d; listener stops: %r", *running.addr, exc)
                return False
            await self._admit(stream, running, sessions)

    def _failed(self, running: _Running) -> None:
        """The listener stopped for good: drain its sessions as a stop would, and report.

        Reported at once (not after the sessions end): the node should release
        the IP now; its ``stop_ip`` then waits for this drain.
        """
        self.counters["listener_failures"] += 1
        if self._running.get(running.addr) is running:
            del self._running[running.addr]
        self._stopping[running.addr] = running
        self._nursery.start_soon(self._drain, running, self._config.cluster.drain_timeout)
        ip = ip_address(running.addr[0])
        if ip not in self._ips:
            return
        try:
            self.on_listener_failed(ip)
        except Exception:
            log.exception("on_listener_failed(%s) failed", ip)

    async def _admit(
        self, stream: trio.SocketStream, running: _Running, sessions: trio.Nursery
    ) -> None:
        """Start a session for ``stream``, or refuse it (``421``) over a session cap."""
        try:
            peer_ip = str(stream.socket.getpeername()[0])
        except OSError:  # the client is gone already
            await trio.aclose_forcefully(stream)
            return
        limits = self._config.smtp
        if self.counters["sessions_active"] >= limits.max_sessions:
            self.counters["sessions_refused_total"] += 1
            await self._refuse(stream)
            return
        if self._per_ip.get(peer_ip, 0) >= limits.max_sessions_per_ip:
            self.counters["sessions_refused_per_ip"] += 1
            await self._refuse(stream)
            return
        # Counted before the task runs, so a burst of accepts sees its own sessions.
        self.counters["sessions"] += 1
        self.counters["sessions_active"] += 1
        self._per_ip[peer_ip] = self._per_ip.get(peer_ip, 0) + 1
        sessions.start_soon(self._session, stream, running, peer_ip)

    async def _refuse(self, stream: trio.SocketStream) -> None:
        """One 421 line, then close. Inline in the accept loop: a flood of refused
        clients costs one fd at a time, never a task each; a fresh socket's send
        buffer takes the line at once, the timeout only bounds a pathological peer."""
        with trio.move_on_after(REFUSE_TIMEOUT):
            try:
                await stream.send_all(too_many_connections(self._settings.hostname))
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
                log.debug("refused connection went away: %r", exc)
        await trio.aclose_forcefully(stream)

    def _drain_backlog(self, running: _Running, sessions: trio.Nursery) -> None:
        """Serve connections the kernel completed but we never accepted (see :func:`drain_backlog`)."""
        drain_backlog(
            running.listener,
            running.addr,
            lambda stream: sessions.start_soon(self._admit, stream, running, sessions),
        )

    async def _session(self, stream: trio.SocketStream, running: _Running, peer_ip: str) -> None:
        try:
            peer = stream.socket.getpeername()[:2]  # IPv6 names are 4-tuples
            local = stream.socket.getsockname()[:2]
            # This session's TLS context: a reload during it changes only later ones.
            tls = self._tls.get(running.addr)
            await handle_connection(
                stream,
                settings=self._tls_settings[tls.offered],
                ssl_context=tls.context,
                sink=self._sink,
                peer=(str(peer[0]), int(peer[1])),
                local=(str(local[0]), int(local[1])),
                shutdown=running.shutdown,
                counters=self.counters,
            )
        except OSError as exc:
            log.debug("session on %s:%d failed: %r", *running.addr, exc)
        except Exception:
            # One broken session must never take the listener down.
            self.counters["session_errors"] += 1
            log.exception("session on %s:%d crashed", *running.addr)
        finally:
            self.counters["sessions_active"] -= 1
            left = self._per_ip.get(peer_ip, 1) - 1
            if left > 0:
                self._per_ip[peer_ip] = left
            else:
                self._per_ip.pop(peer_ip, None)

    async def _stop(self, addr: Addr, drain_timeout: float) -> None:
        running = self._begin_stop(addr)
        if running is not None:
            await self._drain(running, drain_timeout)
            log.info("stopped listening on %s:%d", *addr)

    def _begin_stop(self, addr: Addr) -> _Running | None:
        """Stop accepting on ``addr`` now (synchronously: a start_ip after this starts anew)."""
        running = self._running.pop(addr, None)
        if running is not None:
            self._stopping[addr] = running
            running.accept_scope.cancel()
        return running

    async def _drain(self, running: _Running, drain_timeout: float) -> None:
        """Idle sessions get 421 now, busy ones ``drain_timeout`` to finish; then cut."""
        running.shutdown.set()
        with trio.move_on_after(drain_timeout):
            await running.done.wait()
        if not running.done.is_set():
            assert running.sessions is not None
            running.sessions.cancel_scope.cancel()
            await running.done.wait()


def _index_by_ip(config: Config) -> dict[IPAddress, list[Addr]]:
    """DuraVIP listener addresses per IP: start_ip/stop_ip stay O(1) at 10,240 IPs."""
    index: dict[IPAddress, list[Addr]] = {}
    for lst in config.listeners:
        if is_duravip_listener(config, lst):
            index.setdefault(lst.address.host, []).append(lst.address.as_tuple())
    return index


async def serve(
    *,
    config: Config,
    sink: MessageSink,
    settings: ServerSettings,
    on_listener_failed: Callable[[IPAddress], None] = lambda ip: None,
    task_status: trio.TaskStatus[ListenerManager] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run the plain listeners, hand out the manager, close everything on cancel.

    A plain listener that cannot bind is logged and skipped (the rest run).
    ``on_listener_failed``: see :attr:`ListenerManager.on_listener_failed`.
    """
    async with trio.open_nursery() as nursery:
        manager = ListenerManager(
            config=config,
            sink=sink,
            settings=settings,
            nursery=nursery,
            on_listener_failed=on_listener_failed,
        )
        await manager._start_plain()
        task_status.started(manager)
        await trio.sleep_forever()
