"""The TFTP server on loopback: options, RFC 7440 windows, refusals, concurrency."""

from __future__ import annotations

import os
import socket
import struct
import subprocess
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from bootstrap.server.tftp_server import TftpServer

DATA = os.urandom(300_000)


@pytest.fixture()
def server(tmp_path: Path, tftp_native: bool) -> Iterator[TftpServer]:
    (tmp_path / "root").mkdir()
    (tmp_path / "root" / "f.bin").write_bytes(DATA)
    (tmp_path / "root" / "empty").write_bytes(b"")
    (tmp_path / "root" / "exact").write_bytes(b"z" * 1024)
    (tmp_path / "root" / "out").symlink_to("/etc/hostname")
    # every test client is 127.0.0.1: allow the 64 (32 at a time) ones of test_many_concurrent_transfers
    srv = TftpServer(tmp_path / "root", "127.0.0.1", 0, generator=lambda n, p: b"generated" if n == "gen" else None,
                     max_per_client=64, native=tftp_native)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    yield srv
    srv.shutdown()


def rrq(name: str, **opts: str) -> bytes:
    body = name.encode() + b"\0octet\0" + b"".join(k.encode() + b"\0" + v.encode() + b"\0" for k, v in opts.items())
    return b"\x00\x01" + body


def fetch(srv: TftpServer, name: str, **opts: str) -> tuple[bytes, dict[str, str], int]:
    """A small RFC 7440-aware client: returns (data, OACK options, packets received)."""
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.settimeout(3)
    s.sendto(rrq(name, **opts), ("127.0.0.1", srv.port))
    bs = int(opts["blksize"]) if opts.get("blksize", "").isdigit() else 512
    win = int(opts["windowsize"]) if opts.get("windowsize", "").isdigit() else 1
    out, oack, expect, got, n_pkts = bytearray(), {}, 1, 0, 0
    while True:
        pkt, peer = s.recvfrom(70000)
        n_pkts += 1
        op = struct.unpack(">H", pkt[:2])[0]
        if op == 5:
            raise RuntimeError(f"TFTP error {struct.unpack('>H', pkt[2:4])[0]}: {pkt[4:-1].decode(errors='replace')}")
        if op == 6:
            parts = pkt[2:].split(b"\0")[:-1]
            oack = {parts[i].decode(): parts[i + 1].decode() for i in range(0, len(parts), 2)}
            s.sendto(b"\x00\x04\x00\x00", peer)
            continue
        block = struct.unpack(">H", pkt[2:4])[0]
        if block == expect % 65536:
            out += pkt[4:]
            got += 1
            expect += 1
            if len(pkt) - 4 < bs:
                s.sendto(b"\x00\x04" + pkt[2:4], peer)
                return bytes(out), oack, n_pkts
            if got % win == 0:
                s.sendto(b"\x00\x04" + pkt[2:4], peer)


@pytest.mark.parametrize("opts", [{}, {"blksize": "1468"}, {"blksize": "1468", "windowsize": "8"}, {"windowsize": "16", "tsize": "0"}])
def test_transfers_with_options(server: TftpServer, opts: dict[str, str]) -> None:
    data, oack, _ = fetch(server, "f.bin", **opts)
    assert data == DATA
    for k in ("blksize", "windowsize"):
        if k in opts:
            assert oack[k] == opts[k]
    if "tsize" in opts:
        assert oack["tsize"] == str(len(DATA))


def test_edge_sizes_and_generated(server: TftpServer) -> None:
    assert fetch(server, "empty")[0] == b""
    assert fetch(server, "exact")[0] == b"z" * 1024  # a multiple of blksize ends with an empty block
    assert fetch(server, "gen")[0] == b"generated"
    assert fetch(server, "/f.bin", blksize="8192")[0] == DATA


