"""The context the SWIM module tests share: node ``x`` and its peers at known addresses.

Each concern module (probe, transitions, metasync, pushpull, dispatch) is tested
on its own over a real :class:`~duravip.swim.context.Context`; this builds one.
"""

from __future__ import annotations

import random

from duravip.swim.context import Context
from duravip.swim.crypto import Keyring
from duravip.swim.members import Addr, NodeState
from duravip.swim.settings import Timers

KEY = Keyring([b"0123456789abcdef0123456789abcdef"])
T = Timers(0.4, 0.2, 3, 4, 1.5, 6.0, 0.1, 3, 30.0, 8, 30.0, 30.0)


def addr(i: int) -> Addr:
    """Node ``i``'s gossip address (``x`` is 0, its peers 1, 2, ...)."""
    return (f"10.0.0.{i + 1}", 4801)


def new_context(*peers: str, meta: bytes = b"") -> Context:
    """Node ``x`` at ``addr(0)`` knowing ``peers`` alive at ``addr(1)``, ``addr(2)``, ..."""
    ctx = Context(
        name="x",
        addr=addr(0),
        cluster="c",
        timers=T,
        keyring=KEY,
        meta=meta,
        rng=random.Random(1),
        now=0.0,
        epoch=1,
    )
    for i, p in enumerate(peers, 1):
        ctx.table.add(NodeState(p, addr(i), 0, 0.0))
    return ctx
