"""`imagebuilder car export|import`: move DAGs in and out of the store as CARv1 files."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from cidboot.cli import print_json
from cidboot.ipld import dag
from cidboot.ipld.car import CarReader, CarWriter
from cidboot.ipld.cid import CID
from cidboot.store.blockstore import Blockstore


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("car", help="export or import CARv1 files", description="Export or import CARv1 archives.")
    csub = p.add_subparsers(dest="car_command", metavar="SUBCOMMAND", required=True)
    e = csub.add_parser("export", help="write the DAG under CID to a CAR file")
    e.add_argument("cid")
    e.add_argument("-o", "--output", required=True, help="CAR file to write ('-' for stdout)")
    e.add_argument("--store", type=Path, help="block store directory (default: $CIDBOOT_STORE)")
    e.set_defaults(func=run_export)
    i = csub.add_parser("import", help="verify every block of a CAR file and store it")
    i.add_argument("file", help="CAR file ('-' for stdin)")
    i.add_argument("--store", type=Path, help="block store directory (default: $CIDBOOT_STORE)")
    i.add_argument("--pin", action=argparse.BooleanOptionalAction, default=True,
                   help="pin the roots (default on; needs the whole DAG in the CAR)")
    i.add_argument("--json", action="store_true", help="machine-readable output")
    i.set_defaults(func=run_import)


def run_export(args: argparse.Namespace) -> int:
    root = CID.parse(args.cid)
    store = Blockstore(args.store)
    out = sys.stdout.buffer if args.output == "-" else open(args.output, "wb")
    try:
        w = CarWriter(out, [root])
        for cid, block in dag.walk(root, store.get):
            if not cid.is_identity:
                w.write(cid, block)
    finally:
        if out is not sys.stdout.buffer:
            out.close()
    return 0


def run_import(args: argparse.Namespace) -> int:
    """Every block verified and stored in one batch, as a fetch stores a CAR: more than 16 new
    blocks go to one pack file, fewer to flatfs files; blocks the store holds intact are not
    written again (`Blockstore.writer(skip_present=True)`). Durable (the batch's fsyncs) before
    the roots are pinned."""
    store = Blockstore(args.store)
    src = sys.stdin.buffer if args.file == "-" else open(args.file, "rb")
    try:
        reader = CarReader(src)
        n = 0
        with store.writer(skip_present=True):
            for cid, block in reader:
                store.put(cid, block)
                n += 1
    finally:
        if src is not sys.stdin.buffer:
            src.close()
    if args.pin:
        for r in reader.roots:
            store.pin(r)
    if args.json:
        print_json({"roots": [str(r) for r in reader.roots], "blocks": n})
    else:
        for r in reader.roots:
            print(r)
    return 0
