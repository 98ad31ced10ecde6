"""The node: one root nursery that starts every service in dependency order.

Start order (each ``nursery.start`` returns once that service is ready):

1. control socket (so an operator can look while the rest comes up);
2. plumbing worker (clean slate: every configured DuraVIP already present is removed);
3. mail service (spool recovery, ``ECCluster_Listener``, delivery and mmove loops);
4. SMTP listener manager (plain listeners; DuraVIP ones start when their IP is plumbed);
5. membership (SWIM join through the seeds, then a bounded wait for state sync);
6. resolver (immature for ``view_mature_time``, then takes part in elections).

A crash of any service propagates out of the nursery: every sibling is
cancelled, the finally-blocks unplumb what this node holds, and the process
exits non-zero. A half-alive node holding IPs it no longer serves is worse
than a dead one, because the others would not take those IPs over.
"""

from __future__ import annotations

import logging
import signal
import time
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from functools import partial
from ipaddress import IPv4Address
from pathlib import Path

import trio
from trio_util import AsyncValue

from duravip import config as cfg
from duravip import metrics, sdnotify
from duravip.config import Config
from duravip.control import server as control_server
from duravip.control.protocol import CommandRegistry
from duravip.daemon import commands
from duravip.daemon.actuator import NodeActuator
from duravip.daemon.telemetry import NodeMetrics
from duravip.election import NodeView, build_view, encode
from duravip.election.picture import (
    ClusterSnapshot,
    ViewTracker,
    binding_holders,
    holders_by_ip,
    mmove_peers,
    reannounce_targets,
)
from duravip.election.resolver import ResolverService
from duravip.election.resolver import serve as serve_resolver
from duravip.mail.service import MailService
from duravip.mail.service import serve as serve_mail
from duravip.plumbing.base import Plumber
from duravip.plumbing.netlink import open_netlink_plumber
from duravip.plumbing.worker import PlumbingWorker
from duravip.plumbing.worker import serve as serve_plumbing
from duravip.smtp.listeners import ListenerManager
from duravip.smtp.listeners import serve as serve_listeners
from duravip.smtp.server import ServerSettings
from duravip.swim.crypto import Keyring
from duravip.swim.driver import Membership, MembershipService
from duravip.swim.driver import serve as serve_membership

log = logging.getLogger("duravip.node")

PlumberFactory = Callable[[Config], AbstractAsyncContextManager[Plumber]]

#: Upper bound for a graceful stop: release IPs, hand queues over, leave.
SHUTDOWN_BUDGET = 15.0


def load_keyring(config: Config) -> Keyring:
    if config.cluster.keyring is None:
        raise SystemExit(
            f"{config.source}: cluster.keyring is required: every gossip byte is encrypted"
        )
    return Keyring.from_file(config.cluster.keyring)


