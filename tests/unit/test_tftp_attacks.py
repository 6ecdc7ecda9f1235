"""Attacks on the TFTP server (issue 11 #5, #6, #8), in-process on loopback.

The attacker sends from 127.0.0.2 (another loopback address), the good client from 127.0.0.1,
so the per-client limits can be told apart from the global ones.
"""

from __future__ import annotations

import os
import socket
import struct
import threading
import time
import tracemalloc
from collections.abc import Iterator
from pathlib import Path

import pytest

from bootstrap.server.tftp_server import TftpServer
from tests.unit.test_tftp_server import fetch, rrq

DATA = os.urandom(200_000)
BIG = 4 * 1024 * 1024


@pytest.fixture()
def root(tmp_path: Path) -> Path:
    (tmp_path / "root").mkdir()
    (tmp_path / "root" / "f.bin").write_bytes(DATA)
    with open(tmp_path / "root" / "big.bin", "wb") as f:
        f.write(os.urandom(BIG))
    return tmp_path / "root"


def _running(srv: TftpServer) -> Iterator[TftpServer]:
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    yield srv
    srv.shutdown()
    t.join(2)


@pytest.fixture()
def server(root: Path, tftp_native: bool) -> Iterator[TftpServer]:
    yield from _running(TftpServer(root, "127.0.0.1", 0, native=tftp_native))


def _attacker(addr: str = "127.0.0.2", rcvbuf: int = 0) -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    if rcvbuf:
        s.setsockopt(socket.SOL_SOCKET, getattr(socket, "SO_RCVBUFFORCE", 33), rcvbuf)  # root: above rmem_max
    s.bind((addr, 0))
    s.settimeout(3)
    return s


def _replies(s: socket.socket, n: int, wait: float = 3.0) -> list[bytes]:
    """Up to `n` datagrams, the first ones of each transfer or refusal."""
    out: list[bytes] = []
    s.settimeout(wait)
    try:
        while len(out) < n:
            out.append(s.recvfrom(70000)[0])
    except TimeoutError:
        pass
    return out


def _errors(pkts: list[bytes]) -> list[tuple[int, str]]:
    return [(struct.unpack(">H", p[2:4])[0], p[4:-1].decode()) for p in pkts if p[:2] == b"\0\5"]


def _oack(pkt: bytes) -> dict[str, str]:
    assert pkt[:2] == b"\0\6", pkt[:4]
    parts = pkt[2:].split(b"\0")[:-1]
    return {parts[i].decode(): parts[i + 1].decode() for i in range(0, len(parts), 2)}


def test_513_requests_then_a_good_transfer_is_served(server: TftpServer) -> None:
    """513 stalled requests once filled the 512 slots and the 'busy' ERROR (code 0) crashed
    tftpy's encoder inside serve_forever: TFTP was gone for everyone."""
    a = _attacker()
    for _ in range(513):
        a.sendto(rrq("f.bin"), ("127.0.0.1", server.port))
    busy = _errors(_replies(a, 513, wait=1.0))
    assert busy and all(code == 0 and "busy" in msg for code, msg in busy)
    assert fetch(server, "f.bin")[0] == DATA  # from 127.0.0.1: still served


def test_per_client_slot_limit(root: Path) -> None:
    for srv in _running(TftpServer(root, "127.0.0.1", 0, max_per_client=3)):
        a = _attacker()
        for _ in range(5):
            a.sendto(rrq("f.bin"), ("127.0.0.1", srv.port))
        got = _replies(a, 5, wait=1.0)
        assert sum(p[:2] == b"\0\3" for p in got) == 3  # three transfers started (their block 1)
        assert [code for code, _ in _errors(got)] == [0, 0]
        assert "3 transfers already running for 127.0.0.2" in _errors(got)[0][1]
        assert fetch(srv, "f.bin")[0] == DATA  # another client is not affected
        assert srv.metrics.get("tftp_busy_total") == 2


def test_all_slots_taken_busy_error_and_served_again_when_freed(root: Path) -> None:
    for srv in _running(TftpServer(root, "127.0.0.1", 0, max_transfers=2, retries=1)):
        stalled = [_attacker(f"127.0.0.{i}") for i in (2, 3)]
        for s in stalled:
            s.sendto(rrq("f.bin", timeout="1"), ("127.0.0.1", srv.port))
            assert _oack(s.recvfrom(70000)[0]) == {"timeout": "1"}
        with pytest.raises(RuntimeError, match="TFTP error 0: server busy"):
            fetch(srv, "f.bin")
        deadline = time.monotonic() + 10
        while srv.active and time.monotonic() < deadline:  # the stalled ones give up after 2 x 1 s
            time.sleep(0.1)
        assert fetch(srv, "f.bin")[0] == DATA


