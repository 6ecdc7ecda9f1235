"""`imagebuilder build`: flow.yaml + flow.lock -> layers -> signed manifest, by CID.

Everything is produced in memory and checked first; only a complete, signed result is
written to the chosen destination (block store, Kubo or CAR), so a bad flow or a missing pin
writes nothing. Layers are cached by input hash (see cache.py), so an unchanged rebuild only
re-hashes its inputs.
"""

from __future__ import annotations

import calendar
import functools
import hashlib
import json
import os
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from cidboot.cli import UsageError
from cidboot.errors import CidbootError
from cidboot.ipld import dagcbor
from cidboot.ipld.cid import CID, DAG_CBOR, RAW
from cidboot.ipld.unixfs import import_bytes
from cidboot.trust import keys
from cidboot.trust.manifest import Layer, Manifest, RootOfTrust, sign_manifest
from cidboot.trust.measure import boot_code_hash, image_code_hash, served_initrds
from cidboot.trust.private import carried
from cidboot.trust.private import keys as layer_keys
from imagebuilder import dccache, flowfile, initramfs, pyimports, uki
from imagebuilder.cache import BuildCache, key
from imagebuilder.cpio import (
    archive_bytes,
    compress,
    compression_id,
    decompress,
    flash_initrd,
    normalize_path,
    read_newc,
    source_date_epoch,
)
from imagebuilder.debpkg import read_deb
from imagebuilder.flowfile import FlowFile
from imagebuilder.layers import ROLES, UNIXFS, BuiltLayer, layer_cid
from imagebuilder.layers import encrypt as encrypt_layer
from imagebuilder.lock import (
    Lock,
    cache_dir,
    fetch_deb,
    fetch_wheel,
    flow_arch,
    flow_debs,
    host_arch,
    lock_path,
    update_hint,
    wheel_name,
)
from imagebuilder.uki import BuiltUki

REPO = Path(__file__).resolve().parent.parent
COMPONENT = {"image": "agent", "bootstrap": "bootstrap", "firmware": "firmware"}
KERNEL_SHA512_PATH = "etc/cidboot/kernel.sha512"  # read by cidboot.stage.switch_root.RUNNING_KERNEL
KERNEL_CID_PATH = "etc/cidboot/kernel.cid"  # read by bootstrap.stage.verify.RUNNING_KERNEL_CID
KERNEL_SHA256_PATH = "etc/cidboot/kernel.sha256"  # read by bootstrap.stage.verify.RUNNING_KERNEL_SHA256
# each target's stage entry: /init calls its main() (cidboot.stage.pid1.run_stage), and the image
# ships the import closure of this module (plus pid1 and the flow's operations), nothing else of the
# component: no CLI, no boot server, no host tool (tests/unit/test_image_closure.py)
ENTRY = {"image": "agent.device", "bootstrap": "bootstrap.stage.main", "firmware": "firmware.stage"}
# host-only project code that stage modules import lazily on paths a device never takes
# (agent.publish -> Kubo: the device agent never publishes); never shipped, never followed
HOST_ONLY = ("cidboot.store.kubo",)
# the platform: PID 1 and every stage entry. The runtime layer carries the stdlib and wheel modules of
# the union of their import closures (plus the interpreter and the libraries reached), and nothing a
# single stage or flow adds, so every stage flow of an arch with the same pins has a byte-identical
# runtime layer: a same-kernel hand-over can keep the running one (docs/images.md, BOOT-PLAN contract)
PLATFORM_ENTRIES = ("cidboot.stage.pid1", *sorted(ENTRY.values()))
# modules the platform loads by name at run time, invisible to import analysis: _cffi_backend (loaded
# by cryptography's extension: the wheel's Rust one, or Debian's cffi bindings) and encodings.idna (socket's codec for str host names)
PLATFORM_MODULES = ("_cffi_backend", "encodings.idna")
PLATFORM_COMPONENTS = ("cidboot", *sorted(set(COMPONENT.values())))
# image.compression's default (every layer's, and the runtime layer's unless the flow's
# image.python.runtime.compression says otherwise: docs/images.md, "Compression")
DEFAULT_COMPRESSION = "xz"
RUNTIME_JSON_PATH = "etc/cidboot/runtime.json"  # the runtime layer's identity and paths (runtime_json)
REFERENCE_NAMES = ("firmware", "bootstrap")  # stages measured from their kernel + initrd (cidboot.trust.measure)


class BuildError(CidbootError):
    """The image cannot be built from this flow and lock."""


