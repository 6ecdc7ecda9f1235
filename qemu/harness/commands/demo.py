"""`python -m qemu.harness demo`: the hello flow on one device, the embedded defaults of `make demo`."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from qemu.harness.commands import boot

HELLO = Path(__file__).resolve().parents[3] / "examples" / "hello" / "flow.yaml"


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("demo", help="boot examples/hello on one device and appraise it (what `make demo` runs)")
    p.add_argument("--out", type=Path, default=Path("out/demo"))
    p.add_argument("--json", action="store_true")
    p.add_argument("--timeout", type=float, default=600)
    p.set_defaults(func=run)


def reset_boot_state(out: Path) -> list[Path]:
    """Forget what earlier demos' devices accepted: their NVRAM (rollback state: the manifest
    accepted per version). The demo shows one boot from power-on, not an upgrade: after a
    cidboot change that alters image CIDs at the same flow version, a kept NVRAM would refuse the
    new build as "one version, one content" (right for a real device, where the fix is a new
    version; wrong for the demo). The UDS stays: the device keeps its identity."""
    gone = []
    for nvram in sorted((out / "lab" / "devices").glob("*/nvram.img")):
        nvram.unlink()
        gone.append(nvram)
    return gone


def run(args: argparse.Namespace) -> int:
    for p in reset_boot_state(args.out):
        print(f"==> {p}: an earlier demo's boot state, reset (the demo boots a device without rollback history)",
              file=sys.stderr)
    ns = argparse.Namespace(flow=str(HELLO), store=None, keys=[], devices=1, out=args.out, keep=True, legacy=False, firmware=None, timeout=args.timeout,
                            cluster=0, boot_servers=1, replication="2:2",
                            json=args.json)
    return boot.run(ns)
