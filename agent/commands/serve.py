"""`agent serve`: the attestation API (and optionally a verifier) on this host, for development.

The identity is a software one: a UDS kept in `--identity DIR/uds` (made on first use) run
through the same DICE derivation the boot stages use. With `--manifest`, the image layer is
derived from that manifest and the firmware/bootstrap layers from its reference values, so
a verifier given the manifest affirms it: a simulation of a measured boot, never a proof of
one. `--register FILE` adds this identity's root to a device-roots file.
"""

from __future__ import annotations

import argparse
import hashlib
from pathlib import Path

from agent.attestation_api import Attester, serve_api
from agent.commands.attest import tpm_references
from agent.identity import uds as identity_uds
from agent.verifier import Verifier
from cidboot.cli import UsageError
from cidboot.errors import CidbootError
from cidboot.ipld.cid import CID
from cidboot.store.blockstore import Blockstore
from cidboot.trust.appraisal import DeviceRoots
from cidboot.trust.dice.derive import DiceInputs
from cidboot.trust.dice.software import DerivedIdentity, derive_layers
from cidboot.trust.manifest import SignedManifest, verify_threshold
from cidboot.trust.measure import image_inputs


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("serve", help="serve the attestation API (and a verifier) for development", description=__doc__)
    p.add_argument("--identity", type=Path, default=Path(".cidboot-identity"), help="directory of the software identity")
    p.add_argument("--role", default="default", help="role claimed in evidence")
    p.add_argument("--manifest", help="CID of the signed manifest to simulate booting")
    p.add_argument("--store", type=Path, help="block store (manifest; served on /ipfs/)")
    p.add_argument("--register", type=Path, metavar="FILE", help="add this identity's root and --role to a device-roots file")
    p.add_argument("--verifier", action="store_true", help="also serve POST /attestation/session[/ID]")
    p.add_argument("--roots", type=Path, help="device roots the verifier trusts (with --verifier)")
    p.add_argument("--allow-unmeasured", action="store_true", help="verifier: unmeasured boots give a warning")
    p.add_argument("--uki", type=Path, metavar="FILE",
                   help="verifier: the bootstrap UKI TPM devices boot (their PCR 4/11 references)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.set_defaults(func=run)


def software_identity(directory: Path, signed: SignedManifest | None, mcid: CID | None) -> DerivedIdentity:
    """The same DIR/uds as `agent run --identity DIR` (agent.identity), so one development
    device serves and runs flows under one root key. Unlike agent.identity.development, the
    firmware/bootstrap layers take the manifest's reference values: `serve` exists to be
    attested against that manifest."""
    uds = identity_uds(directory)
    if len(uds) != 32:
        raise CidbootError(f"{directory / 'uds'}: a UDS is 32 bytes, found {len(uds)}")
    ref = signed.manifest.measurements if signed else {}
    layers = [DiceInputs(code_hash=ref.get(n, hashlib.sha512(b"software " + n.encode()).digest()))
              for n in ("firmware", "bootstrap")]
    if signed is not None and mcid is not None:
        signers = verify_threshold(signed.signatures, signed.payload(), signed.manifest.root, f"manifest {mcid}")
        layers.append(image_inputs(mcid, signed.manifest, [bytes.fromhex(s) for s in signers]))
    return derive_layers(uds, layers)


def run(args: argparse.Namespace) -> int:
    if (args.roots or args.uki) and not args.verifier:
        raise UsageError("--roots and --uki are for --verifier")
    store = Blockstore(args.store) if args.store or args.manifest else None
    signed = mcid = None
    if args.manifest:
        assert store is not None
        mcid = CID.parse(args.manifest)
        signed = SignedManifest.decode(store.get(mcid))
    ident = software_identity(args.identity, signed, mcid)
    if args.register:
        roots = DeviceRoots.load(args.register) if args.register.exists() else DeviceRoots()
        did = roots.add(ident.root_public_key, args.role, role=args.role)  # the registry is the role's authority
        roots.save(args.register)
        print(f"registered device {did} in {args.register}")
    attester = Attester.from_derived(ident, manifest_cid=mcid, boot_mode="measured" if signed else "unmeasured",
                                     role=args.role)
    srv = serve_api(attester, args.host, args.port, store=store)
    if args.verifier:
        srv.mount(*Verifier(DeviceRoots.load(args.roots) if args.roots else DeviceRoots(),
                            signed.manifest if signed else None, mcid, args.allow_unmeasured,
                            tpm_references=tpm_references(args.uki)).routes())
    print(f"agent: serving {srv.url}", flush=True)
    try:
        srv.serve_forever()
    finally:
        srv.server_close()
    return 0