class FlowSecretRequired(UsageError):
    """`encrypt: true` and no flow secret file (neither --flow-secret nor the default beside the
    signing keys): an encrypted image cannot be built without one (exit 2)."""


class FlowSecretUnused(UsageError):
    """A flow secret was given for a flow without `encrypt: true`: refused, so nobody publishes a
    plain image believing it private (exit 2)."""


def default_secret_path(ff: FlowFile) -> Path:
    """Where a flow's secret lives unless --flow-secret says otherwise: beside the first signing
    key, named after the flow (`keys/signer-1.pem` -> `keys/<name>.flow.secret`). The secret
    never enters an image; whoever holds it (the builder, the key broker) can derive every
    layer key of the flow."""
    return (ff.dir / ff.data["trust"]["keys"][0]).parent / f"{ff.name}.flow.secret"


def load_flow_secret(ff: FlowFile, flow_secret: str | os.PathLike[str] | None) -> bytes | None:
    """The flow secret an `encrypt: true` build needs (None for a plain flow); see the two
    errors above. A file others can read is refused (keys.FlowSecretExposedError)."""
    if not ff.encrypt:
        if flow_secret is not None:
            raise FlowSecretUnused(f"--flow-secret {flow_secret}: {ff.path} does not set `encrypt: true`; "
                                   f"add it to build a private image, or drop --flow-secret")
        return None
    path = Path(flow_secret) if flow_secret is not None else default_secret_path(ff)
    if not path.exists():
        raise FlowSecretRequired(f"{ff.path} sets `encrypt: true` but there is no flow secret at {path}"
                                 f"{'' if flow_secret is not None else ' (the default, beside the signing keys)'}: "
                                 f"make one with `imagebuilder keygen --flow-secret {path}` or pass "
                                 f"--flow-secret FILE")
    return layer_keys.load_secret(path)


@dataclass
class BuildResult:
    manifest_cid: CID
    manifest: Manifest
    layers: list[BuiltLayer]
    blocks: dict[CID, bytes] = field(default_factory=dict)
    flow_cid: CID | None = None
    operations: dict[str, CID] = field(default_factory=dict)
    unresolved_imports: list[str] = field(default_factory=list)
    uki: BuiltUki | None = None  # `build(..., make_uki=True)`: the bootstrap as one UEFI PE file
    encrypted: bool = False  # `encrypt: true`: layers are ciphertext, flow + operations only inside them

    def to_json(self) -> dict[str, object]:
        return {
            "manifest": str(self.manifest_cid),
            "flow": str(self.flow_cid),
            "encrypted": self.encrypted,
            "layers": [{"role": lyr.role, "cid": str(lyr.cid), "size": lyr.size, "cached": lyr.cached,
                        **({"plaintext": {"sha256": lyr.plaintext.sha256.hex(), "size": lyr.plaintext.size}}
                           if lyr.plaintext else {})}
                       for lyr in self.layers],
            "operations": {k: str(v) for k, v in sorted(self.operations.items())},
            "cmdline": self.manifest.cmdline,  # what the stage before hands this image's kernel
            "blocks": len(self.blocks),
            "bytes": sum(len(b) for b in self.blocks.values()),
            **({"uki": {"name": self.uki.name, "cid": str(self.uki.cid), "size": self.uki.size,
                        "stub": str(self.uki.stub)}} if self.uki else {}),
        }


class _Collect:
    """In-memory block sink: nothing reaches a store until the whole build succeeded."""

    def __init__(self) -> None:
        self.blocks: dict[CID, bytes] = {}

    def put(self, cid: CID, data: bytes) -> None:
        self.blocks[cid] = data


def _sources_digest(paths: list[Path]) -> dict[str, str]:
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(paths)}


def _py_files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*.py") if "__pycache__" not in p.parts)


def stage_entries(target: str, op_modules: list[str]) -> list[str]:
    """The modules whose import closure an image of `target` ships: PID 1, the stage's entry and
    the flow's operation modules."""
    return ["cidboot.stage.pid1", ENTRY[target], *op_modules]


def runtime_compression(ff: FlowFile) -> str:
    """The runtime layer's compression: image.python.runtime.compression, else image.compression.
    zstd there is smaller (~20 %) and cheaper for the kernel to unpack than gzip, and only the
    kernel reads the runtime layer in a normal chain (the boot server finds where a served
    bootstrap's zstd runtime ends from its frame headers: cidboot.stage.switch_root.runtime_prefix);
    docs/images.md, "Compression"."""
    image = ff.data["image"]
    py = image.get("python") or {}
    return str((py.get("runtime") or {}).get("compression", image.get("compression", DEFAULT_COMPRESSION)))


