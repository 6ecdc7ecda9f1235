"""The boot files a client needs, made or found for one trust anchor, cached by content.

Why here: `bootstrap serve --manifest CID` must work without a hand-assembled TFTP root, and the
QEMU harness needs the very same bootstrap; both call `build_bootstrap` (the harness does not
import the server, the server does not import the harness).

- The bootstrap (kernel, initrd, and the UKI) is built per architecture by the real
  `imagebuilder build --uki` CLI from bootstrap/image (flow.yaml for x86_64, flow-arm64.yaml for
  arm64, whose UKI is on Debian's linuxaa64.efi.stub pinned in flow-arm64.lock) with `anchor` as
  its built-in trust anchor and a signing key generated for the cache entry. The entry is keyed
  by the CID of (arch, anchor, flow file, lock, the guest code the image carries): another
  anchor, arch or pin is another entry, and an entry is written to a temporary directory and
  renamed into place, so a crash or a concurrent server never leaves half an entry that a later
  start would serve.
- `undionly.kpxe` (BIOS clients chain-load iPXE) comes from Debian's `ipxe` package.
- BIOS (kernel + initrd through iPXE) is x86_64 only; arm64 boots UEFI only (its UKI).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cidboot.errors import CidbootError
from cidboot.ipld import dagcbor
from cidboot.ipld.cid import CID, DAG_CBOR
from cidboot.trust import keys
from cidboot.trust.manifest import RootOfTrust

REPO = Path(__file__).resolve().parents[1]
BOOTSTRAP_IMAGE = REPO / "bootstrap" / "image"
# the guest code the bootstrap image carries (imagebuilder packs the imported modules): part of the key;
# with the builder itself and the other stages' code, whose imports decide the shared runtime layer
# (imagebuilder.build.PLATFORM_ENTRIES): a stale cached bootstrap would carry another runtime
GUEST_SOURCES = (REPO / "cidboot", REPO / "bootstrap" / "stage", BOOTSTRAP_IMAGE, REPO / "firmware", REPO / "agent",
                 REPO / "imagebuilder")

# served name -> where Debian puts it and the package that provides it
SYSTEM_FILES: dict[str, tuple[tuple[Path, ...], str]] = {
    "undionly.kpxe": ((Path("/usr/lib/ipxe/undionly.kpxe"),), "ipxe"),
}
UKI_NAMES = {"x86_64": "bootstrap-x86_64.efi", "arm64": "bootstrap-arm64.efi"}
# UEFI arch name -> the bootstrap flow file for it (its lock beside it: flow.lock, flow-arm64.lock)
FLOWS = {"x86_64": "flow.yaml", "arm64": "flow-arm64.yaml"}
ARCH_ALIASES = {"amd64": "x86_64", "aarch64": "arm64"}
KERNEL_NAME, INITRD_NAME = "bootstrap/vmlinuz", "bootstrap/initrd.img"
# the boot files `bootstrap serve` offers for each device architecture it serves (the RFC 4578 arch
# map's targets: x86_64 BIOS chain-loads iPXE, which loads kernel and initrd; UEFI loads the UKI):
# what it makes or finds at start, and what a --tftp-root must hold for the server to build nothing
ARCH_FILES = {"x86_64": ("undionly.kpxe", KERNEL_NAME, INITRD_NAME, UKI_NAMES["x86_64"]),
              "arm64": (UKI_NAMES["arm64"],)}
SERVED_NAMES = tuple(name for names in ARCH_FILES.values() for name in names)


def served_names(arches: Iterable[str]) -> list[str]:
    """The boot files a server offering `arches` (UEFI names, as `serve --arch`) resolves at start."""
    return [name for arch, names in ARCH_FILES.items() if arch in set(arches) for name in names]

BUILT_JSON = "built.json"


class BootFileError(CidbootError):
    """A boot file cannot be made or found (the message names the file and what provides it)."""


@dataclass
class BuiltBootstrap:
    """One cache entry: the bootstrap built for one anchor."""

    dir: Path
    manifest: CID
    kernel: Path
    initrd: Path
    uki: dict[str, Path]  # UEFI arch name ("x86_64") -> the UKI
    measurements: dict[str, str]
    result: dict[str, Any] = field(default_factory=dict)

    @property
    def cmdline(self) -> str:
        """The bootstrap manifest's kernel parameters (the build result's `cmdline`): what boot.ipxe
        passes its kernel, so the bootstrap runs with every parameter its next stage may ask for."""
        return str(self.result.get("cmdline") or "")

    def files(self) -> dict[str, Path]:
        """Served name -> file."""
        out = {KERNEL_NAME: self.kernel, INITRD_NAME: self.initrd}
        out.update({UKI_NAMES[a]: p for a, p in self.uki.items()})
        return out


def _anchor_bytes(anchor: RootOfTrust) -> bytes:
    return json.dumps({"version": anchor.version, "threshold": anchor.threshold,
                       "keys": [k.hex() for k in anchor.keys]}, sort_keys=True).encode()


def _sources_digest() -> bytes:
    h = hashlib.sha256()
    for top in GUEST_SOURCES:
        for p in sorted(top.rglob("*")):
            if p.is_file() and "__pycache__" not in p.parts and p.suffix in (".py", ".yaml", ".lock", ".json") \
                    and p.name not in ("trust-anchor.json",):
                h.update(str(p.relative_to(REPO)).encode() + b"\0" + p.read_bytes() + b"\0")
    return h.digest()


def uefi_arch(arch: str) -> str:
    """`x86_64` / `arm64` (UEFI's names, the harness's --arch) from either those or Debian's."""
    a = ARCH_ALIASES.get(arch, arch)
    if a not in FLOWS:
        raise BootFileError(f"no bootstrap for architecture {arch!r} (one of {', '.join(FLOWS)})")
    return a


