"""Open-time recovery of the spool log: scan, repair, keep copies of damage (no trio).

A torn tail (an append cut by a crash, never acknowledged) is truncated.
Anything else is CORRUPTION: the damaged segment is copied aside first, then
rewritten with only its valid records, so the damage is reported once and
appends never follow garbage. Log lines keep the ``duravip.mail.spool`` logger.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

from attrs import Factory, define

from duravip.mail.spool_files import (
    FILE_MODE,
    SEGMENT_SUFFIX,
    TMP_SUFFIX,
    fsync_dir,
    seg_path,
    seg_tmp_path,
    write_all,
)
from duravip.mail.spool_format import ReplayState, SegmentScan, scan, segment_header

__all__ = ["RecoveryReport", "copy_aside", "recover_log", "recover_segment"]

log = logging.getLogger("duravip.mail.spool")


@define
class RecoveryReport:
    """What :meth:`Spool.open` found and repaired (logged, and exported as counters)."""

    segments: int = 0
    records: int = 0
    #: Crash-cut appends truncated (never acknowledged: not a loss).
    torn_tails: int = 0
    torn_bytes: int = 0
    #: Damaged ranges holding no valid record, and their bytes (records in them are lost).
    corrupt_regions: int = 0
    corrupt_bytes: int = 0
    #: Copies of damaged segments taken before repairing them.
    copies: list[Path] = Factory(list)

    def counters(self) -> dict[str, int]:
        return {
            "spool_torn_tails": self.torn_tails,
            "spool_corrupt_regions": self.corrupt_regions,
        }


def recover_log(
    log_dir: Path, state: ReplayState, report: RecoveryReport
) -> tuple[list[int], SegmentScan | None]:
    """Recover every segment of ``log_dir`` in order, replaying its records into ``state``.

    Returns the segment numbers and the last segment's scan (None: no segment).
    Leftover temporary segments (a creation or repair that never completed) go first.
    """
    for p in log_dir.glob("*" + TMP_SUFFIX):
        p.unlink()
    segs = sorted(
        int(p.name.removesuffix(SEGMENT_SUFFIX))
        for p in log_dir.iterdir()
        if p.name.endswith(SEGMENT_SUFFIX) and p.name.removesuffix(SEGMENT_SUFFIX).isdigit()
    )
    res: SegmentScan | None = None
    for seg in segs:
        res = recover_segment(log_dir, seg, report)
        for rec in res.records:
            state.apply(seg, rec)
        report.segments += 1
        report.records += len(res.records)
    return segs, res


def recover_segment(log_dir: Path, seg: int, report: RecoveryReport) -> SegmentScan:
    """Scan one segment; keep a copy of a damaged one, then repair it in place.

    A torn tail is cut off (it was never acknowledged). Anything else is
    CORRUPTION: the original bytes go to ``log/NNNNNNNN.corrupt-<time>``
    first, then the segment is rewritten with only its valid records.
    """
    p = seg_path(log_dir, seg)
    buf = p.read_bytes()
    res = scan(buf)
    if not res.damage:
        return res
    torn = res.torn
    corrupt = res.corrupt
    if torn is not None:
        report.torn_tails += 1
        report.torn_bytes += torn.length
        log.warning(
            "spool: segment %s: torn write at crash, %d bytes at offset %d"
            " (an append never acknowledged); truncating",
            p.name,
            torn.length,
            torn.offset,
        )
    if not corrupt:
        assert torn is not None
        with open(p, "r+b") as f:
            f.truncate(torn.offset)
            os.fsync(f.fileno())
        return res
    report.corrupt_regions += len(corrupt)
    report.corrupt_bytes += sum(d.length for d in corrupt)
    copy = copy_aside(log_dir, seg, buf)
    report.copies.append(copy)
    log.error(
        "spool: CORRUPTION in segment %s: %d damaged range(s) (%s), %d record(s) intact;"
        " records in the damaged ranges are lost unless another copy exists;"
        " original saved as %s, segment rewritten without them",
        p.name,
        len(corrupt),
        ", ".join(f"{d.length} bytes at {d.offset}" for d in corrupt),
        len(res.records),
        copy.name,
    )
    head = segment_header(res.seed, preallocated=res.preallocated) if res.seed is not None else b""
    clean = head + b"".join(buf[r.offset : r.offset + r.length] for r in res.records)
    tmp = seg_tmp_path(p)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, FILE_MODE)
    try:
        os.fchmod(fd, FILE_MODE)
        write_all(fd, clean)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, p)
    fsync_dir(log_dir)
    again = scan(clean)
    if again.damage or len(again.records) != len(res.records):
        raise RuntimeError(f"spool: repair of segment {p.name} did not verify")
    return again


def copy_aside(log_dir: Path, seg: int, buf: bytes) -> Path:
    """Save ``buf`` durably as ``NNNNNNNN.corrupt-<UTC time>[.n]``, never over an older copy."""
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    for n in range(1000):
        name = f"{seg:08d}.corrupt-{stamp}" + (f".{n}" if n else "")
        p = log_dir / name
        try:
            fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, FILE_MODE)
        except FileExistsError:
            continue
        try:
            os.fchmod(fd, FILE_MODE)
            write_all(fd, buf)
            os.fsync(fd)
        finally:
            os.close(fd)
        fsync_dir(log_dir)
        return p
    raise FileExistsError(f"no free name for a copy of segment {seg}")