@pytest.mark.parametrize(
    "name, opts, err",
    [
        ("../etc/passwd", {}, "TFTP error 2"),
        ("a/../../x", {}, "TFTP error 2"),
        ("out", {}, "TFTP error 2"),
        ("nope", {}, "TFTP error 1"),
        ("f.bin", {"blksize": "0"}, "TFTP error 8"),
        ("f.bin", {"blksize": "65536"}, "TFTP error 8"),
        ("f.bin", {"windowsize": "0"}, "TFTP error 8"),
        ("f.bin", {"timeout": "999"}, "TFTP error 8"),
        ("f.bin", {"blksize": "many"}, "TFTP error 8"),
    ],
)
def test_refusals(server: TftpServer, name: str, opts: dict[str, str], err: str) -> None:
    with pytest.raises(RuntimeError, match=err):
        fetch(server, name, **opts)
    assert fetch(server, "exact")[0] == b"z" * 1024  # and the server keeps serving


@pytest.mark.parametrize("pkt, code", [(b"\x00\x02up\x00octet\x00", 2), (b"\x00\x09junk", 4), (b"\x00\x04\x00\x01", 4), (b"\x01", 4)])
def test_writes_and_unknown_opcodes(server: TftpServer, pkt: bytes, code: int) -> None:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.settimeout(3)
    s.sendto(pkt, ("127.0.0.1", server.port))
    reply, _ = s.recvfrom(1000)
    assert reply[:2] == b"\x00\x05" and struct.unpack(">H", reply[2:4])[0] == code


def test_many_concurrent_transfers(server: TftpServer) -> None:
    with ThreadPoolExecutor(32) as ex:
        results = list(ex.map(lambda i: fetch(server, "f.bin", blksize="1468", windowsize=str(1 + i % 4))[0], range(64)))
    assert all(r == DATA for r in results)


def test_tftp_hpa_client(server: TftpServer, tmp_path: Path) -> None:
    out = tmp_path / "got"
    r = subprocess.run(["tftp", "127.0.0.1", str(server.port), "-m", "binary", "-c", "get", "f.bin", str(out)], capture_output=True, timeout=60)
    assert r.returncode == 0 and out.read_bytes() == DATA


@pytest.mark.parametrize("opts", [{"blksize": "8"}, {"blksize": "8", "windowsize": "8"}], ids=["lock-step", "windowsize"])
def test_block_numbers_wrap_past_65535(server: TftpServer, opts: dict[str, str]) -> None:
    """A file of more than 65535 blocks: block numbers wrap to 0 (as tftpd-hpa and PXE clients do)."""
    data = os.urandom(8 * 65536 + 100)  # 65549 blocks of 8 bytes
    (server.root / "wrap.bin").write_bytes(data)
    assert fetch(server, "wrap.bin", **opts)[0] == data


