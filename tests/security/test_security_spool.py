"""Spool under damage and hostile local conditions (issue 17).

* One flipped bit anywhere in a segment (active or older) loses at most the
  record that holds it; every other record is recovered with its exact
  content, the damage is reported as CORRUPTION (not a torn write) and the
  original bytes are kept in a copy beside the log.
* A genuine torn tail is still truncated (and reported as torn).
* The spool's directories are 0700 and bounce files 0600 whatever the umask;
  the directories that make a file or subdirectory durable are fsynced.
"""

from __future__ import annotations

import logging
import os
import shutil
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from duravip.mail.delivery import write_bounce
from duravip.mail.spool import NewMessage, Spool
from duravip.mail.spool_format import QueuedMessage

#: Exhaustive bit-flip runs need many reopenings: keep them off the real disk if we can.
SHM = Path("/dev/shm")


def _new(i: int) -> NewMessage:
    return NewMessage(
        mail_from="a@x",
        rcpt_to=(f"r{i}@y",),
        data=b"m%d\r\n" % i,
        binding="default",
        requested="default",
        origin="n1",
    )


def _scratch(tmp_path: Path) -> Path:
    if SHM.is_dir() and os.access(SHM, os.W_OK):
        d = Path(os.path.join(SHM, f"duravip-test-{os.getpid()}-{id(tmp_path)}"))
        d.mkdir()
        return d
    return tmp_path / "scratch"


async def _template(root: Path, *, older: bool) -> tuple[str, list[QueuedMessage], dict[str, bytes]]:
    """Eight STOREs in segment 1; ``older``: a ninth in segment 2 makes segment 1 an old one."""
    sp = Spool.open(root, segment_size=1 << 20)
    ids = [await sp.store(_new(i)) for i in range(8)]
    msgs = [m for i in ids if (m := sp.get(i)) is not None]
    data = {i: sp.read_data(i) for i in ids}
    sp.close()
    if older:
        sp = Spool.open(root, segment_size=1)
        extra = await sp.store(_new(8))
        msgs.append(sp.get(extra))  # type: ignore[arg-type]
        data[extra] = sp.read_data(extra)
        assert sp.state.where[extra].segment == 2
        sp.close()
    return "00000001.seg", msgs, data


def _spans(root: Path, msgs: list[QueuedMessage]) -> dict[str, tuple[int, int]]:
    """Byte span of each message's record in segment 1 (record 0 from offset 0: conservative)."""
    sp = Spool.open(root, segment_size=1 << 20)
    try:
        spans: dict[str, tuple[int, int]] = {}
        prev = 0
        for m in msgs:
            loc = sp.state.where[m.id]
            if loc.segment != 1:
                continue
            end = loc.data_offset + loc.data_len
            spans[m.id] = (prev, end)
            prev = end
        return spans
    finally:
        sp.close()


def _flips(n: int) -> Iterator[tuple[int, int]]:
    """Every byte, each with one bit (all 8 bit positions in turn); every bit of every
    byte is covered at the format level by ``test_scan_keeps_every_record_a_flip_misses``."""
    for pos in range(n):
        yield pos, pos % 8


@pytest.mark.parametrize("older", [False, True], ids=["active", "older"])
async def test_one_bit_flip_anywhere_loses_only_the_record_it_hits(
    tmp_path: Path, older: bool, caplog: pytest.LogCaptureFixture
) -> None:
    with trio.fail_after(300):
        tpl = tmp_path / "tpl"
        name, msgs, data = await _template(tpl, older=older)
        spans = _spans(tpl, msgs)
        assert len(spans) == 8
        clean = (tpl / "log" / name).read_bytes()
        work = _scratch(tmp_path)
        shutil.copytree(tpl, work, dirs_exist_ok=True)
        seg = work / "log" / name
        try:
            for pos, bit in _flips(len(clean)):
                for c in (work / "log").glob("00000001.corrupt-*"):
                    c.unlink()
                damaged = bytearray(clean)
                damaged[pos] ^= 1 << bit
                seg.write_bytes(damaged)
                caplog.clear()
                with caplog.at_level(logging.WARNING, logger="duravip.mail.spool"):
                    sp = Spool.open(work, segment_size=1 << 20)
                try:
                    got = {m.id: m for m in sp.iter()}
                    where = f"byte {pos} bit {bit}"
                    for m in msgs:
                        span = spans.get(m.id)
                        hit = span is not None and span[0] <= pos < span[1]
                        if not hit:
                            assert got.get(m.id) == m, f"{where}: lost or altered {m.id}"
                        if m.id in got:
                            # Never a message with wrong content, hit or not.
                            assert got[m.id] == m, where
                            assert sp.read_data(m.id) == data[m.id], where
                    assert len(got) >= len(msgs) - 1, where
                    rep = sp.recovery
                    assert rep.corrupt_regions >= 1 and rep.torn_tails == 0, (where, rep)
                    assert any("CORRUPTION" in r.getMessage() for r in caplog.records), where
                    assert not any("torn" in r.getMessage() for r in caplog.records), where
                    copies = sorted((work / "log").glob("00000001.corrupt-*"))
                    assert [c.read_bytes() for c in copies] == [bytes(damaged)], where
                finally:
                    sp.close()
                if pos % 4:
                    continue
                # Repaired: a second open finds nothing wrong and the same messages.
                sp = Spool.open(work, segment_size=1 << 20)
                try:
                    assert {m.id: m for m in sp.iter()} == got, where
                    assert sp.recovery.corrupt_regions == 0, where
                finally:
                    sp.close()
        finally:
            shutil.rmtree(work, ignore_errors=True)


