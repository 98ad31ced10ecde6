"""Spool: store/get/update/remove, recovery, torn writes, group commit, compaction."""

from __future__ import annotations

import itertools
import os
import signal
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import trio
from hypothesis import given, settings
from hypothesis import strategies as st

from duravip.mail import spool_recovery
from duravip.mail.spool import NewMessage, Spool, SpoolError
from duravip.mail.spool_files import (
    create_segment_file,
    private_dir,
    seg_path,
    write_all,
    write_private_file,
)
from duravip.mail.spool_format import (
    LEGACY_HEADER,
    LEGACY_MAGIC,
    MAGIC,
    Damage,
    Kind,
    Record,
    ReplayState,
    encode,
    new_seed,
    scan,
    segment_header,
)
from duravip.mail.spool_recovery import RecoveryReport, copy_aside, recover_log, recover_segment


def new(
    data: bytes = b"Subject: x\r\n\r\nhello\r\n",
    *,
    rcpt_to: tuple[str, ...] = ("b@example.org", "c@example.org"),
    mmove_id: str | None = None,
    transfer_key: str | None = None,
) -> NewMessage:
    return NewMessage(
        mail_from="a@example.org",
        rcpt_to=rcpt_to,
        data=data,
        binding="default",
        requested="default",
        origin="n1",
        mmove_id=mmove_id,
        transfer_key=transfer_key,
    )


async def test_store_get_update_remove(tmp_path: Path) -> None:
    with trio.fail_after(10):
        sp = Spool.open(tmp_path)
        qid = await sp.store(new(b"body-1\r\n"))
        m = sp.get(qid)
        assert m is not None
        assert m.mmove_id == qid
        assert m.rcpt_to == ("b@example.org", "c@example.org")
        assert sp.read_data(qid) == b"body-1\r\n"
        await sp.update(qid, binding="b1", attempts=2, next_at=123.5, rcpt_to=("c@example.org",))
        m = sp.get(qid)
        assert m is not None
        assert (m.binding, m.attempts, m.next_at, m.rcpt_to) == ("b1", 2, 123.5, ("c@example.org",))
        with pytest.raises(ValueError):
            await sp.update(qid, mail_from="evil@example.org")
        await sp.remove(qid)
        assert sp.get(qid) is None
        assert list(sp.iter()) == []
        sp.close()


async def test_recovery_after_restart(tmp_path: Path) -> None:
    with trio.fail_after(10):
        sp = Spool.open(tmp_path)
        ids = [await sp.store(new(f"m{i}\r\n".encode())) for i in range(5)]
        await sp.update(ids[1], attempts=3, next_at=99.0)
        await sp.remove(ids[2])
        k = await sp.store(new(b"moved\r\n", mmove_id="orig-1", transfer_key="orig-1/q9"))
        sp.close()

        sp2 = Spool.open(tmp_path)
        got = {m.id: m for m in sp2.iter()}
        assert set(got) == {ids[0], ids[1], ids[3], ids[4], k}
        assert got[ids[1]].attempts == 3 and got[ids[1]].next_at == 99.0
        assert sp2.read_data(ids[4]) == b"m4\r\n"
        assert got[k].mmove_id == "orig-1"
        assert sp2.has_mmove_id("orig-1/q9")
        assert not sp2.has_mmove_id("orig-1/other")
        sp2.close()


async def test_transfer_key_outlives_message_across_segments(tmp_path: Path) -> None:
    """Dedup records survive removal of the message and the drop of its segment."""
    with trio.fail_after(10):
        sp = Spool.open(tmp_path, segment_size=2048)
        k = await sp.store(new(b"x" * 100, mmove_id="m1", transfer_key="m1/q1"))
        await sp.remove(k)
        for _ in range(60):  # enough to rotate several times and drop old segments
            await sp.remove(await sp.store(new(b"y" * 200)))
        segs = sorted((tmp_path / "log").iterdir())
        assert not (tmp_path / "log" / "00000001.seg").exists()
        assert len(segs) <= 3
        sp.close()
        sp2 = Spool.open(tmp_path, segment_size=2048)
        assert sp2.has_mmove_id("m1/q1")
        assert len(sp2) == 0
        sp2.close()


