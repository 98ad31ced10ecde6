"""Deterministic simulator of the SWIM core (in-memory network, Trio MockClock)."""

from duravip.sim.network import KillRecord, MetaChange, SimNode, Simulation

__all__ = ["KillRecord", "MetaChange", "SimNode", "Simulation"]
