"""The sender's answers and the control-transaction encoding of the two-phase mmove (sans-IO)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from duravip.mail import transfer_state as ts
from duravip.mail.spool import new_queue_id
from duravip.mail.spool_format import COMMITTED
from duravip.mail.transfer_state import Answer, TransferState

TIDS = st.lists(st.text("0123456789abcdef", min_size=22, max_size=22), max_size=30)


def test_answers() -> None:
    st_ = TransferState(window=100.0)
    t = new_queue_id()
    now = ts.tid_time(t) + 1
    assert st_.answer(t, {}, now) is Answer.ABORTED
    st_.inflight.add(t)
    assert st_.answer(t, {}, now) is Answer.WAIT  # the attempt may still commit
    assert st_.answer(t, {COMMITTED + t: now}, now) is Answer.COMMITTED
    st_.inflight.clear()
    # Past 90 % of the memory of committed ids: cannot tell "aborted" from "forgotten".
    assert st_.answer(t, {}, ts.tid_time(t) + 91) is Answer.UNKNOWN


@given(TIDS)
def test_ids_and_answers_round_trip(tids: list[str]) -> None:
    assert ts.decode_ids(ts.encode_ids(tids)) == tids
    answers = {t: list(Answer)[i % 4] for i, t in enumerate(tids)}
    assert ts.parse_answers("Ok: queued as " + ts.encode_answers(answers)) == answers


@pytest.mark.parametrize("data", [b"x\r\n", b"0" * 21 + b"\r\n", b"G" * 22, b"0" * 22 * 1001])
def test_bad_id_lists_are_refused(data: bytes) -> None:
    if len(data) > 1000:
        data = b"".join(b"0" * 22 + b"\r\n" for _ in range(1001))
    with pytest.raises(ValueError):
        ts.decode_ids(data)
