"""NodeMetrics read from running nodes: the rendered series after real events.

Every value asserted here comes from a real election, SMTP session, gossip
exchange or failover between two in-process nodes (fake plumber), scraped
through the console's ``metrics`` command like an operator would.
"""

from __future__ import annotations

import re
import smtplib
from functools import partial

import trio

from duravip import config as cfg
from duravip.swim.crypto import Keyring
from duravip.swim.driver import serve as serve_membership

from .inproc import FOLLOW, VIP1, VIP2, Cluster, banner, cluster

__all__ = ["cluster"]

_SAMPLE = re.compile(r"^([a-z_]+(?:\{[^}]*\})?) (\S+)$")


async def scrape(c: Cluster, node: str) -> dict[str, float]:
    """``name{labels}`` -> value, from the node's ``metrics`` command."""
    reply = await c.console(node, "metrics")
    assert reply["ok"], reply
    text: str = reply["data"]["prometheus"]  # type: ignore[index]
    out: dict[str, float] = {}
    for line in text.splitlines():
        m = _SAMPLE.match(line)
        if m:
            out[m.group(1)] = float(m.group(2))
    return out


async def test_series_follow_the_election_sessions_and_a_failover(cluster: Cluster) -> None:
    with trio.fail_after(40):
        async with trio.open_nursery() as nursery:
            await nursery.start(cluster.run, "n1")
            await nursery.start(cluster.run, "n2")
            await cluster.wait_holders({VIP1: "n1", VIP2: "n2", FOLLOW: "n1"})
            m = await scrape(cluster, "n1")
            assert m['duravip_members{state="alive"}'] == 2
            assert m['duravip_members{state="dead"}'] == 0
            assert m["duravip_ips_configured"] == 3
            assert m["duravip_ips_held"] == 2  # VIP1 and the follow listener's IP
            assert m['duravip_election_total{counter="moves_in"}'] == 2
            assert m['duravip_election_total{counter="moves_out"}'] == 0
            assert m['duravip_election_total{counter="elections"}'] >= 1
            assert m["duravip_failover_seconds_count"] == 0  # nothing failed over yet
            assert m["duravip_views_dropped_total"] == 0
            # This scrape came over the control socket (the console's connection).
            assert m['duravip_control_total{counter="connections"}'] >= 1
            assert m.get('duravip_control_total{counter="refused_peer"}', 0) == 0
            assert m['duravip_swim_total{counter="msgs_recv"}'] > 0
            sessions = m.get('duravip_smtp_total{counter="sessions"}', 0)

            assert "n1" in await banner(VIP1, cluster.smtp_port)
            m = await scrape(cluster, "n1")
            assert m['duravip_smtp_total{counter="sessions"}'] == sessions + 1

            # n2 dies without a word; n1 takes VIP2 over: a failover with a latency.
            cluster.scopes["n2"].cancel()
            await cluster.wait_holders({VIP1: "n1", VIP2: "n1", FOLLOW: "n1"}, timeout=10)
            with trio.fail_after(5):
                while (m := await scrape(cluster, "n1"))["duravip_failover_seconds_count"] < 1:
                    await trio.sleep(0.05)
            assert m["duravip_failover_seconds_count"] == 1
            assert 0 < m["duravip_failover_seconds_sum"] < 10
            assert m['duravip_failover_seconds_bucket{le="+Inf"}'] == 1
            assert m["duravip_ips_held"] == 3
            assert m['duravip_election_total{counter="moves_in"}'] == 3
            assert m['duravip_members{state="alive"}'] == 1
            assert m['duravip_members{state="dead"}'] + m['duravip_members{state="suspect"}'] == 1
            assert m['duravip_swim_total{counter="suspected"}'] >= 1
            nursery.cancel_scope.cancel()


def _send(host: str, port: int) -> None:
    with smtplib.SMTP(host, port, timeout=5) as s:
        s.sendmail("a@example.org", ["b@example.net"], b"Subject: t\r\n\r\nhello\r\n")


async def test_a_received_message_shows_in_the_mail_and_queue_series(cluster: Cluster) -> None:
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            await nursery.start(cluster.run, "n1")
            await cluster.wait_holders({VIP1: "n1", VIP2: "n1"})
            before = await scrape(cluster, "n1")
            assert before['duravip_mail_total{counter="received"}'] == 0
            await trio.to_thread.run_sync(_send, str(VIP1), cluster.smtp_port)
            m = await scrape(cluster, "n1")
            assert m['duravip_mail_total{counter="received"}'] == 1
            assert m['duravip_smtp_total{counter="messages"}'] == 1
            queued = {k: v for k, v in m.items() if k.startswith("duravip_queue_messages") and v}
            # No smarthost in this config: the message stays queued.
            assert sum(queued.values()) == 1, queued
            nursery.cancel_scope.cancel()


async def test_an_undecodable_view_gossiped_by_a_peer_is_counted(cluster: Cluster) -> None:
    """A third member with the cluster key announces bytes that are no view."""
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            await nursery.start(cluster.run, "n1")
            await cluster.wait_holders({VIP1: "n1", VIP2: "n1"})
            assert (await scrape(cluster, "n1"))["duravip_views_dropped_total"] == 0
            c = cfg.load(cluster.paths["n1"])
            await nursery.start(
                partial(
                    serve_membership,
                    name="n3",
                    bind=("127.0.0.13", cluster.gossip_port),
                    cluster=c.cluster.name,
                    timers=c.cluster.timers,
                    keyring=Keyring.from_file(cluster.tmp / "keyring"),
                    seeds=[c.cluster.gossip_address.as_tuple()],
                    meta=b"certainly not a view",
                )
            )
            with trio.fail_after(10):
                while (m := await scrape(cluster, "n1"))["duravip_views_dropped_total"] < 1:
                    await trio.sleep(0.05)
            assert m['duravip_members{state="alive"}'] == 2  # n3 is a member, just no view
            # The node goes on serving: its own IPs are untouched.
            assert cluster.holders() == {VIP1: ["n1"], VIP2: ["n1"], FOLLOW: ["n1"]}
            nursery.cancel_scope.cancel()
