"""fail-closed #10: the verifying client bounds what one gateway can cost it (bytes, time) and
falls back to the next gateway on every failure, with typed errors. Loopback only."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler
from pathlib import Path

import pytest

from cidboot.ipld.cid import CID, RAW
from cidboot.store.blockstore import Blockstore
from cidboot.store.gateway.client import (
    AllGatewaysFailed,
    BlockUnavailable,
    GatewayError,
    GatewayTimeout,
    GatewayUnreachable,
    ResponseTooLarge,
    fetch,
    fetch_block,
)
from tests.support.gateway_fixtures import _serving, running_gateway

BLOCK = b"twelve bytes"
HUGE = 64 * 1024 * 1024


@contextmanager
def misbehaving(kind: str) -> Iterator[str]:
    """A gateway that refuses CARs (406) and answers every raw request with `kind`:
    "flood" (64 MiB, no Content-Length), "announce" (Content-Length: 64 MiB), "drip" (one byte
    every 0.5 s, forever: each read well inside any per-read timeout)."""
    stop = threading.Event()
    chunk = b"\0" * (1 << 20)

    class H(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.0"

        def log_message(self, *a: object) -> None:
            pass

        def do_GET(self) -> None:
            if "format=raw" not in self.path:
                self.send_response(406)
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(200)
            self.send_header("Content-Type", "application/vnd.ipld.raw")
            if kind == "announce":
                self.send_header("Content-Length", str(HUGE))
            self.end_headers()
            try:
                if kind in ("flood", "announce"):
                    for _ in range(HUGE // len(chunk)):
                        self.wfile.write(chunk)
                else:
                    while not stop.wait(0.5):
                        self.wfile.write(b"x")
                        self.wfile.flush()
            except OSError:
                pass

    with _serving(H, on_stop=stop.set) as url:
        yield url


@pytest.fixture
def good(tmp_path: Path) -> Iterator[tuple[str, CID]]:
    store = Blockstore(tmp_path / "origin")
    cid = store.put_block(BLOCK)
    with running_gateway(store) as gw:
        yield gw.url, cid


@pytest.mark.parametrize("kind", ["flood", "announce"])
def test_oversize_response_for_a_small_block_falls_back_to_the_next_gateway(
        kind: str, good: tuple[str, CID], tmp_path: Path) -> None:
    url, cid = good
    with misbehaving(kind) as bad:
        res = fetch(cid, [bad, url], Blockstore(tmp_path / "a"), timeout=5, backoff=0)
        assert Blockstore(tmp_path / "a").get(cid) == BLOCK
        assert any("bytes" in e for e in res.errors), res.errors
        assert fetch_block(cid, [bad, url], Blockstore(tmp_path / "b"), timeout=5) == BLOCK
        with pytest.raises(BlockUnavailable) as e:
            fetch_block(cid, [bad], Blockstore(tmp_path / "c"), timeout=5, rounds=1)
    assert [type(c) for c in e.value.causes] == [ResponseTooLarge]


def test_drip_gateway_is_bounded_by_the_block_deadline(good: tuple[str, CID], tmp_path: Path) -> None:
    url, cid = good
    out: dict[str, object] = {}

    def run() -> None:
        t0 = time.monotonic()
        out["block"] = fetch_block(cid, [drip, url], Blockstore(tmp_path / "a"), timeout=1.0)
        out["block_s"] = time.monotonic() - t0
        t0 = time.monotonic()
        try:
            fetch(cid, [drip], Blockstore(tmp_path / "b"), timeout=1.0, rounds=1)
        except AllGatewaysFailed as e:
            out["fetch_causes"] = e.causes
        out["fetch_s"] = time.monotonic() - t0

    with misbehaving("drip") as drip:
        t = threading.Thread(target=run, daemon=True)
        t.start()
        t.join(15)
        assert not t.is_alive(), "fetch held by a gateway dripping a byte every 0.5 s"
    assert out["block"] == BLOCK and float(out["block_s"]) < 3  # type: ignore[arg-type]
    assert float(out["fetch_s"]) < 3  # type: ignore[arg-type]
    assert [type(c) for c in out["fetch_causes"]] == [GatewayTimeout]  # type: ignore[attr-defined]


def test_all_gateways_failed_carries_typed_causes_with_status(tmp_path: Path) -> None:
    with running_gateway(Blockstore(tmp_path / "empty")) as gw:
        with pytest.raises(AllGatewaysFailed) as e:
            fetch(CID.of(b"absent", RAW), [gw.url, "http://127.0.0.1:9"], Blockstore(tmp_path / "l"), rounds=1)
    causes = e.value.causes
    assert [type(c) for c in causes] == [GatewayError, GatewayUnreachable]  # a 404 is not a dead gateway
    assert isinstance(causes[0], GatewayError) and causes[0].status == 404 and causes[0].gateway == gw.url
    assert isinstance(causes[1], GatewayUnreachable) and causes[1].status is None
    assert not e.value.lied
