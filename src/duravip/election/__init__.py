"""Election: node views, the pure ownership rule, quorum and the resolver task.

Only :mod:`duravip.election.resolver` imports trio; import it explicitly.
"""

from duravip.election.handover import Plan, plan
from duravip.election.quorum import StableMembership, apply_quorum, has_quorum
from duravip.election.rule import Decision, Resolver, node_seed, resolve, score
from duravip.election.view import (
    NodeView,
    Override,
    ViewDecodeError,
    VipClaim,
    build_view,
    decode,
    encode,
)

__all__ = [
    "Decision",
    "NodeView",
    "Override",
    "Plan",
    "Resolver",
    "StableMembership",
    "ViewDecodeError",
    "VipClaim",
    "apply_quorum",
    "build_view",
    "decode",
    "encode",
    "has_quorum",
    "node_seed",
    "plan",
    "resolve",
    "score",
]
