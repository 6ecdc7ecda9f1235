"""`imagebuilder inspect CID`: what an image holds, read back from the store (no network).

Refuses (exit 1, the same messages as `imagebuilder build` and `agent run`) a manifest whose
flow does not pass cidboot.dataflow.checks. Shows the manifest's layers and sizes, measurements, the flow graph (operations and the
definitions that connect them), placement, policies and every file in the archive layers:
that list is the image's attack surface.

An encrypted image (`encrypt: true`, docs/privacy.md) shows each layer's ciphertext CID and size
beside its plaintext SHA-256 and size; its file lists and flow graph are not readable without the
flow secret (the manifest's flow and operation CIDs name ciphertext), and say so. With
`--flow-secret FILE` the layers are decrypted (each checked against its signed plaintext hash),
the files listed, and the flow and operations the image carries checked against the manifest's
ciphertext CIDs (re-encrypted, they must give exactly those CIDs) before the flow is shown.

Given a UKI instead (its CID in the store, or the .efi file itself), lists its PE sections
(.linux, .initrd, .cmdline, .osrel and the stub's own) with the SHA-256 of each.
"""

from __future__ import annotations

import argparse
import stat
from pathlib import Path
from typing import Any

from cidboot.cli import UsageError, print_json
from cidboot.dataflow import checks
from cidboot.errors import VerificationError
from cidboot.ipld import dagcbor
from cidboot.ipld.cid import CID, DAG_CBOR, RAW
from cidboot.ipld.unixfs import ImportOptions, import_bytes
from cidboot.ipld.unixfs.exporter import export_file
from cidboot.store.blockstore import Blockstore, default_store_path
from cidboot.trust.appraisal import LAYER_ORDER, reference_values
from cidboot.trust.manifest import Manifest, ManifestFormatError, SignedManifest
from cidboot.trust.manifest.verify import utc
from cidboot.trust.private import carried, stream
from cidboot.trust.private import keys as layer_keys
from imagebuilder import uki
from imagebuilder.cpio import decompress, read_newc
from imagebuilder.initramfs import OPS


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("inspect", help="show an image's layers, measurements, flow graph and file list",
                       description="Read manifest CID from the block store and show its layers, sizes, "
                                   "measurements, flow graph and the files of each layer (the attack surface).")
    p.add_argument("cid", type=_cid_or_file, metavar="CID|FILE",
                   help="a manifest CID, or a UKI's CID or .efi file (then its PE sections are listed)")
    p.add_argument("--store", type=Path, help=f"block store directory (default: $CIDBOOT_STORE or {default_store_path()})")
    p.add_argument("--no-files", action="store_true", help="skip the per-layer file lists")
    p.add_argument("--flow-secret", type=Path, metavar="FILE",
                   help="an encrypted image's flow secret: decrypt its layers to list their files and check and "
                        "show the flow it carries")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=run)


class CarriedMismatch(VerificationError):
    """An encrypted image's carried flow or operation source does not re-encrypt to the CID the
    manifest names: the image and the manifest disagree about the flow."""


def open_layers(store: Blockstore, m: Manifest, secret: bytes) -> dict[str, bytes]:
    """Role -> plaintext of every layer (encrypted ones decrypted under their key from `secret`
    and checked against the manifest's plaintext hash and size)."""
    out: dict[str, bytes] = {}
    for lyr in m.layers:
        data = b"".join(export_file(lyr.cid, store.get))
        if lyr.plaintext is None:
            out[lyr.role] = data
            continue
        key = layer_keys.layer_key(secret, lyr.plaintext.sha256, lyr.role)
        try:
            out[lyr.role] = b"".join(layer_keys.decrypt_layer(key, [data], sha256=lyr.plaintext.sha256,
                                                              size=lyr.plaintext.size))
        except (stream.StreamVerificationError, stream.StreamFormatError) as e:
            e.args = (f"{lyr.role} layer {lyr.cid}: does not decrypt under this flow secret (another flow's "
                      f"secret?): {e}",)
            raise
    return out


def carried_flow(m: Manifest, layers: dict[str, bytes], secret: bytes) -> tuple[Any, dict[CID, bytes]]:
    """The dataflow and operation sources (by manifest CID) an encrypted image carries, each checked
    to re-encrypt to exactly the CID the manifest names (CarriedMismatch otherwise)."""
    from cidboot.stage.switch_root import parse_initramfs

    files = {mem.path: bytes(data) for role in ("config", "operations") if role in layers
             for mem, data in parse_initramfs(layers[role]).members}
    block = files.get(carried.FLOW_PATH)
    if block is None:
        raise CarriedMismatch(f"the config layer carries no {carried.FLOW_PATH}")
    flow_cid = CID.of(layer_keys.encrypt_layer(secret, block, carried.FLOW_ROLE).ciphertext, RAW)
    if flow_cid != m.flow:
        raise CarriedMismatch(f"the image's flow block encrypts to {flow_cid}, the manifest names {m.flow}")
    dataflow = dagcbor.decode(block)
    sources: dict[CID, bytes] = {}
    for name, op in sorted((dataflow.get("operations") or {}).items()):
        path = f"{OPS}/{op['implementation'].partition(':')[0].replace('.', '/')}.py"
        src, cid = files.get(path), m.operations.get(name)
        if src is None or cid is None:
            raise CarriedMismatch(f"operation {name}: {'no ' + path + ' in the operations layer' if src is None else 'no CID in the manifest'}")
        sealed = layer_keys.encrypt_layer(secret, src, carried.OPERATION_ROLE).ciphertext
        if import_bytes(sealed, None, ImportOptions(cid_version=1)).cid != cid:
            raise CarriedMismatch(f"operation {name}: the image's {path} does not encrypt to the manifest's {cid}")
        sources[cid] = src
    return dataflow, sources