def flow_file(arch: str = "x86_64") -> Path:
    return BOOTSTRAP_IMAGE / FLOWS[uefi_arch(arch)]


def cache_key(anchor: RootOfTrust, arch: str = "x86_64") -> CID:
    """The CID naming the cache entry: anchor, the arch's flow file and lock, and the guest code."""
    flow = flow_file(arch)
    lock = flow.with_name("flow.lock") if flow.name == "flow.yaml" else flow.with_suffix(".lock")
    doc: dict[str, bytes | str] = {"anchor": _anchor_bytes(anchor), "flow": flow.read_bytes(),
                                   "lock": lock.read_bytes(), "sources": _sources_digest()}
    if uefi_arch(arch) != "x86_64":
        doc["arch"] = uefi_arch(arch)
    return CID.of(dagcbor.encode(doc), DAG_CBOR)


def load_entry(d: Path) -> BuiltBootstrap | None:
    """A complete cache entry, or None (absent, or a file it names is gone)."""
    try:
        doc = json.loads((d / BUILT_JSON).read_text())
        built = BuiltBootstrap(d, CID.parse(doc["manifest"]), d / doc["kernel"], d / doc["initrd"],
                               {a: d / p for a, p in doc["uki"].items()}, dict(doc["measurements"]), doc["result"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return built if all(p.is_file() for p in built.files().values()) else None


def build_bootstrap(anchor: RootOfTrust, cache: Path, *, env: dict[str, str] | None = None,
                    say: Callable[[str], None] = lambda _m: None, arch: str = "x86_64") -> BuiltBootstrap:
    """The bootstrap for `arch` trusting `anchor`, from `cache` or built into it (`imagebuilder build --uki`)."""
    arch = uefi_arch(arch)
    flow_name = FLOWS[arch]
    key = cache_key(anchor, arch)
    entry = cache / str(key)
    found = load_entry(entry)
    if found is not None:
        say(f"bootstrap for this anchor found in {entry}")
        return found
    cache.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=cache, prefix=".build-"))
    try:
        flow = tmp / "flow"
        shutil.copytree(BOOTSTRAP_IMAGE, flow,
                        ignore=shutil.ignore_patterns("__pycache__", "keys", "built", "trust-anchor.json"))
        keys.write_keypair(keys.generate(), flow / "keys" / "signer-1")
        keys.write_root(anchor, flow / "trust-anchor.json")
        say(f"building the {arch} bootstrap for this anchor into {entry} (imagebuilder build --uki)")
        proc = subprocess.run([sys.executable, "-m", "imagebuilder", "build", str(flow / flow_name),
                               "--store", str(tmp / "store"), "--json", "--uki", f"{tmp / 'uki'}/"],
                              capture_output=True, text=True, cwd=REPO, env=env)
        if proc.returncode != 0:
            raise BootFileError(f"imagebuilder build {BOOTSTRAP_IMAGE / flow_name} --uki failed:\n"
                                f"{proc.stderr.strip()[-3000:]}")
        result = json.loads(proc.stdout)
        kernel, initrd, measurements = _export(tmp / "store", CID.parse(result["manifest"]), tmp)
        uki = tmp / "uki" / UKI_NAMES[arch]
        if not uki.is_file():
            raise BootFileError(f"imagebuilder wrote no {uki.name}")
        doc = {"manifest": result["manifest"], "kernel": kernel.name, "initrd": initrd.name,
               "uki": {arch: f"uki/{uki.name}"}, "measurements": measurements, "result": result, "arch": arch}
        (tmp / BUILT_JSON).write_text(json.dumps(doc, indent=1) + "\n")
        try:
            os.rename(tmp, entry)
        except OSError:  # another builder won the race: use its entry
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    built = load_entry(entry)
    if built is None:
        raise BootFileError(f"cache entry {entry} is incomplete after the build")
    return built


