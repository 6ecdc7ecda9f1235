"""`agent attest URL`: challenge an agent with a fresh nonce and appraise its evidence locally,
or, with `--verifier VURL`, let a remote verifier (agent/verifier.py) issue the nonce and
appraise: the verifier's session nonce goes to the agent, the evidence back to the verifier.

DICE- and TPM-rooted agents alike (the evidence says which): the same checks list and --json.
For a TPM device, `--uki FILE` gives the bootstrap UKI the PCR 4/11 references are derived
from. `--ear --ear-key PEM` prints the result as an EAR (draft-ietf-rats-ear) JWT signed with
the verifier's key instead of the checks list."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

from agent import httpclient
from agent.commands.verify_evidence import SYMBOL, print_appraisal
from cidboot.cli import UsageError, print_json
from cidboot.errors import CidbootError
from cidboot.ipld.cid import CID
from cidboot.store.blockstore import Blockstore
from cidboot.trust import keys
from cidboot.trust.appraisal import AFFIRMING, AppraisalResult, DeviceRoots, appraise
from cidboot.trust.ear import ear_claims, sign_ear
from cidboot.trust.manifest import Manifest, SignedManifest
from cidboot.trust.tpm.appraise import TpmReferences

NONCE_BYTES = 32


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("attest", help="challenge an agent (GET /attestation) and appraise its evidence",
                       description=__doc__)
    p.add_argument("url", help="the agent's base URL, e.g. http://10.0.0.5:8000")
    p.add_argument("--roots", type=Path, help="registered device roots (JSON); without it every device is unknown")
    p.add_argument("--manifest", help="CID of the signed manifest the agent should run")
    p.add_argument("--store", type=Path, help="block store holding the manifest (default: $CIDBOOT_STORE)")
    p.add_argument("--manifest-file", type=Path, metavar="F",
                   help="the signed manifest block as a file (its CID is computed from it); instead of --manifest")
    p.add_argument("--allow-unmeasured", action="store_true", help="unmeasured boots give a warning, not a refusal")
    p.add_argument("--verifier", metavar="VURL",
                   help="appraise on this verifier (POST /attestation/session) instead of locally")
    p.add_argument("--timeout", type=float, default=10.0, help="seconds to wait for the agent (default 10)")
    p.add_argument("--uki", type=Path, metavar="FILE",
                   help="the bootstrap UKI a TPM device booted: PCR 4 and 11 references are derived from it")
    p.add_argument("--json", action="store_true", help="print the appraisal result as JSON")
    p.add_argument("--ear", action="store_true",
                   help="print the result as an EAR (EAT Attestation Result) JWT signed with --ear-key")
    p.add_argument("--ear-key", type=Path, metavar="PEM", help="the verifier's private key that signs the EAR")
    p.set_defaults(func=run)


def tpm_references(uki: Path | None) -> TpmReferences | None:
    """PCR 4/11 references from the UKI file (its Authenticode and section hashes)."""
    if uki is None:
        return None
    try:
        return TpmReferences.for_uki(uki.read_bytes())
    except OSError as e:
        raise CidbootError(f"--uki: {e}") from None


def print_ear(res: AppraisalResult, nonce: bytes, key_path: Path) -> int:
    print(sign_ear(ear_claims(res, nonce=nonce), keys.load_private_key(key_path)))
    return 0 if res.affirming else 1


def _http(method: str, url: str, path: str, timeout: float, body: bytes | None = None,
          ctype: str = "application/eat+cwt") -> tuple[int, bytes]:
    return httpclient.request(method, url, path, body=body, ctype=ctype, accept=ctype, timeout=timeout)


def get_evidence(url: str, nonce: bytes, timeout: float) -> bytes:
    status, body = _http("GET", url, f"/attestation?nonce={nonce.hex()}", timeout)
    if status != 200:
        raise CidbootError(f"{url}/attestation: HTTP {status}: {body[:200].decode(errors='replace').strip()}")
    return body


def via_verifier(url: str, verifier: str, timeout: float) -> dict[str, Any]:
    """Session from the verifier, evidence from the agent for its nonce, appraisal from the verifier."""
    status, body = _http("POST", verifier, "/attestation/session", timeout, b"", "application/json")
    try:
        if status != 201:
            raise ValueError(f"HTTP {status}: {body[:200].decode(errors='replace').strip()}")
        sess = json.loads(body)
        session, nonce = str(sess["session"]), bytes.fromhex(sess["nonce"])
    except (ValueError, KeyError, TypeError) as e:
        raise CidbootError(f"{verifier}/attestation/session: {e}") from None
    evidence = get_evidence(url, nonce, timeout)
    status, body = _http("POST", verifier, f"/attestation/session/{session}", timeout, evidence)
    try:
        obj = json.loads(body)
    except ValueError:
        obj = None
    if not isinstance(obj, dict) or "status" not in obj:
        raise CidbootError(f"{verifier}/attestation/session/{session}: HTTP {status}: "
                           f"{body[:200].decode(errors='replace').strip()}")
    return obj


def load_manifest(args: argparse.Namespace) -> tuple[Manifest | None, CID | None]:
    """The manifest to compare measurements with: by CID from a store, or a block file whose
    CID is its hash (either way the bytes are exactly what the CID names)."""
    if args.store is not None and args.manifest is None:
        raise UsageError("--store needs --manifest")
    if args.manifest and args.manifest_file:
        raise UsageError("give --manifest CID or --manifest-file F, not both")
    if args.manifest_file:
        try:
            signed = SignedManifest.decode(args.manifest_file.read_bytes())
        except OSError as e:
            raise CidbootError(f"--manifest-file: {e}") from None
        return signed.manifest, signed.cid
    if args.manifest:
        mcid = CID.parse(args.manifest)
        return SignedManifest.decode(Blockstore(args.store).get(mcid)).manifest, mcid
    return None, None


def run(args: argparse.Namespace) -> int:
    if args.ear != (args.ear_key is not None):
        raise UsageError("--ear and --ear-key go together: an EAR is signed with the verifier's key")
    if args.ear and args.json:
        raise UsageError("give --ear or --json, not both")
    if args.verifier:
        if args.ear:
            raise UsageError("--ear signs a local appraisal; with --verifier the remote verifier appraises")
        if args.roots or args.manifest or args.manifest_file or args.allow_unmeasured or args.uki:
            raise UsageError("--verifier appraises with the verifier's own roots and manifest: "
                               "drop --roots/--manifest/--manifest-file/--allow-unmeasured/--uki")
        obj = via_verifier(args.url, args.verifier, args.timeout)
        if args.json:
            print_json(obj)
        else:
            for c in obj.get("checks", []):
                print(f"{SYMBOL.get(c.get('status'), '?')} {c.get('check')}: {c.get('reason')}")
            print(f"status: {obj['status']}")
        return 0 if obj["status"] == AFFIRMING else 1
    manifest, mcid = load_manifest(args)
    roots = DeviceRoots.load(args.roots) if args.roots else DeviceRoots()
    nonce = os.urandom(NONCE_BYTES)
    refs = tpm_references(args.uki)
    res = appraise(get_evidence(args.url, nonce, args.timeout), expected_nonce=nonce, roots=roots, manifest=manifest,
                   manifest_cid=mcid, allow_unmeasured=args.allow_unmeasured, tpm_references=refs)
    if args.ear:
        return print_ear(res, nonce, args.ear_key)
    return print_appraisal(res, as_json=args.json)