class Node:
    """Holds the running services and the operator-facing state of one node."""

    def __init__(
        self,
        config: Config,
        path: Path,
        *,
        plumber: PlumberFactory | None = None,
        handle_signals: bool = True,
    ) -> None:
        self.config = config
        self.path = path
        #: False when several nodes share a process (tests): signal handlers are per process.
        self.handle_signals = handle_signals
        #: How the node gets its plumber: netlink in production, a fake in tests.
        self._open_plumber: PlumberFactory = plumber or (
            lambda c: open_netlink_plumber(use_iflist_cache=c.use_iflist_cache)
        )
        self.keyring = load_keyring(config)
        self.started_at = time.time()
        self.config_loaded_at = time.time()
        self.registry = metrics.Registry()
        self.telemetry = NodeMetrics(self.registry, self)
        self.shutdown_requested = trio.Event()
        self.exit_code = 0
        self.snapshot: AsyncValue[ClusterSnapshot] = AsyncValue(
            ClusterSnapshot(local=config.cluster.node_name, states={}, views={})
        )
        self._tracker = ViewTracker(config.cluster.node_name)
        self._reannounce = trio.Event()
        self.views_changed_at = time.monotonic()
        # Filled as services start.
        self.plumbing: PlumbingWorker
        self.mail: MailService
        self.listeners: ListenerManager
        self.membership: MembershipService
        self.resolver: ResolverService | None = None

    @property
    def name(self) -> str:
        return self.config.cluster.node_name

    # ------------------------------------------------------------------ run

    async def run(self) -> int:
        c = self.config
        try:
            async with (
                self._open_plumber(c) as plumber,
                trio.open_nursery() as nursery,
            ):
                registry = CommandRegistry()
                commands.register(registry, self)
                await nursery.start(
                    partial(
                        control_server.serve,
                        path=c.control.path,
                        mode=c.control.mode,
                        registry=registry,
                    )
                )
                if c.metrics.listen is not None:
                    await nursery.start(
                        partial(
                            metrics.serve_http,
                            registry=self.registry,
                            host=str(c.metrics.listen.host),
                            port=c.metrics.listen.port,
                        )
                    )
                self.plumbing = await nursery.start(
                    partial(
                        serve_plumbing,
                        plumber=plumber,
                        managed=frozenset(c.duravips),
                        topology=c.cluster.topology,
                        forbidden=self.forbidden_ips(c),
                        announce_all_hosts=c.cluster.arp_all_hosts,
                        garp_count=c.cluster.garp_count,
                        garp_interval=c.cluster.garp_interval,
                    )
                )
                nursery.start_soon(self._unplumb_on_exit)
                self.mail = await nursery.start(
                    partial(
                        serve_mail,
                        config=c,
                        node_name=self.name,
                        keyring_keys=lambda: self.keyring.keys,
                    )
                )
                self.listeners = await nursery.start(
                    partial(
                        serve_listeners,
                        config=c,
                        sink=self.mail.sink,
                        settings=ServerSettings(hostname=self.name, limits=c.smtp),
                    )
                )
                self.membership = await nursery.start(
                    partial(
                        serve_membership,
                        name=self.name,
                        bind=c.cluster.gossip_address.as_tuple(),
                        cluster=c.cluster.name,
                        timers=c.cluster.timers,
                        keyring=self.keyring,
                        seeds=[p.as_tuple() for p in c.cluster.peers],
                        meta=encode(self.local_view(mature=False, held=frozenset())),
                    )
                )
                nursery.start_soon(self._follow_membership)
                await self._wait_synced()
                actuator = NodeActuator(self)
                self.resolver = await nursery.start(
                    partial(
                        serve_resolver,
                        config=c,
                        snapshot=self.snapshot,
                        actuator=actuator,
                        publish_view=self._publish_view,
                        mature_after=c.cluster.view_mature_time,
                    )
                )
                nursery.start_soon(self._follow_decisions)
                nursery.start_soon(self._reannounce_loop)
                nursery.start_soon(self._notify_ready)
                log.info("node started", extra={"fields": {"members": len(self.snapshot.value.states)}})
                await self._serve_signals()
                await self._graceful_stop()
                nursery.cancel_scope.cancel()
        except* KeyboardInterrupt:
            log.info("interrupted before the signal handlers were up")
            self.exit_code = 130
        return self.exit_code

    async def _unplumb_on_exit(self) -> None:
        """However the node stops (a service crashed, or a signal), drop every IP it has.

        A graceful stop has released everything already; after a crash this is
        what keeps a dying node from leaving addresses nobody serves.
        """
        try:
            await trio.sleep_forever()
        finally:
            left = self.plumbing.present.value
            if left:
                log.warning("unplumbing %d DuraVIP(s) on the way out", len(left))
                with trio.CancelScope(shield=True), trio.move_on_after(5):
                    await self.plumbing.remove(left)

    @staticmethod
    def forbidden_ips(c: Config) -> frozenset[IPv4Address]:
        """Addresses the node holds outside DuraVIP control: never plumbed, never removed."""
        ips = {c.cluster.gossip_address.host}
        if c.cluster_listener is not None:
            ips.add(c.cluster_listener.host)
        ips.update(ls.address.host for ls in c.listeners if not ls.is_duravip)
        return frozenset(ips - set(c.duravips))

    # --------------------------------------------------------- membership

    def local_view(self, *, mature: bool, held: frozenset[IPv4Address]) -> NodeView:
        return build_view(self.config, version=0, mature=mature, held=held)

    def _publish_view(self, view: NodeView) -> None:
        self.membership.set_meta(encode(view))

    async def _follow_membership(self) -> None:
        """Adapt SWIM snapshots into the election's ``ClusterSnapshot`` (views decoded once)."""
        async for m in self.membership.snapshot.eventual_values():
            self.snapshot.value = self._adapt(m)
            if self.resolver is not None:
                # Holders change when views change (a release, an acquisition),
                # often with no change of owner: mail must follow the holder.
                self.update_mail_holders()

    def _adapt(self, m: Membership) -> ClusterSnapshot:
        held = self.resolver.held.value if self.resolver is not None else frozenset()
        up = self._tracker.update(m.members, held)
        for d in up.dropped:
            self.telemetry.dropped_views.inc()
            log.warning("undecodable view", extra={"fields": {"node": d.node, "error": d.error}})
        if up.reannounce:
            self._reannounce.set()
        if up.views_changed:
            self.views_changed_at = time.monotonic()
        return up.snapshot

    async def _reannounce_loop(self) -> None:
        """GARP every IP held here when the cluster heals or a rival releases one.

        After a partition heals (or a paused node resumes) two nodes held an IP
        and clients' ARP caches may point at the one that just released it: a
        black hole until the entry expires, unless the holder announces again.
        """
        while True:
            await self._reannounce.wait()
            self._reannounce = trio.Event()
            # Let the resolver digest the same change first (it may release).
            await trio.sleep(self.config.cluster.timers.gossip_interval)
            if self.resolver is not None:
                owned = reannounce_targets(
                    self.snapshot.value, self.resolver.decisions.value, self.resolver.held.value
                )
                if owned:
                    log.info("re-announcing %d owned IP(s) by gratuitous ARP", len(owned))
                    await self.plumbing.announce(owned)
            await trio.sleep(self.config.cluster.timers.gossip_interval)

    def holders_by_ip(self) -> dict[IPv4Address, list[str]]:
        """IP -> the live (alive or suspect) nodes whose view says they hold it."""
        return holders_by_ip(self.snapshot.value)

    async def _wait_synced(self) -> None:
        """Bounded wait until the seeds answered and every alive member's view is known."""
        c = self.config.cluster
        if not c.peers:
            return
        budget = max(2.0, 4 * c.timers.probe_interval + 2 * c.timers.probe_timeout)
        with trio.move_on_after(budget):
            async for snap in self.snapshot.eventual_values():
                alive = [n for n, s in snap.states.items() if s in ("alive", "suspect")]
                if len(alive) > 1 and all(n in snap.views for n in alive):
                    return
        log.info("state sync timed out: going on with what is known")

    # ----------------------------------------------------------- decisions

    async def _follow_decisions(self) -> None:
        """Tell the mail service who holds each binding whenever the picture changes."""
        assert self.resolver is not None
        async for _ in self.resolver.decisions.eventual_values():
            self.update_mail_holders()
            self.telemetry.observe_takeovers()

    def binding_holders(self) -> dict[str, str | None]:
        decisions = self.resolver.decisions.value if self.resolver else {}
        bindings = {
            b.name: b.bind_address
            for b in self.config.bindings
            if b.bind_address is not None and b.enable_duravip
        }
        return binding_holders(self.snapshot.value, decisions, bindings)

    def update_mail_holders(self) -> None:
        peers = mmove_peers(self.snapshot.value)
        self.mail.set_holders(self.binding_holders(), local=self.name, peers=peers)

    async def _notify_ready(self) -> None:
        assert self.resolver is not None
        await trio.sleep(self.config.cluster.view_mature_time)
        sdnotify.notify("READY=1")
        sdnotify.notify(f"STATUS=mature; holding {len(self.resolver.held.value)} DuraVIPs")

    # ------------------------------------------------------------- control

    async def _serve_signals(self) -> None:
        if not self.handle_signals:
            await self.shutdown_requested.wait()
            return
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGHUP, signal.SIGINT) as sigs:
            async with trio.open_nursery() as n:

                async def wait_shutdown() -> None:
                    await self.shutdown_requested.wait()
                    n.cancel_scope.cancel()

                n.start_soon(wait_shutdown)
                async for sig in sigs:
                    if sig == signal.SIGHUP:
                        errors = await self.reload()
                        for e in errors:
                            log.error("reload rejected: %s", e)
                    else:
                        log.info("signal %s: graceful stop", signal.Signals(sig).name)
                        n.cancel_scope.cancel()
                        return

    async def _graceful_stop(self) -> None:
        """Release every IP break-before-make, hand queues over, announce ``left``."""
        sdnotify.notify("STOPPING=1")
        with trio.move_on_after(SHUTDOWN_BUDGET) as scope:
            if self.resolver is not None:
                await self.resolver.release_all()
            # Let the others elect new owners and plumb before queues move.
            await trio.sleep(min(1.0, 4 * self.config.cluster.timers.probe_interval))
            self.update_mail_holders()
            await self.mail.hand_over(timeout=max(1.0, SHUTDOWN_BUDGET / 2))
            await self.membership.leave(timeout=2.0)
        if scope.cancelled_caught:
            log.warning("graceful stop ran out of time", extra={"fields": {"budget_s": SHUTDOWN_BUDGET}})
        log.info("stopped")

    async def reload(self) -> list[str]:
        """Apply a new config without restart, or keep the old one and return the errors."""
        try:
            new = await trio.to_thread.run_sync(cfg.load, self.path)
            keyring = load_keyring(new) if new.cluster.keyring else self.keyring
        except cfg.ConfigError as e:
            return [str(d) for d in e.diagnostics]
        except (OSError, ValueError, SystemExit) as e:
            return [str(e)]
        if new.cluster.node_name != self.name or new.cluster.gossip_address != self.config.cluster.gossip_address:
            return ["node_name and gossip_address cannot change on reload: restart the node"]
        self.config = new
        self.config_loaded_at = time.time()
        self.keyring = keyring
        self.membership.set_keyring(keyring)
        self.membership.set_timers(new.cluster.timers)
        self.plumbing.set_managed(frozenset(new.duravips), new.cluster.topology)
        self.listeners.set_config(new)
        self.mail.set_config(new)
        if self.resolver is not None:
            self.resolver.set_config(new)
        log.info("config reloaded", extra={"fields": {"duravips": len(new.duravips)}})
        return []


async def run_node(config: Config, path: Path, *, plumber: PlumberFactory | None = None) -> int:
    return await Node(config, path, plumber=plumber).run()
