"""Build everything a boot needs from one workload flow: firmware, bootstrap, workload.

The order matters and is the trust model in miniature: the firmware and bootstrap are built
first so their code hashes can go into the workload manifest as reference measurements; the
bootstrap is built with the workload's root of trust as its built-in trust anchor (so each
deployment's bootstrap trusts that deployment's signers only). Builds run the real
`imagebuilder build` CLI into one block store; flows are copied into the work dir so keys and
the trust anchor never land in the source tree. Keys are generated once per work dir and
reused, so rebuilding the same flow in the same work dir gives the same CIDs.

`arch` (x86_64, or arm64): one flow file, lock and signed manifest per architecture
(docs/adr/0008-one-manifest-per-arch.md); the arm64 twin of `DIR/flow.yaml` is
`DIR/flow-arm64.yaml`, built with the arm64 bootstrap's code hash as its reference.

A flow with `encrypt: true` (a private image, docs/privacy.md) gets a flow secret beside its
signing keys (`keys/<name>.flow.secret` in the work dir's copy, made once like the keys, never in
the image), given to `imagebuilder build --flow-secret`; the lab gives it to the boot server's
key broker.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from bootstrap.bootfiles import build_bootstrap
from cidboot.dataflow import checks
from cidboot.dataflow.checks import FlowError
from cidboot.dataflow.source import load_yaml
from cidboot.errors import CidbootError
from cidboot.ipld import dagcbor
from cidboot.ipld.cid import CID
from cidboot.ipld.unixfs.exporter import export_file
from cidboot.store.blockstore import Blockstore
from cidboot.trust import keys
from cidboot.trust.manifest import Manifest, RootOfTrust, SignedManifest
from imagebuilder.flash import flash_image
from imagebuilder.lock import lock_path, relock_if_unavailable

REPO = Path(__file__).resolve().parents[2]
FIRMWARE_FLOW = REPO / "firmware" / "image" / "flow.yaml"
BOOTSTRAP_FLOW = REPO / "bootstrap" / "image" / "flow.yaml"
COMMITTED_FLOW_DIRS = (FIRMWARE_FLOW.parent, BOOTSTRAP_FLOW.parent)


class DeployError(CidbootError):
    """A build step failed (the message carries imagebuilder's error)."""


@dataclass
class Built:
    manifest: CID
    kernel: Path
    initrd: Path
    measurements: dict[str, str]
    result: dict[str, Any]
    uki: dict[str, Path] = field(default_factory=dict)  # the bootstrap's UKIs by UEFI arch name


@dataclass
class Deployment:
    work: Path
    store: Path
    flow_dir: Path
    flow: dict[str, Any]
    firmware: Built
    bootstrap: Built
    workload: Built
    signer_keys: list[Path] = field(default_factory=list)
    arch: str = "x86_64"  # what the workload and bootstrap were built for (vm.ARCHES)
    flow_secret: Path | None = None  # a private image's flow secret (flow.yaml `encrypt: true`)

    @property
    def roles(self) -> list[str]:
        return sorted((self.flow.get("placement") or {"default": []}).keys())

    def root_of_trust(self) -> RootOfTrust:
        return _root_of(self.flow_dir, self.flow)


DEBIAN_ARCH = {"x86_64": "amd64", "arm64": "arm64"}


def flow_for_arch(flow: Path, arch: str) -> Path:
    """The flow file of `flow`'s appliance built for `arch`: `flow` itself when its `arch:` is that
    one, else its twin beside it (flow.yaml for x86_64, flow-arm64.yaml for arm64)."""
    if arch not in DEBIAN_ARCH:
        raise DeployError(f"--arch {arch!r}: one of {', '.join(DEBIAN_ARCH)}")
    want = DEBIAN_ARCH[arch]
    for cand in (flow, flow.with_name("flow.yaml" if want == "amd64" else f"flow-{want}.yaml")):
        if cand.is_file() and (yaml.safe_load(cand.read_text()) or {}).get("arch", "amd64") == want:
            return cand
    raise DeployError(f"{flow} is not built for {arch} and there is no {arch} flow beside it "
                      f"(flow-{want}.yaml with `arch: {want}`)")


def _copy_flow(src: Path, dst: Path, name: str = "flow.yaml") -> Path:
    """Copy a flow dir (not its keys or caches) and generate any trust key it names but lacks;
    the copy of the flow file `name` is returned."""
    if dst.exists():
        shutil.rmtree(dst / "__pycache__", ignore_errors=True)
        for p in src.iterdir():  # refresh sources, keep the generated keys
            if p.name in ("keys", "__pycache__"):
                continue
            if p.is_dir():
                shutil.copytree(p, dst / p.name, dirs_exist_ok=True)
            else:
                shutil.copy2(p, dst / p.name)
    else:
        shutil.copytree(src, dst, ignore=shutil.ignore_patterns("__pycache__", "keys"))
        if (src / "keys").is_dir():
            shutil.copytree(src / "keys", dst / "keys")
    doc = yaml.safe_load((dst / name).read_text())
    for rel in doc["trust"]["keys"]:
        key = dst / rel
        if not key.exists():
            keys.write_keypair(keys.generate(), key.with_suffix(""))
    return dst / name


def flow_secret_for(flow: Path, doc: dict[str, Any]) -> Path | None:
    """The flow secret of a work-dir flow copy whose flow says `encrypt: true`, where `imagebuilder
    build` looks for it by default (beside the first signing key, `keys/<name>.flow.secret`),
    made once (mode 0600) so a rebuild in the same work dir gives the same CIDs; None for a flow
    in clear."""
    if not doc.get("encrypt"):
        return None
    from cidboot.trust.private.keys import write_secret
    from imagebuilder import flowfile
    from imagebuilder.build import default_secret_path

    path = default_secret_path(flowfile.load(flow))
    if not path.exists():
        write_secret(path)
    return path


def _root_of(flow_dir: Path, doc: dict[str, Any]) -> RootOfTrust:
    pubs = [keys.load_private_key(flow_dir / k).public_key() for k in doc["trust"]["keys"]]
    return RootOfTrust.from_public_keys(pubs, int(doc["trust"]["threshold"]))


def check_flow(flow: Path) -> None:
    """The flow checks `imagebuilder build` and `agent run` apply (cidboot.dataflow.checks), before
    minutes go into firmware and bootstrap builds; the same `file:line:col` messages."""
    try:
        src = load_yaml(flow)
        _model, problems = checks.check(src.data, modules=checks.modules_beside(flow.parent), file_keys=True)
        if problems:
            raise src.fail(problems)
    except FlowError as e:
        raise DeployError(f"flow {flow} does not validate:\n{e}") from e


def check_manifest_flow(bs: Blockstore, mcid: CID, m: Manifest) -> None:
    """A published manifest's flow, checked like a flow file (a signature is not validity)."""
    if m.flow is None:
        raise DeployError(f"manifest {mcid} names no flow")
    df = dagcbor.decode(bs.get(m.flow))
    try:
        checks.checked({"dataflow": df, "placement": m.placement, "policies": m.policies},
                       modules=checks.modules_by_cid(df, m.operations, lambda c: b"".join(export_file(c, bs.get))),
                       origin=f"manifest {mcid}")
    except FlowError as e:
        raise DeployError(f"manifest {mcid}: its flow does not validate:\n{e}") from e


def relock_copy(flow: Path) -> list[str]:
    """Re-lock a work-dir copy of a flow whose pins are no longer obtainable; print what moved.
    A committed flow (firmware/image, bootstrap/image, examples/*) is left alone: its build fails
    with the `imagebuilder lock --update` hint instead."""
    if flow.resolve().parent in COMMITTED_FLOW_DIRS or flow.resolve().parent.parent == REPO / "examples":
        return []
    try:
        moved = relock_if_unavailable(flow)
    except CidbootError as e:
        raise DeployError(f"{flow}: its lock names packages the mirror no longer serves and re-locking failed: {e}") from e
    if moved:
        print(f"harness: {flow.parent.name}: pinned packages no longer served; re-locked this run's copy "
              f"({lock_path(flow)}; the committed lock is unchanged, `imagebuilder lock --update` refreshes it): "
              f"{'; '.join(moved)}", file=sys.stderr, flush=True)
    return moved


def build(flow: Path, store: Path, *, references: dict[str, str] | None = None, env: dict[str, str] | None = None,
          say: Callable[[str], None] = lambda _m: None, flow_secret: Path | None = None) -> Built:
    """`imagebuilder build` into `store`, then export the kernel and the concatenated initrd.

    `flow` is a copy in the work dir (see _copy_flow): when a pin its lock needs is neither
    cached nor served by the apt mirror any more (Debian's security archive drops the previous
    kernel ABI when a new one lands), the copy is re-locked first and one line says which pins
    moved, so `make demo` works on a fresh machine; the committed lock is never rewritten."""
    refs = [a for name, hexval in sorted((references or {}).items()) for a in ("--reference", f"{name}={hexval}")]
    relock_copy(flow)
    say(f"building {flow}")
    secret = ["--flow-secret", str(flow_secret)] if flow_secret is not None else []
    proc = subprocess.run([sys.executable, "-m", "imagebuilder", "build", str(flow), "--store", str(store), "--json",
                           *refs, *secret], capture_output=True, text=True, cwd=REPO, env=env)
    if proc.returncode != 0:
        raise DeployError(f"imagebuilder build {flow} failed:\n{proc.stderr.strip()}")
    result = json.loads(proc.stdout)
    built = export(store, CID.parse(result["manifest"]), flow.parent / "built", result, flow_secret=flow_secret)
    if (yaml.safe_load(flow.read_text()) or {}).get("target") == "firmware":
        # the firmware's files as a board's flash holds them (`imagebuilder flash`: the initrd uncompressed,
        # checked against the L0 reference value the build pinned)
        flash_image(Blockstore(store), built.manifest).write(built.kernel.parent)
    return built


def export(store: Path, mcid: CID, out: Path, result: dict[str, Any] | None = None, *,
           flow_secret: Path | None = None) -> Built:
    """The manifest's kernel layer and its other layers concatenated (the initrd), as files;
    encrypted layers decrypted with `flow_secret` (the harness's own copy: a test that boots the
    files directly needs the plaintext; what devices fetch stays ciphertext)."""
    bs = Blockstore(store)
    bs.pin(mcid)
    m = SignedManifest.decode(bs.get(mcid)).manifest
    parts = {lyr.role: _plaintext(lyr, b"".join(export_file(lyr.cid, bs.get)), flow_secret) for lyr in m.layers}
    out.mkdir(parents=True, exist_ok=True)
    kernel, initrd = out / "vmlinuz", out / "initrd.img"
    kernel.write_bytes(parts["kernel"])
    initrd.write_bytes(b"".join(parts[lyr.role] for lyr in m.layers if lyr.role != "kernel"))
    info = result or {"manifest": str(mcid), "layers": [{"role": lyr.role, "cid": str(lyr.cid)} for lyr in m.layers],
                      "cmdline": m.cmdline}
    return Built(mcid, kernel, initrd, {k: v.hex() for k, v in m.measurements.items()}, info)


def _plaintext(lyr: Any, data: bytes, flow_secret: Path | None) -> bytes:
    if lyr.plaintext is None:
        return data
    if flow_secret is None:
        raise DeployError(f"layer {lyr.cid} ({lyr.role}) is encrypted and no flow secret was given")
    from cidboot.trust.private.keys import decrypt_layer, layer_key, load_secret

    key = layer_key(load_secret(flow_secret), lyr.plaintext.sha256, lyr.role)
    return b"".join(decrypt_layer(key, [data], sha256=lyr.plaintext.sha256, size=lyr.plaintext.size))


def bootstrap_for(anchor: RootOfTrust, work: Path, *, env: dict[str, str] | None = None,
                  say: Callable[[str], None] = lambda _m: None, arch: str = "x86_64") -> Built:
    """The bootstrap (kernel, initrd, UKI) for `arch` trusting `anchor`: bootstrap.bootfiles, the code
    `bootstrap serve` uses too, cached by (arch, anchor, flow lock, guest code) CID under the work dir."""
    b = build_bootstrap(anchor, work / "bootfiles", env=env, say=say, arch=arch)
    return Built(b.manifest, b.kernel, b.initrd, b.measurements, b.result, dict(b.uki))


def prepare(flow: Path, work: Path, *, anchor: RootOfTrust | None = None, env: dict[str, str] | None = None,
            say: Callable[[str], None] = lambda _m: None, arch: str = "x86_64") -> Deployment:
    """Firmware, bootstrap (trusting `anchor`, default: the workload's own root) and workload, for
    `arch`. arm64 devices boot UEFI only: the (x86_64) firmware is built for the Deployment but is
    no reference of an arm64 workload, whose only stage below is its arm64 bootstrap."""
    work.mkdir(parents=True, exist_ok=True)
    store = work / "store"
    flow = flow_for_arch(flow, arch)
    check_flow(flow)
    wl_flow = _copy_flow(flow.parent, work / "workload", flow.name)
    wl_doc = yaml.safe_load(wl_flow.read_text())
    fw = build(_copy_flow(FIRMWARE_FLOW.parent, work / "firmware"), store, env=env, say=say)
    bs = bootstrap_for(anchor or _root_of(wl_flow.parent, wl_doc), work, env=env, say=say, arch=arch)
    refs = {"bootstrap": bs.measurements["bootstrap"]}
    if arch == "x86_64":
        refs["firmware"] = fw.measurements["firmware"]
    secret = flow_secret_for(wl_flow, wl_doc)
    wl = build(wl_flow, store, references=refs, env=env, say=say, flow_secret=secret)
    return Deployment(work, store, wl_flow.parent, wl_doc, fw, bs, wl,
                      [wl_flow.parent / k for k in wl_doc["trust"]["keys"]], arch, secret)


def prepare_manifest(mcid: CID, store: Path, work: Path, *, signer_keys: list[Path] | None = None,
                     env: dict[str, str] | None = None, say: Callable[[str], None] = lambda _m: None) -> Deployment:
    """Boot an already published manifest (in `store`): firmware and a bootstrap trusting the
    manifest's own root are built beside it. Without `signer_keys` (the manifest's signing keys)
    no device registry can be signed, so agents cannot attest peers: fine for one-role flows."""
    work.mkdir(parents=True, exist_ok=True)
    m = SignedManifest.decode(Blockstore(store).get(mcid)).manifest
    check_manifest_flow(Blockstore(store), mcid, m)
    fw = build(_copy_flow(FIRMWARE_FLOW.parent, work / "firmware"), store, env=env, say=say)
    bs = bootstrap_for(m.root, work, env=env, say=say)
    wl = export(store, mcid, work / "workload" / "built")
    doc = {"name": m.name, "version": m.version, "placement": m.placement}
    return Deployment(work, store, work / "workload", doc, fw, bs, wl, list(signer_keys or []))


def rebuild_workload(dep: Deployment, *, version: int | None = None, sign_with: list[Path] | None = None,
                     env: dict[str, str] | None = None) -> Built:
    """Another build of the workload (new version and/or other signing keys) into the same store,
    with the same reference measurements: for rollback and unknown-signer scenarios."""
    doc = dict(dep.flow)
    if version is not None:
        doc["version"] = version
    variant = dep.work / f"workload-v{doc['version']}-{len(list(dep.work.glob('workload-v*')))}"
    shutil.copytree(dep.flow_dir, variant, ignore=shutil.ignore_patterns("__pycache__", "built"))
    if sign_with is not None:  # flow files name keys relative to the flow: copy them in
        names = []
        for i, key in enumerate(sign_with):
            shutil.copy(key, variant / "keys" / f"other-{i}.pem")
            names.append(f"keys/other-{i}.pem")
        doc["trust"] = {**doc["trust"], "keys": names, "threshold": 1}
    name = "flow.yaml" if dep.arch == "x86_64" else f"flow-{DEBIAN_ARCH[dep.arch]}.yaml"  # its lock: flow{,-arm64}.lock
    (variant / name).write_text(yaml.safe_dump(doc, sort_keys=False))
    refs = {"bootstrap": dep.bootstrap.measurements["bootstrap"]}
    if dep.arch == "x86_64":
        refs["firmware"] = dep.firmware.measurements["firmware"]
    return build(variant / name, dep.store, references=refs, env=env, flow_secret=dep.flow_secret)
