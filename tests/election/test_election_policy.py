"""The resolver's policy without trio: time is a number the test passes in."""

from __future__ import annotations

from ipaddress import IPv4Address

import pytest

from duravip.config import ClusterConfig, Config, DuraVip, HostPort
from duravip.election import NodeView, Override, build_view, resolve
from duravip.election.picture import ClusterSnapshot
from duravip.election.policy import BACKOFF_MAX, BACKOFF_MIN, ResolverPolicy
from duravip.swim.members import State

IPS = [IPv4Address(f"10.1.1.{i}") for i in range(1, 17)]
ALL = frozenset(IPS)
MATURE = 2.0
PATIENCE = 2 * MATURE + 1.0
ALIVE, DEAD = State.ALIVE, State.DEAD


def config(node: str, *, quorum: str = "none") -> Config:
    return Config(
        cluster=ClusterConfig(
            name="t",
            node_name=node,
            gossip_address=HostPort(IPv4Address("192.168.0.1"), 4801),
            view_mature_time=MATURE,
            quorum=quorum,  # type: ignore[arg-type]
        ),
        duravips={ip: DuraVip(ip=ip, listener_ports=(25,)) for ip in IPS},
    )


def peer(node: str, *, mature: bool = True, held: frozenset[IPv4Address] = frozenset(),
         overrides: dict[IPv4Address, Override] | None = None) -> NodeView:
    return build_view(config(node), version=1, mature=mature, held=held, overrides=overrides)


def snap(states: dict[str, State], views: dict[str, NodeView]) -> ClusterSnapshot:
    return ClusterSnapshot(local="n1", states={"n1": ALIVE, **states}, views=views)


def hash_owner(nodes: list[str]) -> dict[IPv4Address, str]:
    views = {n: peer(n) for n in nodes}
    return {ip: d.owner for ip, d in resolve(views, set(nodes)).items() if d.owner}


def mature_policy(now: float = 0.0) -> ResolverPolicy:
    p = ResolverPolicy(config=config("n1"), now=now, wall=1000.0, mature_after=0)
    p.take_views()
    return p


def test_immature_node_is_no_candidate_until_mature_after() -> None:
    p = ResolverPolicy(config=config("n1"), now=10.0, wall=1000.0, mature_after=MATURE)
    assert not p.mature and not p.view.mature
    assert p.deadline(10.0) == 10.0 + MATURE
    decisions = p.observe(10.0, snap({}, {}))
    assert all(d.owner is None for d in decisions.values())
    action = p.next_action(10.0)
    assert action is not None and not action.acquire and not action.release
    assert p.take_views() == []
    decisions = p.observe(10.0 + MATURE, snap({}, {}))
    assert p.mature
    published = p.take_views()
    assert [v.mature for v in published] == [True] and published[0].version == 1
    assert {d.owner for d in decisions.values()} == {"n1"}
    action = p.next_action(10.0 + MATURE)
    assert action is not None and action.acquire == ALL and not action.from_dead


def test_claim_is_announced_before_the_acquisition_and_held_after() -> None:
    p = mature_policy()
    p.observe(0.0, snap({}, {}))
    action = p.next_action(0.0)
    assert action is not None
    p.claim(action.acquire)
    (claimed,) = p.take_views()
    assert claimed.held == ALL and p.held == frozenset()
    assert p.acquired(0.5, action, action.acquire) == frozenset()
    (done,) = p.take_views()
    assert done.held == ALL and done.version == claimed.version + 1 and p.held == ALL
    assert p.stats.moves_in == len(IPS)
    # Free IPs: takeovers recorded, no latency (nobody died).
    assert [t.latency for t in p.stats.recent] == [None] * len(IPS)


def test_free_ips_a_maturing_newcomer_will_own_are_deferred_until_its_patience_ends() -> None:
    p = mature_policy()
    theirs = {ip for ip, n in hash_owner(["n1", "n2"]).items() if n == "n2"}
    assert theirs and theirs != ALL
    s = snap({"n2": ALIVE}, {"n2": peer("n2", mature=False)})
    p.observe(0.0, s)
    action = p.next_action(0.0)
    assert action is not None and action.acquire == ALL - theirs
    assert p.deadline(0.0) == PATIENCE
    # The newcomer never matured: after its patience the others stop waiting.
    p.observe(PATIENCE, s)
    action = p.next_action(PATIENCE)
    assert action is not None and action.acquire == ALL


