"""A graceful stop: release every IP break-before-make, hand queues over, announce ``left``.

Its own module because it is the node's one ordered multi-service sequence
and the planned-move work keeps growing it (see ``docs/operations.md``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import trio

from duravip import sdnotify
from duravip.daemon.services import NodeState, Services
from duravip.election.picture import handed_off

log = logging.getLogger("duravip.node")

#: Upper bound for a graceful stop: release IPs, hand queues over, leave.
SHUTDOWN_BUDGET = 15.0


async def graceful_stop(state: NodeState, s: Services, route_mail: Callable[[], None]) -> None:
    """Release every IP, let the others plumb, move the queues, leave the cluster."""
    sdnotify.notify("STOPPING=1")
    with trio.move_on_after(SHUTDOWN_BUDGET) as scope:
        released = s.resolver.held.value
        await s.resolver.release_all()
        # Let the others elect new owners and plumb before queues move: mail
        # follows the holders. Bounded: a peer that cannot plumb must not
        # keep the queues here.
        with trio.move_on_after(min(1.0, 4 * state.config.cluster.timers.probe_interval)):
            await state.snapshot.wait_value(lambda snap: handed_off(snap, released))
        route_mail()
        await s.mail.hand_over(timeout=max(1.0, SHUTDOWN_BUDGET / 2))
        await s.membership.leave(timeout=2.0)
    if scope.cancelled_caught:
        log.warning(
            "graceful stop ran out of time", extra={"fields": {"budget_s": SHUTDOWN_BUDGET}}
        )
    log.info("stopped")
