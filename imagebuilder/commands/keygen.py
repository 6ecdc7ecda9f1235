"""`imagebuilder keygen`: make a signing key pair, or (`--owner FILE`) a flow owner's age identity;
`imagebuilder root`: make a root-of-trust file."""

from __future__ import annotations

import argparse
import datetime
import os
from pathlib import Path

from cidboot.cli import UsageError, print_json
from cidboot.errors import CidbootError
from cidboot.trust.cose_key import key_id
from cidboot.trust.keys import ALGS, generate, load_public_key, write_keypair, write_root
from cidboot.trust.manifest.model import RootOfTrust


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("keygen", help="generate a manifest signing key (or, --owner, a flow owner's age identity)",
                       description="Write OUT.pem (private, mode 0600) and OUT.pub (COSE_Key); print the key id. "
                                   "With --owner FILE: write an age X25519 identity (AGE-SECRET-KEY-1..., mode 0600, "
                                   "the format age-keygen writes) and print its recipient (age1...) for flow.yaml's "
                                   "owner.recipients; the owner reads sealed results with `imagebuilder show CID "
                                   "--key FILE` (or age -d -i FILE). Never overwrites a file.")
    p.add_argument("-o", "--output", help="path stem for OUT.pem and OUT.pub")
    p.add_argument("stem", nargs="?", help="the same as -o (either one)")
    p.add_argument("--alg", choices=ALGS, default="ed25519")
    p.add_argument("--owner", type=Path, metavar="FILE", help="write a flow owner's age identity to FILE instead")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=run_keygen)
    r = sub.add_parser("root", help="write a root-of-trust file from public keys",
                       description="Write the trust anchor a bootstrap and verifiers carry: keys and threshold.")
    r.add_argument("pubkeys", nargs="+", type=Path, help=".pub files")
    r.add_argument("--threshold", type=int, default=1)
    r.add_argument("--version", type=int, default=1, dest="root_version")
    r.add_argument("-o", "--output", required=True, type=Path)
    r.set_defaults(func=run_root)


class KeyFileExists(CidbootError):
    """The key file is already there: a key is never overwritten (it may be the only copy)."""


def write_owner_identity(path: Path) -> str:
    """Write a new age identity to `path` (mode 0600, created exclusively); return its recipient."""
    from cidboot.trust.private.sealed import Identity

    ident = Identity.generate()
    text = (f"# created: {datetime.datetime.now(datetime.UTC).strftime('%Y-%m-%dT%H:%M:%SZ')}\n"
            f"# public key: {ident.recipient}\n{ident}\n")
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise KeyFileExists(f"{path}: already exists; not overwriting a key") from None
    with os.fdopen(fd, "w") as f:
        f.write(text)
    return ident.recipient


def run_keygen(args: argparse.Namespace) -> int:
    if args.owner is not None:
        if args.output or args.stem:
            raise UsageError("--owner FILE writes an owner identity; give no signing-key output with it")
        recipient = write_owner_identity(args.owner)
        if args.json:
            print_json({"identity": str(args.owner), "recipient": recipient})
        else:
            print(recipient)
        return 0
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
