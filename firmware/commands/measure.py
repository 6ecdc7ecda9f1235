"""`firmware measure KERNEL INITRD... [--bootconfig FILE]`: the DICE inputs L0 derives CDI_1 from.

The firmware measures what it fetched exactly so (cidboot.trust.measure.boot_code_hash): code
hash = SHA-512 over the SHA-512 of the kernel and of each initrd, in boot.ipxe order; the boot
config is the configuration descriptor (its SHA-512 enters the CDI). Run it on the bootstrap's
`vmlinuz` and `initrd.img` to get the reference value for `imagebuilder build --reference
bootstrap=HEX`: an initrd that carries its runtime layer's runtime.json is taken as the boot
server lists it (`bootstrap serve` splits it: the runtime layer, then the rest). The DICE engine
measures the firmware's own kernel + initrd the same way (`--reference firmware=HEX`).
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
    from cidboot.stage.switch_root import runtime_prefix

    kernel = args.kernel.read_bytes()
    initrds: list[bytes] = []
    for p in args.initrd:  # a built bootstrap's initrd.img: as the boot server lists it, runtime layer first
        data = p.read_bytes()
        n = runtime_prefix(data)
        initrds += [data[:n], data[n:]] if n else [data]
    out: dict[str, object] = {"code_hash": boot_code_hash(kernel, initrds).hex(), "kernel": str(args.kernel),
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
