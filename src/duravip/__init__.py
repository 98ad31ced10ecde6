"""duravip: IP fail-over for mail clusters (SWIM gossip, rendezvous election, netlink, SMTP)."""

__version__ = "0.1.0"
