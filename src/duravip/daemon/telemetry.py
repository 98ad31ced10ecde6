"""The node's metrics: read from the services' own counters at render time.

Services keep plain ``dict[str, int]`` counters (cheap on hot paths, no
metrics import in sans-IO cores); this module exposes them in Prometheus
form without copying, so a scrape always sees current values.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, ClassVar

from duravip.metrics import Gauge, Registry

if TYPE_CHECKING:
    from duravip.daemon.node import Node


class _CollectedCounter(Gauge):
    """A counter whose series are read from a service's dict when rendered."""

    type_name: ClassVar[str] = "counter"


def _safe(fn: Callable[[], Any], default: Any) -> Any:
    try:
        return fn()
    except AttributeError:  # service not started yet
        return default


class NodeMetrics:
    def __init__(self, registry: Registry, node: Node) -> None:
        self.registry = registry
        self.node = node
        self._last_takeover_at = float("-inf")
        r = registry
        r.gauge("duravip_members", "cluster members by SWIM state", ["state"]).set_collector(
            lambda: _count_states(node)
        )
        r.gauge(
            "duravip_ips_held", "DuraVIPs plumbed on this node",
            callback=lambda: float(len(node.resolver.held.value)) if node.resolver else 0.0,
        )
        r.gauge(
            "duravip_ips_configured", "DuraVIPs in this node's config",
            callback=lambda: float(len(node.config.duravips)),
        )
        self.failover_seconds = r.histogram(
            "duravip_failover_seconds",
            "from seeing a holder dead or left to this node serving its IP",
        )
        self.dropped_views = r.counter(
            "duravip_views_dropped_total", "member views that failed to decode"
        )
        self._dict_counter(
            "duravip_swim_dropped_packets_total", "gossip packets and streams dropped, by reason",
            "reason", lambda: _prefixed(node.membership.counters, "dropped_"),
        )
        self._dict_counter(
            "duravip_swim_total", "SWIM protocol counters", "counter",
            lambda: {k: v for k, v in node.membership.counters.items() if not k.startswith("dropped_")},
        )
        self._dict_counter(
            "duravip_election_total", "elections and moves of this node's resolver", "counter",
            lambda: _resolver_stats(node),
        )
        self._dict_counter(
            "duravip_plumbing_total", "plumbing operations and errors", "counter",
            lambda: getattr(node.plumbing, "counters", {}),
        )
        self._dict_counter(
            "duravip_smtp_total", "SMTP sessions, messages and rejects", "counter",
            lambda: node.listeners.counters,
        )
        self._dict_counter(
            "duravip_mail_total", "spool, delivery and mmove (ECmmove2) counters", "counter",
            lambda: node.mail.counters,
        )
        r.gauge("duravip_queue_messages", "queued messages", ["binding", "state"]).set_collector(
            lambda: _queue(node)
        )

    def observe_takeovers(self) -> None:
        """Move takeover latencies the resolver recorded since last time into the histogram."""
        if self.node.resolver is None:
            return
        recent = self.node.resolver.stats.recent
        for t in recent:
            if t.at > self._last_takeover_at and t.latency is not None:
                self.failover_seconds.observe(t.latency)
        if recent:
            self._last_takeover_at = max(self._last_takeover_at, max(t.at for t in recent))

    def _dict_counter(
        self, name: str, help_text: str, label: str, source: Callable[[], Mapping[str, int]]
    ) -> None:
        metric = _CollectedCounter(name, help_text, [label])
        metric.set_collector(lambda: {(k,): float(v) for k, v in _safe(source, {}).items()})
        self.registry.register(metric)


def _resolver_stats(node: Node) -> dict[str, int]:
    if node.resolver is None:
        return {}
    st = node.resolver.stats
    return {
        "elections": st.elections,
        "moves_in": st.moves_in,
        "moves_out": st.moves_out,
        "actuator_failures": st.actuator_failures,
    }


def _prefixed(counters: Mapping[str, int], prefix: str) -> dict[str, int]:
    return {k[len(prefix):]: v for k, v in counters.items() if k.startswith(prefix)}


def _count_states(node: Node) -> dict[tuple[str, ...], float]:
    out: dict[tuple[str, ...], float] = {(s,): 0.0 for s in ("alive", "suspect", "dead", "left")}
    for s in node.snapshot.value.states.values():
        out[(s,)] = out.get((s,), 0.0) + 1
    return out


def _queue(node: Node) -> dict[tuple[str, ...], float]:
    out: dict[tuple[str, ...], float] = {}
    for row in _safe(node.mail.mailq, []):
        key = f"{row.group}/{row.binding}"
        out[(key, "active")] = float(row.active)
        out[(key, "delayed")] = float(row.delayed)
    return out
