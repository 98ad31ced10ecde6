"""Eligibility (drain, health) and preemption in the policy and the decision pass, sans-IO."""

from __future__ import annotations

from ipaddress import IPv4Address

import attrs
from hypothesis import given, settings
from hypothesis import strategies as st

from duravip.config import Binding, ClusterConfig, Config, DuraVip, HostPort
from duravip.election import NodeView, Override, build_view, resolve
from duravip.election.picture import ClusterSnapshot
from duravip.election.policy import ResolverPolicy
from duravip.election.preempt import apply_preemption
from duravip.swim.members import State

IPS = [IPv4Address(f"10.1.1.{i}") for i in range(1, 9)]
ALIVE = State.ALIVE


def config(node: str, *, preempt: bool = True, delay: float = 0.0, b1: Binding | None = None) -> Config:
    bindings = (b1,) if b1 is not None else ()
    return Config(
        cluster=ClusterConfig(
            name="t",
            node_name=node,
            gossip_address=HostPort(IPv4Address("192.168.0.1"), 4801),
            view_mature_time=1.0,
            preempt=preempt,
            preempt_delay=delay,
        ),
        bindings=bindings,
        duravips={
            ip: DuraVip(
                ip=ip,
                listener_ports=(25,),
                binding="b1" if i == 0 else None,
                preference="n1" if i == 0 else None,
            )
            for i, ip in enumerate(IPS)
        },
    )


def peer(node: str, **kw: object) -> NodeView:
    v = build_view(config(node), version=1, mature=True)
    return attrs.evolve(v, **kw)


def snap(views: dict[str, NodeView]) -> ClusterSnapshot:
    return ClusterSnapshot(local="n1", states={"n1": ALIVE, **dict.fromkeys(views, ALIVE)}, views=views)


def policy(cfg: Config, now: float = 0.0) -> ResolverPolicy:
    p = ResolverPolicy(config=cfg, now=now, wall=1000.0, mature_after=0)
    p.take_views()
    return p


def test_an_ineligible_node_announces_no_candidacy_with_its_reason_and_releases() -> None:
    p = policy(config("n1"))
    p.observe(0.0, snap({}))
    action = p.next_action(0.0)
    assert action is not None and action.acquire == frozenset(IPS)
    p.claim(action.acquire)
    p.acquired(0.1, action, action.acquire)
    p.set_eligibility(1.0, "drained")
    v = p.take_views()[-1]
    assert not v.mature and v.status == "drained" and not p.candidate
    p.observe(1.0, snap({"n2": peer("n2")}))
    assert all(d.owner == "n2" for d in p.decisions.values())
    action = p.next_action(1.0)
    assert action is not None and action.release == frozenset(IPS) and not action.acquire
    p.set_eligibility(2.0, None)
    v = p.take_views()[-1]
    assert v.mature and v.status == "" and p.candidate


def test_eligibility_is_independent_of_maturity() -> None:
    p = ResolverPolicy(config=config("n1"), now=0.0, wall=1000.0, mature_after=1.0)
    p.set_eligibility(0.0, "unhealthy: smtp")
    p.observe(2.0, snap({}))  # matured, still unhealthy
    assert p.mature and not p.view.mature and p.view.status == "unhealthy: smtp"
    assert all(d.owner is None for d in p.decisions.values())


def test_unchanged_eligibility_publishes_nothing() -> None:
    p = policy(config("n1"))
    p.set_eligibility(0.0, None)
    assert p.take_views() == []


def test_preempt_false_yields_every_ip_and_the_holder_keeps_it() -> None:
    p = policy(config("n1", preempt=False))
    assert p.view.yields == frozenset(IPS) and p.view.failback_at == 0.0
    n2 = peer("n2", held=frozenset(IPS))
    p.observe(0.0, snap({"n2": n2}))
    assert all(d.owner == "n2" for d in p.decisions.values())
    d = p.decisions[IPS[0]]
    assert d.failback == "n1" and d.failback_at is None and "does not preempt" in d.reason
    action = p.next_action(0.0)
    assert action is not None and not action.acquire
    # The holder leaves: the IPs come to us after all.
    gone = ClusterSnapshot(local="n1", states={"n1": ALIVE, "n2": State.DEAD}, views={"n2": n2})
    p.observe(1.0, gone)
    assert all(d.owner == "n1" for d in p.decisions.values())