def _check_served_split(ff: FlowFile, parts: list[bytes]) -> None:
    """Refuse a bootstrap whose initrd a boot server would not cut where its reference value does:
    the reference is measured over the runtime layer and the rest as two initrds (served_initrds),
    the server cuts with runtime_prefix, which must find runtime.json in the layers after the
    runtime (which it reads in Python: gzip, xz or none; a zstd runtime it skips by its frame
    headers). A bootstrap it would serve whole is measured as one initrd by the firmware and the
    device is never affirmed: fail the build instead, naming the cause."""
    from cidboot.stage.switch_root import runtime_prefix

    if len(parts) > 1 and runtime_prefix(b"".join(parts)) != len(parts[0]):
        raise BuildError(f"{ff.path}: a boot server could not split this bootstrap's initrd after its runtime layer "
                         f"(runtime compression {runtime_compression(ff)}, the other layers "
                         f"{ff.data['image'].get('compression', DEFAULT_COMPRESSION)}: they must be gzip, xz or "
                         "none, which the boot server and the stages read); its reference value would never match")


def runtime_pins(ff: FlowFile, lock: Lock) -> dict[str, object]:
    """What of a flow and its lock decides its runtime layer's bytes (with the platform's code): the
    pinned runtime .debs and wheels, the arch and the runtime's compression. Stage flows of one arch
    pin the same, so their runtime layers are one (tests/unit/test_runtime_layer.py checks the
    committed flows agree)."""
    py = ff.data["image"].get("python") or {}
    return {"debs": [asdict(lock.debs[n]) for n in sorted((py.get("runtime") or {}).get("packages", []))],
            "wheels": [asdict(lock.wheels[wheel_name(n)]) for n in sorted(py.get("wheels") or [])],
            "arch": flow_arch(ff), "compression": runtime_compression(ff)}


def runtime_json(layer: bytes) -> bytes:
    """/etc/cidboot/runtime.json for a (plaintext) runtime layer: its CIDv1, size, SHA-256 and
    SHA-512 and every member path in archive order (normalized as cidboot.stage.cpio.normalize_path
    gives them), sorted-key JSON. It goes into the config layer, inside the measured initrd: a
    stage whose running runtime has these hashes can keep it at a same-kernel hand-over and
    unpack only the other layers (whose paths never repeat these: check_layer_paths)."""
    doc = {"cid": str(layer_cid(layer)), "size": len(layer), "sha256": hashlib.sha256(layer).hexdigest(),
           "sha512": hashlib.sha512(layer).hexdigest(), "paths": archive_paths(layer)}
    return json.dumps(doc, sort_keys=True).encode() + b"\n"


def archive_paths(layer: bytes) -> list[str]:
    """Member paths of a compressed newc layer, in archive order, normalized."""
    return [path for path, _ in _members(layer)]


@functools.lru_cache(maxsize=4)
def _members(layer: bytes) -> tuple[tuple[str, int], ...]:
    """(normalized path, mode) of each member, in archive order; cached: a build reads its runtime
    layer three times (the operations layer's skip list, runtime.json, check_layer_paths)."""
    return tuple((normalize_path(m.path), m.mode) for m in read_newc(decompress(layer)))


def check_layer_paths(runtime: bytes, later: dict[str, bytes]) -> None:
    """No later layer repeats a runtime path, except a directory with the same mode (creating it
    again changes nothing): the kernel's unpacker and cidboot.stage.switch_root.extract let a later
    member replace an earlier one, so a repeated file would make the unpacked root differ from the
    runtime a stage keeps. Raises BuildError naming the path and the layer."""
    import stat

    rt = dict(_members(runtime))
    for role, data in later.items():
        for path, mode in _members(data):
            have = rt.get(path)
            if have is not None and not (stat.S_ISDIR(mode) and mode == have):
                raise BuildError(f"the {role} layer repeats the runtime layer's {path!r} "
                                 f"({oct(mode)} over {oct(have)}): a later member would replace it")


def _owner(raw: Any) -> dict[str, Any] | None:
    """flow.yaml's `owner` as the manifest carries it (checked by cidboot.dataflow.checks already)."""
    if raw is None:
        return None
    from cidboot.dataflow.sealing import Owner

    return Owner.from_obj(raw).to_obj()


def _expires(ff: FlowFile) -> int:
    try:
        return calendar.timegm(time.strptime(ff.data["trust"]["expires"], "%Y-%m-%d"))
    except ValueError:
        raise flowfile.FlowFileError([ff.error(("trust", "expires"), "not a valid date (YYYY-MM-DD)")]) from None


