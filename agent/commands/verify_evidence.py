"""`agent verify-evidence FILE`: appraise EAT evidence as a verifier does, offline."""

from __future__ import annotations

import argparse
from pathlib import Path

from cidboot.cli import UsageError, print_json
from cidboot.ipld.cid import CID
from cidboot.store.blockstore import Blockstore
from cidboot.trust.appraisal import AppraisalResult, DeviceRoots, appraise
from cidboot.trust.manifest import SignedManifest
from cidboot.trust.tpm.appraise import TpmReferences

SYMBOL = {"affirming": "✓", "warning": "!", "contraindicated": "✗", "none": "?"}


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("verify-evidence", help="appraise attestation evidence (EAT)", description=__doc__)
    p.add_argument("file", type=Path, help="evidence (COSE_Sign1 EAT) file")
    p.add_argument("--nonce", required=True, help="the challenge nonce, hex (8 to 64 bytes)")
    p.add_argument("--roots", required=True, type=Path, help="registered device roots (JSON)")
    p.add_argument("--manifest", required=True, help="CID of the signed manifest the device should run")
    p.add_argument("--store", type=Path, help="block store holding the manifest (default: $CIDBOOT_STORE)")
    p.add_argument("--allow-unmeasured", action="store_true", help="unmeasured (plain PXE) boots give a warning, not a refusal")
    p.add_argument("--uki", type=Path, metavar="FILE", help="TPM devices: the bootstrap UKI (PCR 4/11 references)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    try:
        nonce = bytes.fromhex(args.nonce)
    except ValueError:
        raise UsageError(f"--nonce must be hex, got {args.nonce!r}") from None
    mcid = CID.parse(args.manifest)
    signed = SignedManifest.decode(Blockstore(args.store).get(mcid))
    res = appraise(args.file.read_bytes(), expected_nonce=nonce, roots=DeviceRoots.load(args.roots),
                   manifest=signed.manifest, manifest_cid=mcid, allow_unmeasured=args.allow_unmeasured,
                   tpm_references=TpmReferences.for_uki(args.uki.read_bytes()) if args.uki else None)
    return print_appraisal(res, as_json=args.json)


def print_appraisal(res: AppraisalResult, *, as_json: bool) -> int:
    """Every check with its reason (or the result as JSON); exit 0 only when affirming."""
    if as_json:
        print_json(res.to_obj())
    else:
        for c in res.checks:
            print(f"{SYMBOL[c.status]} {c.name}: {c.reason}")
        print(f"status: {res.status}")
    return 0 if res.affirming else 1