def _export(store: Path, mcid: CID, out: Path) -> tuple[Path, Path, dict[str, str]]:
    """The manifest's kernel layer and its other layers concatenated (the initrd), as files."""
    from cidboot.ipld.unixfs.exporter import export_file
    from cidboot.store.blockstore import Blockstore
    from cidboot.trust.manifest import SignedManifest

    bs = Blockstore(store)
    m = SignedManifest.decode(bs.get(mcid)).manifest
    parts = {lyr.role: b"".join(export_file(lyr.cid, bs.get)) for lyr in m.layers}
    kernel, initrd = out / "vmlinuz", out / "initrd.img"
    kernel.write_bytes(parts["kernel"])
    initrd.write_bytes(b"".join(parts[lyr.role] for lyr in m.layers if lyr.role != "kernel"))
    return kernel, initrd, {k: v.hex() for k, v in m.measurements.items()}


def flow_cmdline(arch: str = "x86_64") -> str:
    """The bootstrap flow's `image.cmdline` (what `imagebuilder build` writes into its manifest)."""
    import yaml

    doc = yaml.safe_load(flow_file(arch).read_text())
    return str((doc.get("image") or {}).get("cmdline") or "")


def bootstrap_cmdline(kernel: Path) -> str:
    """The kernel parameters for the bootstrap whose kernel is `kernel` (boot.ipxe passes them):
    its cache entry's build result when it was built here, else the bootstrap flow's (a
    --tftp-root kernel, as the harness's, is built from that flow)."""
    entry = load_entry(kernel.parent)
    if entry is not None and entry.kernel == kernel:
        return entry.cmdline
    return flow_cmdline()


def system_file(name: str) -> Path:
    """A boot file a Debian package installs; BootFileError names the package when it is missing."""
    paths, package = SYSTEM_FILES[name]
    for p in paths:
        if p.is_file():
            return p
    raise BootFileError(f"boot file {name} not found ({', '.join(map(str, paths))}): "
                        f"install Debian's {package} package (apt-get install {package})")


def resolve(names: list[str], *, overrides: Path | None, anchor: Callable[[], RootOfTrust] | None, cache: Path,
            say: Callable[[str], None] = lambda _m: None) -> dict[str, Path]:
    """Served name -> file for every name: from `overrides` (a --tftp-root) first, then Debian's
    packages, then the bootstrap built for `anchor()` (only called when a bootstrap file is missing
    from the overrides). BootFileError names the first file that cannot be had and its source."""
    out: dict[str, Path] = {}
    missing: list[str] = []
    for name in names:
        p = overrides / name if overrides is not None else None
        if p is not None and p.is_file():
            out[name] = p
        elif name in SYSTEM_FILES:
            out[name] = system_file(name)
        else:
            missing.append(name)
    if missing:
        if anchor is None:
            raise BootFileError(f"boot file {missing[0]} not found in {overrides} and no manifest to build it for")
        root = anchor()
        arm64 = [n for n in missing if n == UKI_NAMES["arm64"]]
        built = build_bootstrap(root, cache, say=say).files() if len(arm64) < len(missing) else {}
        if arm64:
            built[UKI_NAMES["arm64"]] = build_bootstrap(root, cache, say=say, arch="arm64").uki["arm64"]
        for name in missing:
            if name not in built:
                raise BootFileError(f"boot file {name} is not built by imagebuilder")
            out[name] = built[name]
    return out
