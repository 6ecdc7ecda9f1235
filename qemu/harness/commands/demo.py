"""`python -m qemu.harness demo`: the hello flow on one device, the embedded defaults of `make demo`."""

from __future__ import annotations

import argparse
from pathlib import Path

from qemu.harness.commands import boot

HELLO = Path(__file__).resolve().parents[3] / "examples" / "hello" / "flow.yaml"


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("demo", help="boot examples/hello on one device and appraise it (what `make demo` runs)")
    p.add_argument("--out", type=Path, default=Path("out/demo"))
    p.add_argument("--json", action="store_true")
    p.add_argument("--timeout", type=float, default=600)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    ns = argparse.Namespace(flow=str(HELLO), store=None, keys=[], devices=1, out=args.out, keep=True, legacy=False, firmware=None, timeout=args.timeout,
                            cluster=0, boot_servers=1, replication="2:2",
                            json=args.json)
    return boot.run(ns)
