"""agent.blockfetch: one plain GET for a boot block, else the full gateway client. The quick
path keeps only bytes that hash to the CID; anything else is the client's to decide."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent import blockfetch
from cidboot.ipld.cid import CID, RAW
from cidboot.store.blockstore import Blockstore
from cidboot.store.gateway.client import BlockUnavailable
from cidboot.store.gateway.server import GatewayServer, serve_gateway

BLOCK = b"a boot block"
CID_ = CID.of(BLOCK, RAW)


class Fake:
    """A one-answer-per-connection HTTP server that says what it is told, and counts requests."""

    def __init__(self, answer: bytes) -> None:
        self.answer, self.requests = answer, 0
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                c, _ = self.sock.accept()
            except OSError:
                return
            with c:
                buf = b""
                while b"\r\n\r\n" not in buf:
                    data = c.recv(4096)
                    if not data:
                        break
                    buf += data
                self.requests += 1
                c.sendall(self.answer)


@pytest.fixture
def good(tmp_path: Path) -> Iterator[GatewayServer]:
    store = Blockstore(tmp_path / "gw")
    store.put(CID_, BLOCK)
    gw = serve_gateway(store, "127.0.0.1", 0)
    threading.Thread(target=gw.serve_forever, daemon=True).start()
    yield gw
    gw.shutdown()
    gw.server_close()


def fetch(gateways: list[str], tmp_path: Path) -> bytes:
    return blockfetch.fetch_block(CID_, gateways, Blockstore(tmp_path / "mine"), timeout=5, max_size=1 << 20,
                                  user_agent="test")


def test_quick_path_gets_the_block_from_the_first_gateway(good: GatewayServer, tmp_path: Path) -> None:
    assert blockfetch.quick_get(CID_, good.url, timeout=5, max_size=1 << 20, user_agent="test") == BLOCK
    assert fetch([good.url], tmp_path) == BLOCK


@pytest.mark.parametrize("answer,why", [
    (b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nlies!", "do not match"),
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nc\r\na boot block\r\n0\r\n\r\n", "Content-Length"),
    (b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n", "404"),
    (b"HTTP/1.1 200 OK\r\nContent-Length: 99999999\r\n\r\n", "within"),
    (b"HTTP/1.1 200 OK\r\nContent-Length: 12\r\n\r\na boot", "cut at 6 of its 12"),
])
def test_anything_but_a_verified_block_falls_back_to_the_full_client(good: GatewayServer, tmp_path: Path,
                                                                     answer: bytes, why: str) -> None:
    bad = Fake(answer)
    with pytest.raises(blockfetch.QuickFetchFailed, match=why):
        blockfetch.quick_get(CID_, bad.url, timeout=5, max_size=1 << 20, user_agent="test")
    assert fetch([bad.url, good.url], tmp_path) == BLOCK  # the client asked the first again, then the second
    assert bad.requests >= 3


def test_with_no_gateway_that_has_it_the_clients_error_names_each(tmp_path: Path) -> None:
    bad = Fake(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nlies!")
    with pytest.raises(BlockUnavailable, match="hash mismatch"):
        fetch([bad.url], tmp_path)


def test_an_https_gateway_goes_to_the_full_client() -> None:
    with pytest.raises(blockfetch.QuickFetchFailed, match="not a plain http"):
        blockfetch.quick_get(CID_, "https://127.0.0.1:9", timeout=1, max_size=1 << 20, user_agent="test")
