"""The sealed mmove stream: per-connection keys and AES-GCM framing (issue 14).

After the keyring challenge-response (:mod:`duravip.mail.mmove_auth`) both
sides derive one key per direction with HKDF-SHA256 from the keyring key that
authenticated, salted with both nonces, and the rest of the connection is a
sequence of frames::

    frame   = header | payload
    header  = AES-GCM(k, nonce(0, n), uint32 length)              4 + 16 bytes
    payload = AES-GCM(k, nonce(1, n), data, aad = header)    length + 16 bytes
    nonce(t, n) = uint32 t | uint64 n        (n: this direction's frame counter)

The counter is never sent: the receiver expects frame 0, 1, 2, ... so a
replayed, reordered, dropped or reflected frame fails its tag like a tampered
one. Keys are fresh per connection (fresh nonces), so a (key, nonce) pair is
never reused. The length is sealed on its own so a tampered length is caught
on the 20 header bytes, before the receiver waits for (or buffers) a payload,
and a genuine length above the cap is refused there too.

:class:`FrameSealer` and :class:`FrameOpener` are the sans-IO core;
:class:`SealedStream` is the thin ``trio.abc.Stream`` around them that the
SMTP driver and client use unchanged. Any bad frame raises
:class:`FrameRejected`, a ``trio.BrokenResourceError``: every Stream user
already ends the connection on that, and the stream stays broken.
"""

from __future__ import annotations

import struct
from collections.abc import Callable

import trio
from attrs import frozen
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

TAG_LEN = 16
_LENGTH = struct.Struct("!I")
#: Sealed length field.
HEADER_LEN = _LENGTH.size + TAG_LEN
#: Bytes every frame adds to its data.
OVERHEAD = HEADER_LEN + TAG_LEN
#: Largest data per frame (a receiver buffers at most one frame's worth).
MAX_FRAME = 65536
KEY_LEN = 32
#: HKDF ``info`` prefix; the wire version is in it, so v2 keys are v2 only.
KDF_LABEL = b"duravip mmove v2"
_HEADER_TYPE = b"\x00\x00\x00\x00"
_PAYLOAD_TYPE = b"\x00\x00\x00\x01"
_U64 = (1 << 64) - 1
#: How much the stream asks the socket for at a time (one full frame and a bit).
RECEIVE_SIZE = MAX_FRAME + OVERHEAD


class FrameRejected(trio.BrokenResourceError):
    """A frame failed authentication, was out of order, too large or cut short."""


@frozen
class SessionKeys:
    """The two AES-256 keys of one connection."""

    client_to_server: bytes
    server_to_client: bytes


def _hkdf(key: bytes, salt: bytes, info: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=KEY_LEN, salt=salt, info=info).derive(key)


def derive_keys(key: bytes, nonce_s: str, nonce_c: str, cluster: str) -> SessionKeys:
    """Per-direction keys from the keyring key that authenticated and both (hex) nonces."""
    salt = bytes.fromhex(nonce_s) + bytes.fromhex(nonce_c)
    base = KDF_LABEL + b"|" + cluster.encode() + b"|"
    return SessionKeys(
        client_to_server=_hkdf(key, salt, base + b"client->server"),
        server_to_client=_hkdf(key, salt, base + b"server->client"),
    )


def _nonce(kind: bytes, counter: int) -> bytes:
    return kind + counter.to_bytes(8, "big")


class FrameSealer:
    """One direction's sending half: data in, frames out (never an empty frame)."""

    def __init__(self, key: bytes, *, max_frame: int = MAX_FRAME) -> None:
        self._aead = AESGCM(key)
        self._counter = 0
        self.max_frame = max_frame

    def _next(self) -> int:
        if self._counter > _U64:
            raise trio.BrokenResourceError("mmove frame counter exhausted")
        n = self._counter
        self._counter += 1
        return n

    def seal_header(self, length: int) -> bytes:
        """Only a header announcing ``length`` bytes (tests build oversized frames with it)."""
        n = self._next()
        return self._aead.encrypt(_nonce(_HEADER_TYPE, n), _LENGTH.pack(length), None)

    def seal(self, data: bytes | bytearray | memoryview) -> bytes:
        view = memoryview(data)
        out: list[bytes] = []
        for i in range(0, len(view), self.max_frame):
            piece = view[i : i + self.max_frame]
            n = self._next()
            header = self._aead.encrypt(_nonce(_HEADER_TYPE, n), _LENGTH.pack(len(piece)), None)
            out.append(header)
            out.append(self._aead.encrypt(_nonce(_PAYLOAD_TYPE, n), bytes(piece), header))
        return b"".join(out)