async def test_compaction_relocates_pinned_messages(tmp_path: Path) -> None:
    with trio.fail_after(10):
        sp = Spool.open(tmp_path, segment_size=4096, max_segments=2)
        keep = await sp.store(new(b"keep-me\r\n"))
        await sp.update(keep, attempts=7)
        for _ in range(100):
            await sp.remove(await sp.store(new(b"z" * 300)))
        assert not (tmp_path / "log" / "00000001.seg").exists()
        assert len(list((tmp_path / "log").iterdir())) <= 3
        assert sp.read_data(keep) == b"keep-me\r\n"
        sp.close()
        sp2 = Spool.open(tmp_path, segment_size=4096)
        m = sp2.get(keep)
        assert m is not None and m.attempts == 7
        assert sp2.read_data(keep) == b"keep-me\r\n"
        assert len(sp2) == 1
        sp2.close()


async def test_group_commit_shares_flushes(tmp_path: Path) -> None:
    with trio.fail_after(20):
        sp = Spool.open(tmp_path)
        ids: list[str] = []

        async def one(i: int) -> None:
            ids.append(await sp.store(new(f"c{i}\r\n".encode())))

        async with trio.open_nursery() as n:
            for i in range(200):
                n.start_soon(one, i)
        assert len(set(ids)) == 200
        # 200 concurrent stores must not need 200 flushes.
        assert sp.flushes < 100
        sp.close()
        sp2 = Spool.open(tmp_path)
        assert len(sp2) == 200
        assert {sp2.read_data(i) for i in ids} == {f"c{i}\r\n".encode() for i in range(200)}
        sp2.close()


async def test_torn_tail_is_ignored_and_truncated(tmp_path: Path) -> None:
    with trio.fail_after(10):
        sp = Spool.open(tmp_path)
        a = await sp.store(new(b"complete\r\n"))
        sp.close()
        seg = tmp_path / "log" / "00000001.seg"
        good = seg.stat().st_size
        seed = scan(seg.read_bytes()).seed
        assert seed is not None
        rec = encode(Kind.STORE, {"id": "half"}, b"partial message", seed=seed)
        with open(seg, "ab") as f:
            f.write(rec[: len(rec) - 5])
        sp2 = Spool.open(tmp_path)
        assert [m.id for m in sp2.iter()] == [a]
        assert seg.stat().st_size == good
        b = await sp2.store(new(b"after\r\n"))
        sp2.close()
        sp3 = Spool.open(tmp_path)
        assert {m.id for m in sp3.iter()} == {a, b}
        sp3.close()


def _records(seed: int, n: int = 8) -> list[bytes]:
    """Small records of every kind, data sizes 0..n (one STORE has none)."""
    kinds = [Kind.SEEN, Kind.STORE, Kind.UPDATE, Kind.STORE, Kind.REMOVE, Kind.STORE]
    return [
        encode(kinds[i % len(kinds)], {"id": f"m{i}"}, bytes([65 + i]) * i, seed=seed)
        for i in range(n)
    ]


def _content(buf: bytes, r: Record) -> tuple[Kind, object, bytes]:
    return r.kind, r.meta, buf[r.data_offset : r.data_offset + r.data_len]


@settings(max_examples=60, deadline=None)
@given(
    cut=st.integers(min_value=0, max_value=10_000), flip=st.integers(min_value=0, max_value=10_000)
)
def test_scan_never_returns_a_partial_record(cut: int, flip: int) -> None:
    seed = new_seed()
    recs = [encode(Kind.STORE, {"id": f"m{i}"}, bytes([i]) * (i * 37), seed=seed) for i in range(6)]
    head = segment_header(seed)
    buf = head + b"".join(recs)
    cut %= len(buf) + 1
    damaged = bytearray(buf[:cut])
    flipped = None
    if damaged and flip % 3 == 0:
        flipped = flip % len(damaged)
        damaged[flipped] ^= 0xFF
    res = scan(bytes(damaged))
    ends = [len(head) + sum(len(r) for r in recs[: i + 1]) for i in range(len(recs))]
    # Every reported record is one of the originals, complete, in order, at its place.
    assert [r.offset + r.length for r in res.records] == sorted(r.offset + r.length for r in res.records)
    for r in res.records:
        i = int(r.meta["id"][1:])
        assert r.meta == {"id": f"m{i}"}
        assert r.offset + r.length == ends[i] <= cut
        assert bytes(damaged[r.data_offset : r.data_offset + r.data_len]) == bytes([i]) * (i * 37)


