"""flow.lock: exact Debian package and wheel pins, and fetching pinned artifacts into a cache.

Images must come from pinned sources, never from whatever the build host has installed, so
`imagebuilder lock` records name, version and SHA-256 of every .deb (via `apt-cache show` and
`apt-get download`) and wheel (via `pip download --only-binary :all: --no-deps`), and `build`
uses only these pins: an artifact is taken from the cache when its hash matches, else fetched
again by exact version and checked; one that is no longer served is an error that says how to
refresh the lock (as LinuxKit pins image digests).

A flow names its kernel by Debian's metapackage (`linux-image-cloud-amd64`), not by the ABI
package it depends on (`linux-image-6.1.0-56-cloud-amd64`): Debian's security archive serves
one ABI at a time, so a flow that named the ABI package would stop locking the day the next one
lands. `lock` follows the metapackage's Depends to the concrete package and pins both (`meta`
maps the metapackage's own pin to the concrete package's name, `debs` holds the concrete pin),
so a build from the lock is exactly as reproducible as one that named the ABI package.

`lock` keeps every existing pin the mirror still serves (same version, same SHA-256 in the apt
index) and re-resolves only the others; `lock --update` re-resolves every pin to what the mirror
serves now.

A flow's `arch` (amd64, the default, or arm64) is the Debian architecture of every .deb and the
manylinux platform of every wheel. Packages of the build host's own architecture come from the
host's apt; another architecture's come from a private apt state under
~/.cache/cidboot/apt/<arch>/ (the host's sources.list, its own package lists, an empty dpkg
status), so locking an arm64 flow on an amd64 host needs no `dpkg --add-architecture` and
changes nothing on the host: only the mirror must be reachable.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from cidboot.errors import CidbootError, FormatError, VerificationError
from imagebuilder import flowfile
from imagebuilder.debpkg import parse_stanza
from imagebuilder.flowfile import FlowFile

LOCK_VERSION = 1
ARCHES = ("amd64", "arm64")  # flow.yaml `arch` (Debian names)
WHEEL_MACHINE = {"amd64": "x86_64", "arm64": "aarch64"}  # manylinux platform tags name the machine


def py_target(arch: str = "amd64") -> list[str]:
    """`pip download` options selecting CPython 3.11 manylinux wheels for a flow architecture."""
    m = WHEEL_MACHINE[arch]
    return ["--python-version", "3.11", "--implementation", "cp", "--abi", "cp311",
            "--platform", f"manylinux2014_{m}", "--platform", f"manylinux_2_28_{m}", "--platform", f"manylinux_2_17_{m}"]


PY_TARGET = py_target("amd64")


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


@dataclass(frozen=True)
class MetaPin(DebPin):
    """A metapackage's own pin (its tiny .deb, for the record) and the concrete package its
    Depends named when the lock was made: `resolves_to` is a key of Lock.debs. Builds use the
    concrete pin only, so a metapackage never makes a build depend on what the mirror serves now."""

    resolves_to: str


@dataclass
class Lock:
    debs: dict[str, DebPin]
    wheels: dict[str, WheelPin]
    meta: dict[str, MetaPin] = field(default_factory=dict)

    def pin(self, name: str) -> DebPin:
        """The concrete pin for a package a flow names: a metapackage resolves to the package
        it was locked to (so `lib/modules/<abi>/` and `boot/vmlinuz-<abi>` follow that package)."""
        if name in self.meta:
            return self.debs[self.meta[name].resolves_to]
        return self.debs[name]

    def named(self) -> dict[str, dict[str, Any]]:
        """Every name a flow may use (concrete packages and metapackages), as plain dicts, for
        flowfile.check_lock: a metapackage is checked against its own version."""
        return {**{k: asdict(v) for k, v in self.debs.items()}, **{k: asdict(v) for k, v in self.meta.items()}}

    def to_json(self) -> str:
        doc: dict[str, Any] = {"lock_version": LOCK_VERSION,
                               "debs": {k: asdict(v) for k, v in sorted(self.debs.items())},
                               "wheels": {k: asdict(v) for k, v in sorted(self.wheels.items())}}
        if self.meta:  # absent when the flow names no metapackage (older locks stay byte-identical)
            doc["meta"] = {k: asdict(v) for k, v in sorted(self.meta.items())}
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
            meta = {k: MetaPin(**v) for k, v in doc.get("meta", {}).items()}
        except (KeyError, TypeError, AttributeError) as e:
            raise LockFormatError(f"{path}: malformed lock entry: {e}") from None
        for k, m in meta.items():
            if m.resolves_to not in debs:
                raise LockFormatError(f"{path}: metapackage {k} resolves to {m.resolves_to}, which the lock does not pin")
        return cls(debs, wheels, meta)


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


@functools.cache
def host_arch() -> str:
    """The build host's Debian architecture (`dpkg --print-architecture`)."""
    proc = subprocess.run(["dpkg", "--print-architecture"], capture_output=True, text=True, check=False)
    return proc.stdout.strip() or "amd64"


