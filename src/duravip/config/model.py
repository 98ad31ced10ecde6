"""The structured configuration: frozen attrs classes the runtime reads.

The raw stanza tree (see :mod:`duravip.config.parser`) is converted into these
classes by :mod:`duravip.config.structure` with cattrs; nothing outside the
``config`` package ever sees the raw tree. Every class is frozen so a running
daemon can swap a whole ``Config`` atomically on reload.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Literal

from attrs import Factory, field, frozen

from duravip.ipaddr import IPAddress, IPNetwork, ip_key
from duravip.swim.settings import Timers as Timers

Profile = Literal["lan", "fast", "wan"]
Quorum = Literal["none", "majority"]
BareNewline = Literal["reject", "normalize"]
TlsMode = Literal["optional", "required", "off"]

#: The SPEC's hard limit of DuraVIPs per node (as in the reference product).
MAX_DURAVIPS = 10_240


@frozen(order=True)
class HostPort:
    """An endpoint such as ``"10.1.0.11:4801"`` or ``"[2001:db8::11]:4801"``."""

    #: Ordered IPv4 before IPv6 (the two families do not compare).
    host: IPAddress = field(order=ip_key)
    port: int = field()

    def __str__(self) -> str:
        if self.host.version == 6:
            return f"[{self.host}]:{self.port}"
        return f"{self.host}:{self.port}"

    def as_tuple(self) -> tuple[str, int]:
        return (str(self.host), self.port)


@frozen
class SourceLoc:
    """Where a stanza or key was written, for ``file:line:col`` messages."""

    file: str
    line: int
    col: int

    def __str__(self) -> str:
        return f"{self.file}:{self.line}:{self.col}"


#: Timer presets. ``fast`` aims at ~250 ms crash detection on a LAN. ``Timers`` is the
#: SWIM core's own settings class: a preset (``profile``) fills every field, and each
#: can be overridden in the ``cluster`` stanza under the same name.
PRESETS: Mapping[str, Timers] = {
    "lan": Timers(
        probe_interval=0.4,
        probe_timeout=0.2,
        indirect_checks=3,
        retransmit_mult=4,
        suspicion_mult=1.5,
        suspicion_max_timeout_mult=6.0,
        gossip_interval=0.1,
        gossip_nodes=3,
        push_pull_interval=30.0,
        awareness_max_multiplier=8,
        dead_node_reclaim_time=30.0,
        gossip_to_the_dead_time=30.0,
    ),
    "fast": Timers(
        probe_interval=0.1,
        probe_timeout=0.05,
        indirect_checks=3,
        retransmit_mult=4,
        suspicion_mult=1.0,
        suspicion_max_timeout_mult=4.0,
        gossip_interval=0.05,
        gossip_nodes=3,
        push_pull_interval=10.0,
        awareness_max_multiplier=8,
        dead_node_reclaim_time=5.0,
        gossip_to_the_dead_time=10.0,
    ),
    "wan": Timers(
        probe_interval=5.0,
        probe_timeout=3.0,
        indirect_checks=3,
        retransmit_mult=4,
        suspicion_mult=6.0,
        suspicion_max_timeout_mult=6.0,
        gossip_interval=0.5,
        gossip_nodes=4,
        push_pull_interval=60.0,
        awareness_max_multiplier=8,
        dead_node_reclaim_time=60.0,
        gossip_to_the_dead_time=60.0,
    ),
}


@frozen
class Topology:
    """DuraVIPs inside ``network`` are plumbed on ``interface`` with ``/cidrmask``.

    ``cidrmask`` defaults to the host length of the network's family (32 or 128).
    """

    network: IPNetwork
    interface: str
    cidrmask: int = 32
    loc: SourceLoc | None = field(default=None, eq=False)


@frozen
class ClusterConfig:
    name: str
    node_name: str
    gossip_address: HostPort
    peers: tuple[HostPort, ...] = ()
    keyring: Path | None = None
    profile: Profile = "lan"
    timers: Timers = PRESETS["lan"]
    arp_all_hosts: bool = True
    #: IPv6: set the Router flag in unsolicited neighbour advertisements.
    na_router_flag: bool = False
    unconditional_rebind: bool = True
    view_mature_time: float = 2.0
    quorum: Quorum = "none"
    topology: tuple[Topology, ...] = ()
    #: Gratuitous ARP: how many per IP after plumbing, and the spacing.
    garp_count: int = 3
    garp_interval: float = 0.6
    #: How long an old holder lets SMTP sessions finish before it unplumbs.
    drain_timeout: float = 2.0
    #: ``false``: a returning candidate leaves an IP with its live holder
    #: (keepalived ``nopreempt``); ``preempt_delay``: it waits that long after
    #: becoming a candidate before it takes an IP back. Per binding overridable.
    preempt: bool = True
    preempt_delay: float = 0.0
    #: Notify hooks: a program run per local transition, and/or a FIFO written.
    notify: Path | None = None
    notify_fifo: Path | None = None
    notify_timeout: float = 5.0


@frozen
class Listener:
    """One ``Listen "ip:port"`` inside ``ESMTP_Listener``."""

    address: HostPort
    enable_duravip: bool = False
    duravip_follow: str | None = None
    duravip_preference: str | None = None
    #: STARTTLS (RFC 3207): PEM certificate chain, its key (may be in the same
    #: file), and whether TLS is offered (``optional``), needed before MAIL
    #: (``required``) or not offered (``off``). Without a certificate no TLS is offered.
    tls_certificate: Path | None = None
    tls_key: Path | None = None
    tls: TlsMode = "optional"
    loc: SourceLoc | None = field(default=None, eq=False)

    @property
    def is_duravip(self) -> bool:
        return self.enable_duravip or self.duravip_follow is not None


@frozen
class Binding:
    """A named outbound identity; mail for it leaves from ``bind_address``."""

    name: str
    bind_address: IPAddress | None = None
    enable_duravip: bool = False
    duravip_preference: str | None = None
    #: The ``Binding_Group`` this binding sits in, if any.
    group: str | None = None
    #: Overrides of the cluster's ``preempt`` / ``preempt_delay`` for this binding's IP.
    preempt: bool | None = None
    preempt_delay: float | None = None
    loc: SourceLoc | None = field(default=None, eq=False)


@frozen
class BindingGroup:
    name: str
    bindings: tuple[str, ...] = ()
    loc: SourceLoc | None = field(default=None, eq=False)


@frozen
class SpoolConfig:
    path: Path = Path("/var/spool/duravip")


@frozen
class ControlConfig:
    path: Path = Path("/run/duravip/control.sock")
    mode: int = 0o600
    #: Group given the socket file; its members pass the ``SO_PEERCRED`` check.
    group: str | None = None


@frozen
class DeliveryConfig:
    smarthost: HostPort | None = None
    #: Where deliveries from IPv6 bindings go (unset: ``smarthost``, which must then
    #: be IPv6 too: a source address of one family cannot reach the other).
    smarthost6: HostPort | None = None
    retry_base: float = 1.0
    retry_max: float = 300.0
    concurrency: int = 4
    #: Delivered Message-IDs (with their envelope) remembered this long (seconds) and
    #: at most this many: a second copy within the window is not sent again.
    dedup_window: float = 86400.0
    dedup_max: int = 100_000


@frozen
class SmtpLimits:
    max_message_size: int = 20 * 1024 * 1024
    max_recipients: int = 100
    max_line_length: int = 1000
    max_errors: int = 10
    command_timeout: float = 300.0
    data_timeout: float = 600.0
    #: Wall time one session may last in all (``421 4.4.2`` after it).
    session_timeout: float = 3600.0
    #: Concurrent sessions over all listeners, and per client IP; beyond: ``421 4.7.0``.
    max_sessions: int = 1000
    max_sessions_per_ip: int = 50
    #: A body with a bare LF or CR (SMTP smuggling): refuse it (``550 5.5.2``) or rewrite to CRLF.
    bare_newline: BareNewline = "reject"


HealthKind = Literal["smtp", "spool", "link", "script"]


@frozen
class HealthCheck:
    """One ``Health_Check "NAME" { }``: a probe that can make this node ineligible."""

    name: str
    kind: HealthKind
    rise: int = 2
    fall: int = 3
    interval: float = 1.0
    timeout: float = 1.0
    #: ``script``: the program (exit 0 = healthy).
    path: Path | None = None
    #: ``spool``: free bytes the spool file system must keep.
    min_free: int = 0
    #: Flapping: ``flap_limit`` changes within ``hold_down`` s keep the check
    #: failed for ``hold_down`` s instead of following every change.
    flap_limit: int = 6
    hold_down: float = 60.0
    loc: SourceLoc | None = field(default=None, eq=False)


@frozen
class MetricsConfig:
    listen: HostPort | None = None


@frozen
class Config:
    cluster: ClusterConfig
    use_iflist_cache: bool = False
    spool: SpoolConfig = SpoolConfig()
    control: ControlConfig = ControlConfig()
    #: ``ECCluster_Listener``: the mmove endpoint (None: this node cannot receive moves).
    cluster_listener: HostPort | None = None
    delivery: DeliveryConfig = DeliveryConfig()
    smtp: SmtpLimits = SmtpLimits()
    metrics: MetricsConfig = MetricsConfig()
    listeners: tuple[Listener, ...] = ()
    #: Every binding, including those inside groups (``Binding.group`` says which).
    bindings: tuple[Binding, ...] = ()
    groups: tuple[BindingGroup, ...] = ()
    health: tuple[HealthCheck, ...] = ()
    source: str = "<string>"
    duravips: Mapping[IPAddress, DuraVip] = Factory(dict)
    """Derived by the structurer: every DuraVIP IP with what runs on it."""

    def binding(self, name: str) -> Binding | None:
        for b in self.bindings:
            if b.name.lower() == name.lower():
                return b
        return None

    def topology_for(self, ip: IPAddress) -> Topology | None:
        """Longest-prefix match of ``ip`` against the Topology blocks."""
        best: Topology | None = None
        for t in self.cluster.topology:
            if ip in t.network and (best is None or t.network.prefixlen > best.network.prefixlen):
                best = t
        return best


@frozen
class DuraVip:
    """Everything this node's config says about one DuraVIP address.

    This is what the node announces in its view for that IP (see
    :class:`duravip.election.NodeView`).
    """

    ip: IPAddress
    #: Ports of ESMTP listeners on this IP (sorted).
    listener_ports: tuple[int, ...] = ()
    #: Name of the binding whose ``Bind_Address`` is this IP, if any.
    binding: str | None = None
    #: ``Duravip_Preference`` that applies to this IP, if any.
    preference: str | None = None
    #: For a ``Duravip_Follow`` listener IP: the binding name it follows.
    follows: str | None = None
