"""`bootstrap gateway`: run the trustless HTTP gateway over a block store on its own."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from cidboot.cli import UsageError, listen_error
from cidboot.store.blockstore import Blockstore
from cidboot.store.gateway.server import serve_gateway

log = logging.getLogger("bootstrap.gateway")


def parse_listen(value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise UsageError(f"--listen must be HOST:PORT, got {value!r}")
    return host.strip("[]") or "127.0.0.1", int(port)


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("gateway", help="serve the block store as an IPFS trustless gateway",
                       description="Serve GET/HEAD /ipfs/{cid} (raw blocks and CARs) from the block store.")
    p.add_argument("--store", type=Path, help="block store directory (default: $CIDBOOT_STORE)")
    p.add_argument("--listen", default="127.0.0.1:8080", help="HOST:PORT (default 127.0.0.1:8080; port 0 picks one)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    host, port = parse_listen(args.listen)
    try:
        server = serve_gateway(Blockstore(args.store), host, port)
    except OSError as e:
        raise listen_error(e, host, port) from None
    # The bound address goes to stdout so scripts (and tests) can use port 0.
    print(f"gateway listening on {server.url}", flush=True)
    log.info("gateway listening", extra={"url": server.url, "store": str(server.store.path)})
    try:
        server.serve_forever()
    finally:
        server.server_close()
    return 0
