"""Plumbing: DuraVIP addresses on interfaces (netlink), gratuitous ARP, reconcile.

See ``docs/plumbing.md``.
"""

from duravip.plumbing.base import Placement, Plumber, place

__all__ = ["Placement", "Plumber", "place"]