def apt_state(arch: str) -> Path:
    return cache_dir() / "apt" / arch


def apt_options(arch: str) -> list[str]:
    """apt-get/apt-cache options for `arch`: none for the host's own architecture, else a private
    state (lists, cache, an empty dpkg status) whose native and only architecture is `arch`, so
    plain package names resolve to `arch`'s packages (see the module docstring)."""
    if arch not in ARCHES:
        raise LockError(f"unknown architecture {arch!r} (one of {', '.join(ARCHES)})")
    if arch == host_arch():
        return []
    d = apt_state(arch)
    return ["-o", f"APT::Architecture={arch}", "-o", f"APT::Architectures::={arch}",
            "-o", f"Dir::State::Lists={d / 'lists'}", "-o", f"Dir::State::status={d / 'status'}",
            "-o", f"Dir::Cache={d / 'cache'}"]


APT_LISTS_MAX_AGE = 24 * 3600  # seconds


def apt_update(arch: str, *, force: bool = False) -> None:
    """Fetch `arch`'s package lists into its private state (when missing or a day old, or with
    `force`); a no-op for the host's architecture, whose lists are the host's (`apt-get update`)."""
    opts = apt_options(arch)
    if not opts:
        return
    d = apt_state(arch)
    lists = sorted((d / "lists").glob("*_Packages*"))
    # the host's lists are refreshed by its `apt-get update`; these by age: Debian's security
    # archive drops superseded versions, and stale lists would point `apt-get download` at them
    if not force and lists and time.time() - min(p.stat().st_mtime for p in lists) < APT_LISTS_MAX_AGE:
        return
    for sub in ("lists/partial", "cache/archives/partial"):
        (d / sub).mkdir(parents=True, exist_ok=True)
    (d / "status").touch()
    proc = _run(["apt-get", *opts, "update"])
    if proc.returncode != 0 or not any((d / "lists").glob("*_Packages*")):
        raise LockError(f"apt-get update for {arch} failed ({(proc.stderr.strip().splitlines() or ['no lists'])[-1]}); "
                        "the Debian mirror in /etc/apt/sources.list* must be reachable")


def _stanzas(text: str) -> list[dict[str, str]]:
    """Every stanza of `apt-cache show` output (blank-line separated)."""
    return [f for f in (parse_stanza(chunk) for chunk in re.split(r"\n\s*\n", text)) if f]


def _show(name: str, version: str | None = None, arch: str = "amd64") -> dict[str, str]:
    spec = f"{name}={version}" if version else name
    apt_update(arch)
    proc = _run(["apt-cache", *apt_options(arch), "show", "--no-all-versions", spec])
    found = _stanzas(proc.stdout) if proc.returncode == 0 else []
    if not found:
        raise LockError(f"Debian package {spec} is not known to apt ({proc.stderr.strip() or 'no such package'}); "
                        "check the name or run `apt-get update`")
    return found[0]


def _pin_of(f: dict[str, str], spec: str) -> DebPin:
    try:
        # the name `apt-get download` saves it under (epoch colon escaped), not the pool's
        local = f"{f['Package']}_{f['Version'].replace(':', '%3a')}_{f['Architecture']}.deb"
        return DebPin(f["Package"], f["Version"], f["Architecture"], f["SHA256"], int(f["Size"]), local)
    except (KeyError, ValueError) as e:
        raise LockError(f"apt-cache show {spec}: no valid {e} field") from None


def resolve_deb(name: str, version: str | None = None, arch: str = "amd64") -> DebPin:
    """The candidate (or the given version) of a package for `arch`, from the apt index."""
    return _pin_of(_show(name, version, arch), f"{name}={version}" if version else name)


_DEP = re.compile(r"^\s*([a-z0-9][a-z0-9+.-]*)(?::[a-z0-9-]+)?\s*(?:\(\s*([<>=]+)\s*([^)\s]+)\s*\))?")


