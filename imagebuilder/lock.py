"""flow.lock: exact Debian package and wheel pins, and fetching pinned artifacts into a cache.

Images must come from pinned sources, never from whatever the build host has installed, so
`imagebuilder lock` records name, version and SHA-256 of every .deb (via `apt-cache show` and
`apt-get download`) and wheel (via `pip download --only-binary :all: --no-deps`), and `build`
uses only these pins: an artifact is taken from the cache when its hash matches, else fetched
again by exact version and checked; one that is no longer served is an error that says how to
refresh the lock (as LinuxKit pins image digests).
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from cidboot.errors import CidbootError, FormatError, VerificationError
from imagebuilder.debpkg import parse_stanza
from imagebuilder.flowfile import FlowFile

LOCK_VERSION = 1
PY_TARGET = ["--python-version", "3.11", "--implementation", "cp", "--abi", "cp311",
             "--platform", "manylinux2014_x86_64", "--platform", "manylinux_2_28_x86_64",
             "--platform", "manylinux_2_17_x86_64"]


class LockError(CidbootError):
    """A pin cannot be resolved or fetched; the message says how to refresh the lock."""


class LockFormatError(FormatError):
    """flow.lock is malformed."""


class PinMismatchError(VerificationError):
    """A fetched artifact's SHA-256 differs from its pin."""


@dataclass(frozen=True)
class DebPin:
    name: str
    version: str
    arch: str
    sha256: str
    size: int
    filename: str  # the .deb's name in the cache


@dataclass(frozen=True)
class WheelPin:
    name: str
    version: str
    filename: str
    sha256: str


@dataclass
class Lock:
    debs: dict[str, DebPin]
    wheels: dict[str, WheelPin]

    def to_json(self) -> str:
        doc = {"lock_version": LOCK_VERSION,
               "debs": {k: asdict(v) for k, v in sorted(self.debs.items())},
               "wheels": {k: asdict(v) for k, v in sorted(self.wheels.items())}}
        return json.dumps(doc, indent=2, sort_keys=True) + "\n"

    @classmethod
    def load(cls, path: Path) -> Lock:
        try:
            doc = json.loads(path.read_text())
        except FileNotFoundError:
            raise LockError(f"{path}: no lock file; run `imagebuilder lock {path.with_suffix('.yaml')}` first") from None
        except (OSError, ValueError) as e:
            raise LockFormatError(f"{path}: not a lock file: {e}") from None
        try:
            if doc["lock_version"] != LOCK_VERSION:
                raise LockFormatError(f"{path}: lock_version {doc['lock_version']} unsupported (want {LOCK_VERSION})")
            debs = {k: DebPin(**v) for k, v in doc["debs"].items()}
            wheels = {k: WheelPin(**v) for k, v in doc["wheels"].items()}
        except (KeyError, TypeError) as e:
            raise LockFormatError(f"{path}: malformed lock entry: {e}") from None
        return cls(debs, wheels)


def lock_path(flow_path: Path) -> Path:
    return flow_path.with_name("flow.lock") if flow_path.name == "flow.yaml" else flow_path.with_suffix(".lock")


def cache_dir() -> Path:
    base = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return base / "cidboot"


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _run(cmd: list[str], cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, check=False)


def resolve_deb(name: str, version: str | None = None) -> DebPin:
    """The candidate (or the given version) of a package, from the apt index."""
    spec = f"{name}={version}" if version else name
    proc = _run(["apt-cache", "show", "--no-all-versions", spec])
    if proc.returncode != 0 or not proc.stdout.strip():
        raise LockError(f"Debian package {spec} is not known to apt ({proc.stderr.strip() or 'no such package'}); "
                        "check the name or run `apt-get update`")
    f = parse_stanza(proc.stdout)
    try:
        # the name `apt-get download` saves it under (epoch colon escaped), not the pool's
        local = f"{f['Package']}_{f['Version'].replace(':', '%3a')}_{f['Architecture']}.deb"
        return DebPin(f["Package"], f["Version"], f["Architecture"], f["SHA256"], int(f["Size"]), local)
    except KeyError as e:
        raise LockError(f"apt-cache show {spec}: no {e} field") from None


