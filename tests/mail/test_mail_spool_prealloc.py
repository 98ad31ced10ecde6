"""Preallocated spool segments (format version 3): the zero tail is the end of the log,
torn appends into it are told from corruption, and the spool keeps space allocated ahead."""

from __future__ import annotations

from pathlib import Path

import pytest
import trio

from duravip.mail.spool import NewMessage, Spool
from duravip.mail.spool_files import ZeroFill, seg_path
from duravip.mail.spool_format import (
    SECTOR,
    SEG_COPY,
    SEG_VERSION,
    SEG_VERSION_PREALLOC,
    Damage,
    Kind,
    encode,
    new_seed,
    scan,
    segment_header,
)
from duravip.mail.spool_recovery import RecoveryReport, recover_segment


def new(data: bytes) -> NewMessage:
    return NewMessage(
        mail_from="a@example.org",
        rcpt_to=("b@example.org",),
        data=data,
        binding="default",
        requested="default",
        origin="n1",
    )


def _records(seed: int, n: int = 6, size: int = 40) -> list[bytes]:
    return [
        encode(Kind.STORE, {"id": f"m{i}"}, bytes([65 + i]) * (size + i), seed=seed)
        for i in range(n)
    ]


def _prealloc(seed: int, recs: list[bytes], tail: int = 8192) -> bytes:
    return segment_header(seed, preallocated=True) + b"".join(recs) + bytes(tail)


def _version(buf: bytes) -> int:
    return buf[4]


def test_zero_tail_of_a_preallocated_segment_is_the_clean_end() -> None:
    seed = new_seed()
    recs = _records(seed)
    buf = _prealloc(seed, recs)
    res = scan(buf)
    assert res.preallocated and res.damage == []
    assert [r.meta["id"] for r in res.records] == [f"m{i}" for i in range(len(recs))]
    assert res.end == len(buf) - 8192
    # An empty preallocated segment: header, then zeros.
    empty = scan(segment_header(seed, preallocated=True) + bytes(4096))
    assert empty.records == [] and empty.damage == [] and empty.end == 2 * SEG_COPY.size
    # The same zeros after a version 2 segment stay a torn append, as before.
    old = scan(segment_header(seed) + b"".join(recs) + bytes(100))
    assert not old.preallocated and old.torn is not None and old.corrupt == []


def test_a_record_ending_in_zero_bytes_is_not_cut_by_the_zero_tail() -> None:
    seed = new_seed()
    rec = encode(Kind.STORE, {"id": "z"}, b"data" + bytes(700), seed=seed)
    res = scan(_prealloc(seed, [rec]))
    assert res.damage == [] and [r.meta["id"] for r in res.records] == ["z"]
    assert res.records[0].data_len == 704


def test_torn_append_into_the_zero_tail_at_every_cut() -> None:
    """A crash leaves a prefix of the last append and zeros where the rest would be."""
    seed = new_seed()
    recs = _records(seed, size=300)
    full = _prealloc(seed, recs)
    last = len(full) - 8192 - len(recs[-1])
    end = last + len(recs[-1])
    for cut in range(last + 1, end):
        buf = full[:cut] + bytes(len(full) - cut)
        res = scan(buf)
        assert len(res.records) == len(recs) - 1, cut
        assert res.corrupt == [] and res.torn is not None, cut
        assert res.torn.offset == last and res.end == last, cut


