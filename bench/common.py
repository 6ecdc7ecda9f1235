"""What every bench shares: argument parsing, the machine's memory held steady, a results table,
the JSON file."""

from __future__ import annotations

import argparse
import atexit
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

#: The free page reporting knob of this kind of VM (a Firecracker guest whose kernel reports freed
#: memory to the host, which discards it). At 0 ms a page is reported as soon as it is freed, and
#: the next process to allocate it pays a fault in the host for each page: about 0.5 s of system
#: CPU per 256 MiB of new page cache. Which timed process gets such pages depends on what the one
#: before it freed, not on its own code: in one `bench_fetch` run it doubled our client's CPU in
#: 4 runs of 6, and curl's in 1 of 6.
PAGE_REPORTING_DELAY = Path("/sys/module/page_reporting/parameters/min_free_ms")
#: What the benches set it to: memory freed within the last minute stays with the guest
HOLD_FREED_MS = 60000


def hold_freed_memory(knob: Path | None = None, hold_ms: int = HOLD_FREED_MS) -> dict[str, Any]:
    """Keep memory the guest freed in the last `hold_ms` from going back to the host, until this
    process exits (then the old value is put back), so every kind a bench times, ours and the
    reference alike, allocates memory the guest still holds. Returns what it found and did, for
    the results' machine facts: a machine without the knob (bare metal, most VMs) or without the
    right to write it is measured as it is, and says so. `knob`: PAGE_REPORTING_DELAY."""
    knob = knob or PAGE_REPORTING_DELAY
    try:
        was = int(knob.read_text().strip())
    except FileNotFoundError:
        return {"page_reporting": "absent"}
    except (OSError, ValueError) as e:
        return {"page_reporting": f"unreadable: {e}"}
    if was >= hold_ms:
        return {"page_reporting_min_free_ms": was}
    try:
        knob.write_text(f"{hold_ms}\n")
    except OSError as e:
        return {"page_reporting_min_free_ms": was, "page_reporting": f"left as it is: {e.strerror or e}"}
    atexit.register(_restore, knob, was)
    return {"page_reporting_min_free_ms": hold_ms, "page_reporting_min_free_ms_before": was}


def _restore(knob: Path, value: int) -> None:
    try:
        knob.write_text(f"{value}\n")
    except OSError as e:
        print(f"could not put {knob} back to {value}: {e}", file=sys.stderr)


#: what `hold_freed_memory` did in this process (written into every result's machine facts)
MEMORY: dict[str, Any] = {}


def parse_args(description: str, extra: list[tuple[str, dict[str, Any]]] | None = None) -> argparse.Namespace:
    """The bench's arguments, then `settle_memory` (a bench that parses its arguments is about to
    time something)."""
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--out", default="out/bench", help="directory for the JSON result")
    add_memory_option(ap)
    for name, kw in extra or []:
        ap.add_argument(name, **kw)
    args = ap.parse_args()
    settle_memory(args)
    return args


def add_memory_option(ap: argparse.ArgumentParser) -> None:
    """`--page-reporting hold|leave`: every bench takes it (`make bench` passes it on)."""
    ap.add_argument("--page-reporting", choices=("hold", "leave"), default="hold",
                    help="hold (default): keep freed memory in the guest while the bench runs, where the VM "
                         f"reports it to the host at once ({PAGE_REPORTING_DELAY}); leave: measure as the VM is")


def settle_memory(args: argparse.Namespace) -> None:
    """`hold_freed_memory()` for the rest of the run unless `--page-reporting leave`; what was
    done goes into every result's machine facts (MEMORY)."""
    MEMORY.clear()
    MEMORY.update(hold_freed_memory() if args.page_reporting == "hold" else {"page_reporting": "left by --page-reporting"})


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
           "machine": {"python": platform.python_version(), "cpus": _cpus(), **MEMORY}, "rows": rows, "notes": notes or {}}
    path.write_text(json.dumps(doc, indent=2) + "\n")
    print(f"wrote {path}")
    return path


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"
    return "" if v is None else str(v)


def _cpus() -> int:
    return os.cpu_count() or 0


def peak_rss_of(cmd: list[str]) -> tuple[float, int]:
    """Run cmd in a child; return (seconds, the child's peak RSS in KiB)."""
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    dt = time.perf_counter() - t0
    return dt, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss


def python_child(code: str) -> list[str]:
    return [sys.executable, "-c", code]
