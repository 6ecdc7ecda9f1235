"""`imagebuilder cat CID[/path]`: write a UnixFS file's verified bytes to stdout.

The path goes through UnixFS directories and DAG-CBOR fields alike (the gateway's resolver,
cidboot.store.gateway.pathing), so `MANIFEST/manifest/layers/0/cid` is the kernel layer's bytes.
A path that ends at a DAG-CBOR document or a directory has no bytes to print: the error
names `imagebuilder show`, which decodes it.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from cidboot.errors import CidbootError, FormatError
from cidboot.ipld import dagpb
from cidboot.ipld.cid import CID, DAG_CBOR, DAG_PB
from cidboot.ipld.unixfs import export_file
from cidboot.ipld.unixfs.data import FILE, RAW, TYPE_NAMES, UnixFSData
from cidboot.store.blockstore import Blockstore
from cidboot.store.gateway.pathing import resolve


class NotAFile(FormatError):
    """The CID (or path) names a block with no file bytes: a DAG-CBOR document or a directory."""


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("cat", help="print a file's bytes, verified against its CID",
                       description="Write the file CID[/path] to stdout; the path follows UnixFS directory "
                       "entries and DAG-CBOR fields (MANIFEST/manifest/layers/0/cid). With --gateway, missing "
                       "blocks are fetched from the given trustless gateways (in order, with fallback), each "
                       "verified. For manifests, flows, provenance and other documents use `imagebuilder show`.")
    p.add_argument("cid", help="CID or CID/path/inside")
    p.add_argument("--store", type=Path, help="block store directory (default: $CIDBOOT_STORE)")
    p.add_argument("--gateway", action="append", default=[], metavar="URL", help="trustless gateway (repeatable)")
    p.add_argument("--timeout", type=float, default=10.0, help="seconds without progress before a gateway is skipped")
    p.set_defaults(func=run)


def check_file(cid: CID, block: bytes, spec: str) -> None:
    """Raise NotAFile (naming `imagebuilder show`) unless `cid` is a UnixFS file or raw leaf."""
    if cid.codec == DAG_CBOR:
        from imagebuilder.commands.show import decode_block

        kind = decode_block(cid, block).kind
        raise NotAFile(f"{spec} is a DAG-CBOR {kind}, not a file: use `imagebuilder show {spec}` to read it")
    if cid.codec == DAG_PB:
        try:
            t = UnixFSData.decode(dagpb.decode(block).data).type
        except CidbootError:
            return  # export_file reports the malformed node precisely
        if t not in (FILE, RAW):
            raise NotAFile(f"{spec} is a UnixFS {TYPE_NAMES.get(t, t)}, not a file: "
                           f"use `imagebuilder show {spec}` to list it")


def run(args: argparse.Namespace) -> int:
    root_s, _, path = args.cid.partition("/")
    root = CID.parse(root_s)
    store = Blockstore(args.store)
    if args.gateway:
        from cidboot.store.gateway.client import fetch

        fetch(root, args.gateway, store, timeout=args.timeout)
    segs = [s for s in path.split("/") if s]
    target = resolve(root, segs, store.get).terminal if segs else root
    check_file(target, store.get(target), args.cid)
    out = sys.stdout.buffer
    for chunk in export_file(target, store.get):
        out.write(chunk)
    out.flush()
    return 0