def kernel_depends(depends: str) -> list[tuple[str, str | None]]:
    """The `linux-image-*` packages a Depends field names (first alternative of each clause),
    with the exact version when the relation is `=`: what a kernel metapackage points at."""
    out: list[tuple[str, str | None]] = []
    for clause in depends.split(","):
        m = _DEP.match(clause.split("|")[0])
        if m and m.group(1).startswith("linux-image-"):
            out.append((m.group(1), m.group(3) if m.group(2) == "=" else None))
    return out


MAX_META_DEPTH = 3  # linux-image-cloud-amd64 -> linux-image-6.1.0-56-cloud-amd64 is one step


def resolve_kernel(name: str, version: str | None = None, arch: str = "amd64") -> tuple[list[MetaPin], DebPin]:
    """A kernel package a flow names, followed through metapackages to the concrete package.

    A package whose Depends names exactly one `linux-image-*` package is a metapackage: the
    dependency (at the `=` version it names, else the candidate) is resolved in its place. The
    concrete package is the first with no such dependency; the build checks it carries a
    `boot/vmlinuz-*`. Two candidates in one Depends are ambiguous and refused, not guessed."""
    metas: list[MetaPin] = []
    spec_name, spec_version = name, version
    for _ in range(MAX_META_DEPTH + 1):
        f = _show(spec_name, spec_version, arch)
        spec = f"{spec_name}={spec_version}" if spec_version else spec_name
        pin = _pin_of(f, spec)
        deps = kernel_depends(f.get("Depends", ""))
        if not deps:
            return metas, pin
        if len(deps) > 1:
            raise LockError(f"kernel metapackage {spec} depends on {len(deps)} kernel packages "
                            f"({', '.join(d for d, _ in deps)}); name one of them in image.kernel.package")
        metas.append(MetaPin(**asdict(pin), resolves_to=deps[0][0]))
        spec_name, spec_version = deps[0]
    raise LockError(f"kernel package {name}: more than {MAX_META_DEPTH} metapackages deep "
                    f"({' -> '.join(m.name for m in metas)}); name the concrete package")


SERVED, MISMATCH, GONE = "served", "mismatch", "gone"


def index_status(pins: Iterable[DebPin]) -> dict[DebPin, str]:
    """Each pin's standing in the apt index, in one `apt-cache show` call: SERVED (its name and
    version listed with its SHA-256), MISMATCH (listed with another hash: Debian rebuilt it or
    something is wrong; never silently re-pinned) or GONE (the version is not listed any more)."""
    want = set(pins)
    if not want:
        return {}
    listed: dict[tuple[str, str], set[str]] = {}
    for arch in sorted({p.arch for p in want}):
        apt_update(arch)
        specs = sorted({f"{p.name}={p.version}" for p in want if p.arch == arch})
        proc = _run(["apt-cache", *apt_options(arch), "show", "--no-all-versions", *specs])
        for f in _stanzas(proc.stdout):
            listed.setdefault((f.get("Package", ""), f.get("Version", "")), set()).add(f.get("SHA256", ""))
    out = {}
    for p in want:
        hashes = listed.get((p.name, p.version))
        out[p] = GONE if hashes is None else SERVED if p.sha256 in hashes else MISMATCH
    return out


def cached(pin: DebPin) -> bool:
    """The pinned .deb is in the cache with its pinned hash (a build needs no mirror for it)."""
    path = cache_dir() / "debs" / pin.filename
    return path.is_file() and sha256_file(path) == pin.sha256


def fetch_deb(pin: DebPin, refresh_hint: str) -> Path:
    """The pinned .deb in the cache, downloaded by exact version if needed, hash checked."""
    d = cache_dir() / "debs"
    d.mkdir(parents=True, exist_ok=True)
    path = d / pin.filename
    if path.is_file() and sha256_file(path) == pin.sha256:
        return path
    apt_update(pin.arch)
    proc = _run(["apt-get", *apt_options(pin.arch), "download", f"{pin.name}={pin.version}"], cwd=d)
    if proc.returncode != 0:
        raise LockError(f"pinned {pin.name} {pin.version} is not served by the configured apt mirrors "
                        f"({proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else 'download failed'}); "
                        f"{refresh_hint}")
    got = sha256_file(path) if path.is_file() else "missing"
    if got != pin.sha256:
        raise PinMismatchError(f"{pin.filename}: SHA-256 {got} does not match the pin {pin.sha256}; {refresh_hint}")
    return path