def test_timeout_255_is_capped(server: TftpServer) -> None:
    """timeout=255 once made each stalled transfer hold its slot (5 + 1) x 255 s: about 25 minutes."""
    a = _attacker()
    a.sendto(rrq("f.bin", timeout="255", blksize="1024"), ("127.0.0.1", server.port))
    t0 = time.monotonic()
    first = _oack(a.recvfrom(70000)[0])
    assert first == {"blksize": "1024"}  # declined: not in the OACK (RFC 2349 allows only the echo)
    a.settimeout(server.max_timeout + 1)
    again = _oack(a.recvfrom(70000)[0])  # never ACKed: resent after our default timeout, not 255 s
    assert again == first and time.monotonic() - t0 < server.max_timeout
    a.sendto(rrq("f.bin", timeout="7"), ("127.0.0.1", server.port))
    assert _oack(_replies(a, 1)[-1]) == {"timeout": "7"}  # a value up to max_timeout is honoured


def test_windowsize_65535_is_capped_and_memory_bounded(server: TftpServer) -> None:
    """windowsize 65535 once kept the whole file in memory per stalled transfer."""
    a = _attacker(rcvbuf=64 << 20)
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        before = tracemalloc.get_traced_memory()[0]
        a.sendto(rrq("big.bin", blksize="65464", windowsize="65535"), ("127.0.0.1", server.port))
        pkt, peer = a.recvfrom(70000)
        oack = _oack(pkt)
        assert 1 <= int(oack["windowsize"]) <= 64
        assert int(oack["windowsize"]) * 65464 <= 1 << 20  # and at most 1 MiB in flight
        a.sendto(b"\0\4\0\0", peer)
        buf = bytearray(70000)  # the client keeps nothing: only the server's memory is measured
        n_data = sum(a.recv_into(buf) > 0 and buf[:2] == b"\0\3" for _ in range(int(oack["windowsize"])))
        assert n_data == int(oack["windowsize"])
        time.sleep(0.3)
        peak = tracemalloc.get_traced_memory()[1] - before
    finally:
        tracemalloc.stop()
    print(f"stalled 4 MiB transfer, windowsize {oack['windowsize']}: peak {peak / 1024:.0f} KiB traced")
    assert peak < 1 << 20  # blocks are read when sent, not a window held in memory


@pytest.mark.parametrize("windowed", [True, False], ids=["windowsize", "lock-step"])
def test_duplicate_ack_amplification_is_bounded(server: TftpServer, windowed: bool) -> None:
    """Ten 4-byte duplicate ACKs once made the server resend its whole window ten times."""
    a = _attacker(rcvbuf=128 << 20)
    opts = {"windowsize": "65535"} if windowed else {}
    a.sendto(rrq("big.bin", blksize="8192", timeout="5", **opts), ("127.0.0.1", server.port))
    pkt, peer = a.recvfrom(70000)
    window = min(int(_oack(pkt).get("windowsize", "1")) * 8192, BIG)
    a.sendto(b"\0\4\0\0", peer)  # ACK of the OACK: the first window flows
    for _ in range(10):
        a.sendto(b"\0\4\0\0", peer)  # "I lost block 1", ten times
    received = sum(len(p) - 4 for p in _replies(a, 1 << 20, wait=2.0) if p[:2] == b"\0\3")  # before the 5 s timeout
    print(f"ten duplicate ACKs: {received / 2**20:.1f} MiB sent for a {window / 2**20:.2f} MiB window")
    assert window <= received <= 3 * window  # the window and at most two early resends
    assert fetch(server, "f.bin")[0] == DATA


def test_exception_in_one_tftp_request_is_logged_counted_and_survived(server: TftpServer) -> None:
    real, calls = server.handle_request, []

    def flaky(data: bytes, peer: tuple[str, int]) -> None:
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("a bug we have not found yet")
        real(data, peer)

    server.handle_request = flaky  # type: ignore[method-assign]
    with pytest.raises(TimeoutError):
        fetch(server, "f.bin")
    assert fetch(server, "f.bin")[0] == DATA
    assert server.metrics.get("request_exceptions_total", server="tftp", exception="RuntimeError") == 1


@pytest.mark.parametrize("windowsize", ["4", None], ids=["windowsize", "lock-step"])
def test_repeated_duplicate_acks_do_not_stop_the_timeout_resend(server: TftpServer, windowsize: str | None) -> None:
    """A client that lost block 1 keeps re-sending ACK 0 faster than the server's timeout (a
    windowed client re-ACKs on its own shorter timer). After its two early resends the server
    ignores those ACKs, but they must not keep its timeout from firing: it resends within about
    one timeout and the transfer goes on. (Seen as a stall at 20% loss until the client gave up.)"""
    a = _attacker()
    a.sendto(rrq("f.bin", timeout="1", **({"windowsize": windowsize} if windowsize else {})), ("127.0.0.1", server.port))
    pkt, peer = a.recvfrom(70000)
    assert _oack(pkt).get("windowsize") == windowsize
    a.sendto(b"\0\4\0\0", peer)  # ACK of the OACK: the first window flows; we "lose" it all
    a.settimeout(0.05)
    t0, seen_block1 = time.monotonic(), 0
    while time.monotonic() - t0 < 4.0 and seen_block1 < 4:
        a.sendto(b"\0\4\0\0", peer)  # "still waiting for block 1", every 0.25 s
        end = time.monotonic() + 0.25
        while time.monotonic() < end:
            try:
                data, _ = a.recvfrom(70000)
            except TimeoutError:
                continue
            if data[:4] == b"\0\3\0\1":
                seen_block1 += 1
    # the first window + two early resends = 3 copies of block 1; a 4th only comes from the timeout
    assert seen_block1 >= 4, f"block 1 sent {seen_block1} times in 4 s: the timeout never fired"


