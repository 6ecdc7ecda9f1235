"""`imagebuilder references MANIFEST_CID|FILE [--uki FILE|CID] [--corim] [-o FILE]`: the reference
values a verifier derives from a signed manifest (and the bootstrap UKI), printed, as JSON, or
exported as a CoRIM (draft-ietf-rats-corim; the subset is in cidboot/trust/corim.py).

These are exactly what cidboot's own appraisal compares with (no hand-kept list): the image's
DICE code hash, the bootstrap's PCR 15 events and the PCR 15 value they give, the firmware and
bootstrap code hashes the manifest pins, and with --uki the UKI's PCR 4 digests and PCR 11
section events. The CoRIM is unsigned: its authority is the signed manifest it names by CID."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from cidboot.cli import print_json
from cidboot.errors import CidbootError, FormatError
from cidboot.ipld.cid import CID
from cidboot.ipld.unixfs import export_file
from cidboot.store.blockstore import Blockstore
from cidboot.trust import corim
from cidboot.trust.manifest import SignedManifest


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("references", help="reference values derived from a signed manifest (and UKI); --corim",
                       description=__doc__)
    p.add_argument("manifest", help="manifest CID (read from the store) or a file holding the signed block")
    p.add_argument("--uki", metavar="FILE|CID", help="the bootstrap UKI (a file, or its CID in the store): "
                                                      "adds the PCR 4 and PCR 11 references")
    p.add_argument("--store", type=Path, help="block store (default: $CIDBOOT_STORE)")
    p.add_argument("--corim", action="store_true", help="write a CoRIM (CBOR) instead of the list")
    p.add_argument("-o", "--output", type=Path, metavar="FILE", help="write to FILE (the CoRIM is binary: needed "
                                                                        "unless stdout is redirected)")
    p.add_argument("--json", action="store_true", help="the reference values as JSON")
    p.set_defaults(func=run)


def _block(arg: str, store: Blockstore, what: str) -> tuple[bytes, CID | None]:
    if Path(arg).is_file():
        return Path(arg).read_bytes(), None
    try:
        cid = CID.parse(arg)
    except FormatError:
        raise CidbootError(f"{what} {arg}: neither a file nor a CID") from None
    return store.get(cid), cid


def _uki(arg: str, store: Blockstore) -> bytes:
    if Path(arg).is_file():
        return Path(arg).read_bytes()
    try:
        cid = CID.parse(arg)
    except FormatError:
        raise CidbootError(f"--uki {arg}: neither a file nor a CID") from None
    return b"".join(export_file(cid, store.get))


def to_json(c: corim.Corim) -> dict[str, Any]:
    algs = {corim.SHA256: "sha-256", corim.SHA512: "sha-512"}
    envs = []
    for env in c.environments:
        ms: list[dict[str, Any]] = []
        for m in env.measurements:
            if m.digests:
                ms.append({"key": m.mkey, "digests": [{"alg": algs[a], "value": d.hex()} for a, d in m.digests]})
            else:
                ms.append({"key": m.mkey, "pcrs": {str(r): [{"alg": algs[a], "value": d.hex()} for a, d in ds]
                                                   for r, ds in m.registers}})
        envs.append({"model": env.model, "layer": env.layer, "measurements": ms})
    return {"id": c.id, "not_after": c.not_after, "environments": envs}


def run(args: argparse.Namespace) -> int:
    store = Blockstore(args.store)
    block, cid = _block(args.manifest, store, "manifest")
    signed = SignedManifest.decode(block)
    if cid is not None and cid.multihash != signed.cid.multihash:
        raise CidbootError(f"manifest {cid}: the store returned another block")
    uki = _uki(args.uki, store) if args.uki else None
    refs = corim.references(signed.cid, signed.manifest, uki)
    if args.corim:
        data = corim.encode(refs)
        if args.output:
            args.output.write_bytes(data)
        elif sys.stdout.isatty():
            raise CidbootError("--corim writes CBOR: give -o FILE or redirect stdout")
        else:
            sys.stdout.buffer.write(data)
            sys.stdout.buffer.flush()
        return 0
    if args.json:
        print_json(to_json(refs))
        return 0
    out = [f"{refs.id} (valid until {refs.not_after})"]
    for env in to_json(refs)["environments"]:
        out.append(f"{env['model']} (layer {env['layer']}):")
        for m in env["measurements"]:
            if "digests" in m:
                out += [f"  {m['key']}: {d['alg']} {d['value']}" for d in m["digests"]]
            else:
                out += [f"  {m['key']}: PCR {r} {d['alg']} {d['value']}" for r, ds in m["pcrs"].items() for d in ds]
    text = "\n".join(out) + "\n"
    if args.output:
        args.output.write_text(text)
    else:
        sys.stdout.write(text)
    return 0