def test_a_stopping_peer_is_not_waited_for_as_a_maturing_newcomer() -> None:
    # The peer's own view says "stopping" once its graceful stop begins...
    n2 = ResolverPolicy(config=config("n2"), now=0.0, wall=1000.0, mature_after=0)
    n2.begin_stop()
    (stopping,) = n2.take_views()[-1:]
    assert not stopping.mature and stopping.status == "stopping"
    # ...so n1, inside n2's cold-start patience, takes n2's IPs at once.
    p = mature_policy()
    p.observe(0.0, snap({"n2": ALIVE}, {"n2": stopping}))
    action = p.next_action(0.0)
    assert action is not None and action.acquire == ALL
    assert p.deadline(0.0) != PATIENCE


def test_ips_of_a_dead_holder_are_never_deferred() -> None:
    p = mature_policy()
    owners = hash_owner(["n1", "n2"])
    theirs = frozenset(ip for ip, n in owners.items() if n == "n2")
    s = snap({"n2": ALIVE, "n3": DEAD}, {"n2": peer("n2", mature=False), "n3": peer("n3", held=theirs)})
    p.observe(0.0, s)
    action = p.next_action(0.0)
    assert action is not None and action.acquire == ALL
    assert dict(action.from_dead) == dict.fromkeys(theirs, "n3")


def test_backoff_doubles_up_to_the_cap_and_resets_on_success() -> None:
    p = mature_policy()
    p.observe(0.0, snap({}, {}))
    delays = [p.failed(0.0) for _ in range(8)]
    assert delays[:3] == [BACKOFF_MIN, 2 * BACKOFF_MIN, 4 * BACKOFF_MIN]
    assert max(delays) == BACKOFF_MAX and delays[-1] == BACKOFF_MAX
    assert p.stats.actuator_failures == 8
    assert p.next_action(BACKOFF_MAX - 0.01) is None
    assert p.deadline(1.0) == BACKOFF_MAX
    assert p.next_action(BACKOFF_MAX) is not None
    p.succeeded()
    assert p.failed(10.0) == BACKOFF_MIN


def test_failed_acquire_leaves_uncertain_ips_released_once_owned_elsewhere() -> None:
    p = mature_policy()
    p.observe(0.0, snap({}, {}))
    action = p.next_action(0.0)
    assert action is not None
    p.claim(action.acquire)
    p.acquire_failed(action.acquire)
    assert p.take_views()[-1].held == frozenset()  # the claim is withdrawn
    p.failed(0.0)
    # n2 arrives mature: IPs it owns now are stray here (maybe half plumbed).
    theirs = frozenset(ip for ip, n in hash_owner(["n1", "n2"]).items() if n == "n2")
    p.observe(1.0, snap({"n2": ALIVE}, {"n2": peer("n2")}))
    again = p.next_action(1.0)
    assert again is not None and again.release == theirs and again.moves_out == frozenset()
    p.released(again)
    assert p.stats.moves_out == 0


def test_partial_acquire_reports_what_it_missed() -> None:
    p = mature_policy()
    p.observe(0.0, snap({}, {}))
    action = p.next_action(0.0)
    assert action is not None
    got = frozenset(IPS[:4])
    assert p.acquired(0.1, action, got) == ALL - got
    assert p.held == got
    # The missed IPs are uncertain: those another node owns later are released
    # (they may be half plumbed), without counting as moves out.
    p.observe(0.2, snap({"n2": ALIVE}, {"n2": peer("n2")}))
    again = p.next_action(0.2)
    assert again is not None
    owners = hash_owner(["n1", "n2"])
    assert again.release - again.moves_out == {ip for ip in ALL - got if owners[ip] == "n2"}
    assert again.moves_out == {ip for ip in got if owners[ip] == "n2"}


def test_takeover_latency_runs_from_the_snapshot_that_showed_the_holder_gone() -> None:
    p = mature_policy()
    theirs = frozenset(IPS)
    p.observe(0.0, snap({"n2": ALIVE}, {"n2": peer("n2", held=theirs)}))
    p.snapshot_seen(10.0)
    p.observe(10.2, snap({"n2": DEAD}, {"n2": peer("n2", held=theirs)}))
    action = p.next_action(10.2)
    assert action is not None and action.acquire == ALL
    p.acquired(10.5, action, action.acquire)
    assert {t.from_node for t in p.stats.recent} == {"n2"}
    assert [round(t.latency or 0, 6) for t in p.stats.recent] == [0.5] * len(IPS)
    assert list(p.stats.takeover_latencies) == pytest.approx([0.5] * len(IPS))


