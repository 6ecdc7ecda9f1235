"""cidboot.netboot.tftp_client: against a scripted fake server on loopback (malformed packets, option
fallback, errors, gap ACKs), and in a network namespace against the real boot server (sizes,
tsize, missing file, 20 % loss both ways) and tftpd-hpa (interop without windowsize)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from cidboot.netboot import tftp_client
from cidboot.netboot.tftp_client import (
    DATA,
    OACK,
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


# --- against real servers in a network namespace ----------------------------------------------

CLIENT = r'''
import hashlib, json, sys, time
from cidboot.netboot import tftp_client
host, port, bs, win = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
for name in sys.argv[5:]:
    seen = []
    t0 = time.monotonic()
    try:
        b = tftp_client.get(host, name, port=port, blksize=bs, windowsize=win, progress=lambda n, t: seen.append(t))
        out = {"name": name, "len": len(b), "sha256": hashlib.sha256(b).hexdigest(), "tsize": seen[-1] if seen else None}
    except tftp_client.TftpError as e:
        out = {"name": name, "error": str(e), "type": type(e).__name__}
    out["secs"] = time.monotonic() - t0
    print(json.dumps(out), flush=True)
'''


def fetch_all(net: Any, host: str, ip: str, names: list[str], *, port: int = 69, bs: int = 1468, win: int = 16,
              timeout: float = 300) -> dict[str, dict[str, Any]]:
    run = subprocess.run(net.host_cmd(host, [sys.executable, "-c", CLIENT, ip, str(port), str(bs), str(win), *names]),
                         capture_output=True, text=True, timeout=timeout, cwd=REPO)
    assert run.returncode == 0, run.stderr
    return {o["name"]: o for o in map(json.loads, run.stdout.splitlines())}


def sha(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


def make_files(root: Path, bs: int = 1468, win: int = 16) -> dict[str, bytes]:
    files = {"empty": b"", "one-block": os.urandom(bs), "one-window": os.urandom(bs * win),
             "window-plus-1": os.urandom(bs * win + 1), "3mb": os.urandom(3 * 1024 * 1024)}
    for name, b in files.items():
        (root / name).write_bytes(b)
    return files


@pytest.mark.netns
def test_against_the_boot_server(tmp_path: Path) -> None:
    from tests.support.boot_network import running_boot_server

    with running_boot_server(tmp_path, taps=0) as srv:
        files = make_files(srv.tftp_root)
        host = srv.net.add_host("10.77.0.60")
        got = fetch_all(srv.net, host, srv.net.server_ip, [*files, "no/such.img"])
        for name, b in files.items():
            assert got[name].get("sha256") == sha(b) and got[name]["len"] == len(b), got[name]
            assert got[name]["tsize"] == len(b)  # the server's OACK tsize, checked by the client too
        miss = got["no/such.img"]
        assert miss["type"] == "TftpServerError" and "no/such.img" in miss["error"], miss
        print("0 % loss:", {n: round(o["secs"], 3) for n, o in got.items()})


@pytest.mark.netns
def test_twenty_percent_loss_both_ways(tmp_path: Path) -> None:
    from qemu.harness.netloss import add_loss
    from tests.support.boot_network import running_boot_server

    with running_boot_server(tmp_path, taps=0) as srv:
        blob = os.urandom(3 * 1024 * 1024 + 17)
        (srv.tftp_root / "lossy.bin").write_bytes(blob)
        host = srv.net.add_host("10.77.0.61")
        add_loss(srv.net.host_cmd(host, []), "eth0", 20)
        add_loss(srv.net.cmd([]), "h0p", 20)
        got = fetch_all(srv.net, host, srv.net.server_ip, ["lossy.bin"])["lossy.bin"]
        assert got.get("sha256") == sha(blob), got
        print(f"20 % loss both ways: {len(blob)} bytes in {got['secs']:.2f} s (windowsize 16, blksize 1468)")
        assert got["secs"] < 120


@pytest.mark.netns
@pytest.mark.skipif(shutil.which("in.tftpd") is None, reason="tftpd-hpa not installed")
def test_interop_with_tftpd_hpa() -> None:
    from qemu.harness.netns import boot_network

    with tempfile.TemporaryDirectory() as d, boot_network(taps=0) as net:
        root = Path(d) / "root"
        root.mkdir()
        os.chmod(d, 0o755)
        os.chmod(root, 0o755)
        files = make_files(root)
        for p in root.iterdir():
            os.chmod(p, 0o644)
        hpa = net.popen(["in.tftpd", "-L", "-s", str(root), "-a", f"{net.server_ip}:6970"])
        try:
            host = net.add_host("10.77.0.62")
            time.sleep(0.5)
            got = fetch_all(net, host, net.server_ip, [*files, "missing.bin"], port=6970)
            plain = fetch_all(net, host, net.server_ip, ["3mb"], port=6970, bs=512, win=1)
        finally:
            hpa.terminate()
            hpa.wait(10)
        for name, b in files.items():  # tftpd-hpa has no windowsize: its OACK makes it lock-step
            assert got[name].get("sha256") == sha(b), got[name]
            assert got[name]["tsize"] == len(b)
        assert plain["3mb"]["sha256"] == sha(files["3mb"])
        assert got["missing.bin"]["type"] == "TftpServerError" and "missing.bin" in got["missing.bin"]["error"]
        print("tftpd-hpa:", {n: round(o["secs"], 3) for n, o in got.items()})