def resolve_wheel(name: str, version: str | None = None, arch: str = "amd64") -> tuple[WheelPin, Path]:
    d = cache_dir() / "wheels"
    d.mkdir(parents=True, exist_ok=True)
    spec = f"{name}=={version}" if version else name
    before = set(d.iterdir())
    proc = _run([sys.executable, "-m", "pip", "download", "-q", "--disable-pip-version-check", "--only-binary", ":all:",
                 "--no-deps", *py_target(arch), "-d", str(d), spec])
    if proc.returncode != 0:
        raise LockError(f"wheel {spec} cannot be downloaded: {proc.stderr.strip().splitlines()[-1:] or ['pip failed']}")
    norm = name.lower().replace("-", "_")
    cands = sorted(p for p in d.glob("*.whl") if p.name.lower().startswith(norm + "-") and wheel_fits(p.name, arch))
    new = [p for p in cands if p not in before] or cands
    if version:
        new = [p for p in new if p.name.split("-")[1] == version] or new
    path = max(new, key=lambda p: p.stat().st_mtime)
    return WheelPin(name.lower(), path.name.split("-")[1], path.name, sha256_file(path)), path


def wheel_fits(filename: str, arch: str) -> bool:
    """A wheel file name whose platform tag runs on `arch`: pure Python (`any`) or manylinux for its machine."""
    plat = filename[:-len(".whl")].split("-")[-1] if filename.endswith(".whl") else ""
    return plat == "any" or all(t.endswith("_" + WHEEL_MACHINE[arch]) for t in plat.split("."))


def fetch_wheel(pin: WheelPin, refresh_hint: str, arch: str = "amd64") -> Path:
    path = cache_dir() / "wheels" / pin.filename
    if not wheel_fits(pin.filename, arch):
        raise LockError(f"pinned wheel {pin.filename} is not built for {arch}; {refresh_hint}")
    if not (path.is_file() and sha256_file(path) == pin.sha256):
        try:
            _, path = resolve_wheel(pin.name, pin.version, arch)
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
    stub = (ff.data["image"].get("uki") or {}).get("stub")
    if stub:
        out.setdefault(stub, None)
    return out


def flow_arch(ff: FlowFile) -> str:
    """The flow's Debian architecture (`arch:`, default amd64)."""
    return str(ff.data.get("arch", "amd64"))


def flow_kernel(ff: FlowFile) -> str | None:
    """The kernel package the flow names (a metapackage or a concrete package), if any."""
    return ff.data["image"]["kernel"].get("package")


def update_hint(ff: FlowFile) -> str:
    return f"run `imagebuilder lock --update {ff.path}` to re-resolve its pins to what the mirror serves now"


def _previous_chain(prev: Lock, name: str, version: str | None) -> list[DebPin] | None:
    """The pins the previous lock holds for a name (metapackage chain + concrete), if they
    still answer what the flow asks (same version when it asks one)."""
    chain: list[DebPin] = []
    cur = name
    while cur in prev.meta and len(chain) <= MAX_META_DEPTH:
        chain.append(prev.meta[cur])
        cur = prev.meta[cur].resolves_to
    if cur not in prev.debs:
        return None
    chain.append(prev.debs[cur])
    if version is not None and chain[0].version != version:
        return None
    return chain


def make_lock(ff: FlowFile, progress: Callable[[str], None] | None = None, *, previous: Lock | None = None,
              update: bool = False) -> Lock:
    """Resolve the pins of a flow (downloads each newly resolved artifact once to record its hash).

    With `previous` (the lock beside the flow) and not `update`, a pin the mirror still serves
    (same version and SHA-256 in the apt index; a cached wheel with its hash) is kept, so
    re-locking moves only what must move; with `update` every pin is resolved anew."""
    hint = f"run `imagebuilder lock {ff.path}` again"
    say = progress or (lambda _m: None)
    arch = flow_arch(ff)
    apt_update(arch, force=update)  # a private foreign-arch index is refreshed by `lock --update`
    kernel = flow_kernel(ff)
    wanted = flow_debs(ff)
    keep: dict[str, list[DebPin]] = {}
    if previous is not None and not update:
        for name, version in wanted.items():
            chain = _previous_chain(previous, name, version)
            if chain is not None and (name == kernel or len(chain) == 1):
                keep[name] = chain
        status = index_status(p for chain in keep.values() for p in chain)
        for p, st in sorted(status.items(), key=lambda kv: kv[0].name):
            if st == MISMATCH:
                raise PinMismatchError(f"the apt index lists {p.name} {p.version} with another SHA-256 than the lock's "
                                       f"{p.sha256}: if Debian rebuilt it, `imagebuilder lock --update {ff.path}` "
                                       "re-pins it")
        keep = {n: c for n, c in keep.items() if all(status[p] == SERVED for p in c)}
    debs: dict[str, DebPin] = {}
    meta: dict[str, MetaPin] = {}
    for name, version in sorted(wanted.items()):
        if name in keep:
            metas = [p for p in keep[name][:-1] if isinstance(p, MetaPin)]
            pin = keep[name][-1]
            verb = "kept"
        else:
            metas, pin = (resolve_kernel(name, version, arch) if name == kernel
                          else ([], resolve_deb(name, version, arch)))
            fetch_deb(pin, hint)
            verb = "pinned"
        chain_names = [m.name for m in metas]
        for m in metas:
            meta[m.name] = m
        debs[pin.name] = pin
        say(f"{verb} {' -> '.join([*chain_names, pin.name])} {pin.version}")
    wheels: dict[str, WheelPin] = {}
    for spec in sorted((ff.data["image"].get("python") or {}).get("wheels", [])):
        name, _, version = spec.partition("==")
        old = previous.wheels.get(wheel_name(spec)) if previous is not None and not update else None
        if old is not None and (not version or old.version == version) and wheel_fits(old.filename, arch):
            try:
                fetch_wheel(old, hint, arch)  # the cache when its hash matches, else the index by exact version
                wheels[old.name] = old
                say(f"kept {old.name} {old.version}")
                continue
            except (LockError, PinMismatchError):
                pass
        wpin, _ = resolve_wheel(name, version or None, arch)
        wheels[wpin.name] = wpin
        say(f"pinned {wpin.name} {wpin.version}")
    return Lock(debs, wheels, meta)


