"""What a `python -m qemu.harness boot` run leaves in its --out dir.

A run copies flows, keys and a block store into OUT/work, builds three kernel+initrd pairs there,
copies the bootstrap into OUT/lab/tftp and gives every device a UDS, an NVRAM disk and its DICE
input in OUT/lab/devices/<name>/: about 100 MB for one device, growing with every run dir. What a
user reads afterwards is small: report.json (with each device's boot timeline), the consoles,
the boot server's log and its fleet state. Without --keep the rest goes (`clean`): an allow-list,
so whatever a later change adds to the run dir is removed too, and only inside OUT/work and
OUT/lab (never elsewhere in OUT, which may be a directory of the user's).
"""

from __future__ import annotations

import contextlib
import fnmatch
import shutil
import sqlite3
from dataclasses import dataclass, field
from pathlib import Path

# relative to OUT/lab: what a user reads after the run (everything else in OUT/work, OUT/lab goes)
KEEP = ("boot-server.log", "keys*.log", "keys-policy.json", "devices.yaml", "device-roots.json", "devices/*/run/console.log",
        "devices/*/run/console.raw", "devices/*/run/qemu.argv.json", "devices/*/run/qemu.stderr",
        "server-state/fleet.sqlite", "server-state/fleet.sqlite-wal", "server-state/fleet.sqlite-shm")
REMOVED = ("work", "lab")  # the subdirectories of OUT a run creates


@dataclass
class Cleaned:
    """What `clean` did: sizes in bytes, the files kept (relative to OUT)."""

    before: int
    after: int
    kept: list[str] = field(default_factory=list)

    def line(self) -> str:
        return (f"run dir cleaned: {_size(self.before)} -> {_size(self.after)}; kept report.json, "
                f"lab/devices/*/run/console.log, lab/boot-server.log, lab/server-state/fleet.sqlite "
                f"({len(self.kept)} files; --keep keeps the images, store, keys and device disks)")

    def to_obj(self) -> dict[str, object]:
        return {"bytes_before": self.before, "bytes_after": self.after, "kept": self.kept}


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024  # type: ignore[assignment]
    return f"{n} B"


def du(path: Path) -> int:
    """Bytes in the regular files under `path` (symlinks not followed)."""
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())


def clean(out: Path, *, spare: tuple[Path, ...] = ()) -> Cleaned:
    """Remove OUT/work and OUT/lab except the KEEP files; never touch a path in `spare` (a block
    store the user gave with a manifest CID) or anything in OUT outside those two dirs."""
    out = out.resolve()
    spare = tuple(p.resolve() for p in spare)
    before = du(out)
    kept: list[str] = []
    work = out / "work"
    if work.is_dir():
        if any(s == work or work in s.parents or s in work.parents for s in spare):
            for child in work.iterdir():  # the user's store is in here: leave it, remove the rest
                if not any(child == s or child in s.parents for s in spare):
                    _remove(child)
        else:
            shutil.rmtree(work, ignore_errors=True)
    lab = out / "lab"
    _one_file(lab / "server-state" / "fleet.sqlite")
    if lab.is_dir():
        for p in sorted(lab.rglob("*"), reverse=True):  # children before their directories
            rel = p.relative_to(lab).as_posix()
            if p.is_dir() and not p.is_symlink():
                if not any(p.iterdir()):
                    p.rmdir()
            elif any(fnmatch.fnmatchcase(rel, pat) for pat in KEEP):
                kept.append(f"lab/{rel}")
            else:
                p.unlink()
    return Cleaned(before, du(out), sorted(kept))


def _one_file(db: Path) -> None:
    """Fold the fleet database's write-ahead log into it (the server was stopped, not closed:
    its events sit in a 200 KB -wal file beside a 4 KB database): one self-contained file."""
    if not db.is_file():
        return
    with contextlib.suppress(sqlite3.Error):
        conn = sqlite3.connect(db)
        try:
            conn.execute("PRAGMA journal_mode=DELETE")
        finally:
            conn.close()


def _remove(p: Path) -> None:
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p, ignore_errors=True)
    else:
        p.unlink(missing_ok=True)
