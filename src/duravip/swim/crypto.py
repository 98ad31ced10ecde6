"""AES-GCM sealing of every datagram and stream frame with a keyring.

The first key seals, every key is tried on open, so a key can be rotated in
three steps (add everywhere, make primary, drop the old) without a restart.
The cluster name is bound in as associated data, and a short clear-text cluster
tag lets a receiver tell "another cluster" from "wrong key" when counting drops.
"""

from __future__ import annotations

import base64
import binascii
import os
import struct
from collections.abc import Iterable
from pathlib import Path

import xxhash
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

#: Wire version of the sealed envelope.
ENVELOPE_VERSION = 1
NONCE_LEN = 12
TAG_LEN = 16
_HEADER = struct.Struct("!BI")  # version, cluster tag
#: Bytes a sealed frame adds to its plaintext.
OVERHEAD = _HEADER.size + NONCE_LEN + TAG_LEN
VALID_KEY_LENGTHS = (16, 24, 32)


class CryptoError(Exception):
    """A frame could not be opened; ``reason`` is ``decrypt`` or ``cluster``."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def cluster_tag(cluster: str) -> int:
    """32-bit clear-text tag of a cluster name (not a secret, only for drop counting)."""
    return xxhash.xxh32_intdigest(cluster.encode())


class Keyring:
    """An ordered set of AES keys; ``keys[0]`` is the primary (sealing) key."""

    __slots__ = ("_aeads", "keys")

    def __init__(self, keys: Iterable[bytes]) -> None:
        ks = tuple(bytes(k) for k in keys)
        if not ks:
            raise ValueError("a keyring needs at least one key")
        for k in ks:
            if len(k) not in VALID_KEY_LENGTHS:
                raise ValueError(f"AES key of {len(k)} bytes; need 16, 24 or 32")
        self.keys: tuple[bytes, ...] = ks
        self._aeads = tuple(AESGCM(k) for k in ks)

    def __repr__(self) -> str:  # never print key material
        return f"Keyring(<{len(self.keys)} keys>)"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Keyring) and other.keys == self.keys

    def __hash__(self) -> int:
        return hash(self.keys)

    @classmethod
    def generate(cls, size: int = 32) -> Keyring:
        return cls([AESGCM.generate_key(bit_length=size * 8)])

    @classmethod
    def parse(cls, text: str, source: str = "<keyring>") -> Keyring:
        """One base64 key a line; blank lines and ``#`` comments are ignored."""
        keys: list[bytes] = []
        for lineno, raw in enumerate(text.splitlines(), 1):
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            try:
                key = base64.b64decode(line, validate=True)
            except (binascii.Error, ValueError) as exc:
                raise ValueError(f"{source}:{lineno}: not base64: {exc}") from None
            if len(key) not in VALID_KEY_LENGTHS:
                raise ValueError(f"{source}:{lineno}: key of {len(key)} bytes; need 16, 24 or 32")
            keys.append(key)
        if not keys:
            raise ValueError(f"{source}: no key")
        return cls(keys)

    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> Keyring:
        p = Path(path)
        return cls.parse(p.read_text(encoding="ascii"), str(p))

    def dumps(self) -> str:
        """The file form: one base64 key a line, primary first."""
        return "".join(base64.b64encode(k).decode() + "\n" for k in self.keys)

    def seal(
        self, plaintext: bytes, cluster: str, channel: bytes, nonce: bytes | None = None
    ) -> bytes:
        """Encrypt with the primary key; ``channel`` separates UDP from TCP frames."""
        header = _HEADER.pack(ENVELOPE_VERSION, cluster_tag(cluster))
        n = os.urandom(NONCE_LEN) if nonce is None else nonce
        aad = header + cluster.encode() + b"\x00" + channel
        return header + n + self._aeads[0].encrypt(n, plaintext, aad)

    def open(self, frame: bytes, cluster: str, channel: bytes) -> bytes:
        """Decrypt with any key or raise :class:`CryptoError` (never anything else)."""
        if len(frame) < OVERHEAD:
            raise CryptoError("decrypt")
        version, tag = _HEADER.unpack_from(frame)
        if version != ENVELOPE_VERSION:
            raise CryptoError("decrypt")
        if tag != cluster_tag(cluster):
            raise CryptoError("cluster")
        header = frame[: _HEADER.size]
        nonce = frame[_HEADER.size : _HEADER.size + NONCE_LEN]
        body = frame[_HEADER.size + NONCE_LEN :]
        aad = header + cluster.encode() + b"\x00" + channel
        for aead in self._aeads:
            try:
                return aead.decrypt(nonce, body, aad)
            except InvalidTag:
                continue
        raise CryptoError("decrypt")
