"""The mmove preamble: the cluster challenge-response, then the sealed stream.

Split from :mod:`duravip.mail.mmove` (which re-exports these names) so that
the receiver, the batch sender and the pending-copy resolution share it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, MutableMapping, Sequence

import trio

from duravip.mail import mmove_auth as auth
from duravip.mail.mmove_crypto import FrameRejected, SealedStream, derive_keys

log = logging.getLogger("duravip.mail.ECmmove2")

SERVICE = "ECmmove2"
PREAMBLE_TIMEOUT = 5.0
#: Sent instead of the challenge to a connection over the caps (the sender retries later).
BUSY = b"-ERR busy\r\n"


class MoveFailed(Exception):
    """The batch could not be (fully) moved; the rest stays queued here."""


async def _read_line(stream: trio.abc.Stream, buf: bytes) -> tuple[bytes, bytes]:
    while True:
        got = auth.split_line(buf)
        if got is not None:
            return got
        chunk = await stream.receive_some(4096)
        if not chunk:
            raise auth.AuthError("connection closed during preamble")
        buf += chunk


async def server_preamble(
    stream: trio.abc.Stream,
    keys: Sequence[bytes],
    cluster: str,
    *,
    on_reject: Callable[[FrameRejected], None] | None = None,
) -> tuple[SealedStream, int]:
    """Run the server side of the challenge-response.

    Returns the sealed stream the session continues on (keyed from the keyring
    key the peer proved and both nonces) and that key's index in ``keys``.
    """
    nonce_s = auth.new_nonce()
    await stream.send_all(auth.server_challenge(nonce_s))
    try:
        line, rest = await _read_line(stream, b"")
        verified = auth.server_accept(line, nonce_s, keys, cluster)
    except auth.AuthError:
        await stream.send_all(auth.REFUSAL)
        raise
    await stream.send_all(verified.proof)
    session = derive_keys(verified.key, nonce_s, verified.nonce_c, cluster)
    sealed = SealedStream(
        stream,
        session.server_to_client,
        session.client_to_server,
        initial=rest,
        on_reject=on_reject,
    )
    return sealed, verified.key_index


async def client_preamble(
    stream: trio.abc.Stream,
    key: bytes,
    cluster: str,
    *,
    on_reject: Callable[[FrameRejected], None] | None = None,
) -> SealedStream:
    """Run the client side; returns the sealed stream (the SMTP banner comes next, sealed)."""
    line, rest = await _read_line(stream, b"")
    if line == BUSY.rstrip():
        raise MoveFailed("receiver busy (connection cap), retry later")
    reply, nonce_s, nonce_c = auth.client_response(line, key, cluster)
    await stream.send_all(reply)
    proof, rest = await _read_line(stream, rest)
    if proof.startswith(b"-ERR"):
        raise auth.AuthError("refused by the receiver (keyring mismatch?)")
    auth.client_verify(proof, key, nonce_s, nonce_c, cluster)
    session = derive_keys(key, nonce_s, nonce_c, cluster)
    return SealedStream(
        stream,
        session.client_to_server,
        session.server_to_client,
        initial=rest,
        on_reject=on_reject,
    )


def _frame_rejected(
    counters: MutableMapping[str, int], peer: str
) -> Callable[[FrameRejected], None]:
    def note(exc: FrameRejected) -> None:
        # Tampering on the path (or a broken peer): the connection ends, and with
        # it any transaction in flight; the sender keeps what had no intact 250.
        counters["mmove_frame_rejected"] = counters.get("mmove_frame_rejected", 0) + 1
        log.warning("%s: connection with %s ended: %s", SERVICE, peer, exc)

    return note
