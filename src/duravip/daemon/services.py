"""What the node's parts share: the running services and the operator-facing state.

:class:`Services` is built once, when every service has started, so nothing
in it is optional: a task that needs the resolver is started after it and
gets it as an argument. :class:`NodeState` is what changes while the node runs
(config on reload, the cluster picture and the resolver's results as the
console reads them, the clocks it shows); it exists from the first line of
``Node.__init__``.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from pathlib import Path

import attrs
from attrs import frozen
from trio_util import AsyncValue

from duravip.config import Config
from duravip.election.picture import ClusterSnapshot
from duravip.election.resolver import ResolverService
from duravip.election.rule import Decision
from duravip.ipaddr import IPAddress
from duravip.mail.service import MailService
from duravip.plumbing.worker import PlumbingWorker
from duravip.smtp.listeners import ListenerManager
from duravip.swim.crypto import Keyring
from duravip.swim.driver import MembershipService

__all__ = ["NodeState", "Services"]


@frozen
class Services:
    """Every long-running service of one node, in start order."""

    plumbing: PlumbingWorker
    mail: MailService
    listeners: ListenerManager
    membership: MembershipService
    resolver: ResolverService


@attrs.define
class NodeState:
    """The node's mutable, operator-facing state (one object, read by the handles)."""

    config: Config
    path: Path
    keyring: Keyring
    #: The cluster as the election sees it (adapted from SWIM by the node).
    snapshot: AsyncValue[ClusterSnapshot]
    started_at: float = attrs.Factory(time.time)
    config_loaded_at: float = attrs.Factory(time.time)
    #: ``time.monotonic()`` when a member's view last changed.
    views_changed_at: float = attrs.Factory(time.monotonic)
    #: Member views that failed to decode, since start.
    views_dropped: int = 0
    #: The resolver's latest decisions and held set, mirrored for the console
    #: (empty before the resolver runs: nothing is decided or held then).
    decisions: Mapping[IPAddress, Decision] = attrs.Factory(dict)
    held: frozenset[IPAddress] = frozenset()

    @property
    def name(self) -> str:
        return self.config.cluster.node_name

    def view_stable_for(self) -> float:
        """Seconds since a member's view last changed (the console's "views stable")."""
        return max(0.0, time.monotonic() - self.views_changed_at)

    def config_stable_for(self) -> float:
        return time.time() - self.config_loaded_at