def test_scan_keeps_every_record_a_flip_misses() -> None:
    """Exhaustive: every bit of a small segment; only the record holding the bit may go."""
    seed = new_seed()
    recs = _records(seed)
    head = segment_header(seed)
    buf = head + b"".join(recs)
    base = scan(buf)
    assert not base.damage and len(base.records) == len(recs)
    want = [_content(buf, r) for r in base.records]
    spans = [(r.offset, r.offset + r.length) for r in base.records]
    for pos in range(len(buf)):
        for bit in range(8):
            damaged = bytearray(buf)
            damaged[pos] ^= 1 << bit
            res = scan(bytes(damaged))
            got = {(r.offset, r.offset + r.length): _content(bytes(damaged), r) for r in res.records}
            where = (pos, bit)
            for span, content in zip(spans, want, strict=True):
                if not span[0] <= pos < span[1]:
                    assert got.get(span) == content, where
            assert all(got[s] == want[spans.index(s)] for s in got), where
            assert res.seed == seed, where
            assert res.damage and all(d.kind is Damage.CORRUPT for d in res.damage), where
            bad = res.corrupt
            assert any(d.offset <= pos < d.offset + d.length for d in bad), where


def test_false_magic_inside_data_cannot_derail_resync() -> None:
    """A message may contain the magic, even whole records: resync must not take them."""
    seed = new_seed()
    forged = b"".join(
        encode(Kind.REMOVE, {"id": f"m{i}"}, seed=new_seed()) for i in range(8)
    ) + encode(Kind.STORE, {"id": "forged"}, b"x", seed=seed ^ 1)
    payload = MAGIC * 40 + forged + MAGIC + b"\xff" * 40
    recs = [
        encode(Kind.STORE, {"id": "m0"}, b"first", seed=seed),
        encode(Kind.STORE, {"id": "evil"}, payload, seed=seed),
        encode(Kind.STORE, {"id": "m2"}, b"third", seed=seed),
    ]
    head = segment_header(seed)
    buf = head + b"".join(recs)
    evil = len(head) + len(recs[0])
    # Flip every bit of the carrier's header: resync scans through its payload.
    for pos in range(evil, evil + 29):
        for bit in range(8):
            damaged = bytearray(buf)
            damaged[pos] ^= 1 << bit
            res = scan(bytes(damaged))
            assert [r.meta["id"] for r in res.records] == ["m0", "m2"], (pos, bit)
            assert [(d.offset, d.length) for d in res.damage] == [(evil, len(recs[1]))]


def test_torn_tail_is_told_from_corruption() -> None:
    seed = new_seed()
    recs = _records(seed)
    buf = segment_header(seed) + b"".join(recs)
    last = len(buf) - len(recs[-1])
    for cut in range(last + 1, len(buf)):
        res = scan(buf[:cut])
        assert len(res.records) == len(recs) - 1
        assert res.corrupt == [] and res.torn is not None, cut
        assert (res.torn.offset, res.torn.length) == (last, cut - last)
    # Zeros where the last append should be (size persisted, data not): torn too.
    res = scan(buf[:last] + bytes(len(recs[-1])))
    assert res.corrupt == [] and res.torn is not None
    # A whole last record with one wrong bit is damage, not a torn write.
    damaged = bytearray(buf)
    damaged[-1] ^= 1
    res = scan(bytes(damaged))
    assert res.torn is None and len(res.corrupt) == 1


def _legacy(kind: Kind, meta: dict[str, object], data: bytes = b"") -> bytes:
    """A record as the first spool format wrote it (checksum over meta and data only)."""
    import json

    import xxhash

    m = json.dumps(meta, separators=(",", ":"), sort_keys=True).encode()
    h = xxhash.xxh64(m)
    h.update(data)
    return LEGACY_HEADER.pack(LEGACY_MAGIC, int(kind), len(m), len(data), h.intdigest()) + m + data