class FrameOpener:
    """One direction's receiving half: bytes in (any chunking), data of whole frames out."""

    def __init__(self, key: bytes, *, max_frame: int = MAX_FRAME) -> None:
        self._aead = AESGCM(key)
        self._counter = 0
        self.max_frame = max_frame
        self._buf = bytearray()
        #: The payload length of the frame whose header is already open.
        self._want: int | None = None
        self._header = b""
        self.rejected: FrameRejected | None = None

    @property
    def buffered(self) -> int:
        return len(self._buf)

    def _reject(self, why: str) -> FrameRejected:
        self.rejected = FrameRejected(f"mmove frame {self._counter} rejected: {why}")
        self._buf.clear()
        return self.rejected

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        if self.rejected is None:
            self._buf += data

    def next_frame(self) -> bytes | None:
        """The next frame's data, None until it is complete; raises :class:`FrameRejected`."""
        if self.rejected is not None:
            raise self.rejected
        if self._want is None:
            if len(self._buf) < HEADER_LEN:
                return None
            header = bytes(self._buf[:HEADER_LEN])
            try:
                plain = self._aead.decrypt(_nonce(_HEADER_TYPE, self._counter), header, None)
            except InvalidTag:
                raise self._reject(
                    "bad header (tampered, replayed, reordered or wrong key)"
                ) from None
            (length,) = _LENGTH.unpack(plain)
            if length == 0 or length > self.max_frame:
                raise self._reject(f"frame of {length} bytes is empty or too large")
            del self._buf[:HEADER_LEN]
            self._header, self._want = header, length
        end = self._want + TAG_LEN
        if len(self._buf) < end:
            return None
        try:
            data = self._aead.decrypt(
                _nonce(_PAYLOAD_TYPE, self._counter), bytes(self._buf[:end]), self._header
            )
        except InvalidTag:
            raise self._reject("bad payload (tampered)") from None
        del self._buf[:end]
        self._want = None
        self._counter += 1
        return data

    def end(self) -> None:
        """End of stream: fine between frames, :class:`FrameRejected` inside one."""
        if self.rejected is not None:
            raise self.rejected
        if self._buf or self._want is not None:
            raise self._reject("truncated (connection closed inside a frame)")


class SealedStream(trio.abc.Stream):
    """``stream`` with every byte sealed: what mmove runs SMTP over after its preamble.

    ``initial``: bytes the preamble reader already took from ``stream`` past its
    last line (the start of the first frame). ``on_reject`` is called once, with
    the error, when a frame is rejected (the caller counts it). An interrupted
    ``send_all`` (error or cancel) leaves the send side broken: the peer would
    reject whatever followed a partial frame anyway.
    """

    def __init__(
        self,
        stream: trio.abc.Stream,
        send_key: bytes,
        recv_key: bytes,
        *,
        initial: bytes = b"",
        on_reject: Callable[[FrameRejected], None] | None = None,
        max_frame: int = MAX_FRAME,
    ) -> None:
        self.stream = stream
        self._sealer = FrameSealer(send_key, max_frame=max_frame)
        self._opener = FrameOpener(recv_key, max_frame=max_frame)
        self._opener.feed(initial)
        self._plain = bytearray()
        self._on_reject = on_reject
        self._closed = False
        self._send_broken = False
        self._eof = False
        self._sending = False
        self._receiving = False

    def _rejected(self, exc: FrameRejected) -> FrameRejected:
        if self._on_reject is not None:
            callback, self._on_reject = self._on_reject, None
            callback(exc)
        return exc

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        if self._sending:
            raise trio.BusyResourceError("another task is sending on this stream")
        if self._closed:
            raise trio.ClosedResourceError("stream closed")
        self._sending = True
        try:
            if self._opener.rejected is not None:
                await trio.lowlevel.checkpoint()
                raise trio.BrokenResourceError("the peer sent a rejected frame") from None
            if self._send_broken:
                await trio.lowlevel.checkpoint()
                raise trio.BrokenResourceError("an earlier send was interrupted")
            if not data:
                await self.stream.send_all(b"")  # checkpoint, and the inner stream's checks
                return
            wire = self._sealer.seal(data)
            self._send_broken = True
            await self.stream.send_all(wire)
            self._send_broken = False
        finally:
            self._sending = False

    async def wait_send_all_might_not_block(self) -> None:
        if self._sending:
            raise trio.BusyResourceError("another task is sending on this stream")
        if self._closed:
            raise trio.ClosedResourceError("stream closed")
        self._sending = True
        try:
            await self.stream.wait_send_all_might_not_block()
        finally:
            self._sending = False

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        if max_bytes is not None:
            if not isinstance(max_bytes, int):
                raise TypeError("max_bytes must be an integer or None")
            if max_bytes < 1:
                raise ValueError("max_bytes must be >= 1")
        if self._receiving:
            raise trio.BusyResourceError("another task is receiving on this stream")
        if self._closed:
            raise trio.ClosedResourceError("stream closed")
        self._receiving = True
        try:
            awaited = False
            while not self._plain and not self._eof:
                try:
                    frame = self._opener.next_frame()
                except FrameRejected as exc:
                    raise self._rejected(exc) from None
                if frame is not None:
                    self._plain += frame
                    break
                chunk = await self.stream.receive_some(RECEIVE_SIZE)
                awaited = True
                if chunk:
                    self._opener.feed(chunk)
                    continue
                try:
                    self._opener.end()
                except FrameRejected as exc:
                    raise self._rejected(exc) from None
                self._eof = True
            if not awaited:
                await trio.lowlevel.checkpoint()
            n = len(self._plain) if max_bytes is None else min(max_bytes, len(self._plain))
            out = bytes(self._plain[:n])
            del self._plain[:n]
            return out
        finally:
            self._receiving = False

    async def aclose(self) -> None:
        self._closed = True
        await self.stream.aclose()
