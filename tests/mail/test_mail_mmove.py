"""mmove between two MailService instances on 127.0.0.1 / 127.0.0.2."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest
import trio
import trio.testing
from hypothesis import given
from hypothesis import strategies as st

from duravip.config.model import Config, HostPort
from duravip.mail import mmove_auth as auth
from duravip.mail import mmove_resolve
from duravip.mail.mmove import client_preamble, server_preamble
from duravip.mail.mmove_crypto import OVERHEAD
from duravip.mail.router import MailqRow
from duravip.mail.service import MailService, serve

from .conftest import Recorder, closed_port, envelope, mail_config

Keys = Callable[[], list[bytes]]


async def _until(pred: Callable[[], bool]) -> None:
    while not pred():
        await trio.sleep(0.01)


async def _start(nursery: trio.Nursery, cfg: Config, node: str, keys: Keys) -> MailService:
    svc: MailService = await nursery.start(
        lambda task_status: serve(
            config=cfg, node_name=node, keyring_keys=keys, task_status=task_status
        )
    )
    return svc


class Pair:
    def __init__(self, a: MailService, b: MailService) -> None:
        self.a, self.b = a, b

    def holders(self, mapping: dict[str, str | None]) -> None:
        a, b = self.a.cluster_address, self.b.cluster_address
        assert a is not None and b is not None
        peers = {"n1": a, "n2": b}
        self.a.set_holders(mapping, local="n1", peers=peers)
        self.b.set_holders(mapping, local="n2", peers=peers)


async def _pair(
    nursery: trio.Nursery,
    tmp: Path,
    keys_a: Keys,
    keys_b: Keys,
    smarthost_a: HostPort | None,
    smarthost_b: HostPort | None,
    **kw: object,
) -> Pair:
    a = await _start(
        nursery,
        mail_config(tmp / "a", node="n1", smarthost=smarthost_a, cluster_ip="127.0.0.1", **kw),
        "n1",
        keys_a,
    )
    b = await _start(
        nursery,
        mail_config(tmp / "b", node="n2", smarthost=smarthost_b, cluster_ip="127.0.0.2", **kw),
        "n2",
        keys_b,
    )
    return Pair(a, b)


async def test_move_then_delivery_from_the_holder(
    tmp_path: Path, smarthost: tuple[HostPort, Recorder], keys: Keys
) -> None:
    addr, rec = smarthost
    with trio.fail_after(20):
        async with trio.open_nursery() as n:
            p = await _pair(n, tmp_path, keys, keys, closed_port(), addr)
            p.holders({"b1": "n2", "ga": None, "gb": None})
            for _ in range(5):
                await p.a.sink.accept(envelope("b1", rcpt=3))
            await rec.wait_for(5)
            await _until(lambda: len(p.a.spool) == 0 and len(p.b.spool) == 0)
            n.cancel_scope.cancel()
    assert {m.peer[0] for m in rec.messages} == {"127.0.0.2"}
    assert all(len(m.rcpt_to) == 3 for m in rec.messages)
    assert p.a.counters["mmove_sent"] == 5 and p.b.counters["mmove_received"] == 5
    assert p.b.counters["mmove_dup"] == 0


async def test_wrong_key_is_refused(tmp_path: Path, keys: Keys) -> None:
    other = [os.urandom(32)]
    with trio.fail_after(20):
        async with trio.open_nursery() as n:
            p = await _pair(
                n, tmp_path, keys, lambda: other, closed_port(), closed_port(), retry_base=5.0
            )
            p.holders({"b1": "n2", "ga": None, "gb": None})
            await p.a.sink.accept(envelope("b1"))
            await _until(lambda: p.b.counters["mmove_auth_failed"] >= 1)
            await _until(lambda: p.a.counters["mmove_failed"] >= 1)
            assert len(p.a.spool) == 1 and len(p.b.spool) == 0
            assert MailqRow("default", "#mmove", 0, 1) in p.a.mailq()
            n.cancel_scope.cancel()


async def test_key_rotation_receiver_tries_every_key(tmp_path: Path, keys: Keys) -> None:
    both = [os.urandom(32), keys()[0]]  # receiver's primary differs; sender's key is second
    with trio.fail_after(20):
        async with trio.open_nursery() as n:
            p = await _pair(
                n, tmp_path, keys, lambda: both, closed_port(), closed_port(), retry_base=5.0
            )
            p.holders({"b1": "n2", "ga": None, "gb": None})
            sent = envelope("b1")
            await p.a.sink.accept(sent)
            await _until(lambda: p.b.counters["mmove_received"] == 1)
            # The message arrived intact: same envelope, byte-identical body.
            (moved,) = list(p.b.spool.iter())
            assert moved.mail_from == sent.mail_from and moved.rcpt_to == sent.rcpt_to
            assert p.b.spool.read_data(moved.id) == sent.data
            n.cancel_scope.cancel()
    # The sender's key is the receiver's second one, and that is the one that worked.
    assert p.b.counters["mmove_auth_secondary"] == 1
    assert p.b.counters.get("mmove_auth_primary", 0) == 0
    assert p.b.counters.get("mmove_auth_failed", 0) == 0


@pytest.fixture
def fast_resolve(monkeypatch: pytest.MonkeyPatch) -> None:
    """Pending copies are asked about after 0.3 s (instead of 5 s), looked for every 0.1 s."""
    monkeypatch.setattr(mmove_resolve, "RESOLVE_AFTER", 0.3)
    monkeypatch.setattr(mmove_resolve, "RESOLVE_INTERVAL", 0.1)


async def test_retry_after_lost_reply_is_delivered_once(
    tmp_path: Path, smarthost: tuple[HostPort, Recorder], keys: Keys, fast_resolve: None
) -> None:
    """A 250 lost after the pending store: the retry is a new attempt (new transfer id)
    that is committed; the first pending copy is resolved with the sender: aborted."""
    addr, rec = smarthost
    with trio.fail_after(20):
        async with trio.open_nursery() as n:
            p = await _pair(n, tmp_path, keys, keys, closed_port(), addr)
            dropped: list[str] = []

            def fault(key: str) -> bool:
                if dropped:
                    return False
                dropped.append(key)
                return True

            p.b.receiver.fault_after_store = fault
            p.holders({"b1": "n2", "ga": None, "gb": None})
            qid = await p.a.sink.accept(envelope("b1"))
            await _until(lambda: len(p.a.spool) == 0)
            await rec.wait_for(1)
            await _until(lambda: len(p.b.spool) == 0)
            await trio.sleep(0.2)  # give a duplicate the chance to show up
            n.cancel_scope.cancel()
    assert len(dropped) == 1 and len(dropped[0]) == 22 and qid not in dropped[0]
    assert p.a.counters["mmove_failed"] >= 1
    assert p.b.counters["mmove_received"] == 2
    assert p.b.counters["mmove_committed"] == 1 and p.b.counters["mmove_aborted"] == 1
    assert len(rec.messages) == 1


async def test_whole_queue_follows_a_binding_move(
    tmp_path: Path, smarthost: tuple[HostPort, Recorder], keys: Keys
) -> None:
    addr, rec = smarthost
    with trio.fail_after(20):
        async with trio.open_nursery() as n:
            # n1 holds b1 but cannot reach its smarthost: the queue builds up there.
            p = await _pair(n, tmp_path, keys, keys, closed_port(), addr, retry_base=5.0)
            p.holders({"b1": "n1", "ga": None, "gb": None})
            for _ in range(20):
                await p.a.sink.accept(envelope("b1"))
            await _until(lambda: p.a.counters["deferred"] >= 20)
            assert p.a.mailq()[1] == MailqRow("default", "b1", 0, 20)
            p.holders({"b1": "n2", "ga": None, "gb": None})
            await rec.wait_for(20)
            await _until(lambda: len(p.a.spool) == 0 and len(p.b.spool) == 0)
            n.cancel_scope.cancel()
    assert {m.peer[0] for m in rec.messages} == {"127.0.0.2"}
    assert p.a.counters["mmove_sent"] == 20


async def test_group_rebind_moves_to_the_new_member_holder(
    tmp_path: Path, smarthost: tuple[HostPort, Recorder], keys: Keys
) -> None:
    addr, rec = smarthost
    with trio.fail_after(20):
        async with trio.open_nursery() as n:
            p = await _pair(n, tmp_path, keys, keys, closed_port(), addr, retry_base=5.0)
            # n1 holds ga (unreachable smarthost), so pool mail is assigned to ga and sits there.
            p.holders({"b1": None, "ga": "n1", "gb": None})
            for _ in range(4):
                await p.a.sink.accept(envelope("pool"))
            assert {m.binding for m in p.a.spool.iter()} == {"ga"}
            # ga vanishes, gb appears on n2: unconditional rebind re-resolves the group.
            p.holders({"b1": None, "ga": None, "gb": "n2"})
            await rec.wait_for(4)
            n.cancel_scope.cancel()
    assert {m.peer[0] for m in rec.messages} == {"127.0.0.4"}


async def test_hand_over_on_shutdown(tmp_path: Path, keys: Keys) -> None:
    with trio.fail_after(20):
        async with trio.open_nursery() as n:
            p = await _pair(
                n,
                tmp_path,
                keys,
                keys,
                closed_port(),
                closed_port(),
                retry_base=30.0,
                retry_max=30.0,
            )
            # Peers unknown at first: the messages wait under #mmove.
            p.a.set_holders(
                {"b1": "n2", "ga": None, "gb": None}, local="n1", peers={"n2": closed_port()}
            )
            for _ in range(10):
                await p.a.sink.accept(envelope("b1"))
            await _until(lambda: p.a.counters["mmove_failed"] >= 1)
            assert len(p.a.spool) == 10
            # The real address appears, but the backoff (30 s) holds the scheduler back.
            assert p.b.cluster_address is not None
            p.a.peers["n2"] = p.b.cluster_address
            await p.a.hand_over(5.0)
            assert len(p.a.spool) == 0
            assert len(p.b.spool) == 10
            n.cancel_scope.cancel()


async def test_preamble_round_trip_and_refusal() -> None:
    key = os.urandom(32)
    with trio.fail_after(5):
        a, b = trio.testing.memory_stream_pair()
        out: dict[str, int] = {}

        async def server() -> None:
            sealed, out["index"] = await server_preamble(a, [os.urandom(16), key], "c1")
            await sealed.send_all(b"220 hi\r\n")

        async with trio.open_nursery() as n:
            n.start_soon(server)
            client = await client_preamble(b, key, "c1")
            got = bytes(await client.receive_some(100))
        assert got == b"220 hi\r\n" and out["index"] == 1  # the second key worked

        a, b = trio.testing.memory_stream_pair()
        server_failed: list[str] = []

        async def wrong_cluster_server() -> None:
            try:
                await server_preamble(a, [key], "other-cluster")
            except auth.AuthError as exc:
                server_failed.append(str(exc))

        async with trio.open_nursery() as n:
            n.start_soon(wrong_cluster_server)
            with pytest.raises(auth.AuthError, match="refused"):
                await client_preamble(b, key, "c1")
        assert server_failed == ["no key matches"]


async def test_after_the_preamble_only_sealed_frames_cross() -> None:
    """The banner and everything after it are AES-GCM frames, not SMTP text."""
    key = os.urandom(32)
    with trio.fail_after(5):
        a, b = trio.testing.memory_stream_pair()

        async def server() -> None:
            sealed, _ = await server_preamble(a, [key], "c1")
            await sealed.send_all(b"220 n2 ESMTP duravip\r\n")

        async with trio.open_nursery() as n:
            n.start_soon(server)
            line = b""
            while line.count(b"\r\n") < 1:
                line += await b.receive_some(1)
            reply, nonce_s, nonce_c = auth.client_response(line[:-2], key, "c1")
            await b.send_all(reply)
            banner = b"220 n2 ESMTP duravip\r\n"
            want = 64 + 2 + len(banner) + OVERHEAD  # the proof line, then one frame
            raw = b""
            while len(raw) < want:
                chunk = await b.receive_some(4096)
                assert chunk
                raw += chunk
        assert len(raw) == want
        proof, sealed_bytes = raw[:64], raw[66:]
        auth.client_verify(proof, key, nonce_s, nonce_c, "c1")
        assert sealed_bytes and b"ESMTP" not in sealed_bytes and b"220" not in sealed_bytes


async def test_wire_version_mismatch_is_a_clean_auth_error() -> None:
    """A v1 (plaintext) receiver: the sender refuses at the banner, it does not hang."""
    with trio.fail_after(5):
        a, b = trio.testing.memory_stream_pair()
        await a.send_all(b"DVMMOVE1 " + auth.new_nonce().encode() + b"\r\n")
        with pytest.raises(auth.AuthError, match="version"):
            await client_preamble(b, os.urandom(32), "c1")
    assert auth.server_challenge(auth.new_nonce()).startswith(b"DVMMOVE2 ")


def test_auth_rejects_replay_and_reflection() -> None:
    key = os.urandom(32)
    nonce_s = auth.new_nonce()
    line, ns, nc = auth.client_response(auth.server_challenge(nonce_s), key, "c")
    proof = auth.server_verify(line, nonce_s, [key], "c")
    auth.client_verify(proof, key, ns, nc, "c")
    # The same answer to a fresh challenge fails (replay).
    with pytest.raises(auth.AuthError):
        auth.server_verify(line, auth.new_nonce(), [key], "c")
    # The server's proof is not a valid client proof (reflection): direction tag differs.
    with pytest.raises(auth.AuthError):
        auth.server_verify(nc.encode() + b" " + proof.strip(), nonce_s, [key], "c")
    # No key material on the wire.
    assert key.hex().encode() not in line + proof


@given(st.text(max_size=40))
def test_xtext_round_trip(value: str) -> None:
    enc = auth.xtext_encode(value)
    assert all(33 <= ord(c) <= 126 and c != "=" for c in enc)
    assert auth.xtext_decode(enc) == value


# ------------------------------------------------- a man in the middle (issue 14)


class TamperProxy:
    """A TCP relay between a sender and a receiver's listener that flips one byte.

    ``c2s_at``: flip byte number N the sender sends after its preamble line.
    ``s2c_after``: flip the first byte the receiver sends once the sender has sent
    more than N bytes after its preamble line (with a big body: the final ``250``).
    Every connection is tampered with the same way; ``connections`` counts them.
    """

    def __init__(
        self, target: HostPort, *, c2s_at: int | None = None, s2c_after: int | None = None
    ) -> None:
        self.target = target
        self.c2s_at = c2s_at
        self.s2c_after = s2c_after
        self.connections = 0
        self.flipped = 0

    async def handle(self, client: trio.SocketStream) -> None:
        self.connections += 1
        server = await trio.open_tcp_stream(str(self.target.host), self.target.port)
        state = {"line": b"", "sent": -1, "s2c_done": False}

        def c2s(chunk: bytes) -> bytes:
            out = bytearray(chunk)
            start = 0
            if state["sent"] < 0:  # still inside the preamble line
                state["line"] += chunk
                i = state["line"].find(b"\r\n")
                if i < 0:
                    return chunk
                start = len(chunk) - (len(state["line"]) - i - 2)
                state["sent"] = 0
            for j in range(start, len(out)):
                if self.c2s_at is not None and state["sent"] == self.c2s_at:
                    out[j] ^= 0x01
                    self.flipped += 1
                state["sent"] += 1
            return bytes(out)

        def s2c(chunk: bytes) -> bytes:
            if self.s2c_after is None or state["s2c_done"] or state["sent"] <= self.s2c_after:
                return chunk
            state["s2c_done"] = True
            self.flipped += 1
            return bytes([chunk[0] ^ 0x01]) + chunk[1:]

        async def pump(
            src: trio.SocketStream, dst: trio.SocketStream, f: Callable[[bytes], bytes]
        ) -> None:
            try:
                while chunk := await src.receive_some(65536):
                    await dst.send_all(f(bytes(chunk)))
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass

        async with server, trio.open_nursery() as n:

            async def one_way(
                src: trio.SocketStream, dst: trio.SocketStream, f: Callable[[bytes], bytes]
            ) -> None:
                await pump(src, dst, f)
                n.cancel_scope.cancel()  # one side gone: end the relay

            n.start_soon(one_way, client, server, c2s)
            n.start_soon(one_way, server, client, s2c)


async def _proxy(nursery: trio.Nursery, proxy: TamperProxy) -> HostPort:
    from functools import partial
    from ipaddress import IPv4Address

    listeners = await nursery.start(partial(trio.serve_tcp, proxy.handle, 0, host="127.0.0.1"))
    return HostPort(IPv4Address("127.0.0.1"), listeners[0].socket.getsockname()[1])


BIG_BODY = b"".join(b"line %04d of a moved message body\r\n" % i for i in range(120))  # ~4.3 KB


async def test_mitm_flipping_a_byte_of_the_body_fails_the_move_and_the_sender_keeps_it(
    tmp_path: Path, keys: Keys
) -> None:
    with trio.fail_after(20):
        async with trio.open_nursery() as n:
            p = await _pair(n, tmp_path, keys, keys, closed_port(), closed_port(), retry_base=5.0)
            a_addr, b_addr = p.a.cluster_address, p.b.cluster_address
            assert a_addr is not None and b_addr is not None
            proxy = TamperProxy(b_addr, c2s_at=2000)  # inside the DATA frame
            via = await _proxy(n, proxy)
            mapping: dict[str, str | None] = {"b1": "n2", "ga": None, "gb": None}
            p.b.set_holders(mapping, local="n2", peers={"n1": a_addr, "n2": b_addr})
            p.a.set_holders(mapping, local="n1", peers={"n1": a_addr, "n2": via})
            sent = envelope("b1", body=BIG_BODY)
            await p.a.sink.accept(sent)
            await _until(lambda: p.a.counters["mmove_failed"] >= 1)
            assert proxy.flipped >= 1
            # The receiver refused the frame, stored nothing; the sender still has it.
            assert p.b.counters.get("mmove_frame_rejected", 0) >= 1
            assert len(p.b.spool) == 0 and p.b.counters["mmove_received"] == 0
            assert len(p.a.spool) == 1 and p.a.counters["mmove_sent"] == 0
            # Without the attacker, the same message moves, byte-identical.
            p.a.set_holders(mapping, local="n1", peers={"n1": a_addr, "n2": b_addr})
            await p.a.hand_over(5.0)
            await _until(lambda: p.b.counters["mmove_received"] == 1)
            (moved,) = list(p.b.spool.iter())
            assert p.b.spool.read_data(moved.id) == sent.data
            assert moved.mail_from == sent.mail_from and moved.rcpt_to == sent.rcpt_to
            n.cancel_scope.cancel()
    assert len(p.a.spool) == 0


async def test_mitm_flipping_a_byte_of_the_250_keeps_the_message_at_the_sender(
    tmp_path: Path, keys: Keys, fast_resolve: None
) -> None:
    """The receiver stored it pending, but the sender never saw an intact 250: it keeps
    its copy; the retry is a new attempt, committed, and the first pending copy is
    aborted by the sender when asked (exactly one live copy at the end)."""
    with trio.fail_after(20):
        async with trio.open_nursery() as n:
            p = await _pair(n, tmp_path, keys, keys, closed_port(), closed_port(), retry_base=5.0)
            a_addr, b_addr = p.a.cluster_address, p.b.cluster_address
            assert a_addr is not None and b_addr is not None
            proxy = TamperProxy(b_addr, s2c_after=3000)
            via = await _proxy(n, proxy)
            mapping: dict[str, str | None] = {"b1": "n2", "ga": None, "gb": None}
            p.b.set_holders(mapping, local="n2", peers={"n1": a_addr, "n2": b_addr})
            p.a.set_holders(mapping, local="n1", peers={"n1": a_addr, "n2": via})
            await p.a.sink.accept(envelope("b1", body=BIG_BODY))
            await _until(lambda: p.a.counters["mmove_failed"] >= 1)
            assert proxy.flipped == 1
            assert p.a.counters.get("mmove_frame_rejected", 0) == 1
            assert len(p.a.spool) == 1 and p.a.counters["mmove_sent"] == 0
            p.a.set_holders(mapping, local="n1", peers={"n1": a_addr, "n2": b_addr})
            await p.a.hand_over(5.0)
            await _until(lambda: len(p.a.spool) == 0)
            await _until(lambda: p.b.counters["mmove_aborted"] == 1)
            n.cancel_scope.cancel()
    assert p.b.counters["mmove_received"] == 2 and p.b.counters["mmove_committed"] == 1
    (kept,) = list(p.b.spool.iter())
    assert kept.pending is None


async def test_a_lost_commit_is_resolved_by_asking_the_sender(
    tmp_path: Path, smarthost: tuple[HostPort, Recorder], keys: Keys, fast_resolve: None
) -> None:
    """The sender removed its copy (commit point) but its confirmation never left:
    the receiver's copy stays pending (shown by mailq, not delivered) until the
    receiver asks and the sender answers "committed"."""
    from duravip.mail import transfer_state as ts
    from duravip.mail.mmove import MoveFailed
    from duravip.mail.router import PENDING

    addr, rec = smarthost
    seen_pending: list[MailqRow] = []
    with trio.fail_after(20):
        async with trio.open_nursery() as n:
            p = await _pair(n, tmp_path, keys, keys, closed_port(), addr)

            def fault(point: str, _key: str) -> None:
                if point == ts.SEND_BEFORE_COMMIT:
                    seen_pending.extend(r for r in p.b.mailq() if r.binding == PENDING)
                    raise MoveFailed("confirmation lost")

            p.a.transfers.fault = fault
            p.holders({"b1": "n2", "ga": None, "gb": None})
            await p.a.sink.accept(envelope("b1"))
            await rec.wait_for(1)
            await _until(lambda: len(p.b.spool) == 0)
            n.cancel_scope.cancel()
    assert [(r.active, r.age >= 0) for r in seen_pending] == [(1, True)]
    assert len(p.a.spool) == 0 and p.b.counters["mmove_committed"] == 1
    assert len(rec.messages) == 1