def test_a_move_override_beats_preempt_false() -> None:
    p = policy(config("n1", preempt=False))
    n2 = peer("n2", held=frozenset(IPS))
    p.observe(0.0, snap({"n2": n2}))
    p.request_move(IPS[0], "n1")
    p.observe(0.1, snap({"n2": n2}))
    assert p.decisions[IPS[0]].owner == "n1" and p.decisions[IPS[1]].owner == "n2"


def test_preempt_delay_yields_until_the_delay_after_becoming_a_candidate() -> None:
    p = ResolverPolicy(config=config("n1", delay=5.0), now=0.0, wall=1000.0, mature_after=1.0)
    assert p.view.yields == frozenset()  # not a candidate yet: nothing to yield
    n2 = peer("n2", held=frozenset(IPS))
    p.observe(1.0, snap({"n2": n2}))  # mature at 1.0: yields until 6.0
    assert p.view.yields == frozenset(IPS) and p.view.failback_at == 1000.0 + 6.0
    assert p.deadline(1.0) == 6.0
    assert p.decisions[IPS[0]].owner == "n2" and p.decisions[IPS[0]].failback_at == 1006.0
    p.observe(6.0, snap({"n2": n2}))
    assert p.view.yields == frozenset()
    assert p.decisions[IPS[0]].owner == "n1"  # preferred: it fails back now
    # Unhealthy and back: the delay starts again.
    p.set_eligibility(7.0, "unhealthy: link")
    p.set_eligibility(8.0, None)
    assert p.view.yields == frozenset(IPS) and p.deadline(8.0) == 13.0


def test_a_binding_overrides_the_cluster_preempt_setting() -> None:
    p = policy(config("n1", preempt=True, b1=Binding("b1", IPS[0], True, preempt=False)))
    assert p.view.yields == frozenset({IPS[0]})
    p2 = policy(config("n1", preempt=False, b1=Binding("b1", IPS[0], True, preempt=True)))
    assert p2.view.yields == frozenset(IPS[1:])


# ---------------------------------------------------------------- the decision pass

nodes = st.sampled_from(["n1", "n2", "n3", "n4"])


@st.composite
def clusters(draw: st.DrawFn) -> dict[str, NodeView]:
    names = sorted(draw(st.sets(nodes, min_size=1)))
    held_by = {ip: draw(st.none() | st.sampled_from(names)) for ip in IPS}
    out = {}
    for n in names:
        out[n] = peer(
            n,
            mature=draw(st.booleans()),
            held=frozenset(ip for ip, h in held_by.items() if h == n),
            yields=draw(st.frozensets(st.sampled_from(IPS))),
            overrides={IPS[1]: Override(draw(nodes), 1)} if draw(st.booleans()) else {},
        )
    return out


@settings(max_examples=300, deadline=None)
@given(clusters())
def test_the_pass_only_keeps_ips_with_a_live_candidate_holder(views: dict[str, NodeView]) -> None:
    alive = set(views)
    rule = resolve(views, alive)
    out = apply_preemption(rule, views, alive)
    for ip, d in out.items():
        r = rule[ip]
        if d == r:
            continue
        # Changed only for a yielding rule owner, never against an override,
        # and only to a candidate that holds the IP now.
        assert r.override is None and r.owner is not None and ip in views[r.owner].yields
        assert d.owner in r.candidates and ip in views[d.owner].held
        assert d.failback == r.owner
    # Deterministic, and a no-op without yields.
    assert apply_preemption(rule, views, alive) == out
    plain = {n: attrs.evolve(v, yields=frozenset()) for n, v in views.items()}
    assert apply_preemption(resolve(plain, alive), plain, alive) == resolve(plain, alive)


def test_a_drained_newcomer_is_not_waited_for_on_a_cold_start() -> None:
    p = policy(config("n1"))
    n2 = attrs.evolve(peer("n2"), mature=False, status="drained")
    p.observe(0.0, snap({"n2": n2}))
    action = p.next_action(0.0)
    assert action is not None and action.acquire == frozenset(IPS)
