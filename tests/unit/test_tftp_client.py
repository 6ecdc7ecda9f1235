"""cidboot.netboot.tftp_client: against a scripted fake server on loopback (malformed packets, option
fallback, errors, gap ACKs), and in a network namespace against the real boot server (sizes,
tsize, missing file, 20 % loss both ways) and tftpd-hpa (interop without windowsize)."""

from __future__ import annotations

import os
import socket
import struct
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from cidboot.errors import CidbootError
from cidboot.netboot import tftp_client
from cidboot.netboot.tftp_client import (
    ACK,
    DATA,
    ERROR,
    OACK,
    TftpError,
    TftpProtocolError,
    TftpServerError,
    TftpTimeoutError,
    parse_oack,
)

REPO = Path(__file__).resolve().parents[2]


# --- a scripted fake server on loopback -------------------------------------------------------


def data(n: int, payload: bytes) -> bytes:
    return struct.pack(">HH", DATA, n) + payload


def oack(**opts: object) -> bytes:
    return struct.pack(">H", OACK) + b"".join(f"{k}\0{v}\0".encode() for k, v in opts.items())


def parse_rrq(pkt: bytes) -> tuple[str, dict[str, str]]:
    assert pkt[:2] == b"\x00\x01"
    parts = pkt[2:].split(b"\0")
    name, mode, rest = parts[0].decode(), parts[1], parts[2:-1]
    assert mode == b"octet"
    return name, {rest[i].decode(): rest[i + 1].decode() for i in range(0, len(rest), 2)}


class Fake:
    """The request port and one transfer socket (its TID); the test plays the server."""

    def __init__(self) -> None:
        self.req = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.req.bind(("127.0.0.1", 0))
        self.port = self.req.getsockname()[1]
        self.tid = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.tid.bind(("127.0.0.1", 0))
        self.client: tuple[str, int] | None = None

    def rrq(self, timeout: float = 5.0) -> tuple[str, dict[str, str]]:
        self.req.settimeout(timeout)
        pkt, self.client = self.req.recvfrom(65536)
        return parse_rrq(pkt)

    def send(self, pkt: bytes) -> None:
        assert self.client is not None
        self.tid.sendto(pkt, self.client)

    def recv(self, timeout: float = 5.0) -> tuple[int, int]:
        self.tid.settimeout(timeout)
        pkt, _ = self.tid.recvfrom(65536)
        return struct.unpack_from(">HH", pkt)

    def close(self) -> None:
        self.req.close()
        self.tid.close()


@contextmanager
def client(**kw: Any) -> Iterator[tuple[Fake, dict[str, Any]]]:
    """A Fake and the client running against it in a thread; box["result"] or box["error"]."""
    fake = Fake()
    box: dict[str, Any] = {}
    kw.setdefault("min_timeout", kw.get("timeout", 0.3))  # no RTT-driven timeouts while the test types

    def run() -> None:
        try:
            box["result"] = tftp_client.get("127.0.0.1", kw.pop("name", "f.bin"), port=fake.port, **kw)
        except Exception as e:  # handed to the test
            box["error"] = e

    t = threading.Thread(target=run, daemon=True)
    t.start()
    try:
        yield fake, box
        t.join(10)
        assert not t.is_alive()
    finally:
        fake.close()


def test_server_that_ignores_options_gets_plain_rfc1350() -> None:
    blob = os.urandom(512 + 100)
    with client(timeout=1.0) as (fake, box):
        name, opts = fake.rrq()
        assert name == "f.bin" and opts["blksize"] == "1468" and opts["windowsize"] == "16" and opts["tsize"] == "0"
        fake.send(data(1, blob[:512]))
        assert fake.recv() == (ACK, 1)  # lock-step: window 1, blksize 512
        fake.send(data(2, blob[512:]))
        assert fake.recv() == (ACK, 2)
    assert box["result"] == blob


def test_error_packet_names_the_file_and_the_servers_message() -> None:
    with client(name="boot/vmlinuz") as (fake, box):
        fake.rrq()
        fake.send(struct.pack(">HH", ERROR, 2) + b"Access violation\0")
    e = box["error"]
    assert isinstance(e, TftpServerError) and isinstance(e, CidbootError)
    assert e.code == 2 and e.server_message == "Access violation" and e.filename == "boot/vmlinuz"
    assert "boot/vmlinuz" in str(e) and "Access violation" in str(e)


def test_options_refused_with_error_8_then_plain_request() -> None:
    with client() as (fake, box):
        _, opts = fake.rrq()
        assert opts
        fake.send(struct.pack(">HH", ERROR, 8) + b"no options\0")
        _, opts = fake.rrq()
        assert opts == {}
        fake.send(data(1, b"abc"))
        assert fake.recv() == (ACK, 1)
    assert box["result"] == b"abc"


def test_malformed_packets_are_ignored_not_trusted() -> None:
    blob = os.urandom(100 * 3 + 7)
    with client(blksize=100, windowsize=4, timeout=1.0) as (fake, box):
        fake.rrq()
        fake.send(oack(blksize=100, windowsize=4, tsize=len(blob)))
        assert fake.recv() == (ACK, 0)
        fake.send(b"\x00")  # too short
        fake.send(struct.pack(">HH", 9, 1) + b"xx")  # no such opcode
        fake.send(struct.pack(">HH", ACK, 1))  # a server never sends ACK
        fake.send(data(1, b"X" * 101))  # larger than blksize
        fake.send(data(4000, b"Y" * 100))  # far outside the window
        for n in range(1, 5):
            fake.send(data(n, blob[(n - 1) * 100 : n * 100]))
        assert fake.recv() == (ACK, 4)
    assert box["result"] == blob


