"""`imagebuilder sign MANIFEST.yaml`: build a workload manifest, sign it with a threshold of
keys, store the signed envelope (a DAG-CBOR block) and print its CID."""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import yaml

from cidboot.errors import FormatError
from cidboot.ipld.cid import CID, DAG_CBOR
from cidboot.store.blockstore import Blockstore
from cidboot.trust.keys import load_private_key, load_root
from cidboot.trust.manifest import Layer, Manifest, sign_manifest


class ManifestSpecError(FormatError):
    """The manifest description file is wrong (the message names the key)."""


def parse_expires(v: Any, now: int) -> int:
    if isinstance(v, int):
        return v
    if isinstance(v, str) and v.startswith("+") and v[-1] in "smhd" and v[1:-1].isdigit():
        return now + int(v[1:-1]) * {"s": 1, "m": 60, "h": 3600, "d": 86400}[v[-1]]
    raise ManifestSpecError(f"expires must be unix seconds or +N[smhd], got {v!r}")


def manifest_from_spec(spec: dict[str, Any], base: Path, now: int) -> Manifest:
    allowed = {"name", "version", "expires", "layers", "measurements", "flow", "operations", "placement",
               "policies", "root", "cmdline"}
    extra = sorted(set(spec) - allowed)
    if extra:
        raise ManifestSpecError(f"unknown keys {extra} (allowed: {', '.join(sorted(allowed))})")
    try:
        return Manifest(
            name=spec["name"], version=int(spec["version"]), expires=parse_expires(spec.get("expires", "+30d"), now),
            layers=tuple(Layer(CID.parse(x["cid"]), int(x["size"]), x["role"]) for x in spec.get("layers", [])),
            root=load_root(base / spec["root"]),
            measurements={k: bytes.fromhex(v) for k, v in spec.get("measurements", {}).items()},
            flow=CID.parse(spec["flow"]) if spec.get("flow") else None,
            operations={k: CID.parse(v) for k, v in spec.get("operations", {}).items()},
            placement=spec.get("placement", {}), policies=spec.get("policies", []), cmdline=spec.get("cmdline", ""),
        )
    except KeyError as e:
        raise ManifestSpecError(f"missing key {e}") from None
    except (TypeError, ValueError) as e:
        raise ManifestSpecError(str(e)) from None


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("sign", help="sign a workload manifest", description=__doc__)
    p.add_argument("spec", type=Path, help="manifest description (YAML or JSON)")
    p.add_argument("--key", action="append", required=True, type=Path, help="private key .pem (repeat for a threshold)")
    p.add_argument("--store", type=Path, help="block store (default: $CIDBOOT_STORE)")
    p.add_argument("-o", "--output", type=Path, help="also write the signed envelope block to this file")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    try:
        spec = yaml.safe_load(args.spec.read_text())
    except yaml.YAMLError as e:
        raise ManifestSpecError(f"{args.spec}: {e}") from None
    if not isinstance(spec, dict):
        raise ManifestSpecError(f"{args.spec}: must be a mapping")
    m = manifest_from_spec(spec, args.spec.parent, int(time.time()))
    signed = sign_manifest(m, [load_private_key(k) for k in args.key])
    block = signed.encode()
    cid = Blockstore(args.store).put_block(block, DAG_CBOR)
    if args.output:
        args.output.write_bytes(block)
    print(cid)
    return 0
