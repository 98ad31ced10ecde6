"""The node's metrics: read from the services' own counters at render time.

Services keep plain ``dict[str, int]`` counters (cheap on hot paths, no
metrics import in sans-IO cores); this module exposes them in Prometheus
form without copying, so a scrape always sees current values. It never sees
the node: the families that read the node's state are registered at once
(:class:`MetricsContext`), each service's family when that service has
started (``add_*``), so a scrape during start-up shows what runs so far.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import ClassVar

from attrs import frozen

from duravip.daemon.operator import Operator
from duravip.election.policy import ResolverStats
from duravip.mail.router import MailqRow
from duravip.metrics import Gauge, Registry
from duravip.swim.members import State

Counters = Callable[[], Mapping[str, int]]


class _CollectedCounter(Gauge):
    """A counter whose series are read from a service's dict when rendered."""

    type_name: ClassVar[str] = "counter"


@frozen
class MetricsContext:
    """Readers of the node's own state (each called at render time)."""

    member_states: Callable[[], Iterable[State]]
    configured: Callable[[], int]
    held: Callable[[], int]
    views_dropped: Callable[[], int]


class NodeMetrics:
    def __init__(self, registry: Registry, ctx: MetricsContext) -> None:
        self.registry = registry
        self._last_takeover_at = float("-inf")
        r = registry
        r.gauge("duravip_members", "cluster members by SWIM state", ["state"]).set_collector(
            lambda: _count_states(ctx.member_states())
        )
        r.gauge(
            "duravip_ips_held", "DuraVIPs plumbed on this node",
            callback=lambda: float(ctx.held()),
        )
        r.gauge(
            "duravip_ips_configured", "DuraVIPs in this node's config",
            callback=lambda: float(ctx.configured()),
        )
        self.failover_seconds = r.histogram(
            "duravip_failover_seconds",
            "from seeing a holder dead or left to this node serving its IP",
        )
        r.register(
            _CollectedCounter(
                "duravip_views_dropped_total", "member views that failed to decode",
                callback=lambda: float(ctx.views_dropped()),
            )
        )

    # One per service, called once that service has started (in start order).

    def add_control(self, counters: Counters) -> None:
        self._dict_counter(
            "duravip_control_total", "control socket connections, refusals and bad requests",
            "counter", counters,
        )

    def add_plumbing(self, counters: Counters) -> None:
        self._dict_counter(
            "duravip_plumbing_total", "plumbing operations and errors", "counter", counters
        )

    def add_mail(self, counters: Counters, queues: Callable[[], Iterable[MailqRow]]) -> None:
        self._dict_counter(
            "duravip_mail_total", "spool, delivery and mmove (ECmmove2) counters", "counter",
            counters,
        )
        self.registry.gauge(
            "duravip_queue_messages", "queued messages", ["binding", "state"]
        ).set_collector(lambda: _queue(queues()))

    def add_smtp(self, counters: Counters) -> None:
        self._dict_counter(
            "duravip_smtp_total", "SMTP sessions, messages and rejects", "counter", counters
        )

    def add_swim(self, counters: Counters) -> None:
        self._dict_counter(
            "duravip_swim_dropped_packets_total", "gossip packets and streams dropped, by reason",
            "reason", lambda: _prefixed(counters(), "dropped_"),
        )
        self._dict_counter(
            "duravip_swim_total", "SWIM protocol counters", "counter",
            lambda: {k: v for k, v in counters().items() if not k.startswith("dropped_")},
        )

    def add_election(self, stats: ResolverStats) -> None:
        self._dict_counter(
            "duravip_election_total", "elections and moves of this node's resolver", "counter",
            lambda: _resolver_stats(stats),
        )

    def add_operator(self, op: Operator) -> None:
        """Eligibility, drain, health checks, pending fail-backs and notify hooks."""
        r = self.registry
        r.gauge(
            "duravip_node_eligible", "1 when this node may be elected (not drained, healthy)",
            callback=lambda: float(op.reason is None),
        )
        r.gauge(
            "duravip_node_drained", "1 while this node is drained (node drain)",
            callback=lambda: float(op.drained),
        )
        r.gauge(
            "duravip_health_check_healthy", "1 when the check passes (and is not held down)",
            ["check"],
        ).set_collector(
            lambda: {(h["check"],): float(h["healthy"]) for h in op.health.report(_now())}
        )
        r.gauge(
            "duravip_health_check_flapping", "1 while the check is held down for flapping",
            ["check"],
        ).set_collector(
            lambda: {(h["check"],): float(h["status"] == "flapping") for h in op.health.report(_now())}
        )
        metric = _CollectedCounter(
            "duravip_health_total", "health probes, failures, verdict changes, hold-downs",
            ["check", "counter"],
        )
        metric.set_collector(lambda: {k: float(v) for k, v in op.health.counters().items()})
        r.register(metric)
        r.gauge(
            "duravip_failback_pending", "IPs this node would own but leaves with their holder",
            callback=lambda: float(len(op.failback_pending())),
        )
        self._dict_counter(
            "duravip_notify_total", "notify hook events, successes, failures, timeouts, drops",
            "counter", lambda: op.notifier.counters,
        )

    def observe_takeovers(self, stats: ResolverStats) -> None:
        """Move takeover latencies the resolver recorded since last time into the histogram."""
        recent = stats.recent
        for t in recent:
            if t.at > self._last_takeover_at and t.latency is not None:
                self.failover_seconds.observe(t.latency)
        if recent:
            self._last_takeover_at = max(self._last_takeover_at, max(t.at for t in recent))

    def _dict_counter(self, name: str, help_text: str, label: str, source: Counters) -> None:
        metric = _CollectedCounter(name, help_text, [label])
        metric.set_collector(lambda: {(k,): float(v) for k, v in source().items()})
        self.registry.register(metric)


def _now() -> float:
    import trio  # render runs inside the daemon's trio run

    return trio.current_time()


def _resolver_stats(st: ResolverStats) -> dict[str, int]:
    return {
        "elections": st.elections,
        "moves_in": st.moves_in,
        "moves_out": st.moves_out,
        "actuator_failures": st.actuator_failures,
    }


def _prefixed(counters: Mapping[str, int], prefix: str) -> dict[str, int]:
    return {k[len(prefix):]: v for k, v in counters.items() if k.startswith(prefix)}


def _count_states(states: Iterable[State]) -> dict[tuple[str, ...], float]:
    out: dict[tuple[str, ...], float] = {(s,): 0.0 for s in ("alive", "suspect", "dead", "left")}
    for s in states:
        out[(str(s),)] = out.get((str(s),), 0.0) + 1
    return out


def _queue(rows: Iterable[MailqRow]) -> dict[tuple[str, ...], float]:
    out: dict[tuple[str, ...], float] = {}
    for row in rows:
        key = f"{row.group}/{row.binding}"
        out[(key, "active")] = float(row.active)
        out[(key, "delayed")] = float(row.delayed)
    return out
