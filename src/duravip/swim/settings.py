"""The SWIM core's own settings: protocol timers and the datagram budget.

Defined here, not in the config package, so the core depends on nothing but
itself. The config package uses this very class for the ``cluster`` stanza's
timer keys (one key per field, same name) and fills it from a preset.
"""

from __future__ import annotations

from attrs import frozen


@frozen
class Timers:
    """SWIM / Lifeguard timers, in seconds unless noted. See ``docs/membership.md``."""

    probe_interval: float
    probe_timeout: float
    indirect_checks: int
    retransmit_mult: int
    suspicion_mult: float
    suspicion_max_timeout_mult: float
    gossip_interval: float
    gossip_nodes: int
    push_pull_interval: float
    awareness_max_multiplier: int
    dead_node_reclaim_time: float
    gossip_to_the_dead_time: float
    #: Largest datagram we build (bytes, sealing overhead included).
    mtu: int = 1400