def _kernel_from_deb(deb: Path) -> bytes:
    images = [f for f in read_deb(deb) if f.kind == "file" and f.path.startswith("boot/vmlinuz-")]
    if len(images) != 1:
        raise BuildError(f"{deb.name}: expected one boot/vmlinuz-* file, found {len(images)}")
    return images[0].data


def _check_arch(lock: Lock, names: list[str], arch: str, lpath: Path) -> None:
    """Every pinned .deb the build takes is for the flow's architecture (or `all`): an amd64 pin
    in an arm64 flow's lock would ship x86 code the ELF check might never reach (a kernel, a stub)."""
    for n in names:
        pin = lock.pin(n)
        if pin.arch not in (arch, "all"):
            raise BuildError(f"{lpath}: {pin.name} is pinned for {pin.arch}, the flow is arch {arch}; "
                             f"run `imagebuilder lock --update` on the flow")


def _stub_from_deb(deb: Path, arch: str) -> bytes:
    """The architecture's systemd-boot EFI stub from a pinned systemd-boot-efi .deb (never run,
    only read: an arm64 stub for an amd64 build host cannot be installed beside the host's own)."""
    want = "usr/lib/systemd/boot/efi/" + uki.ARCHES[arch][0]
    found = [f.data for f in read_deb(deb) if f.kind == "file" and f.path == want]
    if not found:
        raise BuildError(f"{deb.name}: no {want} (image.uki.stub must name Debian's {uki.STUB_PACKAGE} for {arch})")
    return found[0]


def _module_entries(deb: Path, names: list[str]) -> list[initramfs.Entry]:
    """The named kernel modules and their depends= closure, flat in /lib/modules, plus
    /etc/cidboot/modules listing them in load order (read by cidboot.stage.pid1 at boot)."""
    import tempfile

    from imagebuilder import kmod

    kos = {f.path.rsplit("/", 1)[-1]: f.data for f in read_deb(deb) if f.kind == "file" and f.path.endswith(".ko")}
    with tempfile.TemporaryDirectory() as tmp:
        for name, data in kos.items():
            Path(tmp, name).write_bytes(data)
        index = kmod.module_index(tmp)
        try:
            order = kmod.load_order(names, index)
        except kmod.ModuleNotFound as e:
            raise BuildError(f"{deb.name}: {e}") from None
        entries = [initramfs.Entry.file(f"lib/modules/{n}.ko", index[n].read_bytes()) for n in order]
    return entries + [initramfs.Entry.file("etc/cidboot/modules", ("\n".join(order) + "\n").encode())]


def parse_reference(spec: str) -> tuple[str, bytes]:
    """`NAME=HEX` (NAME firmware|bootstrap, HEX the 64-byte SHA-512 code hash) -> (name, hash)."""
    name, sep, value = spec.partition("=")
    if not sep or name not in REFERENCE_NAMES:
        raise BuildError(f"--reference {spec!r}: expected NAME=HEX with NAME one of {', '.join(REFERENCE_NAMES)}")
    try:
        raw = bytes.fromhex(value)
    except ValueError:
        raise BuildError(f"--reference {name}: {value!r} is not hex") from None
    if len(raw) != 64:
        raise BuildError(f"--reference {name}: a code hash is 64 bytes (128 hex digits), got {len(raw)}")
    return name, raw


def _check_references(target: str, references: dict[str, bytes]) -> dict[str, bytes]:
    for name, value in references.items():
        if name not in REFERENCE_NAMES or len(value) != 64:
            raise BuildError(f"reference {name!r}: expected one of {', '.join(REFERENCE_NAMES)} with a 64-byte hash")
        if name == target:
            raise BuildError(f"reference {name!r}: a {target} build measures itself; it takes no reference for {name}")
    return dict(references)