async def test_torn_tail_is_truncated_at_every_cut(tmp_path: Path) -> None:
    with trio.fail_after(120):
        tpl = tmp_path / "tpl"
        name, msgs, _ = await _template(tpl, older=False)
        spans = _spans(tpl, msgs)
        clean = (tpl / "log" / name).read_bytes()
        last_start, last_end = spans[msgs[-1].id]
        assert last_end == len(clean)
        work = _scratch(tmp_path)
        try:
            shutil.copytree(tpl, work, dirs_exist_ok=True)
            seg = work / "log" / name
            for cut in range(last_start + 1, last_end):
                seg.write_bytes(clean[:cut])
                sp = Spool.open(work, segment_size=1 << 20)
                try:
                    assert [m.id for m in sp.iter()] == [m.id for m in msgs[:-1]], cut
                    assert sp.recovery.torn_tails == 1 and sp.recovery.corrupt_regions == 0, cut
                    assert seg.stat().st_size == last_start, cut
                    assert not list((work / "log").glob("*.corrupt-*")), cut
                    q = await sp.store(_new(99))
                finally:
                    sp.close()
                sp = Spool.open(work, segment_size=1 << 20)
                try:
                    assert sp.read_data(q) == b"m99\r\n"
                    assert len(sp) == len(msgs)
                    assert sp.recovery.torn_tails == 0
                finally:
                    sp.close()
        finally:
            shutil.rmtree(work, ignore_errors=True)


async def test_corruption_is_counted_by_the_mail_service(tmp_path: Path) -> None:
    from tests.mail.conftest import mail_config

    from duravip.mail.service import MailService

    with trio.fail_after(30):
        tpl = tmp_path / "spool"
        name, msgs, _ = await _template(tpl, older=False)
        spans = _spans(tpl, msgs)
        seg = tpl / "log" / name
        buf = bytearray(seg.read_bytes())
        buf[spans[msgs[2].id][0] + 3] ^= 0x10  # record 3 of 8
        seg.write_bytes(buf)
        sp = Spool.open(tpl)
        try:
            assert {m.id for m in sp.iter()} == {m.id for m in msgs} - {msgs[2].id}
            svc = MailService(
                config=mail_config(tpl, node="n1", smarthost=None),
                node_name="n1",
                spool=sp,
                keyring_keys=lambda: [b"k" * 32],
            )
            assert svc.counters["spool_corrupt_regions"] == 1
            assert svc.counters["spool_torn_tails"] == 0
            # Appends after the repair land behind the intact records.
            later = await sp.store(_new(9))
        finally:
            sp.close()
        sp = Spool.open(tpl)
        try:
            assert {m.id for m in sp.iter()} == {m.id for m in msgs} - {msgs[2].id} | {later}
            assert sp.read_data(later) == b"m9\r\n"
            assert sp.recovery.corrupt_regions == 0
        finally:
            sp.close()


# ---- permissions and durability ------------------------------------------------


def _mode(p: Path) -> int:
    return stat.S_IMODE(p.stat().st_mode)


def test_spool_directories_are_private_whatever_the_umask(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        root = tmp_path / "new" / "spool"
        Spool.open(root).close()
        assert _mode(root) == 0o700
        assert _mode(root / "log") == 0o700
        assert _mode(root / "bounces") == 0o700
        for seg in (root / "log").iterdir():
            assert _mode(seg) == 0o600
    finally:
        os.umask(old)


def test_existing_wide_spool_directories_are_tightened(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    old = os.umask(0)
    try:
        root = tmp_path / "spool"
        for d in (root, root / "log", root / "bounces"):
            d.mkdir(mode=0o777)
            d.chmod(0o777)
        with caplog.at_level(logging.WARNING, logger="duravip.mail.spool"):
            Spool.open(root).close()
        for d in (root, root / "log", root / "bounces"):
            assert _mode(d) == 0o700, d
        assert sum("0777" in r.getMessage() for r in caplog.records) == 3
    finally:
        os.umask(old)


def _record_fsyncs(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    synced: list[str] = []
    real = os.fsync

    def spy(fd: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real(fd)

    monkeypatch.setattr(os, "fsync", spy)
    return synced


def test_spool_root_is_fsynced_after_creating_its_subdirectories(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = tmp_path / "spool"
    root.mkdir()
    synced = _record_fsyncs(monkeypatch)
    Spool.open(root).close()
    assert str(root) in synced


def test_bounce_file_is_private_and_its_directory_fsynced(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    old = os.umask(0)
    try:
        sp = Spool.open(tmp_path / "spool")
        msg = QueuedMessage(
            id="q1",
            mail_from="a@x",
            rcpt_to=("b@y",),
            binding="default",
            requested="default",
            origin="n1",
            mmove_id="q1",
            size=3,
            received_at=0.0,
        )
        synced = _record_fsyncs(monkeypatch)
        path = write_bounce(sp.bounce_dir, msg, b"hi\n", "550 no", ["b@y"])
        sp.close()
        assert _mode(path) == 0o600
        assert path.read_bytes().endswith(b"\n\nhi\n")
        assert str(sp.bounce_dir) in synced
        assert synced.index(str(sp.bounce_dir)) > synced.index(str(path.with_suffix(".tmp")))
        assert not list(sp.bounce_dir.glob("*.tmp"))
    finally:
        os.umask(old)
