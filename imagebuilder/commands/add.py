"""`imagebuilder add PATH`: import a file or directory as UnixFS, like `ipfs add`."""

from __future__ import annotations

import argparse
from pathlib import Path

from cidboot.cli import Progress, print_json
from cidboot.errors import CidbootError
from cidboot.ipld.unixfs import ImportOptions, import_path
from cidboot.ipld.unixfs.importer import BlockSink
from cidboot.store.blockstore import Blockstore, default_store_path


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("add", help="import a file or directory tree (Kubo-identical CIDs)",
                       description="Import PATH as UnixFS, exactly as `ipfs add` would; print the root CID last.")
    p.add_argument("path", type=Path)
    p.add_argument("--cid-version", type=int, choices=(0, 1), default=0, help="0 (Kubo default) or 1 (raw leaves)")
    p.add_argument("--chunker", default="size-262144", help="size-N fixed-size chunks (default size-262144)")
    p.add_argument("--raw-leaves", action=argparse.BooleanOptionalAction, default=None,
                   help="raw leaf blocks (default: on with CIDv1, off with CIDv0)")
    p.add_argument("--hidden", action="store_true", help="include dotfiles in directories")
    p.add_argument("--only-hash", action="store_true", help="compute the CID, store nothing")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--store", type=Path, help=f"block store directory (default: $CIDBOOT_STORE or {default_store_path()})")
    where.add_argument("--kubo", metavar="URL", help="publish to a Kubo node's RPC instead, e.g. http://127.0.0.1:5001")
    p.add_argument("--pin", action=argparse.BooleanOptionalAction, default=True, help="pin the root (default on)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if not args.path.exists():
        raise CidbootError(f"{args.path}: no such file or directory")
    opts = ImportOptions(args.cid_version, ImportOptions.parse_chunker(args.chunker), args.raw_leaves, args.hidden)
    sink: BlockSink | None = None
    store = kubo = None
    if not args.only_hash:
        if args.kubo:
            from cidboot.store.kubo import KuboClient

            sink = kubo = KuboClient(args.kubo)
        else:
            sink = store = Blockstore(args.store)
    total = args.path.stat().st_size if args.path.is_file() else None
    prog = Progress(f"adding {args.path.name}", total, quiet=args.quiet or args.json)
    res = import_path(args.path, sink, opts, progress=prog.update)
    prog.close()
    if args.pin:
        if store is not None:
            store.pin(res.cid)
        elif kubo is not None:
            kubo.pin(res.cid)
    if args.json:
        print_json({"cid": str(res.cid), "size": res.size, "blocks": res.blocks, "dag_size": res.tsize,
                    "entries": [{"path": p, "cid": str(c)} for p, c in res.entries] if args.path.is_dir() else []})
        return 0
    if args.path.is_dir() and not args.quiet:
        for rel, cid in res.entries:
            if rel:
                print(f"added {cid} {args.path.name}/{rel}")
    print(res.cid)
    return 0