def _flow_blocks(ff: FlowFile, flow_block: bytes, secret: bytes | None,
                 sink: _Collect) -> tuple[CID, dict[str, CID]]:
    """The flow block and each operation's source into `sink`; their CIDs for the manifest. With a
    secret (encrypt: true) each is encrypted first (roles `flow`, `operation`), so the manifest's
    `flow` and `operations` name ciphertext, like its layers (cidboot.trust.private.carried)."""
    def add(data: bytes, role: str) -> CID:
        if secret is None:
            return import_bytes(data, sink, UNIXFS).cid
        return import_bytes(layer_keys.encrypt_layer(secret, data, role).ciphertext, sink, UNIXFS).cid

    if secret is None:
        flow_cid = CID.of(flow_block, DAG_CBOR)
        sink.put(flow_cid, flow_block)
    else:  # one raw block, as the plain flow is one DAG-CBOR block: a device fetches it alone (fetch_block)
        sealed = layer_keys.encrypt_layer(secret, flow_block, carried.FLOW_ROLE).ciphertext
        flow_cid = CID.of(sealed, RAW)
        sink.put(flow_cid, sealed)
    operations = {name: add(flowfile.implementation_file(ff, op["implementation"]).read_bytes(), carried.OPERATION_ROLE)
                  for name, op in sorted(ff.data["dataflow"]["operations"].items())}
    return flow_cid, operations


def build_uki(name: str, version: int, cmdline: str, layers: list[BuiltLayer], arch: str = "amd64",
              stub: Path | None = None, stub_bytes: bytes | None = None) -> BuiltUki:
    """The stage as a UKI: its kernel layer as .linux, the other layers concatenated in manifest
    order as .initrd (the same initramfs iPXE and the firmware load, so the same code hash), the
    manifest's cmdline and an os-release naming the flow. Deterministic: no clock, no paths.
    The stub: `stub_bytes` (from the pinned .deb the flow's image.uki.stub names; `stub` is then
    that .deb, for the record), else the file `stub`, else the host's installed one."""
    try:
        stub_file = stub or uki.stub_path(arch)
    except uki.StubMissing as e:
        raise BuildError(f"{e}; or pin the stub: image.uki.stub: {uki.STUB_PACKAGE} in the flow") from None
    roles = [lyr.role for lyr in layers]
    if roles[:1] != ["kernel"]:
        raise BuildError(f"a UKI needs the kernel layer first, got layers {roles}")
    try:
        data = uki.build_uki(stub_bytes if stub_bytes is not None else stub_file.read_bytes(), layers[0].data,
                             b"".join(lyr.data for lyr in layers[1:]), cmdline, uki.os_release(name, version), arch)
    except uki.UkiError as e:
        raise BuildError(f"UKI for {arch}: {e}") from None
    return BuiltUki(uki.file_name("bootstrap", arch), data, layer_cid(data), stub_file)