async def test_legacy_segment_is_read_but_never_appended_to(tmp_path: Path) -> None:
    from duravip.mail.spool_format import QueuedMessage, meta_of

    with trio.fail_after(10):
        msgs = [
            QueuedMessage(f"old{i}", "a@x", ("b@y",), "default", "default", "n0", f"old{i}", 3, 1.0)
            for i in range(3)
        ]
        (tmp_path / "log").mkdir(parents=True)
        seg = tmp_path / "log" / "00000001.seg"
        recs = [_legacy(Kind.SEEN, {"keys": {"k/1": 1.0}})]
        recs += [_legacy(Kind.STORE, meta_of(m), b"d%d\n" % i) for i, m in enumerate(msgs)]
        recs.append(_legacy(Kind.REMOVE, {"id": "old1"}))
        legacy = b"".join(recs)
        damaged = bytearray(legacy)
        damaged[len(recs[0]) + 9] ^= 0x40  # a length bit of old0's record: resync past it
        seg.write_bytes(damaged)
        sp = Spool.open(tmp_path)
        assert [m.id for m in sp.iter()] == ["old2"]
        assert sp.read_data("old2") == b"d2\n"
        assert sp.has_mmove_id("k/1")
        assert sp.recovery.corrupt_regions == 1
        assert scan(seg.read_bytes()).legacy  # repaired, still in the old format
        seg2 = tmp_path / "log" / "00000002.seg"
        assert scan(seg2.read_bytes()).seed is not None
        q = await sp.store(new(b"fresh\r\n"))
        assert sp.state.where[q].segment == 2
        sp.close()
        sp2 = Spool.open(tmp_path)
        assert {m.id for m in sp2.iter()} == {"old2", q}
        assert sp2.read_data("old2") == b"d2\n"
        assert sp2.recovery.corrupt_regions == 0
        sp2.close()


async def test_write_failure_raises_and_spool_stays_usable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with trio.fail_after(10):
        sp = Spool.open(tmp_path)
        a = await sp.store(new(b"ok\r\n"))
        real = os.fdatasync
        calls = {"n": 0}

        def failing(fd: int) -> None:
            calls["n"] += 1
            if calls["n"] == 1:  # the append fails; the roll-back's own sync works
                raise OSError(28, "No space left on device")
            real(fd)

        with monkeypatch.context() as m:
            m.setattr(os, "fdatasync", failing)
            with pytest.raises(SpoolError):
                await sp.store(new(b"lost\r\n"))
        assert calls["n"] >= 1
        assert [m.id for m in sp.iter()] == [a]
        b = await sp.store(new(b"later\r\n"))
        sp.close()
        sp2 = Spool.open(tmp_path)
        assert {m.id for m in sp2.iter()} == {a, b}
        sp2.close()


WRITER = textwrap.dedent(
    """
    import sys, trio
    from duravip.mail.spool import NewMessage, Spool

    async def main(path):
        sp = Spool.open(path, segment_size=64 * 1024)
        async def one(i):
            qid = await sp.store(NewMessage("a@x", ("b@x",), b"D%06d" % i * 50, "default", "default", "n1"))
            # Acknowledged: the id is printed only after store() returned.
            print(qid, flush=True)
            if i % 3 == 0:
                print("rm-start", qid, flush=True)
                await sp.remove(qid)
                print("rm", qid, flush=True)
        i = 0
        while True:
            async with trio.open_nursery() as n:
                for _ in range(8):
                    n.start_soon(one, i)
                    i += 1

    trio.run(main, sys.argv[1])
    """
)


