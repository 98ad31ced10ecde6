"""Quorum: the stable membership and partitions 2+1, 2+2, 1+1+1."""

from __future__ import annotations

from duravip.election import StableMembership, apply_quorum, has_quorum, resolve

from .strategies import IPS, uniform_claims, view


def stable_of(local: str, nodes: list[str]) -> StableMembership:
    s = StableMembership(local, stable_after=2.0)
    states = {n: "alive" for n in nodes}
    s.observe(0.0, states)
    s.observe(2.0, states)
    return s


def test_member_becomes_stable_only_after_continuous_liveness():
    s = StableMembership("a", stable_after=2.0)
    s.observe(0.0, {"a": "alive", "b": "alive"})
    assert s.members == {"a"}
    assert s.next_deadline() == 2.0
    s.observe(1.0, {"a": "alive", "b": "dead"})  # interrupted: the clock restarts
    s.observe(1.5, {"a": "alive", "b": "suspect"})
    s.observe(3.0, {"a": "alive", "b": "suspect"})
    assert s.members == {"a"}
    s.observe(3.5, {"a": "alive", "b": "alive"})
    assert s.members == {"a", "b"}
    assert s.next_deadline() is None


def test_dead_stays_left_shrinks():
    s = stable_of("a", ["a", "b", "c"])
    s.observe(10.0, {"a": "alive", "b": "dead", "c": "alive"})
    assert s.members == {"a", "b", "c"}
    s.observe(11.0, {"a": "alive", "b": "left", "c": "alive"})
    assert s.members == {"a", "c"}
    s.observe(12.0, {"a": "alive", "c": "alive"})  # forgotten: no change
    assert s.members == {"a", "c"}


def partition_owners(groups: list[list[str]]) -> dict[str, int]:
    """IPs each node would hold, each side seeing only its own group."""
    nodes = [n for g in groups for n in g]
    vips = uniform_claims(IPS)
    views = {n: view(n, vips) for n in nodes}
    held: dict[str, int] = {}
    for side in groups:
        for local in side:
            st = stable_of(local, nodes)
            st.observe(20.0, {n: ("alive" if n in side else "dead") for n in nodes})
            dec = apply_quorum(
                resolve(views, side), local=local, alive=side, stable_members=st.members
            )
            held[local] = sum(1 for d in dec.values() if d.owner == local)
    return held


def test_partition_two_plus_one():
    held = partition_owners([["a", "b"], ["c"]])
    assert held["c"] == 0
    assert held["a"] + held["b"] == len(IPS)


def test_partition_two_plus_two_nobody_serves():
    held = partition_owners([["a", "b"], ["c", "d"]])
    assert set(held.values()) == {0}


def test_partition_one_one_one_nobody_serves():
    held = partition_owners([["a"], ["b"], ["c"]])
    assert set(held.values()) == {0}


def test_no_partition_keeps_decisions():
    vips = uniform_claims(IPS)
    views = {n: view(n, vips) for n in "abc"}
    dec = resolve(views, "abc")
    assert apply_quorum(dec, local="a", alive="abc", stable_members="abc") is dec
    lost = apply_quorum(dec, local="a", alive="a", stable_members="abc")
    assert all(d.owner is None and "no quorum" in d.reason for d in lost.values())


def test_has_quorum_counts_only_stable_members():
    assert has_quorum(["a", "b"], ["a", "b", "c"])
    assert not has_quorum(["a", "x", "y"], ["a", "b", "c"])
    assert not has_quorum(["a", "b"], ["a", "b", "c", "d"])
