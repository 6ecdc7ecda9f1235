"""`imagebuilder flash MANIFEST_CID --out DIR`: a firmware build's kernel and initrd as a board's
boot flash holds them (imagebuilder.flash), checked against the manifest's own L0 reference."""

from __future__ import annotations

import argparse
from pathlib import Path

from cidboot.cli import print_json
from cidboot.ipld.cid import CID
from cidboot.store.blockstore import Blockstore
from imagebuilder.flash import flash_image


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("flash", help="write a firmware build's kernel and uncompressed initrd for a board's flash",
                       description="Write vmlinuz and initrd.img of a `target: firmware` manifest into DIR, as a "
                       "board's boot flash holds them (the initrd uncompressed: docs/images.md, \"The firmware's "
                       "flash\"). The files are checked against the manifest's L0 reference value (the code hash "
                       "the board's DICE engine will measure) before anything is written; a manifest without one "
                       "is refused.")
    p.add_argument("manifest", help="the firmware manifest's CID")
    p.add_argument("--out", type=Path, required=True, metavar="DIR", help="directory for vmlinuz and initrd.img")
    p.add_argument("--store", type=Path, help="block store directory (default: $CIDBOOT_STORE)")
    p.add_argument("--json", action="store_true", help="print the files, sizes and code hash as JSON")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    img = flash_image(Blockstore(args.store), CID.parse(args.manifest))
    kernel, initrd = img.write(args.out)
    if args.json:
        print_json({"manifest": str(img.manifest), "kernel": str(kernel), "kernel_bytes": len(img.kernel),
                    "initrd": str(initrd), "initrd_bytes": len(img.initrd), "code_hash": img.code_hash.hex(),
                    "cmdline": img.cmdline})
    else:
        print(f"{kernel} ({len(img.kernel)} bytes)\n{initrd} ({len(img.initrd)} bytes, uncompressed)\n"
              f"L0 code hash (the board's DICE engine measures this): {img.code_hash.hex()}\n"
              f"kernel command line: {img.cmdline}")
    return 0
