"""Gateways on loopback for the tests: ours over a store, and misbehaving ones."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import TYPE_CHECKING

from cidboot.ipld.cid import CID
from cidboot.store.blockstore import Blockstore
from cidboot.store.gateway.server import GatewayServer, serve_gateway

if TYPE_CHECKING:
    from agent.device import BootedAgent

NetFixture = tuple[GatewayServer, Blockstore, list["BootedAgent"]]


@contextmanager
def running_gateway(store: Blockstore) -> Iterator[GatewayServer]:
    gw = serve_gateway(store, "127.0.0.1", 0)
    t = threading.Thread(target=gw.serve_forever, daemon=True)
    t.start()
    try:
        yield gw
    finally:
        gw.shutdown()
        gw.server_close()


@contextmanager
def agents_net(store_dir: Path, blocks: Iterable[tuple[CID, bytes]]) -> Iterator[NetFixture]:
    """A gateway over a store holding `blocks`, and a list the test appends the agents it boots
    from it to: every agent's API server and the gateway are shut down after the block."""
    store = Blockstore(store_dir)
    for cid, block in blocks:
        store.put(cid, block)
    agents: list[BootedAgent] = []
    with running_gateway(store) as gw:
        try:
            yield gw, store, agents
        finally:
            for a in agents:
                a.server.shutdown()
                a.server.server_close()


@contextmanager
def _serving(handler: type[BaseHTTPRequestHandler], on_stop: Callable[[], None] | None = None) -> Iterator[str]:
    """Run a throwaway HTTP server on loopback for the duration of the block; yield its URL."""
    srv = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    srv.daemon_threads = True
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{srv.server_address[1]}"
    finally:
        if on_stop is not None:
            on_stop()  # release handlers that are deliberately stalling
        srv.shutdown()
        srv.server_close()
        time.sleep(0.05)


@contextmanager
def proxy_gateway(upstream: str, mangle: Callable[[str, bytes], bytes | None]) -> Iterator[str]:
    """A gateway that forwards to `upstream` and lets `mangle(path, body)` change the body;
    returning None means stall (send headers, then nothing) until the client gives up."""
    import urllib.request

    stop = threading.Event()

    class H(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.0"

        def log_message(self, *a: object) -> None:
            pass

        def do_GET(self) -> None:
            req = urllib.request.Request(upstream + self.path, headers={"Accept": self.headers.get("Accept", "")})
            with urllib.request.urlopen(req) as r:
                body, ctype = r.read(), r.headers["Content-Type"]
            out = mangle(self.path, body)
            self.send_response(200)
            self.send_header("Content-Type", ctype)
            self.end_headers()
            if out is None:
                self.wfile.write(body[:50])
                self.wfile.flush()
                stop.wait(30)
                return
            self.wfile.write(out)

    with _serving(H, on_stop=stop.set) as url:
        yield url


@contextmanager
def raw_only_gateway(upstream: str) -> Iterator[str]:
    """A gateway that answers 406 to every CAR request and forwards `?format=raw`: the kind
    of block-only server the client must fall back to per-block fetches for."""
    import urllib.request

    class H(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.0"

        def log_message(self, *a: object) -> None:
            pass

        def do_GET(self) -> None:
            if "format=raw" not in self.path:
                self.send_response(406)
                self.send_header("Content-Type", "text/plain")
                self.end_headers()
                self.wfile.write(b"only raw blocks here\n")
                return
            with urllib.request.urlopen(upstream + self.path) as r:
                body = r.read()
            self.send_response(200)
            self.send_header("Content-Type", "application/vnd.ipld.raw")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    with _serving(H) as url:
        yield url