def test_move_override_outbids_every_seq_seen_and_drops_when_its_target_dies() -> None:
    p = mature_policy()
    ip = IPS[0]
    n3 = peer("n3", overrides={ip: Override("n3", 5)})
    p.observe(0.0, snap({"n2": ALIVE, "n3": ALIVE}, {"n2": peer("n2"), "n3": n3}))
    p.request_move(ip, "n2")
    (moved,) = p.take_views()
    assert moved.overrides == {ip: Override("n2", 6)}
    decisions = p.observe(0.1, snap({"n2": ALIVE, "n3": ALIVE}, {"n2": peer("n2"), "n3": n3}))
    assert decisions[ip].owner == "n2"
    p.request_move(ip, "n1")
    assert p.take_views()[-1].overrides == {ip: Override("n1", 7)}
    # The target leaves: the override goes (a new view without it).
    p.request_move(ip, "n2")
    p.take_views()
    p.observe(0.2, snap({"n2": DEAD, "n3": ALIVE}, {"n2": peer("n2"), "n3": n3}))
    assert p.take_views()[-1].overrides == {}


def test_announce_and_reload_drop_overrides_and_bump_the_version() -> None:
    p = mature_policy()
    p.request_move(IPS[0], "n2")
    v1 = p.take_views()[-1]
    p.announce()
    v2 = p.take_views()[-1]
    assert v2.overrides == {} and v2.version == v1.version + 1
    p.request_move(IPS[0], "n2")
    p.set_config(config("n1"), wall=2000.0)
    v3 = p.take_views()[-1]
    assert v3.overrides == {} and v3.config_stable_since == 2000.0 and v3.booted_at == 1000.0
    with pytest.raises(ValueError):
        p.set_config(config("n9"), wall=2001.0)


def test_majority_quorum_deadline_and_no_owner_without_quorum() -> None:
    p = ResolverPolicy(config=config("n1", quorum="majority"), now=0.0, wall=0.0, mature_after=0)
    s = snap({"n2": ALIVE}, {"n2": peer("n2")})
    p.observe(0.0, s)
    assert p.deadline(0.0) == MATURE  # when n2 becomes a stable member
    p.observe(MATURE, s)
    p.observe(MATURE + 1, snap({"n2": DEAD}, {"n2": peer("n2")}))
    decisions = p.decisions
    assert all(d.owner is None and "no quorum" in d.reason for d in decisions.values())


def test_graceful_stop_withdraws_candidacy_and_releases_everything() -> None:
    p = mature_policy()
    p.observe(0.0, snap({}, {}))
    action = p.next_action(0.0)
    assert action is not None
    p.acquired(0.1, action, frozenset(IPS[:10]))  # 6 IPs left uncertain
    p.take_views()
    p.begin_stop()
    assert p.take_views()[-1].mature is False and p.stopping
    p.observe(0.2, snap({}, {}))
    assert p.next_action(0.2) is None
    todo = p.to_release_on_stop()
    assert todo == ALL
    p.stopped(todo, frozenset())
    assert p.held == frozenset() and p.take_views()[-1].held == frozenset()
    assert p.stats.moves_out == 10


def test_a_withdrawn_ip_is_no_longer_announced_and_is_released_to_a_peer() -> None:
    p = mature_policy()
    p.observe(0.0, snap({}, {}))
    action = p.next_action(0.0)
    assert action is not None
    p.acquired(0.1, action, action.acquire)
    p.take_views()
    ip = IPS[0]
    p.withdraw(ip)
    (view,) = p.take_views()
    assert ip not in view.vips and set(view.vips) == ALL - {ip} and ip in view.held
    decisions = p.observe(0.2, snap({"n2": ALIVE}, {"n2": peer("n2")}))
    assert decisions[ip].owner == "n2"
    again = p.next_action(0.2)
    assert again is not None and ip in again.release and ip in again.moves_out
    p.withdraw(ip)  # already withdrawn: no new view
    p.withdraw(IPv4Address("192.0.2.1"))  # not ours: ignored
    assert p.take_views() == []
    # Alone, nobody else can serve it: it is released all the same.
    q = mature_policy()
    q.observe(0.0, snap({}, {}))
    first = q.next_action(0.0)
    assert first is not None
    q.acquired(0.1, first, first.acquire)
    q.withdraw(ip)
    assert q.observe(0.2, snap({}, {})).get(ip) is None
    last = q.next_action(0.2)
    assert last is not None and last.release == {ip}
    # A reload (or announce) announces it again.
    q.set_config(config("n1"), wall=5.0)
    assert ip in q.take_views()[-1].vips
