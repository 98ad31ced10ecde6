"""Classic BPF: the label assembler, and the listeners' SYN gate on a real kernel."""

from __future__ import annotations

import socket
import threading

import pytest

from duravip import bpf
from duravip.plumbing.netns import open_socket

from .conftest import Lab


def test_assemble_resolves_forward_labels_and_refuses_bad_ones() -> None:
    code = bpf.assemble([(bpf.JMP | bpf.JEQ, 1, "yes", None), (bpf.RET, 0, None, None), "yes",
                         (bpf.RET, 7, None, None)])  # fmt: skip
    assert code == bytes.fromhex("1500 01 00 010000000600 00 00 000000000600 00 00 07000000")
    with pytest.raises(ValueError, match="unknown label"):
        bpf.assemble([(bpf.JMP | bpf.JEQ, 1, "nowhere", None)])
    with pytest.raises(ValueError, match="out of range"):
        bpf.assemble(["back", (bpf.JMP | bpf.JEQ, 1, "back", None)])


def _connect(lab: Lab, timeout: float) -> str:
    c = open_socket(lab.b, socket.AF_INET, socket.SOCK_STREAM)
    c.settimeout(timeout)
    try:
        c.connect(("10.9.0.1", 2525))
        return c.recv(64).decode()
    except TimeoutError:
        return "timeout"
    except ConnectionRefusedError:
        return "refused"
    finally:
        c.close()


@pytest.mark.lab
def test_syn_gate_drops_new_syns_silently_and_lifts(lab: Lab) -> None:
    srv = open_socket(lab.a, socket.AF_INET, socket.SOCK_STREAM)
    with srv:
        srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        srv.bind(("10.9.0.1", 2525))
        srv.listen(8)
        srv.settimeout(2)

        def serve_one() -> None:
            conn, _ = srv.accept()
            with conn:
                conn.sendall(b"220 hi\r\n")

        t = threading.Thread(target=serve_one)
        t.start()
        assert _connect(lab, 2) == "220 hi\r\n"
        t.join()
        bpf.attach(srv, bpf.SYN_GATE)
        # Neither a SYN-ACK nor a reset: the client's SYN goes unanswered.
        assert _connect(lab, 0.3) == "timeout"
        bpf.detach(srv)
        t = threading.Thread(target=serve_one)
        t.start()
        assert _connect(lab, 2) == "220 hi\r\n"
        t.join()
