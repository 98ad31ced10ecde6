"""The mmove preamble: mutual challenge-response proving cluster membership (pure).

Before anything else on the ``ECCluster_Listener``::

    S: DVMMOVE2 <nonce_s>\\r\\n
    C: <nonce_c> <HMAC-SHA256(key, "DVMMOVE2" | "c" | nonce_s | nonce_c | cluster)>\\r\\n
    S: <HMAC-SHA256(key, "DVMMOVE2" | "s" | nonce_c | nonce_s | cluster)>\\r\\n
                                                   (or "-ERR auth" and close)
    then AES-GCM frames both ways (:mod:`duravip.mail.mmove_crypto`), SMTP inside.

Nonces are 32 random bytes, hex. The client proves with its primary key; the
server tries every key of its keyring (rotation), then proves back with the
key that matched, so a client never talks SMTP to an impostor. The direction
tag and both nonces in each MAC stop reflection and replay; only MACs and
nonces cross the wire, never a key. The banner word is the wire version
(``DVMMOVE1`` was plaintext SMTP after the proof): it is in every MAC and in
the key derivation, and a peer of another version fails with an
:class:`AuthError` at the first line. See ``docs/mail.md``.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from collections.abc import Sequence

from attrs import frozen

#: The wire version: 2 = sealed frames after the proof (1, plaintext SMTP, is gone).
BANNER = b"DVMMOVE2"
_BANNER_FAMILY = b"DVMMOVE"
NONCE_BYTES = 32
#: Longest preamble line either side accepts.
MAX_LINE = 256
REFUSAL = b"-ERR auth\r\n"


class AuthError(Exception):
    """The peer failed the challenge-response or spoke something else."""


def new_nonce() -> str:
    return secrets.token_hex(NONCE_BYTES)


#: A nonce or a MAC on the wire: exactly 64 lower-case hex digits (both are 32 bytes).
_HEX64 = re.compile(rb"[0-9a-f]{64}")


def _mac(key: bytes, tag: bytes, first: str, second: str, cluster: str) -> bytes:
    msg = b"|".join([BANNER, tag, first.encode(), second.encode(), cluster.encode()])
    return hmac.new(key, msg, hashlib.sha256).hexdigest().encode("ascii")


def _hex_field(raw: bytes) -> str | None:
    """``raw`` as text if it is 64 lower-case hex digits, else None.

    Every field is validated as bytes before anything is decoded or compared:
    ``hmac.compare_digest`` raises ``TypeError`` on non-ASCII ``str``, and an
    exception other than :class:`AuthError` here would end the whole daemon.
    """
    if _HEX64.fullmatch(raw) is None:
        return None
    return raw.decode("ascii")


def server_challenge(nonce_s: str) -> bytes:
    return BANNER + b" " + nonce_s.encode() + b"\r\n"


def client_response(challenge_line: bytes, key: bytes, cluster: str) -> tuple[bytes, str, str]:
    """Answer the server's challenge: the line to send, ``nonce_s`` and ``nonce_c``."""
    parts = challenge_line.strip().split(b" ")
    if len(parts) == 2 and parts[0] != BANNER and parts[0].startswith(_BANNER_FAMILY):
        theirs = parts[0][len(_BANNER_FAMILY) :].decode("ascii", "replace")[:8]
        raise AuthError(
            f"mmove wire version mismatch: the receiver speaks version {theirs!r}, "
            f"this node {BANNER[len(_BANNER_FAMILY) :].decode()!r} (upgrade both)"
        )
    if len(parts) != 2 or parts[0] != BANNER:
        raise AuthError("not an mmove listener")
    nonce_s = _hex_field(parts[1])
    if nonce_s is None:
        raise AuthError("bad server nonce")
    nonce_c = new_nonce()
    line = nonce_c.encode() + b" " + _mac(key, b"c", nonce_s, nonce_c, cluster) + b"\r\n"
    return line, nonce_s, nonce_c


def server_verify(response_line: bytes, nonce_s: str, keys: Sequence[bytes], cluster: str) -> bytes:
    """Check the client's proof against every key; returns the server's proof line."""
    return server_verify_key(response_line, nonce_s, keys, cluster)[0]


def server_verify_key(
    response_line: bytes, nonce_s: str, keys: Sequence[bytes], cluster: str
) -> tuple[bytes, int]:
    """:func:`server_verify`, plus the index in ``keys`` of the key the client used.

    During a key rotation the index tells whether peers still use the old key.
    """
    v = server_accept(response_line, nonce_s, keys, cluster)
    return v.proof, v.key_index


@frozen
class Verified:
    """A client that proved a key: what the server answers and derives session keys from."""

    proof: bytes
    key_index: int
    key: bytes
    nonce_c: str


def server_accept(
    response_line: bytes, nonce_s: str, keys: Sequence[bytes], cluster: str
) -> Verified:
    """Check the client's proof against every key; the proof line to send, and what matched."""
    parts = response_line.strip().split(b" ")
    if len(parts) != 2:
        raise AuthError("malformed response")
    nonce_c = _hex_field(parts[0])
    if nonce_c is None or nonce_c == nonce_s:
        raise AuthError("bad client nonce")
    given = parts[1]
    if _hex_field(given) is None:
        raise AuthError("malformed MAC")
    for index, key in enumerate(keys):
        if hmac.compare_digest(_mac(key, b"c", nonce_s, nonce_c, cluster), given):
            return Verified(
                _mac(key, b"s", nonce_c, nonce_s, cluster) + b"\r\n", index, key, nonce_c
            )
    raise AuthError("no key matches")


def client_verify(proof_line: bytes, key: bytes, nonce_s: str, nonce_c: str, cluster: str) -> None:
    """Check the server's proof; any other line (garbage included) is an :class:`AuthError`."""
    want = _mac(key, b"s", nonce_c, nonce_s, cluster)
    if not hmac.compare_digest(want, proof_line.strip()):
        raise AuthError("server failed to prove cluster membership")


def split_line(buf: bytes) -> tuple[bytes, bytes] | None:
    """``(line, rest)`` once ``buf`` holds a CRLF-terminated line; raises if it is too long."""
    i = buf.find(b"\r\n")
    if i < 0:
        if len(buf) > MAX_LINE:
            raise AuthError("preamble line too long")
        return None
    if i > MAX_LINE:
        raise AuthError("preamble line too long")
    return buf[:i], buf[i + 2 :]


def xtext_encode(value: str) -> str:
    """RFC 3461 xtext, so binding names and ids travel safely as ESMTP parameter values."""
    out = []
    for ch in value.encode():
        if 33 <= ch <= 126 and ch not in (ord("+"), ord("=")):
            out.append(chr(ch))
        else:
            out.append(f"+{ch:02X}")
    return "".join(out)


def xtext_decode(value: str) -> str:
    """Inverse of :func:`xtext_encode`; raises ``ValueError`` on a malformed escape."""
    raw = bytearray()
    i = 0
    while i < len(value):
        c = value[i]
        if c == "+":
            hexpair = value[i + 1 : i + 3]
            if len(hexpair) != 2:
                raise ValueError("truncated xtext escape")
            raw += bytes([int(hexpair, 16)])
            i += 3
        else:
            raw += c.encode()
            i += 1
    return raw.decode("utf-8", "replace")