def test_lockstep_retransmission_budget_is_enforced(root: Path, tftp_native: bool) -> None:
    """Each round the client ACKs block n and then ACKs it again ("I lost n + 1"): progress
    resets the early-resend limit, so only the budget of re-sent blocks (here `retries` x 1
    block) stops the server resending every block twice."""
    for srv in _running(TftpServer(root, "127.0.0.1", 0, resend_factor=0, native=tftp_native)):
        a = _attacker()
        a.sendto(rrq("f.bin"), ("127.0.0.1", srv.port))  # no options: no OACK, DATA 1 comes at once
        pkt, peer = a.recvfrom(70000)
        assert pkt[:4] == b"\0\3\0\1"
        resends, errors = 0, []
        for n in range(1, 20):
            a.sendto(struct.pack(">HH", 4, n), peer)
            a.sendto(struct.pack(">HH", 4, n), peer)
            got = [a.recvfrom(70000)[0] for _ in range(2)]
            assert got[0] == struct.pack(">HH", 3, n + 1) + DATA[n * 512:(n + 1) * 512]
            errors = _errors(got)
            if errors:
                break
            assert got[1] == got[0]  # the early resend
            resends += 1
        assert resends == srv.retries and errors == [(0, "too many retransmissions")]
        assert srv.metrics.get("tftp_retransmitted_blocks_total") == resends
        assert srv.metrics.get("tftp_errors_total", code="retransmit_budget") == 1


def test_lockstep_silent_client_is_given_up_after_its_retries(root: Path, tftp_native: bool,
                                                              caplog: pytest.LogCaptureFixture) -> None:
    """A client that acknowledges the OACK and then goes silent gets block 1 once and `retries`
    times again, one timeout apart, and then the transfer ends and frees its slot."""
    caplog.set_level("WARNING", logger="bootstrap.tftp")
    for srv in _running(TftpServer(root, "127.0.0.1", 0, retries=2, native=tftp_native)):
        a = _attacker()
        a.sendto(rrq("f.bin", timeout="1"), ("127.0.0.1", srv.port))
        pkt, peer = a.recvfrom(70000)
        a.sendto(b"\0\4\0\0", peer)  # ACK of the OACK, then silence
        t0 = time.monotonic()
        got = _replies(a, 10, wait=1.6)
        took = time.monotonic() - t0
        assert got == [struct.pack(">HH", 3, 1) + DATA[:512]] * 3 and 2.0 <= took < 4.5, (len(got), took)
        deadline = time.monotonic() + 3
        while srv.active and time.monotonic() < deadline:
            time.sleep(0.05)
        assert srv.active == 0
        assert srv.metrics.get("tftp_errors_total", code="timeout") == 1
        assert srv.metrics.get("tftp_retransmitted_blocks_total") == 2
        assert "client stopped answering (2 retries)" in caplog.text


def test_lockstep_long_client_error_ends_the_transfer(server: TftpServer, caplog: pytest.LogCaptureFixture) -> None:
    """The lock-step loop reads at most FAST_READ bytes of a datagram: a client's ERROR with a
    longer message arrives cut (no NUL), and must still end the transfer at once, not be
    ignored as malformed until the timeouts give up."""
    from bootstrap.server.tftp_server import FAST_READ

    caplog.set_level("WARNING", logger="bootstrap.tftp")
    a = _attacker()
    a.sendto(rrq("big.bin", timeout="5"), ("127.0.0.1", server.port))
    pkt, peer = a.recvfrom(70000)
    a.sendto(b"\0\4\0\0", peer)  # ACK of the OACK
    assert a.recvfrom(70000)[0][:4] == b"\0\3\0\1"
    a.sendto(b"\0\5\0\3" + b"x" * (2 * FAST_READ) + b"\0", peer)  # ERROR 3 "disk full", a long message
    deadline = time.monotonic() + 2.0  # well before one 5 s timeout
    while server.active and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.active == 0
    assert _replies(a, 1, wait=0.5) == []  # nothing more was sent
    assert f"client aborted with error 3: {'x' * 80}\n" in caplog.text  # the message cut at 80 characters
