"""What every bench shares: argument parsing, a results table, the JSON file."""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any


def parse_args(description: str, extra: list[tuple[str, dict[str, Any]]] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--out", default="out/bench", help="directory for the JSON result")
    for name, kw in extra or []:
        ap.add_argument(name, **kw)
    return ap.parse_args()


def write_results(out_dir: str, name: str, rows: list[dict[str, Any]], notes: dict[str, Any] | None = None) -> Path:
    """Print `rows` as a table and write them (with machine facts) to out_dir/name.json."""
    cols = list(dict.fromkeys(k for r in rows for k in r))
    widths = {c: max(len(c), *(len(_fmt(r.get(c))) for r in rows)) for c in cols}
    print("  ".join(c.ljust(widths[c]) for c in cols))
    for r in rows:
        print("  ".join(_fmt(r.get(c)).ljust(widths[c]) for c in cols))
    path = Path(out_dir) / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    doc = {"bench": name, "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
           "machine": {"python": platform.python_version(), "cpus": _cpus()}, "rows": rows, "notes": notes or {}}
    path.write_text(json.dumps(doc, indent=2) + "\n")
    print(f"wrote {path}")
    return path


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"
    return "" if v is None else str(v)


def _cpus() -> int:
    import os

    return os.cpu_count() or 0


def peak_rss_of(cmd: list[str]) -> tuple[float, int]:
    """Run cmd in a child; return (seconds, the child's peak RSS in KiB)."""
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    dt = time.perf_counter() - t0
    return dt, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss


def python_child(code: str) -> list[str]:
    return [sys.executable, "-c", code]
