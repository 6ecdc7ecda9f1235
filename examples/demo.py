"""`make demo`: the cidboot pipeline end to end on the embedded defaults, in one process tree.

What runs for real: content addressing into the embedded block store, the trustless gateway
(a separate `bootstrap gateway` process on loopback), the verifying fetch client, manifest
signing and verification (threshold, expiry, rollback state), the Open Profile for DICE
derivation of firmware -> bootstrap -> image, EAT evidence and appraisal.
What is not yet wired (issue 6): booting QEMU guests over PXE; here the device's three DICE
layers are derived in software by `cidboot.trust.dice.software`, the same derivation the stages run.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from cidboot.ipld.cid import DAG_CBOR
from cidboot.ipld.unixfs import ImportOptions, export_file, import_path
from cidboot.store.blockstore import Blockstore
from cidboot.store.gateway.client import fetch
from cidboot.trust.appraisal import DeviceRoots, appraise
from cidboot.trust.cose_key import key_id, raw_public_bytes
from cidboot.trust.dice.derive import DiceInputs, DiceMode
from cidboot.trust.dice.software import derive_layers
from cidboot.trust.eat import build_evidence, ueid_for
from cidboot.trust.keys import generate
from cidboot.trust.manifest import (
    Layer,
    Manifest,
    RootOfTrust,
    SignedManifest,
    TrustState,
    check_layer,
    sign_manifest,
    verify_manifest,
)
from cidboot.trust.measure import code_hash_of_blobs, image_inputs

HERE = Path(__file__).parent


def step(msg: str) -> None:
    print(f"==> {msg}", flush=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="out/demo", type=Path)
    args = ap.parse_args(argv)
    out: Path = args.out
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    t0 = time.monotonic()
    stamps: dict[str, float] = {}

    step("publish: import the hello layer and sign a manifest (2-of-3 keys) into the embedded store")
    origin = Blockstore(out / "server-store")
    layer = import_path(HERE / "hello" / "greeting.txt", origin, ImportOptions(cid_version=1))
    keys = [generate() for _ in range(3)]
    root = RootOfTrust.from_public_keys([k.public_key() for k in keys], threshold=2)
    fw_hash, bs_hash = code_hash_of_blobs([b"demo firmware"]), code_hash_of_blobs([b"demo bootstrap"])
    manifest = Manifest("hello", 1, int(time.time()) + 86400, (Layer(layer.cid, layer.size, "config"),), root,
                        {"firmware": fw_hash, "bootstrap": bs_hash})
    signed = sign_manifest(manifest, keys[:2])
    mcid = origin.put_block(signed.encode(), DAG_CBOR)
    origin.pin(mcid)
    stamps["published"] = time.monotonic() - t0

    step("serve: start `bootstrap gateway` on loopback")
    gw = subprocess.Popen([sys.executable, "-m", "bootstrap", "gateway", "--store", str(origin.path), "--listen", "127.0.0.1:0"],
                          stdout=subprocess.PIPE, text=True)
    try:
        assert gw.stdout is not None
        url = gw.stdout.readline().split()[-1]
        step(f"device: fetch manifest {mcid} and its layers through {url}, verifying every block")
        device_store = Blockstore(out / "device-store")
        res = fetch(mcid, [url], device_store)
        stamps["fetched"] = time.monotonic() - t0
    finally:
        gw.terminate()
        gw.wait(10)

    step("device: verify the manifest against the trust anchor (threshold, expiry, rollback)")
    got = SignedManifest.decode(device_store.get(mcid))
    checks = verify_manifest(got, TrustState.load(out / "device-trust-state.json", root))
    for lyr in got.manifest.layers:
        data = b"".join(export_file(lyr.cid, device_store.get))
        check_layer(got.manifest, lyr.cid, len(data))
    greeting = b"".join(export_file(layer.cid, device_store.get)).decode().strip()

    step("device: DICE firmware -> bootstrap -> image (software engine; QEMU boot chain: issue 6)")
    uds = os.urandom(32)
    signer_ids = [key_id(k.public_key()) for k in keys[:2]]
    ident = derive_layers(uds, [DiceInputs(code_hash=fw_hash, mode=DiceMode.NORMAL),
                                DiceInputs(code_hash=bs_hash, mode=DiceMode.NORMAL),
                                image_inputs(mcid, got.manifest, signer_ids)])
    roots = DeviceRoots()
    device_id = roots.add(ident.root_public_key, "demo-device-1", role="hello")  # the registry says what it is
    roots.save(out / "device-roots.json")

    step("verifier: challenge with a fresh nonce and appraise the evidence")
    nonce = os.urandom(32)
    evidence = build_evidence(nonce=nonce, leaf_key=ident.leaf_key, chain=ident.chain,
                              ueid=ueid_for(raw_public_bytes(ident.root_public_key)),
                              measurements={"firmware": fw_hash, "bootstrap": bs_hash}, manifest_cid=mcid, role="hello")
    (out / "evidence.cbor").write_bytes(evidence)
    appraisal = appraise(evidence, expected_nonce=nonce, roots=roots, manifest=got.manifest, manifest_cid=mcid)
    stamps["appraised"] = time.monotonic() - t0

    report = {
        "manifest_cid": str(mcid),
        "devices": [{
            "device_id": device_id,
            "appraisal": appraisal.to_obj(),
            "manifest_checks": [c.to_obj() for c in checks],
            "measurements": appraisal.measurements,
            "flow_result": {"greeting": greeting},
            "fetch": {"blocks": res.blocks_fetched, "bytes": res.bytes_fetched},
            "stage_seconds": {k: round(v, 3) for k, v in stamps.items()},
        }],
        "not_yet": "QEMU/PXE boot chain (issue 6) and dataflow execution (issue 7): device layers derived in software",
    }
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    print()
    print(f"manifest {mcid}")
    print(f"device {device_id[:16]}...  appraisal: {appraisal.status}  result: {greeting!r}")
    for c in appraisal.checks:
        print(f"   {c.status:<15} {c.name}: {c.reason}")
    print(f"report: {out / 'report.json'}  ({time.monotonic() - t0:.2f} s)")
    return 0 if appraisal.affirming else 1


if __name__ == "__main__":
    sys.exit(main())