def test_torn_batch_with_an_unwritten_sector_in_the_middle_is_torn() -> None:
    """Pages reach the disk in any order: a later page of a batch landed, an earlier did not."""
    seed = new_seed()
    good = _records(seed, n=2)
    batch = _records(seed, n=3, size=1500)
    buf = bytearray(_prealloc(seed, good + batch))
    start = len(segment_header(seed)) + sum(map(len, good))
    last = start + len(batch[0]) + len(batch[1])
    first = -(-(last + 100) // SECTOR) * SECTOR
    assert first + SECTOR < last + len(batch[2]) - 100  # its later bytes landed
    buf[first : first + SECTOR] = bytes(SECTOR)  # never written
    res = scan(bytes(buf))
    assert len(res.records) == 4
    assert res.corrupt == [] and res.torn is not None and res.torn.offset == last
    # The head of the batch never landed but its later records did, whole: those are
    # kept, and the hole before them is reported as CORRUPT (conservative: a hole with
    # valid records after it looks the same as lost acknowledged data).
    buf = bytearray(_prealloc(seed, good + batch))
    buf[start : start + 64] = bytes(64)
    res = scan(bytes(buf))
    assert len(res.records) == 4 and res.torn is None
    assert [(d.offset, d.length, d.kind) for d in res.damage] == [
        (start, len(batch[0]), Damage.CORRUPT)
    ]


def test_a_bit_flip_in_the_last_record_before_the_zero_tail_is_corruption() -> None:
    seed = new_seed()
    recs = _records(seed)
    buf = bytearray(_prealloc(seed, recs))
    buf[len(buf) - 8192 - 3] ^= 0x01
    res = scan(bytes(buf))
    assert res.torn is None and len(res.corrupt) == 1
    assert len(res.records) == len(recs) - 1


def test_repair_of_a_preallocated_segment_keeps_its_version(tmp_path: Path) -> None:
    seed = new_seed()
    recs = _records(seed)
    buf = bytearray(_prealloc(seed, recs))
    buf[len(segment_header(seed)) + len(recs[0]) + 30] ^= 0x08  # inside record 2
    seg_path(tmp_path, 1).write_bytes(buf)
    report = RecoveryReport()
    res = recover_segment(tmp_path, 1, report)
    assert report.corrupt_regions == 1 and len(res.records) == len(recs) - 1
    fixed = seg_path(tmp_path, 1).read_bytes()
    assert _version(fixed) == SEG_VERSION_PREALLOC and scan(fixed).damage == []


async def test_spool_preallocates_appends_in_place_and_reopens_clean(tmp_path: Path) -> None:
    with trio.fail_after(20):
        sp = Spool.open(tmp_path, preallocate=8192)
        seg = seg_path(tmp_path / "log", 1)
        assert _version(seg.read_bytes()) == SEG_VERSION_PREALLOC
        size0 = seg.stat().st_size
        assert size0 >= 8192
        ids = [await sp.store(new(f"m{i}\r\n".encode() * 40)) for i in range(3)]
        assert seg.stat().st_size == size0  # overwritten in place, not grown
        ids += [await sp.store(new(b"x" * 3000)) for _ in range(10)]
        for _ in range(200):  # the zero fill runs in its thread
            if seg.stat().st_size - sp._active_size >= 4096:
                break
            await trio.sleep(0.01)
        assert seg.stat().st_size > size0  # kept written ahead of the appends
        assert seg.stat().st_size - sp._active_size >= 4096
        ahead = seg.read_bytes()[sp._active_size :]
        assert ahead == bytes(len(ahead))
        sp.close()
        sp = Spool.open(tmp_path, preallocate=8192)
        assert [m.id for m in sp.iter()] == ids
        assert (sp.recovery.torn_tails, sp.recovery.corrupt_regions) == (0, 0)
        later = await sp.store(new(b"later\r\n"))
        sp.close()
        sp = Spool.open(tmp_path, preallocate=8192)
        assert [m.id for m in sp.iter()] == [*ids, later]
        assert sp.read_data(later) == b"later\r\n"
        assert (sp.recovery.torn_tails, sp.recovery.corrupt_regions) == (0, 0)
        sp.close()


async def test_crash_inside_a_preallocated_segment_is_a_torn_tail(tmp_path: Path) -> None:
    with trio.fail_after(20):
        sp = Spool.open(tmp_path, preallocate=16384)
        ids = [await sp.store(new(f"m{i}\r\n".encode())) for i in range(4)]
        end = sp._active_size
        sp.close()
        seg = seg_path(tmp_path / "log", 1)
        size = seg.stat().st_size
        seed = scan(seg.read_bytes()).seed
        assert seed is not None
        rec = encode(Kind.STORE, {"id": "half"}, b"never acknowledged" * 20, seed=seed)
        with open(seg, "r+b") as f:  # the crash: part of an append landed in the zeros
            f.seek(end)
            f.write(rec[: len(rec) // 2])
        assert seg.stat().st_size == size
        sp = Spool.open(tmp_path, preallocate=16384)
        assert [m.id for m in sp.iter()] == ids
        assert (sp.recovery.torn_tails, sp.recovery.corrupt_regions) == (1, 0)
        assert sp.recovery.torn_bytes == len(rec) // 2
        assert not list((tmp_path / "log").glob("*.corrupt-*"))
        after = [await sp.store(new(f"a{i}\r\n".encode() * 50)) for i in range(3)]
        sp.close()
        sp = Spool.open(tmp_path, preallocate=16384)
        assert [m.id for m in sp.iter()] == ids + after
        assert (sp.recovery.torn_tails, sp.recovery.corrupt_regions) == (0, 0)
        assert sp.read_data(after[-1]) == b"a2\r\n" * 50
        sp.close()


async def test_rotation_and_switching_preallocation_off(tmp_path: Path) -> None:
    with trio.fail_after(20):
        sp = Spool.open(tmp_path, preallocate=4096, segment_size=1)  # every flush rotates
        ids = [await sp.store(new(f"m{i}\r\n".encode())) for i in range(3)]
        sp.close()
        log_dir = tmp_path / "log"
        segs = sorted(log_dir.glob("*.seg"))
        assert len(segs) >= 3
        assert all(_version(p.read_bytes()) == SEG_VERSION_PREALLOC for p in segs)
        # Opened without preallocation: a new version 2 segment, the old ones read.
        sp = Spool.open(tmp_path)
        assert {m.id for m in sp.iter()} == set(ids)  # (compaction may reorder)
        q = await sp.store(new(b"plain\r\n"))
        sp.close()
        newest = sorted(log_dir.glob("*.seg"))[-1]
        assert _version(newest.read_bytes()) == SEG_VERSION
        assert newest.stat().st_size == scan(newest.read_bytes()).end  # append-only
        sp = Spool.open(tmp_path, preallocate=4096)
        assert {m.id for m in sp.iter()} == {*ids, q}
        assert sp.recovery.torn_tails == 0
        sp.close()


async def test_a_failed_zero_fill_falls_back_to_appends(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with trio.fail_after(20):
        sp = Spool.open(tmp_path, preallocate=4096)
        first = await sp.store(new(b"a\r\n"))

        def refuse(self: ZeroFill, fd: int, buf: object) -> None:
            raise OSError(28, "No space left on device")

        monkeypatch.setattr(ZeroFill, "_fill", refuse)
        ids = [first]
        for _ in range(40):
            ids.append(await sp.store(new(b"y" * 2000)))
            if sp._pre.step == 0:
                break
            await trio.sleep(0.01)
        assert sp._pre.step == 0  # told once, then plain appends
        ids += [await sp.store(new(b"z" * 2000)) for _ in range(3)]
        sp.close()
        monkeypatch.undo()
        sp = Spool.open(tmp_path, preallocate=4096)
        assert [m.id for m in sp.iter()] == ids
        assert (sp.recovery.torn_tails, sp.recovery.corrupt_regions) == (0, 0)
        sp.close()



def test_zero_fill_never_writes_below_its_start(tmp_path: Path) -> None:
    p = tmp_path / "f"
    data = b"r" * 5000  # not block-aligned
    p.write_bytes(data)
    job = ZeroFill(p, len(data), 10000)
    assert job.done.wait(10) and job.error is None
    assert job.start == 8192 and job.end == 8192 + 12288
    buf = p.read_bytes()
    assert buf[:5000] == data and buf[5000:] == bytes(len(buf) - 5000)
    assert len(buf) == job.end