def changes(old: Lock | None, new: Lock) -> list[str]:
    """What moved between two locks, one short entry per name a flow uses, e.g.
    `linux-image-cloud-amd64 6.1.192-2 (linux-image-6.1.0-56-cloud-amd64 6.1.192-2) -> 6.1.200-1
    (linux-image-6.1.0-57-cloud-amd64 6.1.200-1)`; a metapackage's line carries its concrete pin."""
    def view(lock: Lock | None) -> dict[str, tuple[str, str]]:
        """name -> (what to print, identity): the identity includes every hash behind the name."""
        if lock is None:
            return {}
        targets = {m.resolves_to for m in lock.meta.values()}
        out = {k: (p.version, f"{p.version} {p.sha256}") for k, p in lock.debs.items() if k not in targets}
        for k, m in lock.meta.items():
            c = lock.pin(k)
            shown = f"{m.version} ({c.name} {c.version})"
            out[k] = (shown, f"{shown} {m.sha256} {c.sha256}")
        out |= {f"wheel {k}": (w.version, f"{w.version} {w.sha256}") for k, w in lock.wheels.items()}
        return out

    a, b = view(old), view(new)
    old_debs = old.debs if old is not None else {}
    moved = []
    for k in sorted(a.keys() | b.keys()):
        if k not in b:
            if k in new.debs and new.debs[k] == old_debs.get(k):
                continue  # still pinned, now reached through a metapackage (reported with it)
            moved.append(f"{k} {a[k][0]} removed")
        elif k not in a:
            c = new.pin(k)
            moved.append(f"{k} {b[k][0]} added" + (", unchanged" if k in new.meta and old_debs.get(c.name) == c else ""))
        elif a[k][1] != b[k][1]:
            moved.append(f"{k} {a[k][0]} -> {b[k][0]}" + (" (SHA-256 changed)" if a[k][0] == b[k][0] else ""))
    return moved


def unavailable(lock: Lock, names: Iterable[str]) -> list[DebPin]:
    """The concrete pins a build of these names needs that are neither in the cache (with their
    hash) nor listed by the apt index any more: a build from this lock would fail on them."""
    need = sorted({lock.pin(n) for n in names if n in lock.debs or n in lock.meta}, key=lambda p: p.name)
    uncached = [p for p in need if not cached(p)]
    status = index_status(uncached)
    return [p for p in uncached if status[p] == GONE]  # a MISMATCH is the build's to refuse, never re-pinned


def relock_if_unavailable(flow_path: Path, progress: Callable[[str], None] | None = None) -> list[str]:
    """Re-lock `flow_path`'s lock in place when a pin it needs is neither cached nor served
    (pins still served are kept); return what moved, [] when nothing had to. For copies of a
    flow (the QEMU harness's work dir), never the committed lock: the caller says it did."""
    ff = flowfile.load(flow_path, require_keys=False)
    lpath = lock_path(ff.path)
    lock = Lock.load(lpath)
    if not unavailable(lock, flow_debs(ff)):
        return []
    new = make_lock(ff, progress, previous=lock)
    lpath.write_text(new.to_json())
    return changes(lock, new)