def _cid_or_file(value: str) -> CID | Path:
    """An existing file is a UKI to read; anything else must parse as a CID."""
    if Path(value).is_file():
        return Path(value)
    try:
        return CID.parse(value)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"{value!r} is neither a file nor a CID ({e})") from None


def describe_uki(data: bytes, name: str) -> dict[str, Any]:
    """A UKI's sections and hashes (imagebuilder.uki.describe), UkiError when it is no PE image."""
    return {"uki": name, **uki.describe(data, name)}


def _print_uki(d: dict[str, Any]) -> None:
    print(f"uki      {d['uki']}  {d['size']} bytes  sha256 {d['sha256']}")
    print(f"machine  {d['machine']}  checksum {'ok' if d['checksum_ok'] else 'WRONG'}"
          f"{'' if d['unified'] else '  (no .linux/.initrd: not a UKI)'}")
    if d["cmdline"] is not None:
        print(f"cmdline  {d['cmdline']}")
    for line in (d["osrel"] or "").splitlines():
        print(f"osrel    {line}")
    print("sections")
    for s in d["sections"]:
        print(f"  {s['name']:<9} vma {s['vma']:>10} {s['size']:>10}  sha256 {s['sha256']}")


def not_a(what: str, cid: CID, block: bytes, why: str) -> ManifestFormatError:
    """What the block is instead, and where to read it: `imagebuilder show` decodes any block
    (a provenance node or EAT otherwise fails deep in a decoder: "271 trailing bytes")."""
    from imagebuilder.commands.show import decode_block

    return ManifestFormatError(f"{cid} is not {what} (it is a {decode_block(cid, block).kind}: {why}): "
                               f"use `imagebuilder show {cid}` to decode it")


def manifest_or_hint(cid: CID, block: bytes) -> Manifest:
    try:
        return SignedManifest.decode(block).manifest
    except ManifestFormatError as e:
        raise not_a("a signed manifest", cid, block, str(e)) from None


def _kind(mode: int) -> str:
    return "d" if stat.S_ISDIR(mode) else "l" if stat.S_ISLNK(mode) else "c" if stat.S_ISCHR(mode) else "-"


def pinning(m: Manifest) -> dict[str, bool]:
    """For a workload image: which measured layers the manifest pins with a reference value
    (cidboot.trust.appraisal.reference_values, what appraisal compares); empty for a firmware or
    bootstrap build's manifest, which records its own code hash and nothing below it."""
    if "image" not in m.measurements and len(m.measurements) == 1 and set(m.measurements) <= set(LAYER_ORDER):
        return {}
    return {name: ref is not None for name, ref in reference_values(m).items()}


def unpinned(m: Manifest) -> list[str]:
    return [name for name, ok in pinning(m).items() if not ok]


def describe(store: Blockstore, cid: CID, files: bool = True, secret: bytes | None = None) -> dict[str, Any]:
    m = manifest_or_hint(cid, store.get(cid))
    flow: dict[str, Any] = {}
    private = carried.private(m)
    if secret is not None and not private:
        raise UsageError(f"--flow-secret: manifest {cid} is not encrypted")
    plain = open_layers(store, m, secret) if secret is not None else {}
    df: Any = None
    sources: dict[CID, bytes] | None = None
    if private and secret is None:
        flow = {"encrypted": True}
    elif private and secret is not None:
        df, sources = carried_flow(m, plain, secret)
    elif m.flow is not None and store.has(m.flow):
        df = dagcbor.decode(store.get(m.flow))

    def read(c: CID) -> bytes:
        return sources[c] if sources is not None else b"".join(export_file(c, store.get))

    if df is not None:
        # the checks lock, build and `agent run` apply: a signed flow the agent would read
        # another way (or not run at all) is refused here too, with the same message
        model = checks.checked({"dataflow": df, "placement": m.placement, "policies": m.policies},
                               modules=checks.modules_by_cid(df, m.operations, read),
                               origin=f"manifest {cid}")
        flow = {"operations": {n: {"inputs": dict(op.inputs), "outputs": dict(op.outputs),
                                   "implementation": op.implementation} for n, op in model.operations.items()},
                "edges": sorted([a, b] for a, bs in checks.operation_edges(model).items() for b in bs)}
    layers = []
    for lyr in m.layers:
        entry: dict[str, Any] = {"role": lyr.role, "cid": str(lyr.cid), "size": lyr.size}
        if lyr.plaintext is not None:
            entry["plaintext"] = {"sha256": lyr.plaintext.sha256.hex(), "size": lyr.plaintext.size}
        if files and lyr.role != "kernel" and (lyr.plaintext is None or plain):
            data = plain.get(lyr.role) or b"".join(export_file(lyr.cid, store.get))
            entry["files"] = [{"path": f.path, "kind": _kind(f.mode), "mode": oct(stat.S_IMODE(f.mode)),
                               "size": f.size, **({"target": f.target} if f.target else {})}
                              for f in read_newc(decompress(data))]
        layers.append(entry)
    return {"manifest": str(cid), "name": m.name, "version": m.version, "expires": m.expires,
            "expires_utc": utc(m.expires),
            "cmdline": m.cmdline, "encrypted": private, "layers": layers,
            "measurements": {k: v.hex() for k, v in sorted(m.measurements.items())},
            "pinned": pinning(m),
            "flow_cid": str(m.flow) if m.flow else None, "flow": flow,
            "operations": {k: str(v) for k, v in sorted(m.operations.items())},
            "placement": m.placement, "policies": m.policies,
            "root": {"threshold": m.root.threshold, "keys": len(m.root.keys)}}


