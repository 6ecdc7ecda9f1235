"""`imagebuilder keygen`: make a signing key pair and/or a flow secret (`--flow-secret`, for flows
with `encrypt: true`: docs/privacy.md); `imagebuilder root`: make a root-of-trust file."""

from __future__ import annotations

import argparse
from pathlib import Path

from cidboot.cli import UsageError, print_json
from cidboot.trust.cose_key import key_id
from cidboot.trust.keys import ALGS, generate, load_public_key, write_keypair, write_root
from cidboot.trust.manifest.model import RootOfTrust
from cidboot.trust.private import keys as flow_keys


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("keygen", help="generate a manifest signing key or a flow secret",
                       description="Write OUT.pem (private, mode 0600) and OUT.pub (COSE_Key); print the key id. "
                                   "With --flow-secret FILE, (also) write a new 32-byte flow secret to FILE "
                                   "(mode 0600, never overwritten) for flows with `encrypt: true`; keep it beside the "
                                   "signing keys (imagebuilder build looks for KEYDIR/NAME.flow.secret), never in an "
                                   "image, and back it up: without it no layer key of the flow can be derived again.")
    p.add_argument("-o", "--output", help="path stem for OUT.pem and OUT.pub")
    p.add_argument("stem", nargs="?", help="the same as -o (either one)")
    p.add_argument("--alg", choices=ALGS, default="ed25519")
    p.add_argument("--flow-secret", type=Path, metavar="FILE",
                   help="write a new flow secret to FILE (refused if FILE exists)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=run_keygen)
    r = sub.add_parser("root", help="write a root-of-trust file from public keys",
                       description="Write the trust anchor a bootstrap and verifiers carry: keys and threshold.")
    r.add_argument("pubkeys", nargs="+", type=Path, help=".pub files")
    r.add_argument("--threshold", type=int, default=1)
    r.add_argument("--version", type=int, default=1, dest="root_version")
    r.add_argument("-o", "--output", required=True, type=Path)
    r.set_defaults(func=run_root)


def run_keygen(args: argparse.Namespace) -> int:
    if args.stem and args.output and args.stem != args.output:
        raise UsageError(f"two outputs given: -o {args.output} and {args.stem}")
    args.output = args.output or args.stem
    if not args.output and not args.flow_secret:
        raise UsageError("where to write the key: -o STEM (writes STEM.pem and STEM.pub), "
                         "or --flow-secret FILE for a flow secret")
    out: dict[str, str] = {}
    if args.flow_secret:
        if args.flow_secret.exists():  # checked first, so nothing is written when it is refused
            raise UsageError(f"--flow-secret {args.flow_secret} exists; refusing to overwrite a flow secret "
                             f"(losing it loses every layer key of the flow)")
    if args.output:
        key = generate(args.alg)
        priv, pub = write_keypair(key, args.output)
        out = {"private": str(priv), "public": str(pub), "key_id": key_id(key.public_key()).hex(), "alg": args.alg}
    if args.flow_secret:
        flow_keys.write_secret(args.flow_secret)  # O_EXCL, mode 0600
        out["flow_secret"] = str(args.flow_secret)
    if args.json:
        print_json(out)
    else:
        print(out.get("key_id") or out["flow_secret"])
    return 0


def run_root(args: argparse.Namespace) -> int:
    root = RootOfTrust.from_public_keys([load_public_key(p) for p in args.pubkeys], args.threshold, args.root_version)
    write_root(root, args.output)
    print(args.output)
    return 0
