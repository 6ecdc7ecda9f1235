"""`imagebuilder keygen`: make a signing key pair; `imagebuilder root`: make a root-of-trust file."""

from __future__ import annotations

import argparse
from pathlib import Path

from cidboot.cli import UsageError, print_json
from cidboot.trust.cose_key import key_id
from cidboot.trust.keys import ALGS, generate, load_public_key, write_keypair, write_root
from cidboot.trust.manifest.model import RootOfTrust


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("keygen", help="generate a manifest signing key",
                       description="Write OUT.pem (private, mode 0600) and OUT.pub (COSE_Key); print the key id.")
    p.add_argument("-o", "--output", help="path stem for OUT.pem and OUT.pub")
    p.add_argument("stem", nargs="?", help="the same as -o (either one)")
    p.add_argument("--alg", choices=ALGS, default="ed25519")
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
    if not args.output:
        raise UsageError("where to write the key: -o STEM (writes STEM.pem and STEM.pub)")
    key = generate(args.alg)
    priv, pub = write_keypair(key, args.output)
    kid = key_id(key.public_key()).hex()
    if args.json:
        print_json({"private": str(priv), "public": str(pub), "key_id": kid, "alg": args.alg})
    else:
        print(kid)
    return 0


def run_root(args: argparse.Namespace) -> int:
    root = RootOfTrust.from_public_keys([load_public_key(p) for p in args.pubkeys], args.threshold, args.root_version)
    write_root(root, args.output)
    print(args.output)
    return 0
