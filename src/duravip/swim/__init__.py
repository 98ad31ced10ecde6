"""SWIM membership with the Lifeguard extensions.

Sans-IO core (:mod:`.core` and its helpers) plus a thin Trio driver
(:mod:`.driver`). See ``docs/membership.md``.
"""

from duravip.swim.core import StreamRequest, Swim
from duravip.swim.crypto import CryptoError, Keyring
from duravip.swim.members import Member, MemberEvent, State

__all__ = ["CryptoError", "Keyring", "Member", "MemberEvent", "State", "StreamRequest", "Swim"]
