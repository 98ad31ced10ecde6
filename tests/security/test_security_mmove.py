"""Hostile input to the mmove preamble never takes a node down (issue 17).

No key is needed for any of these: the attacker only reaches the
``ECCluster_Listener`` port (server side) or impersonates a peer's listener
(client side). Each malformed preamble must end as an ``AuthError``: counted,
connection closed, the listener still serving.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Awaitable, Callable, Iterator
from functools import partial
from ipaddress import IPv4Address
from pathlib import Path

import pytest
import trio
from hypothesis import given, settings
from hypothesis import strategies as st

from duravip.config.model import HostPort, SmtpLimits
from duravip.mail import mmove
from duravip.mail import mmove_auth as auth
from duravip.mail.mmove import MoveFailed, Receiver, client_preamble, move_batch, serve_listener
from duravip.mail.spool import NewMessage, Spool
from duravip.smtp.types import Envelope, PermanentFailure

CLUSTER = "sec"
KEY = os.urandom(32)
NONCE = "ab" * auth.NONCE_BYTES
HEX = "0123456789abcdef"


# ------------------------------------------------------------ pure functions


def test_non_ascii_byte_in_the_mac_is_an_auth_error() -> None:
    nonce_c = "cd" * auth.NONCE_BYTES
    line = nonce_c.encode() + b" " + b"\xff" + b"0" * 63
    with pytest.raises(auth.AuthError):
        auth.server_verify(line, NONCE, [KEY], CLUSTER)


def test_non_ascii_byte_in_the_server_proof_is_an_auth_error() -> None:
    with pytest.raises(auth.AuthError):
        auth.client_verify(b"\xe9" * 64, KEY, NONCE, "cd" * auth.NONCE_BYTES, CLUSTER)


@pytest.mark.parametrize(
    "line",
    [
        b"",
        b" ",
        b"\x00",
        b"cd" * 32,  # missing MAC
        b"cd" * 32 + b" ",  # empty MAC
        b"cd" * 32 + b" " + b"0" * 63,  # MAC one short
        b"cd" * 32 + b" " + b"0" * 65,  # MAC one long
        b"cd" * 32 + b" " + b"G" * 64,  # not hex
        b"CD" * 32 + b" " + b"0" * 64,  # upper-case nonce
        b"cd" * 32 + b"  " + b"0" * 64,  # two spaces
        b"cd" * 32 + b" " + b"0" * 64 + b" extra",
        "é".encode() * 32 + b" " + b"0" * 64,
        b"\xff" * 64 + b" " + b"\xff" * 64,
    ],
)
def test_malformed_responses_are_auth_errors(line: bytes) -> None:
    with pytest.raises(auth.AuthError):
        auth.server_verify(line, NONCE, [KEY], CLUSTER)


@pytest.mark.parametrize(
    "line",
    [b"", b"DVMMOVE1", b"DVMMOVE1 ", b"DVMMOVE1 \xff", b"DVMMOVE1 " + b"\xff" * 64, b"x y z"],
)
def test_malformed_challenges_are_auth_errors(line: bytes) -> None:
    with pytest.raises(auth.AuthError):
        auth.client_response(line, KEY, CLUSTER)


_preamble_bytes = st.one_of(
    st.binary(max_size=300),
    # Shaped like a real response, with arbitrary bytes where the fields go.
    st.builds(
        lambda a, b: a + b" " + b,
        st.binary(min_size=60, max_size=68),
        st.binary(min_size=60, max_size=68),
    ),
    st.builds(
        lambda a, b: a.encode() + b" " + b,
        st.text(HEX, min_size=64, max_size=64),
        st.binary(min_size=64, max_size=64),
    ),
)


@settings(max_examples=300, deadline=None)
@given(_preamble_bytes)
def test_any_response_line_is_accepted_or_an_auth_error(line: bytes) -> None:
    with contextlib.suppress(auth.AuthError):
        auth.server_verify(line, NONCE, [KEY, os.urandom(32)], CLUSTER)


@settings(max_examples=300, deadline=None)
@given(_preamble_bytes)
def test_any_proof_or_challenge_is_an_auth_error(line: bytes) -> None:
    with pytest.raises(auth.AuthError):
        auth.client_verify(line, KEY, NONCE, "cd" * auth.NONCE_BYTES, CLUSTER)
    with contextlib.suppress(auth.AuthError):
        auth.client_response(line, KEY, CLUSTER)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=2 * auth.MAX_LINE + 10))
def test_split_line_returns_a_line_none_or_an_auth_error(buf: bytes) -> None:
    try:
        got = auth.split_line(buf)
    except auth.AuthError:
        return
    if got is not None:
        assert len(got[0]) <= auth.MAX_LINE


def test_the_real_handshake_still_works() -> None:
    challenge = auth.server_challenge(NONCE)
    reply, nonce_s, nonce_c = auth.client_response(challenge.rstrip(b"\r\n"), KEY, CLUSTER)
    proof = auth.server_verify(reply.rstrip(b"\r\n"), nonce_s, [os.urandom(32), KEY], CLUSTER)
    auth.client_verify(proof.rstrip(b"\r\n"), KEY, nonce_s, nonce_c, CLUSTER)


# ----------------------------------------------- the real listener, loopback


@pytest.fixture
def spool(tmp_path: Path) -> Iterator[Spool]:
    s = Spool.open(tmp_path / "spool")
    yield s
    s.close()


async def _listener(
    nursery: trio.Nursery, receiver: Receiver, limits: SmtpLimits | None = None
) -> tuple[HostPort, Callable[[], Awaitable[None]]]:
    listeners = await nursery.start(
        partial(
            serve_listener,
            receiver,
            HostPort(IPv4Address("127.0.0.1"), 0),
            node_name="rx",
            cluster=CLUSTER,
            keys=lambda: [KEY],
            limits=limits or SmtpLimits(),
        )
    )
    port = listeners[0].socket.getsockname()[1]
    addr = HostPort(IPv4Address("127.0.0.1"), port)

    async def still_serves() -> None:
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        sealed = await client_preamble(stream, KEY, CLUSTER)
        buf = b""
        while b"\r\n" not in buf:
            buf += await sealed.receive_some(4096)
        assert buf.startswith(b"220 rx ")
        await sealed.aclose()

    return addr, still_serves


async def _read_until_closed(stream: trio.SocketStream) -> bytes:
    got = b""
    while True:
        try:
            chunk = await stream.receive_some(4096)
        except trio.BrokenResourceError:
            return got
        if not chunk:
            return got
        got += chunk


_HOSTILE_LINES = [
    b"cd" * 32 + b" \xff" + b"0" * 63 + b"\r\n",  # the reported crash
    "é".encode() * 64 + b" " + b"0" * 64 + b"\r\n",
    b"\xff\xfe\r\n",
    b"\r\n",
    b"cd" * 32 + b"\r\n",
    b"x" * (auth.MAX_LINE + 50),  # oversized, no CRLF
    b"x" * (auth.MAX_LINE + 50) + b"\r\n",
]


@pytest.mark.parametrize("hostile", _HOSTILE_LINES)
async def test_hostile_preamble_on_loopback_is_counted_and_the_listener_serves(
    spool: Spool, hostile: bytes
) -> None:
    counters: dict[str, int] = {}
    receiver = Receiver(spool, counters)
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            addr, still_serves = await _listener(nursery, receiver)
            for _ in range(3):
                stream = await trio.open_tcp_stream(str(addr.host), addr.port)
                await stream.send_all(hostile)
                got = await _read_until_closed(stream)
                challenge, _, after = got.partition(b"\r\n")
                assert challenge.startswith(auth.BANNER + b" ")
                assert after in (b"", auth.REFUSAL)  # never an SMTP banner
                await stream.aclose()
            await still_serves()
            nursery.cancel_scope.cancel()
    assert counters["mmove_auth_failed"] == 3
    assert counters.get("mmove_received", 0) == 0


async def test_silent_client_times_out_and_the_listener_serves(
    spool: Spool, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Real time (the spool works in threads, which an autojump clock would skip over).
    monkeypatch.setattr(mmove, "PREAMBLE_TIMEOUT", 0.3)
    counters: dict[str, int] = {}
    receiver = Receiver(spool, counters)
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            addr, still_serves = await _listener(nursery, receiver)
            stream = await trio.open_tcp_stream(str(addr.host), addr.port)
            await stream.send_all(b"cd" * 10)  # half a line, then silence
            await _read_until_closed(stream)
            await stream.aclose()
            assert counters["mmove_auth_failed"] == 1
            await still_serves()
            nursery.cancel_scope.cancel()


async def test_unauthenticated_connections_are_capped(spool: Spool) -> None:
    counters: dict[str, int] = {}
    receiver = Receiver(spool, counters)
    limits = SmtpLimits(max_sessions=3, max_sessions_per_ip=2)
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            addr, still_serves = await _listener(nursery, receiver, limits)

            async def hold(source: str) -> tuple[trio.SocketStream, bytes]:
                s = await trio.open_tcp_stream(str(addr.host), addr.port, local_address=source)
                return s, await _read_line(s)

            held = [await hold("127.0.0.7"), await hold("127.0.0.7")]
            assert all(line.startswith(auth.BANNER) for _, line in held)
            # Per-IP cap, then the total cap.
            over, line = await hold("127.0.0.7")
            assert line == mmove.BUSY
            await over.aclose()
            held.append(await hold("127.0.0.8"))
            over, line = await hold("127.0.0.9")
            assert line == mmove.BUSY
            await over.aclose()
            assert counters["mmove_refused_busy"] == 2
            for s, _ in held:
                await s.aclose()
            while counters.get("mmove_auth_failed", 0) < 3:
                await trio.sleep(0.01)
            await still_serves()  # room again once they are gone
            nursery.cancel_scope.cancel()


# ------------------------------------------------- a fake peer, client side


def _msg() -> NewMessage:
    return NewMessage(
        mail_from="a@x",
        rcpt_to=("b@y",),
        data=b"hi\r\n",
        binding="b1",
        requested="b1",
        origin="tx",
    )


async def _fake_peer(
    nursery: trio.Nursery, script: Callable[[trio.SocketStream], Awaitable[None]]
) -> HostPort:
    async def handler(stream: trio.SocketStream) -> None:
        try:
            await script(stream)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            await trio.aclose_forcefully(stream)

    listeners = await nursery.start(partial(trio.serve_tcp, handler, 0, host="127.0.0.1"))
    return HostPort(IPv4Address("127.0.0.1"), listeners[0].socket.getsockname()[1])


async def _read_line(stream: trio.SocketStream) -> bytes:
    buf = b""
    while b"\r\n" not in buf:
        chunk = await stream.receive_some(4096)
        if not chunk:
            break
        buf += chunk
    return buf


def _garbage_proof(proof: bytes) -> Callable[[trio.SocketStream], Awaitable[None]]:
    async def script(stream: trio.SocketStream) -> None:
        await stream.send_all(auth.server_challenge(auth.new_nonce()))
        await _read_line(stream)
        await stream.send_all(proof)
        await trio.sleep(1)

    return script


def _raw(data: bytes) -> Callable[[trio.SocketStream], Awaitable[None]]:
    async def script(stream: trio.SocketStream) -> None:
        await stream.send_all(data)
        await trio.sleep(1)

    return script


_BUSY_PEER = _raw(mmove.BUSY)


@pytest.mark.parametrize(
    "script",
    [
        _garbage_proof(b"\xff" * 64 + b"\r\n"),  # the reported client-side crash
        _garbage_proof(b"0" * 63 + b"\xe9\r\n"),
        _garbage_proof(b"\r\n"),
        _garbage_proof(b"+OK\r\n"),
        _garbage_proof(b"z" * (auth.MAX_LINE + 10)),
        _raw(b"DVMMOVE1 " + b"\xff" * 64 + b"\r\n"),
        _raw(b"220 not an mmove listener\r\n"),
        _BUSY_PEER,
        _raw(b"\xff" * (auth.MAX_LINE + 10)),
        _raw(b"DVMMOVE1 " + b"ab" * 32 + b"\r\n"),  # a plaintext (v1) receiver
    ],
)
async def test_fake_peer_answering_garbage_fails_the_move_not_the_node(
    spool: Spool, script: Callable[[trio.SocketStream], Awaitable[None]]
) -> None:
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            addr = await _fake_peer(nursery, script)
            qid = await spool.store(_msg())
            counters: dict[str, int] = {}
            with pytest.raises(MoveFailed):
                await move_batch(
                    spool,
                    [m for m in spool.iter()],
                    address=addr,
                    key=KEY,
                    cluster=CLUSTER,
                    helo="tx",
                    counters=counters,
                    node="fake",
                    timeout=2.0,
                )
            assert spool.get(qid) is not None  # still queued here
            assert counters.get("mmove_sent", 0) == 0
            if script is not _BUSY_PEER:
                assert counters["mmove_auth_failed"] == 1
            nursery.cancel_scope.cancel()


async def test_fake_peer_that_never_answers_times_out(
    spool: Spool, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(mmove, "PREAMBLE_TIMEOUT", 0.3)

    async def silent(stream: trio.SocketStream) -> None:
        await trio.sleep_forever()

    counters: dict[str, int] = {}

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            addr = await _fake_peer(nursery, silent)
            await spool.store(_msg())
            with pytest.raises(MoveFailed):
                await move_batch(
                    spool,
                    list(spool.iter()),
                    address=addr,
                    key=KEY,
                    cluster=CLUSTER,
                    helo="tx",
                    counters=counters,
                    node="fake",
                    timeout=30.0,
                )
            assert counters["mmove_auth_failed"] == 1
            nursery.cancel_scope.cancel()


async def test_receiver_normalizes_a_bare_newline_body_from_an_authenticated_peer(
    spool: Spool,
) -> None:
    """An older sender may move a stored bare-LF body: refusing it would strand a
    message the cluster already acknowledged, so mmove rewrites it to CRLF."""
    counters: dict[str, int] = {}
    receiver = Receiver(spool, counters)
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            addr, _ = await _listener(nursery, receiver)  # default limits: bare_newline=reject
            stream = await trio.open_tcp_stream(str(addr.host), addr.port)
            sealed = await client_preamble(stream, KEY, CLUSTER)
            await sealed.send_all(
                b"EHLO tx\r\nMAIL FROM:<a@x> XMMOVEID=m1 XQID=q1\r\nRCPT TO:<b@y>\r\nDATA\r\n"
                b"x\n.\r\nMAIL FROM:<evil@x>\r\n.\r\nQUIT\r\n"
            )
            buf = b""
            while b"221 " not in buf:
                chunk = await sealed.receive_some(4096)
                if not chunk:
                    break
                buf += chunk
            await sealed.aclose()
            nursery.cancel_scope.cancel()
    assert b"250 2.0.0 Ok: queued as" in buf, buf
    (msg,) = list(spool.iter())
    assert spool.read_data(msg.id) == b"x\r\n.\r\nMAIL FROM:<evil@x>\r\n"


# ------------------------------------- after the preamble: sealed frames only (issue 14)


async def _authenticated_raw(addr: HostPort) -> trio.SocketStream:
    """A key holder that runs the preamble by hand and then writes raw bytes."""
    stream = await trio.open_tcp_stream(str(addr.host), addr.port)
    line = b""
    while not line.endswith(b"\r\n"):
        line += await stream.receive_some(1)
    reply, nonce_s, nonce_c = auth.client_response(line[:-2], KEY, CLUSTER)
    await stream.send_all(reply)
    proof = b""
    while not proof.endswith(b"\r\n"):
        proof += await stream.receive_some(1)
    auth.client_verify(proof[:-2], KEY, nonce_s, nonce_c, CLUSTER)
    return stream


async def test_plaintext_smtp_after_the_preamble_is_refused(spool: Spool) -> None:
    """Even a key holder (an old v1 sender) cannot talk clear SMTP: nothing is
    stored, the frame is counted as rejected and the listener keeps serving."""
    counters: dict[str, int] = {}
    receiver = Receiver(spool, counters)
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            addr, still_serves = await _listener(nursery, receiver)
            stream = await _authenticated_raw(addr)
            await stream.send_all(
                b"EHLO tx\r\nMAIL FROM:<a@x> XMMOVEID=m1 XQID=q1\r\nRCPT TO:<b@y>\r\n"
                b"DATA\r\nhello\r\n.\r\nQUIT\r\n"
            )
            got = await _read_until_closed(stream)
            await stream.aclose()
            assert b"250" not in got and b"354" not in got
            await still_serves()
            nursery.cancel_scope.cancel()
    assert counters["mmove_frame_rejected"] == 1
    assert counters.get("mmove_received", 0) == 0 and len(spool) == 0


async def test_oversized_frame_from_a_key_holder_is_refused_on_its_header(spool: Spool) -> None:
    """A sealed header announcing 1 GiB ends the connection at once: no wait for
    (or buffer of) the payload."""
    from duravip.mail.mmove_crypto import FrameSealer, derive_keys

    counters: dict[str, int] = {}
    receiver = Receiver(spool, counters)
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            addr, still_serves = await _listener(nursery, receiver)
            stream = trio.SocketStream(trio.socket.socket())
            await stream.socket.connect((str(addr.host), addr.port))
            line = b""
            while not line.endswith(b"\r\n"):
                line += await stream.receive_some(1)
            reply, nonce_s, nonce_c = auth.client_response(line[:-2], KEY, CLUSTER)
            await stream.send_all(reply)
            keys = derive_keys(KEY, nonce_s, nonce_c, CLUSTER)
            await stream.send_all(FrameSealer(keys.client_to_server).seal_header(1 << 30))
            await _read_until_closed(stream)  # closed without waiting for 1 GiB
            await stream.aclose()
            await still_serves()
            nursery.cancel_scope.cancel()
    assert counters["mmove_frame_rejected"] == 1


# --- two-phase mmove control transactions (after the preamble: an authenticated peer) ----------


def _control(param: str, data: bytes, **extra: str) -> Envelope:
    return Envelope(
        mail_from="",
        rcpt_to=("mmove-control@duravip.invalid",),
        data=data,
        peer=("127.0.0.9", 1),
        mail_params={param: "1", **extra},
    )


@pytest.mark.parametrize(
    "data", [b"not-an-id\r\n", b"01a2\r\n", b"0" * 23 + b"\r\n", b"\xff" * 22, b"ab;cd" * 5]
)
@pytest.mark.parametrize("param", ["XMMOVEC", "XMMOVEQ"])
async def test_malformed_control_transactions_are_refused(
    spool: Spool, param: str, data: bytes
) -> None:
    receiver = Receiver(spool, {})
    with pytest.raises(PermanentFailure):
        await receiver.accept(_control(param, data))


async def test_a_commit_only_makes_a_pending_copy_of_that_id_live(spool: Spool) -> None:
    """A commit for an unknown id, or for a live copy, changes nothing; a query is
    answered from this node's own durable record only."""
    from duravip.mail.spool import new_queue_id
    from duravip.mail.transfer_state import encode_ids, parse_answers

    counters: dict[str, int] = {}
    receiver = Receiver(spool, counters)
    tid, other = new_queue_id(), new_queue_id()
    live = await spool.store(NewMessage("a@x", ("r@y",), b"x\r\n", "b1", "b1", "n1"))
    pend = await spool.store(
        NewMessage("a@x", ("r@y",), b"y\r\n", "b1", "b1", "n1", transfer_key=tid, pending="n1")
    )
    await receiver.accept(_control("XMMOVEC", encode_ids([other])))
    assert spool.get(pend).pending == "n1"
    await receiver.accept(_control("XMMOVEC", encode_ids([tid, tid])))
    assert spool.get(pend).pending is None and spool.get(live) is not None
    assert counters["mmove_committed"] == 1
    # This node never sent `other`, and removed nothing with it: "aborted".
    await spool.remove(live, tid=tid)
    reply = await receiver.accept(_control("XMMOVEQ", encode_ids([tid, other])))
    assert {k: v.value for k, v in parse_answers(reply).items()} == {tid: "c", other: "a"}


@pytest.mark.parametrize("extra", [{"XTID": "zz"}, {"XTID": "0" * 22}, {"XTID": "0" * 22, "XDOUBT": "x"}])
async def test_a_two_phase_move_needs_a_valid_id_and_sender(
    spool: Spool, extra: dict[str, str]
) -> None:
    env = Envelope(
        mail_from="a@x",
        rcpt_to=("r@y",),
        data=b"x\r\n",
        mail_params={"XMMOVEID": "m1", "XQID": "q1", **({"XSENDER": "n1"} if "XDOUBT" in extra else {}), **extra},
    )
    with pytest.raises(PermanentFailure):
        await Receiver(spool, {}).accept(env)
    assert len(spool) == 0