@pytest.mark.parametrize("bs", [8, 512, 1468, 65464])
def test_lockstep_runs_at_chunk_edges(tmp_path: Path, bs: int) -> None:
    """`_Source.runs` reads chunks straight into ready packets from two alternating buffers:
    at every size around a chunk's edge, each packet holds the right block number and bytes and
    comes with the ACK word it waits for, the run before is still intact while the next is
    handed out (the lock-step loop may resend the last block of a run after reading the next),
    the last packet is short (header only for a multiple of blksize), nothing past the size at
    open is sent, and `sent` counts the data bytes."""
    from bootstrap.server.tftp_server import LOCKSTEP_CHUNK, MAX_IOV, _Source

    k = max(1, min(MAX_IOV, LOCKSTEP_CHUNK // bs))

    def walk(src: _Source, size: int) -> bytes:
        got, held, i = bytearray(), None, 0
        for packets, acks in src.runs(bs):
            if held is not None:
                assert [bytes(p) for p in held[1]] == held[0], f"size {size}: a run overwritten while held"
            assert len(packets) == len(acks) and 0 < len(packets) <= k
            for pkt, ack in zip(packets, acks, strict=True):
                i += 1
                assert bytes(pkt[:4]) == struct.pack(">HH", 3, i & 0xFFFF)
                assert struct.pack("=I", ack) == struct.pack(">HH", 4, i & 0xFFFF)
                got += pkt[4:]
            held = ([bytes(p) for p in packets], packets)
        assert len(pkt) - 4 < bs and src.sent == size, size
        return bytes(got)

    for size in (0, 1, bs - 1, bs, k * bs - 1, k * bs, k * bs + 1, 2 * k * bs, 2 * k * bs + 3):
        data = os.urandom(size)
        path = tmp_path / f"f{size}"
        path.write_bytes(data)
        with open(path, "rb") as f:
            src = _Source(f, None, size)
            path.write_bytes(data + b"grown after open")  # beyond tsize: never sent
            assert walk(src, size) == data
        assert walk(_Source(None, data, size), size) == data


def test_lockstep_block_numbers_wrap_in_one_chunk() -> None:
    """A chunk whose run of block numbers passes 65535 continues at 0 (the header table wraps)."""
    from bootstrap.server.tftp_server import _block_numbers

    table = _block_numbers()
    at = 2 * 65534
    assert table[at : at + 8] == struct.pack(">4H", 65534, 65535, 0, 1)


def _native_transfer(fd: int, content: bytes, size: int, bs: int) -> tuple[str, int, bytes]:
    """A whole transfer by the C loop to a client on the other end of a datagram socketpair
    that ACKs every block: (reason, data bytes it reports, the bytes the client got)."""
    from bootstrap.server.tftp_server import MAX_DUP_RESENDS, _timeval, lockstep_impl

    send = lockstep_impl()
    assert send is not None, "the C lock-step module is not built (pip install -e .)"
    ours, client = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    ours.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, _timeval(2.0))
    client.settimeout(3)
    got = bytearray()

    def ack_all() -> None:
        while True:
            pkt = client.recv(70000)
            got.extend(pkt[4:])
            client.send(b"\0\4" + pkt[2:4])
            if len(pkt) - 4 < bs:
                return

    t = threading.Thread(target=ack_all)
    t.start()
    try:
        reason, sent, resends, _code, _msg = send(ours.fileno(), fd, content, size, bs, 2.0, 5, 100, MAX_DUP_RESENDS)
    finally:
        t.join(5)
        ours.close()
        client.close()
    assert resends == 0
    return reason, sent, bytes(got)


@pytest.mark.parametrize("bs", [8, 512, 1468, 65464])
def test_native_lockstep_at_chunk_edges(tmp_path: Path, bs: int) -> None:
    """The C loop reads a file in 64 KiB chunks (and generated content from memory): at every size
    around a chunk's edge each block is the right bytes, the last is short (empty for a multiple
    of blksize), nothing past the size at open is sent (the file grew), and a file that shrank
    since it was opened ends at its new end."""
    chunk = 64 * 1024 - 64 * 1024 % bs or bs
    for size in sorted({0, 1, bs - 1, bs, chunk - 1, chunk, chunk + 1, 2 * chunk, 2 * chunk + 3}):
        data = os.urandom(size)
        path = tmp_path / f"f{size}"
        path.write_bytes(data + b"grown after open")
        with open(path, "rb") as f:
            assert _native_transfer(f.fileno(), b"", size, bs) == ("done", size, data), size
        assert _native_transfer(-1, data, size, bs) == ("done", size, data), size
    data = os.urandom(3 * bs + 5)
    path = tmp_path / "shrinks"
    path.write_bytes(data)
    with open(path, "rb") as f:
        os.truncate(path, 2 * bs + 1)  # after the open that took the size
        assert _native_transfer(f.fileno(), b"", len(data), bs) == ("done", 2 * bs + 1, data[: 2 * bs + 1])


def test_a_c_loop_older_than_its_source_is_stale(tmp_path: Path) -> None:
    """A checkout or an edit that changes _tftp_lockstep.c after the build makes the built
    module stale: lockstep_impl then runs the Python loop (and says so) rather than old rules."""
    from bootstrap.server.tftp_server import is_stale

    built, source = tmp_path / "_tftp_lockstep.so", tmp_path / "_tftp_lockstep.c"
    built.write_bytes(b"\x7fELF")
    source.write_text("/* the loop */\n")
    os.utime(source, (1_000_000, 1_000_000))
    os.utime(built, (2_000_000, 2_000_000))
    assert not is_stale(built, source)
    os.utime(source, (3_000_000, 3_000_000))
    assert is_stale(built, source)
    source.unlink()  # an installed wheel: the module alone
    assert not is_stale(built, source)
