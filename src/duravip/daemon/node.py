"""The node: one root nursery that starts every service in dependency order.

Start order (each ``nursery.start`` returns once that service is ready):

1. control socket (so an operator can look while the rest comes up);
2. plumbing worker (clean slate: every configured DuraVIP already present is removed);
3. mail service (spool recovery, ``ECCluster_Listener``, delivery and mmove loops);
4. SMTP listener manager (plain listeners; DuraVIP ones start when their IP is plumbed);
5. membership (SWIM join through the seeds, then a bounded wait for state sync);
6. resolver (immature for ``view_mature_time``, then takes part in elections).

Then :class:`~duravip.daemon.services.Services` exists and everything that
needs more than one service starts with it: the console command groups, the
metrics, mail routing, the re-announce loop. This module is wiring only: the
rules live in :mod:`duravip.election.picture` (SWIM to cluster picture, holders)
and :mod:`duravip.election.policy` (the resolver's decisions).

A crash of any service propagates out of the nursery: every sibling is
cancelled, the finally-blocks unplumb what this node holds, and the process
exits non-zero. A half-alive node holding IPs it no longer serves is worse
than a dead one, because the others would not take those IPs over.
"""

from __future__ import annotations

import logging
import math
import signal
import time
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from functools import partial
from pathlib import Path

import trio
from trio_util import AsyncValue

from duravip import config as cfg
from duravip import metrics, sdnotify
from duravip.config import Config
from duravip.control import server as control_server
from duravip.control.protocol import CommandRegistry
from duravip.daemon import operator
from duravip.daemon.actuator import ActuatorContext, NodeActuator
from duravip.daemon.budget import TakeoverBudget
from duravip.daemon.commands import cluster as cluster_cmds
from duravip.daemon.commands import duravip as duravip_cmds
from duravip.daemon.commands import lifecycle
from duravip.daemon.commands import mail as mail_cmds
from duravip.daemon.commands import node as node_cmds
from duravip.daemon.commands import reload as reload_cmds
from duravip.daemon.commands.common import Pending
from duravip.daemon.services import NodeState, Services
from duravip.daemon.shutdown import graceful_stop
from duravip.daemon.telemetry import MetricsContext, NodeMetrics
from duravip.election import NodeView, build_view, encode
from duravip.election.picture import (
    ClusterSnapshot,
    ViewTracker,
    binding_holders,
    mmove_peers,
    reannounce_targets,
)
from duravip.election.quorum import LIVE_STATES
from duravip.election.resolver import serve as serve_resolver
from duravip.ipaddr import IPAddress
from duravip.mail.service import serve as serve_mail
from duravip.plumbing import relay as handover_relay
from duravip.plumbing.base import Plumber
from duravip.plumbing.netlink import open_netlink_plumber
from duravip.plumbing.worker import PlumbingWorker
from duravip.plumbing.worker import serve as serve_plumbing
from duravip.smtp.listeners import serve as serve_listeners
from duravip.smtp.server import ServerSettings
from duravip.swim.crypto import Keyring
from duravip.swim.driver import Membership, MembershipService
from duravip.swim.driver import serve as serve_membership

log = logging.getLogger("duravip.node")

PlumberFactory = Callable[[Config], AbstractAsyncContextManager[Plumber]]

def load_keyring(config: Config) -> Keyring:
    if config.cluster.keyring is None:
        raise SystemExit(
            f"{config.source}: cluster.keyring is required: every gossip byte is encrypted"
        )
    return Keyring.from_file(config.cluster.keyring)


