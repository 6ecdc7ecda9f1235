"""`firmware run`: be the L0 stage (what the firmware image's /init does as PID 1).

Reads the DICE engine's handover, network-boots the bootstrap, measures it, derives CDI_1 and
kexecs into it; every failure prints one console line and powers the machine off. That only
makes sense as PID 1 of the firmware image: anywhere else it would power off the host, so it
refuses unless it is PID 1.
"""

from __future__ import annotations

import argparse
import os

from cidboot.errors import CidbootError


class NotPid1(CidbootError):
    """`firmware run` outside PID 1: it powers off on failure and kexecs on success."""


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from firmware.stage import FW_CFG_HANDOVER

    p = sub.add_parser("run", help="run the L0 stage (only as PID 1 of the firmware image)", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--handover", default=FW_CFG_HANDOVER, metavar="PATH",
                   help=f"where the DICE engine's handover is read (default: QEMU fw_cfg, {FW_CFG_HANDOVER})")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if os.getpid() != 1:
        raise NotPid1(f"firmware run is the boot stage: it kexecs or powers the machine off, so it runs only as "
                      f"PID 1 of the firmware image (this is PID {os.getpid()}); to check what it would measure, "
                      f"use `firmware measure KERNEL INITRD`")
    from firmware.stage import main

    main(args.handover)  # powers off or kexecs; returns only if neither happened
    return 1
