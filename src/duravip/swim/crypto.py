"""AES-GCM sealing of every datagram and stream frame with a keyring.

The first key seals, every key is tried on open, so a key can be rotated in
three steps (add everywhere, make primary, drop the old) without a restart.
The cluster name is bound in as associated data, and a short clear-text cluster
tag lets a receiver tell "another cluster" from "wrong key" when counting drops.

Nonces are deterministic, not random: each process (each *boot*) seals with its
own sub-key ``HMAC-SHA256(key, label | boot id)`` and uses its frame counter as
the nonce. A (sub-key, nonce) pair therefore never repeats as long as boot ids
differ (64-bit boot epoch + 64 random bits), and no key has the 2^32-message
bound of random 96-bit nonces. The boot id and the counter travel in the clear
header, authenticated as associated data; they are also what the receiver's
replay window (:mod:`duravip.swim.replay`) works on.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import os
import struct
from collections import OrderedDict
from collections.abc import Iterable
from pathlib import Path

import xxhash
from attrs import define, frozen
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

#: Wire version of the sealed envelope.
ENVELOPE_VERSION = 2
TAG_LEN = 16
_HEADER = struct.Struct("!BIQ8sQ")  # version, cluster tag, boot epoch, boot salt, counter
HEADER_LEN = _HEADER.size
#: Bytes a sealed frame adds to its plaintext.
OVERHEAD = HEADER_LEN + TAG_LEN
VALID_KEY_LENGTHS = (16, 24, 32)
_SUBKEY_LABEL = b"duravip swim boot key v2\x00"
#: Sub-keys of remote boots kept (per keyring); only boots that sealed a valid frame enter.
SUBKEY_CACHE = 4096
_U64 = (1 << 64) - 1


@define
class Boot:
    """This process's sealing identity: a per-boot epoch and salt, and a frame counter.

    ``epoch`` must grow from one boot of a node to the next (the driver uses the
    wall clock in ns): receivers accept a higher epoch as a restart and reject
    frames of lower ones as replays. ``salt`` (random) keeps two boots with the
    same epoch apart. ``counter`` numbers every frame sealed, on every channel and
    with every key, so it is both the nonce and the replay sequence number.
    """

    epoch: int
    salt: bytes
    counter: int = 0

    @property
    def id(self) -> bytes:
        return self.epoch.to_bytes(8, "big") + self.salt

    def next(self) -> int:
        if self.counter >= _U64:
            raise OverflowError("frame counter exhausted")  # 2^64 frames: never in practice
        self.counter += 1
        return self.counter

    @classmethod
    def fresh(cls, epoch: int) -> Boot:
        return cls(epoch & _U64, os.urandom(8))


@frozen
class Opened:
    """A frame that authenticated: who sealed it (boot) and its counter."""

    epoch: int
    salt: bytes
    counter: int
    plaintext: bytes


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

    __slots__ = ("_cache", "keys", "sealed")

    def __init__(self, keys: Iterable[bytes]) -> None:
        ks = tuple(bytes(k) for k in keys)
        if not ks:
            raise ValueError("a keyring needs at least one key")
        for k in ks:
            if len(k) not in VALID_KEY_LENGTHS:
                raise ValueError(f"AES key of {len(k)} bytes; need 16, 24 or 32")
        self.keys: tuple[bytes, ...] = ks
        self._cache: OrderedDict[bytes, tuple[AESGCM, ...]] = OrderedDict()
        #: frames sealed with this keyring's primary key (its usage, for rotation policies)
        self.sealed = 0

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

    def _subkeys(self, boot_id: bytes) -> tuple[AESGCM, ...] | None:
        return self._cache.get(boot_id)

    def _derive(self, boot_id: bytes) -> tuple[AESGCM, ...]:
        return tuple(
            AESGCM(hmac.digest(k, _SUBKEY_LABEL + boot_id, "sha256")[: len(k)]) for k in self.keys
        )

    def _remember(self, boot_id: bytes, aeads: tuple[AESGCM, ...]) -> None:
        self._cache[boot_id] = aeads
        self._cache.move_to_end(boot_id)
        while len(self._cache) > SUBKEY_CACHE:
            self._cache.popitem(last=False)

    def seal(self, plaintext: bytes, cluster: str, channel: bytes, boot: Boot) -> bytes:
        """Encrypt with the primary key's sub-key of ``boot``; ``channel`` separates UDP from TCP."""
        bid = boot.id
        aeads = self._subkeys(bid)
        if aeads is None:
            aeads = self._derive(bid)
            self._remember(bid, aeads)
        n = boot.next()
        self.sealed += 1
        header = _HEADER.pack(ENVELOPE_VERSION, cluster_tag(cluster), boot.epoch, boot.salt, n)
        aad = header + cluster.encode() + b"\x00" + channel
        return header + aeads[0].encrypt(_nonce(n), plaintext, aad)

    def open(self, frame: bytes, cluster: str, channel: bytes) -> Opened:
        """Decrypt with any key or raise :class:`CryptoError` (never anything else)."""
        if len(frame) < OVERHEAD:
            raise CryptoError("decrypt")
        version, tag, epoch, salt, n = _HEADER.unpack_from(frame)
        if version != ENVELOPE_VERSION:
            raise CryptoError("decrypt")
        if tag != cluster_tag(cluster):
            raise CryptoError("cluster")
        header = frame[:HEADER_LEN]
        bid = header[5:21]
        aad = header + cluster.encode() + b"\x00" + channel
        cached = self._subkeys(bid)
        aeads = cached if cached is not None else self._derive(bid)
        for aead in aeads:
            try:
                plain = aead.decrypt(_nonce(n), frame[HEADER_LEN:], aad)
            except InvalidTag:
                continue
            if cached is None:
                self._remember(bid, aeads)  # only boots that proved the key take cache space
            return Opened(epoch, salt, n, plain)
        raise CryptoError("decrypt")


def _nonce(counter: int) -> bytes:
    """The 96-bit GCM nonce of frame ``counter`` (unique per boot sub-key)."""
    return b"\x00\x00\x00\x00" + counter.to_bytes(8, "big")
