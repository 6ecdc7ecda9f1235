"""`imagebuilder verify MANIFEST_CID|FILE`: check a signed manifest offline, printing every check."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from cidboot.cli import print_json
from cidboot.errors import CidbootError, FormatError
from cidboot.ipld.cid import CID
from cidboot.ipld.unixfs import export_file
from cidboot.store.blockstore import Blockstore
from cidboot.trust.keys import load_root
from cidboot.trust.manifest import Check, SignedManifest, TrustState, check_layer, verify_manifest
from imagebuilder.commands.inspect import pinning


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("verify", help="verify a signed manifest (signatures, expiry, rollback, layers)",
                       description=__doc__)
    p.add_argument("manifest", help="manifest CID (read from the store) or a file holding the signed block")
    p.add_argument("--root", required=True, type=Path, help="root-of-trust file (the trust anchor)")
    p.add_argument("--state", type=Path, help="trust state file: remembers versions and rotations (rollback protection)")
    p.add_argument("--name", help="the manifest name the device may boot (its role's name in the signed device "
                                  "registry); default: the name pinned in --state, if any")
    p.add_argument("--store", type=Path, help="block store (default: $CIDBOOT_STORE)")
    p.add_argument("--no-layers", action="store_true", help="do not check that layers are present with listed sizes")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    store = Blockstore(args.store)
    if Path(args.manifest).exists():
        block = Path(args.manifest).read_bytes()
    else:
        try:
            cid = CID.parse(args.manifest)
        except FormatError:
            raise CidbootError(f"{args.manifest}: neither a file nor a CID") from None
        block = store.get(cid)
    # The trust anchor and state are the verifier's own inputs, not checks of the manifest: a
    # missing or damaged file is an error (stderr, exit 1), not a failed check on stdout.
    anchor = load_root(args.root)
    state = TrustState.load(args.state, anchor) if args.state else TrustState(anchor)
    checks: list[Check] = []
    ok = True
    try:
        signed = SignedManifest.decode(block)
        checks.append(Check("format", True, f"signed manifest {signed.manifest.name} v{signed.manifest.version}"))
        checks += verify_manifest(signed, state, now=int(time.time()), persist=bool(args.state),
                                  cid=None if Path(args.manifest).exists() else CID.parse(args.manifest),
                                  expected_name=args.name)
        if not args.no_layers:
            for layer in signed.manifest.layers:
                size = sum(len(b) for b in export_file(layer.cid, store.get))
                check_layer(signed.manifest, layer.cid, size)
                enc = (f"; encrypted, plaintext sha256 {layer.plaintext.sha256.hex()} {layer.plaintext.size} bytes "
                       f"(not checked here: that needs the layer key)") if layer.plaintext is not None else ""
                checks.append(Check(f"layer {layer.role}", True,
                                    f"{layer.cid} present, {size} <= {layer.size} bytes{enc}"))
    except CidbootError as e:
        ok = False
        checks.append(Check(type(e).__name__, False, str(e)))
    pinned = pinning(signed.manifest) if ok else {}
    loose = [name for name, p in pinned.items() if not p]
    warnings = [f"unpinned: no reference value for {', '.join(loose)}: any {' or '.join(loose)} is accepted, "
                f"appraisal of devices booting it is at best 'warning'"] if loose else []
    if args.json:
        print_json({"ok": ok, "checks": [c.to_obj() for c in checks], "pinned": pinned, "warnings": warnings})
    else:
        for c in checks:
            print(f"{'✓' if c.ok else '✗'} {c.name}: {c.detail}")
        for name, p in pinned.items():
            print(f"{'✓' if p else '!'} pinned {name}: {'reference value in the manifest' if p else 'NO reference value'}")
        for w in warnings:
            print(f"! {w}")
    return 0 if ok else 1

