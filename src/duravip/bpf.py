"""Classic BPF socket filters: the handover relay's capture filter and the listeners' SYN gate.

Both run in the kernel, so a planned move costs no Python per packet it does
not care about: the relay's packet socket sees only ARP, neighbour adverts and
TCP SYNs; a gated listening socket drops new SYNs silently (no RST, no SYN-ACK:
the client's SYN is the relay's to hand on) while the handshakes already in
flight still complete. Programs are built from a tiny label assembler so they
read like ``tcpdump -d`` output.
"""

from __future__ import annotations

import ctypes
import socket
import struct
from collections.abc import Sequence
from typing import Protocol

__all__ = [
    "CAPTURE_HANDOVER",
    "SYN_GATE",
    "Insn",
    "assemble",
    "attach",
    "detach",
]

SO_ATTACH_FILTER = getattr(socket, "SO_ATTACH_FILTER", 26)
SO_DETACH_FILTER = getattr(socket, "SO_DETACH_FILTER", 27)

# Opcode parts (linux/bpf_common.h).
LD, LDX, ALU, JMP, RET = 0x00, 0x01, 0x04, 0x05, 0x06
H, B = 0x08, 0x10
ABS, IND, MSH = 0x20, 0x40, 0xA0
JEQ, JSET = 0x10, 0x40
AND = 0x50

#: One instruction: (opcode, k, jump-if-true label, jump-if-false label); labels
#: are names of later instructions (None: fall through). A str alone is a label.
Insn = tuple[int, int, str | None, str | None] | str

_INSN = struct.Struct("=HBBI")


class Settable(Protocol):
    """A stdlib or trio socket."""

    def setsockopt(self, level: int, option: int, value: int | bytes, /) -> None: ...


ACCEPT_ALL = 0xFFFFFFFF

SYN, ACK = 0x02, 0x10


def assemble(program: Sequence[Insn]) -> bytes:
    """Resolve labels into relative jumps; ``ValueError`` on a backward or unknown label."""
    where: dict[str, int] = {}
    code: list[tuple[int, int, str | None, str | None]] = []
    for item in program:
        if isinstance(item, str):
            where[item] = len(code)
        else:
            code.append(item)
    out = bytearray()
    for pc, (op, k, jt, jf) in enumerate(code):
        offsets = []
        for label in (jt, jf):
            if label is None:
                offsets.append(0)
                continue
            if label not in where:
                raise ValueError(f"unknown label {label!r}")
            off = where[label] - pc - 1
            if not 0 <= off <= 255:
                raise ValueError(f"jump to {label!r} out of range")
            offsets.append(off)
        out += _INSN.pack(op, offsets[0], offsets[1], k)
    return bytes(out)


#: A listening TCP socket's filter sees the segment from its TCP header on:
#: drop a SYN without ACK (a new connection), pass everything else (the ACK that
#: completes a handshake already answered, data of sessions being drained).
SYN_GATE = assemble(
    [
        (LD | B | ABS, 13, None, None),  # TCP flags
        (ALU | AND | 0x00, SYN | ACK, None, None),
        (JMP | JEQ, SYN, "drop", "pass"),
        "drop",
        (RET, 0, None, None),
        "pass",
        (RET, ACCEPT_ALL, None, None),
    ]
)

#: A packet socket's filter sees the Ethernet frame: pass ARP, IPv4 and IPv6 TCP
#: SYNs (no ACK, first fragment), and ICMPv6 neighbour advertisements.
CAPTURE_HANDOVER = assemble(
    [
        (LD | H | ABS, 12, None, None),  # EtherType
        (JMP | JEQ, 0x0806, "pass", None),
        (JMP | JEQ, 0x0800, "v4", None),
        (JMP | JEQ, 0x86DD, "v6", "drop"),
        "v4",
        (LD | B | ABS, 23, None, None),  # IPv4 protocol
        (JMP | JEQ, 6, None, "drop"),
        (LD | H | ABS, 20, None, None),  # flags + fragment offset
        (JMP | JSET, 0x1FFF, "drop", None),
        (LDX | B | MSH, 14, None, None),  # X = IPv4 header length
        (LD | B | IND, 14 + 13, None, None),  # TCP flags
        (ALU | AND | 0x00, SYN | ACK, None, None),
        (JMP | JEQ, SYN, "pass", "drop"),
        "v6",
        (LD | B | ABS, 20, None, None),  # IPv6 next header
        (JMP | JEQ, 6, "tcp6", None),
        (JMP | JEQ, 58, "icmp6", "drop"),
        "tcp6",
        (LD | B | ABS, 14 + 40 + 13, None, None),
        (ALU | AND | 0x00, SYN | ACK, None, None),
        (JMP | JEQ, SYN, "pass", "drop"),
        "icmp6",
        (LD | B | ABS, 14 + 40, None, None),  # ICMPv6 type
        (JMP | JEQ, 136, "pass", "drop"),
        "drop",
        (RET, 0, None, None),
        "pass",
        (RET, 0xFFFF, None, None),
    ]
)


def attach(sock: Settable, program: bytes) -> None:
    """``SO_ATTACH_FILTER`` ``program`` (from :func:`assemble`) to ``sock`` (stdlib or trio)."""
    n = len(program) // _INSN.size
    buf = ctypes.create_string_buffer(program, len(program))
    fprog = struct.pack("HL", n, ctypes.addressof(buf))
    sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER, fprog)  # the kernel copies buf now


def detach(sock: Settable) -> None:
    """Remove the socket's filter (``OSError`` ENOENT if it had none)."""
    sock.setsockopt(socket.SOL_SOCKET, SO_DETACH_FILTER, 0)
