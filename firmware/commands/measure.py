"""`firmware measure KERNEL INITRD... [--bootconfig FILE]`: the DICE inputs L0 derives CDI_1 from.

The firmware measures what it fetched exactly so (cidboot.trust.measure.boot_code_hash): code
hash = SHA-512 over the SHA-512 of the kernel and of each initrd, in boot.ipxe order; the boot
config is the configuration descriptor (its SHA-512 enters the CDI). Run it on the files the
boot server lists for the bootstrap (`vmlinuz`, then `runtime.img` and `initrd-rest.img` when it
splits the initrd after its runtime layer, as `bootstrap serve` does for a built bootstrap; else
`initrd.img`) to get the reference value for `imagebuilder build --reference bootstrap=HEX`; the
DICE engine measures the firmware's own kernel + initrd the same way (`--reference firmware=HEX`).
"""

from __future__ import annotations

import argparse
import hashlib
from pathlib import Path

from cidboot.cli import print_json
from cidboot.trust.measure import boot_code_hash


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("measure", help="print the code hash L0 measures for a kernel + initrd(s)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("kernel", type=Path)
    p.add_argument("initrd", type=Path, nargs="+", help="initrd(s), in the order boot.ipxe names them")
    p.add_argument("--bootconfig", type=Path, help="the boot config file (configuration descriptor)")
    p.add_argument("--json", action="store_true", help='{"code_hash", "config_hash"?, "kernel", "initrds"}')
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    kernel = args.kernel.read_bytes()
    out: dict[str, object] = {"code_hash": boot_code_hash(kernel, [p.read_bytes() for p in args.initrd]).hex(),
                              "kernel": str(args.kernel),
                              "initrds": [str(p) for p in args.initrd]}
    if args.bootconfig:
        out["config_hash"] = hashlib.sha512(args.bootconfig.read_bytes()).hexdigest()
    if args.json:
        print_json(out)
    else:
        print(out["code_hash"])
        if "config_hash" in out:
            print(f"config {out['config_hash']}")
    return 0
