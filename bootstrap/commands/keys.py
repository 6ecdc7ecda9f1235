"""`bootstrap keys`: run the key broker alone (docs/privacy.md): layer keys of private images to
devices whose fresh evidence appraises as the key policy asks, wrapped to their ephemeral key."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from bootstrap.commands.gateway import parse_listen
from bootstrap.server.keys import serve_keys
from cidboot.cli import UsageError, listen_error
from cidboot.errors import FormatError
from cidboot.ipld.cid import CID
from cidboot.store.blockstore import Blockstore
from cidboot.trust.appraisal import DeviceRoots
from cidboot.trust.keys import load_root
from cidboot.trust.manifest.signed import SignedManifest
from cidboot.trust.private.broker import JsonLinesLog, KeyBroker, Policy
from cidboot.trust.private.keys import load_secret
from cidboot.trust.registry import verify_registry

log = logging.getLogger("bootstrap.keys")


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("keys", help="run the key broker: layer keys to devices that attest",
                       description=__doc__)
    p.add_argument("--listen", default="127.0.0.1:8090", help="HOST:PORT (default 127.0.0.1:8090; port 0 picks one)")
    p.add_argument("--trust-anchor", required=True, type=Path, help="root-of-trust file the manifests must be signed under")
    p.add_argument("--manifest", required=True, action="append",
                   help="signed manifest to serve keys for: a file, or a CID in --store (repeatable)")
    p.add_argument("--store", type=Path, help="block store holding the manifests given by CID")
    who = p.add_mutually_exclusive_group(required=True)
    who.add_argument("--roots", type=Path, help="device roots file (JSON: registered devices and roles)")
    who.add_argument("--registry", type=Path, help="signed device registry block, verified under --trust-anchor")
    p.add_argument("--policy", required=True, type=Path, help="key policy (JSON, docs/privacy.md)")
    p.add_argument("--secret", required=True, action="append", metavar="NAME=PATH",
                   help="flow secret file for the manifests named NAME (repeatable)")
    p.add_argument("--log", required=True, type=Path, help="decision log: one JSON line per release or refusal")
    p.set_defaults(func=run)


def _secrets(values: list[str]) -> dict[str, bytes]:
    out = {}
    for v in values:
        name, sep, path = v.partition("=")
        if not sep or not name or not path:
            raise UsageError(f"--secret must be NAME=PATH, got {v!r}")
        out[name] = load_secret(path)
    return out


def _manifest(value: str, store: Path | None) -> SignedManifest:
    p = Path(value)
    if p.is_file():
        return SignedManifest.decode(p.read_bytes())
    try:
        cid = CID.parse(value)
    except FormatError:
        raise UsageError(f"--manifest {value!r} is neither a file nor a CID") from None
    return SignedManifest.decode(Blockstore(store).get(cid))


def run(args: argparse.Namespace) -> int:
    host, port = parse_listen(args.listen)
    root = load_root(args.trust_anchor)
    roots = DeviceRoots.load(args.roots) if args.roots else verify_registry(args.registry.read_bytes(), root)
    broker = KeyBroker(roots, Policy.load(args.policy), _secrets(args.secret), log=JsonLinesLog(args.log))
    for value in args.manifest:
        signed = _manifest(value, args.store)
        cid = broker.add_manifest(signed, root)
        log.info("serving keys for %s v%d (%s)", signed.manifest.name, signed.manifest.version, cid)
    try:
        server = serve_keys(broker, host, port)
    except OSError as e:
        raise listen_error(e, host, port) from None
    print(f"key broker listening on {server.url}", flush=True)
    try:
        server.serve_forever()
    finally:
        server.server_close()
    return 0