def fetch_deb(pin: DebPin, refresh_hint: str) -> Path:
    """The pinned .deb in the cache, downloaded by exact version if needed, hash checked."""
    d = cache_dir() / "debs"
    d.mkdir(parents=True, exist_ok=True)
    path = d / pin.filename
    if path.is_file() and sha256_file(path) == pin.sha256:
        return path
    proc = _run(["apt-get", "download", f"{pin.name}={pin.version}"], cwd=d)
    if proc.returncode != 0:
        raise LockError(f"pinned {pin.name} {pin.version} is not served by the configured apt mirrors "
                        f"({proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else 'download failed'}); "
                        f"{refresh_hint}")
    got = sha256_file(path) if path.is_file() else "missing"
    if got != pin.sha256:
        raise PinMismatchError(f"{pin.filename}: SHA-256 {got} does not match the pin {pin.sha256}; {refresh_hint}")
    return path


def resolve_wheel(name: str, version: str | None = None) -> tuple[WheelPin, Path]:
    d = cache_dir() / "wheels"
    d.mkdir(parents=True, exist_ok=True)
    spec = f"{name}=={version}" if version else name
    before = set(d.iterdir())
    proc = _run([sys.executable, "-m", "pip", "download", "-q", "--disable-pip-version-check", "--only-binary", ":all:",
                 "--no-deps", *PY_TARGET, "-d", str(d), spec])
    if proc.returncode != 0:
        raise LockError(f"wheel {spec} cannot be downloaded: {proc.stderr.strip().splitlines()[-1:] or ['pip failed']}")
    norm = name.lower().replace("-", "_")
    cands = sorted(p for p in d.glob("*.whl") if p.name.lower().startswith(norm + "-"))
    new = [p for p in cands if p not in before] or cands
    if version:
        new = [p for p in new if p.name.split("-")[1] == version] or new
    path = max(new, key=lambda p: p.stat().st_mtime)
    return WheelPin(name.lower(), path.name.split("-")[1], path.name, sha256_file(path)), path


def fetch_wheel(pin: WheelPin, refresh_hint: str) -> Path:
    path = cache_dir() / "wheels" / pin.filename
    if not (path.is_file() and sha256_file(path) == pin.sha256):
        try:
            _, path = resolve_wheel(pin.name, pin.version)
        except LockError as e:
            raise LockError(f"pinned wheel {pin.name} {pin.version}: {e}; {refresh_hint}") from None
    got = sha256_file(path)
    if got != pin.sha256 or path.name != pin.filename:
        raise PinMismatchError(f"{pin.filename}: got {path.name} with SHA-256 {got}, pin says {pin.sha256}; {refresh_hint}")
    return path


def wheel_name(spec: str) -> str:
    """`cryptography==46.0.3` -> `cryptography` (the lock's key)."""
    return spec.partition("==")[0].lower()


def flow_debs(ff: FlowFile) -> dict[str, str | None]:
    """Debian packages the flow names, with the version it asks for (None = candidate)."""
    out: dict[str, str | None] = {}
    kernel = ff.data["image"]["kernel"]
    if "package" in kernel:
        out[kernel["package"]] = kernel.get("version")
    for name in ((ff.data["image"].get("python") or {}).get("runtime") or {}).get("packages", []):
        out.setdefault(name, None)
    return out


def make_lock(ff: FlowFile, progress: Any = None) -> Lock:
    """Resolve every pin of a flow now (downloads each artifact once to record its hash)."""
    hint = f"run `imagebuilder lock {ff.path}` again"
    debs: dict[str, DebPin] = {}
    for name, version in sorted(flow_debs(ff).items()):
        pin = resolve_deb(name, version)
        fetch_deb(pin, hint)
        debs[name] = pin
        if progress:
            progress(f"{name} {pin.version}")
    wheels: dict[str, WheelPin] = {}
    for spec in sorted((ff.data["image"].get("python") or {}).get("wheels", [])):
        name, _, version = spec.partition("==")
        wpin, _ = resolve_wheel(name, version or None)
        wheels[wpin.name] = wpin
        if progress:
            progress(f"{wpin.name} {wpin.version}")
    return Lock(debs, wheels)
