"""`imagebuilder lock [--update] flow.yaml`: resolve and record exact pins in flow.lock beside the flow."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from cidboot.cli import print_json
from imagebuilder import flowfile
from imagebuilder.lock import Lock, LockFormatError, changes, lock_path, make_lock


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("lock", help="pin the flow's Debian packages and wheels in flow.lock",
                       description="Resolve every Debian package (apt-cache show + apt-get download) and wheel "
                                   "(pip download --only-binary :all: --no-deps) the flow names, and write name, "
                                   "version and SHA-256 of each to flow.lock beside it (sorted JSON). A kernel "
                                   "metapackage (linux-image-cloud-amd64) is followed to the concrete package its "
                                   "Depends names, and both are pinned. Pins of an existing lock that the mirror "
                                   "still serves are kept; --update re-resolves every pin. The flow's `arch:` (amd64 or "
                                   "arm64) selects the packages' architecture and the wheels' manylinux platform; "
                                   "another architecture than the host's is resolved through a private apt state "
                                   "in ~/.cache/cidboot/apt/ARCH (the host's sources, nothing installed). A flow "
                                   "other than flow.yaml is locked into NAME.lock (flow-arm64.yaml -> flow-arm64.lock).")
    p.add_argument("flow", type=Path)
    p.add_argument("--update", action="store_true",
                   help="re-resolve every pin to what the mirror serves now (default: keep pins still served)")
    p.add_argument("--json", action="store_true", help="print the lock as JSON instead of a summary")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    ff = flowfile.load(args.flow, require_keys=False)
    quiet = args.quiet or args.json

    def say(msg: str) -> None:
        if not quiet:
            print(f"imagebuilder: {msg}", file=sys.stderr, flush=True)

    out = lock_path(ff.path)
    previous: Lock | None = None
    if out.exists():
        try:
            previous = Lock.load(out)
        except LockFormatError as e:  # a malformed lock is an error, unless --update replaces it
            if not args.update:
                raise LockFormatError(f"{e}; `imagebuilder lock --update {args.flow}` replaces it") from None
    lock = make_lock(ff, say, previous=previous, update=args.update)
    moved = changes(previous, lock) if previous is not None else []
    if moved:
        say(f"moved: {'; '.join(moved)}")
    text = lock.to_json()
    out.write_text(text)
    if args.json:
        import json

        print_json(json.loads(text))
    else:
        print(out)
    return 0
