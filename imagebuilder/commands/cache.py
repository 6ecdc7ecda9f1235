"""`imagebuilder cache prune`: free the build cache (~/.cache/cidboot, or $XDG_CACHE_HOME/cidboot).

The cache holds finished layers by input hash (`layers`, or $CIDBOOT_BUILD_CACHE), unpacked
Debian sysroots, downloaded .debs and wheels. Every entry is rebuilt or downloaded again (and
checked against flow.lock) when a build needs it, so pruning only costs time. A layer's age
is the time since a build last used it.

`imagebuilder build` keeps the layers at most $CIDBOOT_LAYER_CACHE_MAX (default 8G; `off` for no
limit) by removing the least recently used after each build: every change to the builder's own
code changes every layer's key, so without a cap a build host collects a copy per version.
"""

from __future__ import annotations

import argparse
import os
import re
from pathlib import Path

from cidboot.cli import UsageError, human_bytes, print_json
from imagebuilder.cache import KINDS, prune
from imagebuilder.lock import cache_dir

UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
SIZE_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
DEFAULT_LAYER_CACHE_MAX = "8G"


def parse_age(text: str) -> float:
    """`90s`, `30m`, `12h`, `7d`, `2w` or plain seconds."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhdw]?)\s*", text)
    if not m:
        raise UsageError(f"--older-than must be a number with s/m/h/d/w, got {text!r}")
    return float(m.group(1)) * UNITS[m.group(2) or "s"]


def parse_size(text: str, what: str = "--max-size") -> int:
    """`500M`, `8G`, `8GiB`, `1.5T` or plain bytes (binary units: the sizes `prune` prints)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(?:i?b)?\s*", text, re.IGNORECASE)
    if not m:
        raise UsageError(f"{what} must be a size such as 500M or 8G, got {text!r}")
    return int(float(m.group(1)) * SIZE_UNITS[m.group(2).lower()])


def layer_cache_max() -> int | None:
    """The layers' cap for the prune after a build: $CIDBOOT_LAYER_CACHE_MAX, or None for `off`."""
    text = os.environ.get("CIDBOOT_LAYER_CACHE_MAX", DEFAULT_LAYER_CACHE_MAX)
    if text.strip().lower() in ("off", "none", "0", ""):
        return None
    return parse_size(text, "CIDBOOT_LAYER_CACHE_MAX")


def kind_dir(kind: str) -> Path:
    if kind == "layers" and os.environ.get("CIDBOOT_BUILD_CACHE"):
        return Path(os.environ["CIDBOOT_BUILD_CACHE"])
    return cache_dir() / kind


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("cache", help="manage the build cache (prune)", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    csub = p.add_subparsers(dest="cache_command", metavar="COMMAND", required=True)
    pr = csub.add_parser("prune", help="remove cache entries (all, or those not used for --older-than)",
                         description="Remove entries of the build cache and print how many bytes were freed.")
    pr.add_argument("--older-than", metavar="AGE", help="only entries not used for AGE (90s, 30m, 12h, 7d, 2w); "
                    "default: every entry")
    pr.add_argument("--max-size", metavar="SIZE", help="keep the most recently used entries that fit in SIZE "
                    "(500M, 8G) and remove the rest; with --older-than, an entry must pass both to stay")
    pr.add_argument("--kind", action="append", choices=(*KINDS, "all"),
                    help="which part of the cache (repeatable; default: layers)")
    pr.add_argument("--dry-run", action="store_true", help="count what would be removed, remove nothing")
    pr.add_argument("--json", action="store_true", help='{"removed", "bytes", "kept", "kept_bytes", "dirs", "dry_run"}')
    pr.set_defaults(func=run_prune)


def run_prune(args: argparse.Namespace) -> int:
    older = parse_age(args.older_than) if args.older_than is not None else None
    cap = parse_size(args.max_size) if args.max_size is not None else None
    kinds = ["layers"] if not args.kind else list(KINDS) if "all" in args.kind else list(dict.fromkeys(args.kind))
    dirs = [kind_dir(k) for k in kinds]
    res = prune(dirs, older, dry_run=args.dry_run, max_bytes=cap)
    if args.json:
        print_json({"removed": res.entries, "bytes": res.bytes, "kept": res.kept, "kept_bytes": res.kept_bytes,
                    "dirs": [str(d) for d in dirs], "dry_run": args.dry_run})
    else:
        verb = "would free" if args.dry_run else "freed"
        where = ", ".join(str(d) for d in dirs)
        print(f"{verb} {human_bytes(res.bytes)} ({res.entries} entries) in {where}; "
              f"kept {res.kept} entries ({human_bytes(res.kept_bytes)})")
    return 0
