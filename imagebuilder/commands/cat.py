"""`imagebuilder cat CID`: write a UnixFS file's verified bytes to stdout."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from cidboot.ipld.cid import CID
from cidboot.ipld.unixfs import export_file, resolve_path
from cidboot.store.blockstore import Blockstore


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("cat", help="print a file's bytes, verified against its CID",
                       description="Write the file CID[/path] to stdout. With --gateway, missing blocks are "
                       "fetched from the given trustless gateways (in order, with fallback), each verified.")
    p.add_argument("cid", help="CID or CID/path/inside")
    p.add_argument("--store", type=Path, help="block store directory (default: $CIDBOOT_STORE)")
    p.add_argument("--gateway", action="append", default=[], metavar="URL", help="trustless gateway (repeatable)")
    p.add_argument("--timeout", type=float, default=10.0, help="seconds without progress before a gateway is skipped")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    root_s, _, path = args.cid.partition("/")
    root = CID.parse(root_s)
    store = Blockstore(args.store)
    if args.gateway:
        from cidboot.store.gateway.client import fetch

        fetch(root, args.gateway, store, timeout=args.timeout)
    target = resolve_path(root, path, store.get) if path else root
    out = sys.stdout.buffer
    for chunk in export_file(target, store.get):
        out.write(chunk)
    out.flush()
    return 0
