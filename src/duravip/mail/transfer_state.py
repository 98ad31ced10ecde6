"""Two-phase mmove: transfer ids, the sender's answers, control transactions (sans-IO).

Every attempt to move a message gets a fresh transfer id (``XTID``, a queue
id: time-sortable). The receiver stores the copy *pending* and answers
``250``; the sender then removes its copy durably with the id in the same
``REMOVE`` record (``spool_format.COMMITTED``) and confirms a whole batch in
one control transaction (``XMMOVEC``); only then is the receiver's copy live.
A pending copy whose confirmation never came is resolved by asking the sender
(``XMMOVEQ``): the sender's durable record is the only authority, so exactly
one copy survives whatever crashed. See ``docs/mail.md`` (state machine).

Control transactions are ordinary SMTP transactions on the sealed mmove
stream (the SMTP server needs no new verb): ``MAIL FROM:<> XMMOVEC=1`` or
``XMMOVEQ=1``, one recipient, and the transfer ids one per line as the data;
a query's answers come back in the ``250`` text.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterable, Mapping
from enum import Enum

from attrs import Factory, define

from duravip.mail.spool_format import COMMITTED

COMMIT_PARAM = "XMMOVEC"
QUERY_PARAM = "XMMOVEQ"
TID_PARAM = "XTID"
SENDER_PARAM = "XSENDER"
#: A copy whose last delivery is in doubt keeps that mark when it moves (its time).
DOUBT_PARAM = "XDOUBT"
CONTROL_RCPT = "mmove-control@duravip.invalid"
#: Transfer ids per query transaction (keeps the answer line short).
QUERY_CHUNK = 20
#: Transfer ids per control transaction.
MAX_IDS = 1000
_TID = re.compile(r"[0-9a-f]{22}")


class Answer(Enum):
    #: The sender deleted its copy: the pending copy becomes live.
    COMMITTED = "c"
    #: The sender still owns the message (or gave this attempt up): drop the pending copy.
    ABORTED = "a"
    #: The attempt is still running at the sender: ask again later.
    WAIT = "w"
    #: Older than the sender's memory of committed ids: keep pending, tell the operator.
    UNKNOWN = "u"


#: Named crash points (fault hooks). The crash-point harness enumerates them all.
SEND_BEFORE_DATA = "send.before_data"
SEND_AFTER_250 = "send.after_250"
SEND_AFTER_REMOVE = "send.after_remove"
SEND_BEFORE_COMMIT = "send.before_commit"
SEND_AFTER_COMMIT = "send.after_commit"
RECV_BEFORE_STORE = "recv.before_store"
RECV_AFTER_STORE = "recv.after_store"
RECV_BEFORE_LIVE = "recv.before_live"
RECV_AFTER_LIVE = "recv.after_live"
ANSWER_BEFORE = "answer.before"
RESOLVE_BEFORE_QUERY = "resolve.before_query"
RESOLVE_BEFORE_APPLY = "resolve.before_apply"
RESOLVE_AFTER_APPLY = "resolve.after_apply"
DELIVER_BEFORE_DATA = "deliver.before_data"
DELIVER_AFTER_250 = "deliver.after_250"
DELIVER_AFTER_REMOVE = "deliver.after_remove"
MMOVE_POINTS = (
    SEND_BEFORE_DATA,
    SEND_AFTER_250,
    SEND_AFTER_REMOVE,
    SEND_BEFORE_COMMIT,
    SEND_AFTER_COMMIT,
    RECV_BEFORE_STORE,
    RECV_AFTER_STORE,
    RECV_BEFORE_LIVE,
    RECV_AFTER_LIVE,
)
RESOLVE_POINTS = (ANSWER_BEFORE, RESOLVE_BEFORE_QUERY, RESOLVE_BEFORE_APPLY, RESOLVE_AFTER_APPLY)
DELIVER_POINTS = (DELIVER_BEFORE_DATA, DELIVER_AFTER_250, DELIVER_AFTER_REMOVE)

#: ``fault(point, key)``: a test hook called at each named point; it may raise (a crash).
Fault = Callable[[str, str], None]


def no_fault(_point: str, _key: str) -> None:
    return None


def tid_time(tid: str) -> float:
    """When the attempt started (the queue-id time prefix), in seconds."""
    return int(tid[:12], 16) / 1000.0


@define
class TransferState:
    """The sender's in-memory view: attempts whose outcome is not settled yet.

    An id is in flight from before its ``MAIL FROM`` until either its
    ``REMOVE`` (with the id) is durable or the attempt failed without a
    ``250``; after that the durable spool alone answers.
    """

    inflight: set[str] = Factory(set)
    #: How long committed ids are remembered (the spool's ``seen_ttl``).
    window: float = 7 * 86400.0
    fault: Fault = no_fault

    def answer(self, tid: str, seen: Mapping[str, float], now: float | None = None) -> Answer:
        if COMMITTED + tid in seen:
            return Answer.COMMITTED
        if tid in self.inflight:
            return Answer.WAIT
        # Committed ids are remembered for ``window``: an older attempt cannot be
        # told apart from a forgotten commit, so it is not called aborted.
        if (now if now is not None else time.time()) - tid_time(tid) > self.window * 0.9:
            return Answer.UNKNOWN
        return Answer.ABORTED


def valid_tid(tid: str) -> bool:
    return _TID.fullmatch(tid) is not None


def encode_ids(tids: Iterable[str]) -> bytes:
    return b"".join(t.encode() + b"\r\n" for t in tids)


def decode_ids(data: bytes) -> list[str]:
    """Transfer ids of a control transaction; ``ValueError`` on anything else."""
    out = data.decode("ascii", "replace").split()
    if len(out) > MAX_IDS or not all(_TID.fullmatch(t) for t in out):
        raise ValueError("bad transfer id list")
    return out


def encode_answers(answers: Mapping[str, Answer]) -> str:
    return QUERY_PARAM + " " + " ".join(f"{t}={a.value}" for t, a in answers.items())


def parse_answers(text: str) -> dict[str, Answer]:
    out: dict[str, Answer] = {}
    values = {a.value: a for a in Answer}
    for tok in text.split():
        tid, sep, val = tok.partition("=")
        if sep and _TID.fullmatch(tid) and val in values:
            out[tid] = values[val]
    return out