def test_gap_is_acked_at_once_and_duplicates_are_not() -> None:
    blob = os.urandom(10 * 8 + 3)
    block = [b""] + [blob[i : i + 10] for i in range(0, len(blob), 10)]  # 1-based, 9 blocks
    with client(blksize=10, windowsize=4, timeout=2.0) as (fake, box):
        fake.rrq()
        fake.send(oack(blksize=10, windowsize=4))
        assert fake.recv() == (ACK, 0)
        t0 = time.monotonic()
        for n in (1, 2, 4):  # block 3 lost
            fake.send(data(n, block[n]))
        assert fake.recv() == (ACK, 2)
        assert time.monotonic() - t0 < 0.5  # not the 2 s timeout: the gap was ACKed at once
        for n in (3, 4, 5, 6):
            fake.send(data(n, block[n]))
        assert fake.recv() == (ACK, 6)
        for n in (3, 4):  # a re-sent old window: ignored, no ACK
            fake.send(data(n, block[n]))
        for n in (7, 8, 9):
            fake.send(data(n, block[n]))
        assert fake.recv() == (ACK, 9)
    assert box["result"] == blob


def test_restarted_window_that_lost_the_block_again_is_acked_again() -> None:
    block = [b""] + [bytes([n]) * 10 for n in range(1, 6)] + [b"end"]
    with client(blksize=10, windowsize=4, timeout=2.0) as (fake, box):
        fake.rrq()
        fake.send(oack(blksize=10, windowsize=4))
        assert fake.recv() == (ACK, 0)
        t0 = time.monotonic()
        fake.send(data(1, block[1]))
        fake.send(data(3, block[3]))  # 2 lost: gap
        assert fake.recv() == (ACK, 1)
        fake.send(data(4, block[4]))  # the rest of the old window: no second ACK
        fake.send(data(3, block[3]))  # the restarted window 2..5, its 2 lost again
        assert fake.recv() == (ACK, 1)
        assert time.monotonic() - t0 < 1.0  # both without waiting for the 2 s timeout
        for n in (2, 3, 4, 5):
            fake.send(data(n, block[n]))
        assert fake.recv() == (ACK, 5)
        fake.send(data(6, block[6]))
        assert fake.recv() == (ACK, 6)
    assert box["result"] == b"".join(block)


def test_timeout_reacks_the_last_in_order_block() -> None:
    with client(blksize=10, windowsize=4, timeout=0.2) as (fake, box):
        fake.rrq()
        fake.send(oack(blksize=10, windowsize=4))
        assert fake.recv() == (ACK, 0)
        fake.send(data(1, b"a" * 10))
        fake.send(data(2, b"b" * 10))  # 3 and 4 lost, nothing after them
        assert fake.recv() == (ACK, 2)
        fake.send(data(3, b"c"))
        assert fake.recv() == (ACK, 3)
    assert box["result"] == b"a" * 10 + b"b" * 10 + b"c"


@pytest.mark.parametrize(("opts", "why"), [
    ({"blksize": 100, "color": "blue"}, "did not ask for: color"),
    ({"blksize": 5000}, "blksize 5000"),
    ({"windowsize": 0}, "windowsize 0"),
    ({"tsize": "x"}, "invalid literal"),
])
def test_unacceptable_oack_aborts_with_error_8(opts: dict[str, object], why: str) -> None:
    with client(blksize=1000, windowsize=8) as (fake, box):
        fake.rrq()
        fake.send(oack(**opts))
        assert fake.recv()[:2] == (ERROR, 8)
    assert isinstance(box["error"], TftpProtocolError) and why in str(box["error"])


def test_tsize_is_verified() -> None:
    with client(timeout=1.0) as (fake, box):
        fake.rrq()
        fake.send(oack(tsize=1000))
        assert fake.recv() == (ACK, 0)
        fake.send(data(1, b"short"))
    assert isinstance(box["error"], TftpProtocolError) and "tsize 1000" in str(box["error"])


def test_no_answer_names_file_block_and_retries() -> None:
    with client(name="a/b.img", timeout=0.02, retries=3) as (fake, box):
        fake.rrq()
        fake.send(oack(blksize=1468, windowsize=16))
        assert fake.recv() == (ACK, 0)
        fake.send(data(1, b"z" * 1468))  # then silence
    e = box["error"]
    assert isinstance(e, TftpTimeoutError)
    assert "a/b.img" in str(e) and "block 2" in str(e) and "3 retries" in str(e) and e.block == 2


def test_another_transfer_id_gets_error_5() -> None:
    with client(timeout=1.0) as (fake, box):
        fake.rrq()
        fake.send(data(1, b"x" * 512))
        assert fake.recv() == (ACK, 1)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as other:
            other.bind(("127.0.0.1", 0))
            assert fake.client is not None
            other.sendto(data(2, b"evil"), fake.client)
            other.settimeout(5)
            assert struct.unpack_from(">HH", other.recv(100)) == (ERROR, 5)
        fake.send(data(2, b"ok"))
        assert fake.recv() == (ACK, 2)
    assert box["result"] == b"x" * 512 + b"ok"


def test_parse_oack_and_arguments() -> None:
    assert parse_oack(b"BlkSize\x00100\x00tsize\x005\x00") == {"blksize": "100", "tsize": "5"}
    for bad in (b"blksize\x00100", b"blksize\x00", b"a\x001\x00a\x002\x00"):
        with pytest.raises(ValueError):
            parse_oack(bad)
    with pytest.raises(ValueError, match="blksize"):
        tftp_client.get("127.0.0.1", "x", blksize=7)
    assert issubclass(TftpError, CidbootError)


# --- against real servers in a network namespace ----------------------------------------------


