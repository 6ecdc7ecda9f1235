"""`imagebuilder gc`: remove the blocks no pin reaches from the block store.

Pins are the roots someone asked to keep: `imagebuilder build` pins the manifest it stores,
`agent run` its results and audit logs. Everything else (superseded builds, blocks added by
hand, fetched then abandoned) is garbage. The walk from the pins goes through every codec we
read links from, so a pinned manifest keeps its layers, flow and operation modules. A pin
whose DAG has a block missing stops the collection before anything is removed (the store's
own `gc` walks first): we cannot know what that block would have kept.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

from cidboot.cli import human_bytes, print_json
from cidboot.errors import NotFoundError
from cidboot.ipld import dag
from cidboot.ipld.cid import CID, RAW
from cidboot.ipld.multihash import Multihash
from cidboot.store.blockstore import Blockstore


@dataclass(frozen=True)
class Garbage:
    """What a collection would remove (dry run) or did remove."""

    pins: int
    kept: int
    removed: int
    bytes: int

    def to_obj(self, dry_run: bool) -> dict[str, object]:
        return {"pins": self.pins, "kept": self.kept, "removed": self.removed, "bytes": self.bytes,
                "dry_run": dry_run}


def _as_cid(mh: Multihash) -> CID:
    return CID(1, RAW, mh)  # the store keys blocks by multihash; the codec does not matter for a lookup


def unreachable(store: Blockstore) -> tuple[int, int, list[CID]]:
    """(pins, blocks kept, the blocks no pin reaches), by the same walk as `Blockstore.gc`."""
    pins = store.pins()
    keep: set[bytes] = set()
    for root in pins:
        for cid, _ in dag.walk(root, store.get):
            keep.add(cid.multihash.encode())
    garbage = [_as_cid(mh) for mh in store.multihashes() if mh.encode() not in keep]
    return len(pins), len(keep), garbage


def _size(store: Blockstore, cid: CID) -> int:
    try:
        return store.size(cid)
    except NotFoundError:
        return 0


def collect(store: Blockstore, dry_run: bool = False) -> Garbage:
    """Count (and unless dry_run, remove) the unreachable blocks; bytes are the block files'
    sizes. The removal itself is `Blockstore.gc` (it holds the store's lock and walks again,
    so a block pinned meanwhile survives); what it removed is what is gone afterwards."""
    pins, kept, garbage = unreachable(store)
    sizes = {c: _size(store, c) for c in garbage}
    if dry_run:
        return Garbage(pins, kept, len(garbage), sum(sizes.values()))
    removed = store.gc()
    freed = sum(n for c, n in sizes.items() if not store.has(c))
    return Garbage(pins, kept, removed, freed)


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("gc", help="remove blocks no pin reaches from the block store",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--store", type=Path, help="block store directory (default: $CIDBOOT_STORE)")
    p.add_argument("--dry-run", action="store_true", help="count what would be removed, remove nothing")
    p.add_argument("--json", action="store_true", help='{"pins", "kept", "removed", "bytes", "dry_run"}')
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    store = Blockstore(args.store)
    g = collect(store, dry_run=args.dry_run)
    if args.json:
        print_json(g.to_obj(args.dry_run))
    else:
        verb = "would remove" if args.dry_run else "removed"
        print(f"{verb} {g.removed} blocks ({human_bytes(g.bytes)}); kept {g.kept} blocks reachable from {g.pins} pins")
    return 0