@pytest.mark.parametrize("delay", [0.6, 0.9, 1.3])
def test_crash_loses_no_acknowledged_message(tmp_path: Path, delay: float) -> None:
    """SIGKILL a writer at some point; every acknowledged, not removed message survives whole."""
    proc = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(tmp_path)],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        out = ""
        try:
            out, _ = proc.communicate(timeout=delay)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGKILL)
            out, _ = proc.communicate(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
    lines = [ln for ln in out.splitlines() if ln]
    acked = {ln for ln in lines if not ln.startswith("rm")}
    removing = {ln.split()[1] for ln in lines if ln.startswith("rm-start ")}
    removed = {ln[3:] for ln in lines if ln.startswith("rm ")}
    sp = Spool.open(tmp_path, segment_size=64 * 1024)
    try:
        present = {m.id for m in sp.iter()}
        assert acked, "the writer acknowledged nothing before the kill"
        must = acked - removing
        assert must <= present, f"lost {len(must - present)} acknowledged messages"
        assert not (present & removed)
        for m in sp.iter():
            data = sp.read_data(m.id)
            assert len(data) == 7 * 50 and data == data[:7] * 50
    finally:
        sp.close()


async def test_seen_checkpoint_is_chunked(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from duravip.mail import spool_format

    monkeypatch.setattr(spool_format, "SEEN_CHUNK", 3)
    with trio.fail_after(10):
        sp = Spool.open(tmp_path, segment_size=1024)
        for i in range(10):
            await sp.remove(await sp.store(new(b"m\r\n", mmove_id=f"o{i}", transfer_key=f"o{i}/q")))
        for _ in range(30):
            await sp.remove(await sp.store(new(b"y" * 200)))
        assert not (tmp_path / "log" / "00000001.seg").exists()
        sp.close()
        first = min((tmp_path / "log").iterdir())
        records = scan(first.read_bytes()).records
        seen = [r for r in records if r.kind is Kind.SEEN]
        assert len(seen) == 4 and all(len(r.meta["keys"]) <= 3 for r in seen)
        sp2 = Spool.open(tmp_path, segment_size=1024)
        assert all(sp2.has_mmove_id(f"o{i}/q") for i in range(10))
        sp2.close()


async def test_oversized_metadata_is_refused_before_writing(tmp_path: Path) -> None:
    from duravip.mail.spool_format import MAX_META, RecordTooLarge

    with trio.fail_after(10):
        sp = Spool.open(tmp_path)
        huge = tuple(f"r{i}@{'x' * 60}.example" for i in range(MAX_META // 60))
        with pytest.raises(RecordTooLarge):
            await sp.store(new(b"x\r\n", rcpt_to=huge))
        ok = await sp.store(new(b"fine\r\n"))
        sp.close()
        sp2 = Spool.open(tmp_path)
        assert [m.id for m in sp2.iter()] == [ok]
        sp2.close()


async def test_failed_flush_amid_pipelined_flushes_keeps_memory_equal_to_disk(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import time as _time

    real = os.fdatasync
    counter = itertools.count(1)
    calls = {"n": 0}

    def flaky(fd: int) -> None:
        n = next(counter)  # atomic: flushes run in several threads
        calls["n"] = n
        _time.sleep(0.002)  # keep flushes overlapping
        if n == 2:
            raise OSError(5, "Input/output error")
        real(fd)

    with trio.fail_after(20):
        sp = Spool.open(tmp_path)
        acked: list[str] = []
        failed = 0

        async def one(i: int) -> None:
            nonlocal failed
            try:
                acked.append(await sp.store(new(f"p{i}\r\n".encode())))
            except SpoolError:
                failed += 1

        with monkeypatch.context() as m:
            m.setattr(os, "fdatasync", flaky)
            async with trio.open_nursery() as n:
                for i in range(60):
                    n.start_soon(one, i)
                    await trio.sleep(0.001)
        assert failed >= 1 and len(acked) + failed == 60, (calls, sp.flushes, failed, len(acked))
        in_memory = {q.id for q in sp.iter()}
        assert in_memory == set(acked)
        later = await sp.store(new(b"after\r\n"))
        sp.close()
        sp2 = Spool.open(tmp_path)
        assert {q.id for q in sp2.iter()} == set(acked) | {later}
        for q in acked:
            assert sp2.read_data(q).startswith(b"p")
        sp2.close()


# ------------------------------------------- spool_files: private durable files


def _mode(p: Path) -> int:
    return stat.S_IMODE(p.stat().st_mode)


def test_private_dir_creates_0700_and_tightens_only_a_wide_one(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        assert private_dir(tmp_path / "new") is True
        assert _mode(tmp_path / "new") == 0o700
        wide = tmp_path / "wide"
        wide.mkdir(mode=0o755)
        assert private_dir(wide) is False
        assert _mode(wide) == 0o700
        assert private_dir(wide) is False  # already private: left alone
    finally:
        os.umask(old)


def test_write_private_file_is_0600_and_leaves_nothing_on_failure(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    old = os.umask(0)
    try:
        final = tmp_path / "bounce.eml"
        write_private_file(final, b"content")
        assert final.read_bytes() == b"content" and _mode(final) == 0o600

        def no_fsync(fd: int) -> None:
            raise OSError(5, "EIO")

        monkeypatch.setattr(os, "fsync", no_fsync)
        other = tmp_path / "other.eml"
        with pytest.raises(OSError):
            write_private_file(other, b"x")
        assert sorted(p.name for p in tmp_path.iterdir()) == ["bounce.eml"]
    finally:
        os.umask(old)


def test_create_segment_file_is_all_or_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    seg = seg_path(tmp_path, 7)
    assert seg.name == "00000007.seg"
    head = segment_header(new_seed())
    fd = create_segment_file(seg, head)
    try:
        os.write(fd, b"appended")
    finally:
        os.close(fd)
    assert seg.read_bytes() == head + b"appended" and _mode(seg) == 0o600
    with pytest.raises(FileExistsError):
        create_segment_file(seg, head)

    def no_sync(fd: int) -> None:
        raise OSError(28, "ENOSPC")

    monkeypatch.setattr(os, "fdatasync", no_sync)
    with pytest.raises(OSError):
        create_segment_file(seg_path(tmp_path, 8), head)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["00000007.seg"]


def test_write_all_survives_short_writes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = os.write
    monkeypatch.setattr(os, "write", lambda fd, data: real(fd, bytes(data[:3])))
    p = tmp_path / "f"
    fd = os.open(p, os.O_WRONLY | os.O_CREAT)
    try:
        write_all(fd, b"0123456789")
    finally:
        os.close(fd)
    assert p.read_bytes() == b"0123456789"


# ---------------------------------------- spool_recovery: scan, repair, copies


def _segment(log_dir: Path, seg: int, n: int = 6) -> tuple[bytes, list[bytes]]:
    seed = new_seed()
    recs = _records(seed, n)
    buf = segment_header(seed) + b"".join(recs)
    seg_path(log_dir, seg).write_bytes(buf)
    return buf, recs


def test_recover_segment_cuts_a_torn_tail_without_a_copy(tmp_path: Path) -> None:
    buf, recs = _segment(tmp_path, 1)
    good = len(buf) - len(recs[-1])
    seg_path(tmp_path, 1).write_bytes(buf[: len(buf) - 3])
    report = RecoveryReport()
    res = recover_segment(tmp_path, 1, report)
    assert len(res.records) == len(recs) - 1
    assert seg_path(tmp_path, 1).stat().st_size == good
    assert (report.torn_tails, report.torn_bytes) == (1, len(recs[-1]) - 3)
    assert (report.corrupt_regions, report.copies) == (0, [])
    assert report.counters() == {"spool_torn_tails": 1, "spool_corrupt_regions": 0}


def test_recover_segment_copies_corruption_aside_then_rewrites_it(tmp_path: Path) -> None:
    buf, recs = _segment(tmp_path, 3)
    damaged = bytearray(buf)
    damaged[len(buf) - len(recs[-1]) - 2] ^= 0x40  # inside the second-to-last record
    seg_path(tmp_path, 3).write_bytes(damaged)
    report = RecoveryReport()
    res = recover_segment(tmp_path, 3, report)
    assert not res.damage and len(res.records) == len(recs) - 1
    assert not scan(seg_path(tmp_path, 3).read_bytes()).damage
    assert report.corrupt_regions == 1 and report.corrupt_bytes == len(recs[-2])
    [copy] = report.copies
    assert copy.name.startswith("00000003.corrupt-") and copy.read_bytes() == damaged
    assert _mode(copy) == 0o600 and _mode(seg_path(tmp_path, 3)) == 0o600
    assert not list(tmp_path.glob("*.tmp"))


def test_copy_aside_never_overwrites_an_older_copy(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(spool_recovery.time, "strftime", lambda fmt, t: "20260101T000000Z")
    first = copy_aside(tmp_path, 2, b"one")
    second = copy_aside(tmp_path, 2, b"two")
    assert (first.name, second.name) == (
        "00000002.corrupt-20260101T000000Z",
        "00000002.corrupt-20260101T000000Z.1",
    )
    assert (first.read_bytes(), second.read_bytes()) == (b"one", b"two")


async def test_recover_log_replays_segments_in_order_and_drops_leftovers(tmp_path: Path) -> None:
    with trio.fail_after(10):
        sp = Spool.open(tmp_path, segment_size=1)  # every flush rotates: one message a segment
        ids = [await sp.store(new(f"m{i}\r\n".encode())) for i in range(3)]
        sp.close()
    log_dir = tmp_path / "log"
    (log_dir / "00000009.seg.tmp").write_bytes(b"half made")
    (log_dir / "notes.seg").write_bytes(b"not a segment number")
    (log_dir / "00000001.corrupt-x").write_bytes(b"an old copy")
    state, report = ReplayState(), RecoveryReport()
    segs, last = recover_log(log_dir, state, report)
    assert segs == sorted(segs) and len(segs) == report.segments >= 3
    assert last is not None and last.seed is not None
    assert list(state.messages) == ids
    assert not (log_dir / "00000009.seg.tmp").exists()
    assert (log_dir / "notes.seg").exists() and (log_dir / "00000001.corrupt-x").exists()