def build(flow_path: str | Path, *, progress: Callable[[str], None] | None = None,
          cache_root: Path | None = None, references: dict[str, bytes] | None = None,
          make_uki: bool = False, flow_secret: str | os.PathLike[str] | None = None) -> BuildResult:
    """Build the flow into layers and a signed manifest (blocks returned, not yet stored).

    `references` are the reference measurements of the stages below this image (firmware,
    bootstrap: their code hashes, as `imagebuilder build --reference NAME=HEX` gives them); a
    firmware/bootstrap build records its own code hash, an image build the DICE image-layer
    code hash (cidboot.trust.measure.image_code_hash: the layer CIDs, not their bytes).
    `make_uki` (bootstrap flows only) also assembles the bootstrap as a UKI (see build_uki) and
    puts its UnixFS blocks beside the layers'.
    `flow_secret`: the flow secret file of an `encrypt: true` flow (default: `default_secret_path`);
    every layer is then stored encrypted (layers.encrypt; the manifest's layers carry their
    plaintext hash and size, the measurement uses those), and the flow and operation blocks the
    manifest names are not returned for publishing: they travel inside the encrypted config layer
    (cidboot.trust.private.blocks, docs/privacy.md).
    """
    say = progress or (lambda _msg: None)
    ff = flowfile.load(flow_path)
    secret = load_flow_secret(ff, flow_secret)
    refs = _check_references(ff.target, references or {})
    if make_uki and ff.target != "bootstrap":
        raise BuildError(f"{ff.path}: a UKI is built for the bootstrap flow (target: bootstrap), not target {ff.target}")
    lpath = lock_path(ff.path)
    lock = Lock.load(lpath)
    flowfile.check_lock(ff, lock.named(), {k: asdict(v) for k, v in lock.wheels.items()})
    hint = f"the lock {lpath} is stale: {update_hint(ff)}"
    arch = flow_arch(ff)
    _check_arch(lock, sorted(flow_debs(ff)), arch, lpath)
    cache = BuildCache(cache_root or Path(os.environ.get("CIDBOOT_BUILD_CACHE") or cache_dir() / "layers"))
    image = ff.data["image"]
    comp = image.get("compression", DEFAULT_COMPRESSION)
    epoch = source_date_epoch()
    signers = [keys.load_private_key(ff.dir / k) for k in ff.data["trust"]["keys"]]
    threshold = int(ff.data["trust"]["threshold"])
    root = RootOfTrust.from_public_keys([k.public_key() for k in signers], threshold)

    built: dict[str, BuiltLayer] = {}

    def layer(role: str, inputs: object, make: Callable[[], bytes], compression: str = comp) -> None:
        k = key(role, {"inputs": inputs, "compression": compression_id(compression), "epoch": epoch})
        data = cache.get(k)
        cached = data is not None
        if data is None:
            say(f"building {role} layer")
            data = make()
            cache.put(k, data)
        built[role] = BuiltLayer(role, data, layer_cid(data), cached)

    # kernel
    kspec = image["kernel"]
    if "path" in kspec:
        kfile = ff.dir / kspec["path"]
        layer("kernel", hashlib.sha256(kfile.read_bytes()).hexdigest(), kfile.read_bytes)
    else:
        kpin = lock.pin(kspec["package"])  # a metapackage: the concrete package it was locked to
        layer("kernel", asdict(kpin), lambda: _kernel_from_deb(fetch_deb(kpin, hint)))

    # python code: the component, cidboot and the operations, analysed against the Debian stdlib
    component = COMPONENT[ff.target]
    code_files = _py_files(REPO / "cidboot") + _py_files(REPO / component)
    platform_files = sorted({f for c in PLATFORM_COMPONENTS for f in _py_files(REPO / c)})
    op_modules = sorted({op["implementation"].split(":", 1)[0] for op in ff.data["dataflow"]["operations"].values()})
    op_files = sorted({flowfile.implementation_file(ff, op["implementation"])
                       for op in ff.data["dataflow"]["operations"].values()})
    rt_names = sorted(((image.get("python") or {}).get("runtime") or {}).get("packages", []))
    rt_pins = [asdict(lock.debs[n]) for n in rt_names]
    extra = list((image.get("python") or {}).get("modules", []))
    wheel_pins = [asdict(lock.wheels[wheel_name(n)]) for n in sorted((image.get("python") or {}).get("wheels", []))]
    wheel_roots: list[Path] = []
    code_digest = _sources_digest(code_files)
    platform_digest = _sources_digest(platform_files)
    ops_digest = _sources_digest(op_files)
    graph_cache: dict[str, pyimports.ImportGraph] = {}
    sysroot_cache: list[Path] = []

    def sysroot() -> Path:
        if not sysroot_cache:
            if not rt_names:
                raise BuildError(f"{ff.path}: image.python.runtime.packages is empty; the stage needs an interpreter")
            say("unpacking pinned runtime packages")
            debs = [fetch_deb(lock.debs[n], hint) for n in rt_names]
            sysroot_cache.append(initramfs.stage_sysroot(debs, cache_dir() / "sysroots"))
        return sysroot_cache[0]

    def roots() -> list[Path]:
        sr = sysroot()
        if not wheel_roots:
            # Debian's Python packages (python3-cryptography, python3-cffi-backend: the runtime's
            # .debs) ship as the wheels do, under /opt/cidboot/lib; first, so the import analysis and
            # the dataclass recorder see the guest's copy of a module, never the build host's
            dist = sr / initramfs.DIST_PACKAGES
            if dist.is_dir():
                wheel_roots.append(dist)
            for w in wheel_pins:
                wheel_roots.append(initramfs.unpack_wheel(fetch_wheel(lock.wheels[w["name"]], hint, arch),
                                                          cache_dir() / "wheels-unpacked"))
        return [REPO, sr / initramfs.STDLIB, sr / initramfs.STDLIB / "lib-dynload", *wheel_roots]

    def graph() -> pyimports.ImportGraph:
        """This stage's closure: PID 1, its entry, the flow's operations and extra modules."""
        if "stage" not in graph_cache:
            r = roots()
            say("analysing imports")
            graph_cache["stage"] = pyimports.analyse(stage_entries(ff.target, op_modules), [r[0], ff.dir, *r[1:]],
                                                     extra, HOST_ONLY)
        return graph_cache["stage"]

    def platform_graph() -> pyimports.ImportGraph:
        """The union of every stage's closure (PLATFORM_ENTRIES): what the runtime layer carries.
        Not the flow's directory: an operation module never decides what the runtime holds."""
        if "platform" not in graph_cache:
            graph_cache["platform"] = pyimports.analyse(PLATFORM_ENTRIES, roots(), PLATFORM_MODULES, HOST_ONLY)
        return graph_cache["platform"]

    kmods = sorted(kspec.get("modules", []))

    rt_comp = runtime_compression(ff)

    def runtime() -> bytes:
        entries = initramfs.runtime_entries(sysroot(), platform_graph(), arch, wheel_roots=wheel_roots)
        return compress(archive_bytes(entries, epoch), rt_comp)

    # the runtime's inputs name nothing of the target, the flow or its kernel: same pins, same bytes
    layer("runtime", {**runtime_pins(ff, lock), "code": platform_digest, "platform": PLATFORM_ENTRIES,
                      "modules": PLATFORM_MODULES, "exclude": HOST_ONLY, "docstrings": False}, runtime, rt_comp)
    runtime_paths = archive_paths(built["runtime"].data)

    # the project's code as bytecode alone unless the flow asks for its sources (image.python.sources:
    # tracebacks with source lines, for debugging); the operations keep theirs always: an operation's
    # source is what the manifest names by CID (cidboot.trust.private.carried reads it from the image)
    code_sources = bool((image.get("python") or {}).get("sources", False))

    def agent() -> bytes:
        entries = (initramfs.init_entries(ENTRY[ff.target])
                   + initramfs.code_entries(graph(), REPO, initramfs.APP, sources=code_sources))
        # the stage's dataclass method code, compiled here (cidboot.stage.dccache)
        # recorded with the image's own packages first on the path (roots() after REPO and the
        # stdlib) when the builder can load them: an image of another arch (arm64 on an amd64
        # host) is recorded with the host's site-packages as before; a text its packages would
        # compile differently is only a miss on the device (compiled then), never other code
        own = roots()[3:] if arch == host_arch() else []
        entries.append(dccache.table_entry(graph().modules, REPO, own))
        if kmods:
            entries += _module_entries(fetch_deb(lock.pin(kspec["package"]), hint), kmods)
        return compress(archive_bytes(entries, epoch), comp)

    def ops_layer() -> bytes:
        # the operations' code, and what only they (or the flow's extra modules) import beyond the
        # platform: stdlib and wheel modules, their extension modules' libraries
        entries = initramfs.code_entries(graph(), ff.dir, initramfs.OPS)
        entries += initramfs.runtime_entries(sysroot(), graph(), arch, wheel_roots=wheel_roots, skip=runtime_paths)
        return compress(archive_bytes(entries, epoch), comp)

    layer("agent", {"code": code_digest, "component": component, "entry": ENTRY[ff.target],
                    "sources": code_sources, "dataclass_code": [dccache.FORMAT, sys.version.split()[0]],
                    "packages": [rt_pins, wheel_pins, arch == host_arch()],  # the recorder imports them (dccache)
                    "kmods": kmods, "kernel": asdict(lock.pin(kspec["package"])) if kmods else None}, agent)
    layer("operations", {"ops": ops_digest, "code": code_digest, "entry": ENTRY[ff.target], "debs": rt_pins,
                         "wheels": wheel_pins, "extra": extra, "arch": arch, "runtime": str(built["runtime"].cid),
                         "docstrings": False},
          ops_layer)
    files = {dest: ff.dir / src for dest, src in (image.get("files") or {}).items()}
    flow_block = dagcbor.encode(ff.data["dataflow"])
    flow_doc = {k: ff.data[k] for k in ("name", "version", "dataflow", "placement", "policies") if k in ff.data}
    flow_json = json.dumps(flow_doc, sort_keys=True, indent=1).encode()
    # the SHA-512 of the kernel this image is built to run on: a stage compares it with the next
    # stage's kernel to hand over without kexec (cidboot.stage.switch_root, docs/boot-chain.md);
    # it is inside the measured initrd, so a stage cannot claim a kernel its measurement does not show
    # and the kernel layer's CID: the bootstrap does not fetch a next stage's kernel layer with that CID
    # when it hands over in the same kernel (bootstrap.stage.verify.reuses_running_kernel)
    kernel_sha512 = hashlib.sha512(built["kernel"].data).hexdigest()
    # (the plaintext kernel layer's CID, also in an encrypted image: the config layer's bytes, hence the
    # image measurement, must not depend on the flow secret)
    kernel_cid = str(built["kernel"].cid)
    # and its SHA-256: what an encrypted image's manifest signs as the kernel layer's plaintext hash,
    # so the bootstrap can tell a next stage's encrypted kernel layer is its own kernel too
    kernel_sha256 = hashlib.sha256(built["kernel"].data).hexdigest()
    config_inputs: dict[str, object] = {
        "flow": hashlib.sha256(flow_json).hexdigest(), "files": _sources_digest(list(files.values())),
        "dests": sorted(files), "kernel_sha512": kernel_sha512, "kernel_cid": kernel_cid,
        "kernel_sha256": kernel_sha256, "runtime": str(built["runtime"].cid)}
    # an encrypted image carries its plain flow block (the manifest names the ciphertext's CID: carried.py)
    carry = [initramfs.Entry.file(carried.FLOW_PATH, flow_block)] if secret is not None else []
    if carry:
        config_inputs["carried_flow"] = hashlib.sha256(flow_block).hexdigest()
    layer("config", config_inputs,
          lambda: compress(archive_bytes([initramfs.Entry.file("etc/cidboot/flow.json", flow_json),
                                          initramfs.Entry.file(KERNEL_SHA512_PATH, kernel_sha512.encode() + b"\n"),
                                          initramfs.Entry.file(KERNEL_CID_PATH, kernel_cid.encode() + b"\n"),
                                          initramfs.Entry.file(KERNEL_SHA256_PATH, kernel_sha256.encode() + b"\n"),
                                          initramfs.Entry.file(RUNTIME_JSON_PATH, runtime_json(built["runtime"].data))]
                                         + carry + initramfs.data_entries(files), epoch), comp))

    check_layer_paths(built["runtime"].data, {r: built[r].data for r in ("agent", "operations", "config")})
    sink = _Collect()
    layers = [built[r] for r in ROLES]
    if secret is not None:
        say("encrypting every layer (encrypt: true)")
        layers = [encrypt_layer(lyr, secret) for lyr in layers]
    for lyr in layers:
        say(f"hashing {lyr.role} layer ({lyr.size} bytes)")
        import_bytes(lyr.data, sink, UNIXFS)
    flow_cid, operations = _flow_blocks(ff, flow_block, secret, sink)
    measurements = dict(sorted(refs.items()))
    if ff.target in REFERENCE_NAMES:  # measured by the stage below from its files (cidboot.trust.measure.boot_code_hash)
        parts = [lyr.data for lyr in layers[1:]]
        # the firmware: one initrd on the flash, as the DICE engine loads it; the bootstrap: the initrds
        # the boot server lists in boot.ipxe, runtime layer first (bootstrap.server.serve.split_initrd)
        # (uncompressed: imagebuilder.cpio.flash_initrd, what the harness writes to the flash)
        initrds = served_initrds(parts) if ff.target == "bootstrap" else [flash_initrd(parts)]
        if ff.target == "bootstrap" and secret is None:
            _check_served_split(ff, parts)
        measurements[ff.target] = boot_code_hash(layers[0].data, initrds)
    manifest = Manifest(
        name=ff.name, version=int(ff.data["version"]), expires=_expires(ff),
        layers=tuple(Layer(lyr.cid, lyr.size, lyr.role, lyr.plaintext) for lyr in layers), root=root,
        measurements=measurements, flow=flow_cid, operations=operations,
        placement={k: list(v) for k, v in sorted((ff.data.get("placement") or {}).items())},
        policies=list(ff.data.get("policies") or []), cmdline=str(image.get("cmdline", "")),
        owner=_owner(ff.data.get("owner")))
    if ff.target == "image":  # the bootstrap measures an image by its layer CIDs (cidboot.trust.measure.image_inputs)
        manifest = replace(manifest, measurements={**measurements, "image": image_code_hash(manifest)})
    signed = sign_manifest(manifest, signers[:threshold])
    block = signed.encode()
    mcid = CID.of(block, DAG_CBOR)
    sink.put(mcid, block)
    unresolved: list[str] = []
    for g in graph_cache.values():  # names whose parent module was found are attributes (`from x import y`)
        found = g.modules
        unresolved += [n for n in g.unresolved if n.rpartition(".")[0] not in found
                       and not any(u != n and n.startswith(u + ".") for u in g.unresolved)]
    unresolved = sorted(set(unresolved))
    built_uki = None
    if make_uki:
        say("assembling the UKI")
        stub_pkg = (image.get("uki") or {}).get("stub")
        stub_deb = fetch_deb(lock.pin(stub_pkg), hint) if stub_pkg else None
        built_uki = build_uki(ff.name, int(ff.data["version"]), manifest.cmdline, layers, arch, stub=stub_deb,
                              stub_bytes=_stub_from_deb(stub_deb, arch) if stub_deb else None)
        import_bytes(built_uki.data, sink, UNIXFS)
    return BuildResult(mcid, manifest, layers, sink.blocks, flow_cid, operations, unresolved, built_uki,
                       encrypted=secret is not None)