class Node:
    """Starts the services, hands each part the narrow handle it needs, stops them."""

    def __init__(
        self,
        config: Config,
        path: Path,
        *,
        plumber: PlumberFactory | None = None,
        handle_signals: bool = True,
    ) -> None:
        #: False when several nodes share a process (tests): signal handlers are per process.
        self.handle_signals = handle_signals
        #: How the node gets its plumber: netlink in production, a fake in tests.
        self._open_plumber: PlumberFactory = plumber or (
            lambda c: open_netlink_plumber(
                use_iflist_cache=c.use_iflist_cache, na_router=c.cluster.na_router_flag
            )
        )
        self.state = NodeState(
            config=config,
            path=path,
            keyring=load_keyring(config),
            snapshot=AsyncValue(ClusterSnapshot(local=config.cluster.node_name, states={}, views={})),
        )
        #: Control socket connections, refusals and bad requests (filled by the server).
        self.control_counters: dict[str, int] = {}
        self.registry = metrics.Registry()
        self.telemetry = NodeMetrics(
            self.registry,
            MetricsContext(
                member_states=lambda: self.state.snapshot.value.states.values(),
                configured=lambda: len(self.config.duravips),
                held=lambda: len(self.state.held),
                views_dropped=lambda: self.state.views_dropped,
            ),
        )
        self.shutdown_requested = trio.Event()
        self.exit_code = 0
        self._tracker = ViewTracker(config.cluster.node_name)
        self._reannounce = trio.Event()

    @property
    def name(self) -> str:
        return self.state.name

    @property
    def config(self) -> Config:
        return self.state.config

    # ------------------------------------------------------------------ run

    async def run(self) -> int:
        c = self.config
        try:
            async with (
                self._open_plumber(c) as plumber,
                trio.open_nursery() as nursery,
            ):
                registry = CommandRegistry()
                lifecycle.register(
                    registry, lifecycle.LifecycleContext(self.registry, self.shutdown_requested)
                )
                # Each command group answers once what it needs runs; until then
                # its names answer "not started yet" (help lists them all at once).
                duravip_cmds.register_views(registry, self.state)
                waiting_mail = Pending(registry, mail_cmds.SPECS)
                waiting_members = Pending(registry, cluster_cmds.SPECS)
                waiting_resolver = Pending(
                    registry, (*duravip_cmds.STEER_SPECS, *reload_cmds.SPECS, *node_cmds.SPECS)
                )
                await nursery.start(
                    partial(
                        control_server.serve,
                        path=c.control.path,
                        mode=c.control.mode,
                        group=c.control.group,
                        counters=self.control_counters,
                        registry=registry,
                    )
                )
                self.telemetry.add_control(lambda: self.control_counters)
                if c.metrics.listen is not None:
                    await nursery.start(
                        partial(
                            metrics.serve_http,
                            registry=self.registry,
                            host=str(c.metrics.listen.host),
                            port=c.metrics.listen.port,
                        )
                    )
                plumbing = await nursery.start(
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
                nursery.start_soon(self._unplumb_on_exit, plumbing)
                mail = await nursery.start(
                    partial(
                        serve_mail,
                        config=c,
                        node_name=self.name,
                        keyring_keys=lambda: self.state.keyring.keys,
                    )
                )
                self.telemetry.add_mail(lambda: mail.counters, mail.mailq)
                waiting_mail.release()
                mail_cmds.register(registry, mail_cmds.MailContext(mailq=mail.mailq))
                # A DuraVIP listener that stops for good makes this node withdraw
                # its IP. Listeners start before the resolver, so failures queue
                # here until _withdraw_failed_listeners runs (once Services exist).
                failed_send, failed_recv = trio.open_memory_channel[IPAddress](math.inf)
                listeners = await nursery.start(
                    partial(
                        serve_listeners,
                        config=c,
                        sink=mail.sink,
                        settings=ServerSettings(hostname=self.name, limits=c.smtp),
                        on_listener_failed=failed_send.send_nowait,
                    )
                )
                self.telemetry.add_smtp(lambda: listeners.counters)
                membership = await nursery.start(
                    partial(
                        serve_membership,
                        name=self.name,
                        bind=c.cluster.gossip_address.as_tuple(),
                        cluster=c.cluster.name,
                        timers=c.cluster.timers,
                        keyring=self.state.keyring,
                        seeds=[p.as_tuple() for p in c.cluster.peers],
                        meta=encode(self.local_view(mature=False, held=frozenset())),
                    )
                )
                self.telemetry.add_swim(lambda: membership.counters)
                waiting_members.release()
                cluster_cmds.register(
                    registry, cluster_cmds.ClusterContext(self.state, membership.snapshot)
                )
                await self._sync(membership)
                # Packet sockets: only with the kernel plumber (else NoRelay).
                relay = await handover_relay.start(
                    nursery, plumber, lambda: self.config.cluster.topology
                )
                self.telemetry.add_plumbing(lambda: relay.counters)
                actuator = NodeActuator(
                    ActuatorContext(
                        plumbing=plumbing,
                        listeners=listeners,
                        drain_timeout=lambda: self.config.cluster.drain_timeout,
                        relay=relay,
                        # Deliveries from an IP read their last reply before it leaves.
                        quiesce=mail.quiesce_ips,
                    )
                )
                resolver = await nursery.start(
                    partial(
                        serve_resolver,
                        config=c,
                        snapshot=self.state.snapshot,
                        actuator=actuator,
                        publish_view=lambda v: membership.set_meta(encode(v)),
                        mature_after=c.cluster.view_mature_time,
                    )
                )
                services = Services(
                    plumbing=plumbing,
                    mail=mail,
                    listeners=listeners,
                    membership=membership,
                    resolver=resolver,
                )
                self.telemetry.add_election(resolver.stats)
                budget = TakeoverBudget(
                    marks=membership.failure_marks,
                    plumbed_at=plumbing.plumbed_at,
                    garp_at=plumbing.garp_at,
                    bound_at=actuator.bound_at,
                )
                resolver.on_takeover.append(budget.on_takeover)
                waiting_resolver.release()
                self._register_steering(registry, services)
                # Drain, health checks, notify hooks (a persisted drain applies before maturity).
                ops = operator.OperatorContext(self.state, resolver, plumber, mail, registry)
                self.telemetry.add_operator(await nursery.start(operator.serve, ops))
                nursery.start_soon(self._follow_membership, services)
                nursery.start_soon(self._follow_decisions, services)
                nursery.start_soon(self._follow_held, services)
                nursery.start_soon(self._reannounce_loop, services)
                nursery.start_soon(self._withdraw_failed_listeners, failed_recv, services)
                nursery.start_soon(self._notify_ready, services)
                log.info("node started", extra={"fields": {"members": len(self.state.snapshot.value.states)}})
                await self._serve_signals(services)
                await graceful_stop(self.state, services, partial(self._route_mail, services))
                nursery.cancel_scope.cancel()
        except* KeyboardInterrupt:
            log.info("interrupted before the signal handlers were up")
            self.exit_code = 130
        return self.exit_code

    # ------------------------------------------------------------- wiring

    def _register_steering(self, registry: CommandRegistry, s: Services) -> None:
        duravip_cmds.register_steering(registry, duravip_cmds.SteeringContext(self.state, s.resolver))
        reload_cmds.register(
            registry,
            reload_cmds.ReloadContext(reload=partial(self.reload, s), path=lambda: self.state.path),
        )

    async def _unplumb_on_exit(self, plumbing: PlumbingWorker) -> None:
        """However the node stops (a service crashed, or a signal), drop every IP it has.

        A graceful stop has released everything already; after a crash this is
        what keeps a dying node from leaving addresses nobody serves.
        """
        try:
            await trio.sleep_forever()
        finally:
            left = plumbing.present.value
            if left:
                log.warning("unplumbing %d DuraVIP(s) on the way out", len(left))
                with trio.CancelScope(shield=True), trio.move_on_after(5):
                    await plumbing.remove(left)

    @staticmethod
    def forbidden_ips(c: Config) -> frozenset[IPAddress]:
        """Addresses the node holds outside DuraVIP control: never plumbed, never removed."""
        ips = {c.cluster.gossip_address.host}
        if c.cluster_listener is not None:
            ips.add(c.cluster_listener.host)
        ips.update(ls.address.host for ls in c.listeners if not ls.is_duravip)
        return frozenset(ips - set(c.duravips))

    # --------------------------------------------------------- membership

    def local_view(self, *, mature: bool, held: frozenset[IPAddress]) -> NodeView:
        return build_view(self.config, version=0, mature=mature, held=held)

    def _adapt(self, m: Membership, held: frozenset[IPAddress]) -> None:
        """Apply one SWIM snapshot: new picture, counters, re-announce request."""
        up = self._tracker.update(m.members, held)
        for d in up.dropped:
            self.state.views_dropped += 1
            log.warning("undecodable view", extra={"fields": {"node": d.node, "error": d.error}})
        if up.reannounce:
            self._reannounce.set()
        if up.views_changed:
            self.state.views_changed_at = time.monotonic()
        self.state.snapshot.value = up.snapshot

    async def _sync(self, membership: MembershipService) -> None:
        """Bounded wait until the seeds answered and every alive member's view is known.

        Adapts snapshots itself (nothing is held yet) until :meth:`_follow_membership`
        takes over once the resolver runs.
        """
        self._adapt(membership.snapshot.value, frozenset())
        c = self.config.cluster
        if not c.peers:
            return
        budget = max(2.0, 4 * c.timers.probe_interval + 2 * c.timers.probe_timeout)
        with trio.move_on_after(budget):
            async for m in membership.snapshot.eventual_values():
                self._adapt(m, frozenset())
                snap = self.state.snapshot.value
                alive = [n for n, s in snap.states.items() if s in LIVE_STATES]
                if len(alive) > 1 and all(n in snap.views for n in alive):
                    return
        log.info("state sync timed out: going on with what is known")

    async def _follow_membership(self, s: Services) -> None:
        """Adapt every SWIM snapshot; mail follows the holders (they change with views)."""
        async for m in s.membership.snapshot.eventual_values():
            self._adapt(m, s.resolver.held.value)
            self._route_mail(s)

    async def _withdraw_failed_listeners(
        self, failed: trio.MemoryReceiveChannel[IPAddress], s: Services
    ) -> None:
        """A listener that stopped for good: stop announcing its IP so a peer serves it.

        Keeping the IP plumbed with nothing accepting on it would make this a
        half-alive node that the others never replace. Counted by the listener
        manager (``listener_failures``); ``broadcast cluster duravip announce
        view`` or a reload makes the node a candidate again.
        """
        async for ip in failed:
            log.error(
                "listener on %s stopped for good: withdrawing the IP from this node", ip,
                extra={"fields": {"ip": str(ip)}},
            )
            s.resolver.withdraw(ip)

    async def _reannounce_loop(self, s: Services) -> None:
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
            owned = reannounce_targets(
                self.state.snapshot.value, s.resolver.decisions.value, s.resolver.held.value
            )
            if owned:
                log.info("re-announcing %d owned IP(s) by gratuitous ARP", len(owned))
                await s.plumbing.announce(owned)
            await trio.sleep(self.config.cluster.timers.gossip_interval)

    # ----------------------------------------------------------- decisions

    async def _follow_decisions(self, s: Services) -> None:
        """Mirror the decisions for the console; mail follows the holders."""
        async for decisions in s.resolver.decisions.eventual_values():
            self.state.decisions = decisions
            self._route_mail(s)

    async def _follow_held(self, s: Services) -> None:
        """Mirror the held set; feed the failover histogram (an acquire returned).

        Decisions change before the acquisition finishes, so following them
        alone saw each takeover only at the next, unrelated, decision change.
        """
        async for held in s.resolver.held.eventual_values():
            self.state.held = held
            self.telemetry.observe_takeovers(s.resolver.stats)

    def _route_mail(self, s: Services) -> None:
        snap = self.state.snapshot.value
        bindings = {
            b.name: b.bind_address
            for b in self.config.bindings
            if b.bind_address is not None and b.enable_duravip
        }
        holders = binding_holders(snap, s.resolver.decisions.value, bindings)
        s.mail.set_holders(holders, local=self.name, peers=mmove_peers(snap))

    async def _notify_ready(self, s: Services) -> None:
        await trio.sleep(self.config.cluster.view_mature_time)
        sdnotify.notify("READY=1")
        sdnotify.notify(f"STATUS=mature; holding {len(s.resolver.held.value)} DuraVIPs")

    # ------------------------------------------------------------- control

    async def _serve_signals(self, s: Services) -> None:
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
                        errors = await self.reload(s)
                        for e in errors:
                            log.error("reload rejected: %s", e)
                    else:
                        log.info("signal %s: graceful stop", signal.Signals(sig).name)
                        n.cancel_scope.cancel()
                        return

    async def reload(self, s: Services) -> list[str]:
        """Apply a new config without restart, or keep the old one and return the errors."""
        path = self.state.path
        try:
            new = await trio.to_thread.run_sync(cfg.load, path)
            keyring = load_keyring(new) if new.cluster.keyring else self.state.keyring
        except cfg.ConfigError as e:
            return [str(d) for d in e.diagnostics]
        except (OSError, ValueError, SystemExit) as e:
            return [str(e)]
        if new.cluster.node_name != self.name or new.cluster.gossip_address != self.config.cluster.gossip_address:
            return ["node_name and gossip_address cannot change on reload: restart the node"]
        self.state.config = new
        self.state.config_loaded_at = time.time()
        self.state.keyring = keyring
        s.membership.set_keyring(keyring)
        s.membership.set_timers(new.cluster.timers)
        s.plumbing.set_managed(frozenset(new.duravips), new.cluster.topology)
        s.listeners.set_config(new)
        s.mail.set_config(new)
        s.resolver.set_config(new)
        log.info("config reloaded", extra={"fields": {"duravips": len(new.duravips)}})
        return []


async def run_node(config: Config, path: Path, *, plumber: PlumberFactory | None = None) -> int:
    return await Node(config, path, plumber=plumber).run()
