"""Per-sender anti-replay window for sealed datagrams (IPsec style).

Every sealed frame carries its sender's boot (epoch + salt) and a frame counter
in the authenticated header; the sender's name is inside the ciphertext. For
each sender name the receiver keeps the boot it last accepted and a sliding
bitmap of the counters seen below the highest one. A frame is accepted once:

* a sender never seen, or a higher epoch than the one kept (a restart), starts
  a fresh window;
* a lower epoch, or the same epoch with another salt, is an old boot: replay;
* within the kept boot, a counter already seen, or more than :data:`WINDOW`
  below the highest, is a replay.

The window is only updated for frames that authenticated and decoded, so an
attacker without the key cannot move it. The core forgets a sender's window
when it declares that member dead or left: a restarted process whose clock
stepped back is then accepted after one failure detection, at the price of
letting the old boot's superseded packets in once each (they are stale by
incarnation, and answered only to the member's own address).
"""

from __future__ import annotations

from collections import OrderedDict

from attrs import define

#: Counters below the highest seen that are still accepted (reordering tolerance).
WINDOW = 1024
#: Senders remembered (least recently accepted forgotten first).
MAX_SENDERS = 16384
_MASK = (1 << WINDOW) - 1


@define
class _Window:
    epoch: int
    salt: bytes
    top: int
    bits: int  # bit i set: counter ``top - i`` was seen


class ReplayGuard:
    """Accept each (sender, boot, counter) at most once."""

    def __init__(self, max_senders: int = MAX_SENDERS) -> None:
        self._w: OrderedDict[str, _Window] = OrderedDict()
        self.max_senders = max_senders

    def __len__(self) -> int:
        return len(self._w)

    def accept(self, sender: str, epoch: int, salt: bytes, counter: int) -> bool:
        """True (and recorded) if this frame is new; False for a replay or an old boot."""
        w = self._w.get(sender)
        if w is None or epoch > w.epoch:
            self._w[sender] = _Window(epoch, salt, counter, 1)
            self._w.move_to_end(sender)
            while len(self._w) > self.max_senders:
                self._w.popitem(last=False)
            return True
        if epoch < w.epoch or salt != w.salt:
            return False
        if counter > w.top:
            shift = counter - w.top  # may be huge: never shift a big int by it
            w.bits = 1 if shift >= WINDOW else ((w.bits << shift) | 1) & _MASK
            w.top = counter
        else:
            off = w.top - counter
            if off >= WINDOW or (w.bits >> off) & 1:
                return False
            w.bits |= 1 << off
        self._w.move_to_end(sender)
        return True

    def forget(self, sender: str) -> None:
        """Drop ``sender``'s window (it was declared dead: whatever boot comes next is new)."""
        self._w.pop(sender, None)

    def epoch_of(self, sender: str) -> int | None:
        w = self._w.get(sender)
        return None if w is None else w.epoch