def run(args: argparse.Namespace) -> int:
    if isinstance(args.cid, Path) or args.cid.codec != DAG_CBOR:  # not a manifest: a UKI (file or UnixFS)
        if isinstance(args.cid, Path):
            data, name = args.cid.read_bytes(), str(args.cid)
        else:
            data, name = b"".join(export_file(args.cid, Blockstore(args.store).get)), str(args.cid)
        try:
            u = describe_uki(data, name)
        except uki.UkiError as e:
            if isinstance(args.cid, Path):
                raise
            raise not_a("a manifest or a UKI", args.cid, Blockstore(args.store).get(args.cid), str(e)) from None
        if args.json:
            print_json(u)
        else:
            _print_uki(u)
        return 0
    secret = layer_keys.load_secret(args.flow_secret) if args.flow_secret else None
    d = describe(Blockstore(args.store), args.cid, files=not args.no_files, secret=secret)
    if args.json:
        print_json(d)
        return 0
    print(f"manifest {d['manifest']}  {d['name']} v{d['version']}  expires {d['expires_utc']}")
    print(f"cmdline  {d['cmdline']}")
    print(f"signers  {d['root']['threshold']} of {d['root']['keys']} root keys")
    for k, v in d["measurements"].items():
        print(f"measure  {k}: {v}")
    for k, ok in d["pinned"].items():
        print(f"pinned   {k}: {'yes' if ok else 'NO: no reference value, any ' + k + ' is accepted (appraisal: warning)'}")
    print("layers")
    for lyr in d["layers"]:
        n = f"  {len(lyr['files'])} files" if "files" in lyr else ""
        if "plaintext" in lyr:
            n = f"  encrypted: plaintext sha256 {lyr['plaintext']['sha256']} {lyr['plaintext']['size']} bytes{n}"
        print(f"  {lyr['role']:<11} {lyr['cid']} {lyr['size']:>10}{n}")
    if d.get("encrypted") and d["flow"].get("encrypted"):
        print(f"flow {d['flow_cid']}  encrypted (the flow, the operations' code and the layers' files are "
              f"readable only with the flow secret)")
        for name, cid in sorted(d["operations"].items()):
            print(f"  {name}  code {cid} (encrypted)")
    elif d["flow"]:
        print(f"flow {d['flow_cid']}")
        for name, op in sorted(d["flow"]["operations"].items()):
            print(f"  {name} = {op['implementation']}({_pairs(op['inputs'])}) -> {_pairs(op['outputs'])}"
                  f"  code {d['operations'].get(name)}")
        for a, b in d["flow"]["edges"]:
            print(f"  {a} -> {b}")
    for role, ops in sorted(d["placement"].items()):
        print(f"placement {role}: {', '.join(ops)}")
    for pol in d["policies"]:
        print(f"policy {policy_line(pol)}")
    for lyr in d["layers"]:
        for f in lyr.get("files", []):
            tgt = f" -> {f['target']}" if "target" in f else ""
            print(f"{lyr['role']:<11} {f['kind']}{f['mode'][2:]:>4} {f['size']:>9} /{f['path']}{tgt}")
    return 0


def _pairs(m: dict[str, str]) -> str:
    """`param: definition, ...` (an operation's inputs or outputs, as flow.yaml writes them)."""
    return ", ".join(f"{k}: {v}" for k, v in m.items())


def policy_line(pol: Any) -> str:
    """`NAME: veto operation=count producer=seed unless measurement=image` for a policy map."""
    if not isinstance(pol, dict):
        return str(pol)
    parts = [f"{pol.get('name', '(unnamed)')}:"]
    for key in ("veto", "unless"):
        cond = pol.get(key)
        if isinstance(cond, dict):
            parts.append(key + " " + " ".join(f"{k}={','.join(map(str, v)) if isinstance(v, list) else v}"
                                              for k, v in sorted(cond.items())))
    parts += [f"{k}={v}" for k, v in sorted(pol.items()) if k not in ("name", "veto", "unless")]
    return " ".join(parts)
