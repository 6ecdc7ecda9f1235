"""`imagebuilder show CID[/path]`: decode any block cidboot writes, as readable text or JSON.

What the agent and the builder leave in the block store is DAG-CBOR (signed manifests, flows,
provenance nodes, audit entries, device registries), COSE in raw blocks (EAT evidence, DICE
certificates and chains) or UnixFS (dag-pb nodes and raw leaves). `cat` only prints UnixFS
file bytes; this decodes the rest. The kind comes from the CID's codec and the block's shape
(the exact key set each writer uses), never from a guess at content: a block that is none of
ours is shown as generic DAG-CBOR, dag-pb, CBOR or raw bytes.

Readable form: times as ISO 8601 (UTC), bytes as hex, CIDs as strings, keys by key id.
`--depth N` follows the block's links N levels (each block once; a block missing from the
store is named, not fatal). A path (`CID/manifest/flow`) resolves through DAG-CBOR fields and
UnixFS directories like the gateway does (cidboot.gateway.pathing); a path that ends inside a
DAG-CBOR document shows that document.

Sealed values (a flow with an owner, docs/privacy.md "Private results"): a provenance node's
value and a sealed-value block show as `sealed (age, N recipients)`; `--key IDENTITY_FILE`
(the owner's age identity, `imagebuilder keygen --owner`) opens them and shows the value. A key
that opens none of them is an error (exit 1), never a silent "sealed".
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cbor2

from cidboot.cli import print_json
from cidboot.errors import CidbootError, FormatError, NotFoundError, VerificationError
from cidboot.ipld import dagcbor, dagpb
from cidboot.ipld.cid import CID, DAG_CBOR, DAG_PB, RAW
from cidboot.store.blockstore import Blockstore
from cidboot.trust import cose
from cidboot.trust.cose_key import decode_public_key, key_id

GetBlock = Callable[[CID], bytes]
PREVIEW = 64  # bytes of a raw block shown (as text when it is UTF-8, else hex)

SIGNED_MANIFEST = frozenset({"manifest", "signatures", "rotations"})
MANIFEST_REQUIRED = frozenset({"name", "version", "expires", "layers", "root"})
PROVENANCE = frozenset({"input", "sig"})
AUDIT = frozenset({"entry", "sig"})
REGISTRY = frozenset({"registry", "signatures"})
SEALED = frozenset({"format", "sealed"})


class ShowError(FormatError):
    """A block claims to be one of ours (by its shape) but does not decode as that kind."""


class WrongOwnerKey(VerificationError):
    """`--key` was given but does not open a sealed value shown (not the owner's identity)."""


@dataclass
class Opener:
    """What `show` needs to open sealed values: the block source and the owner's identities."""

    get: GetBlock
    identities: list[Any] = field(default_factory=list)  # cidboot.trust.private.sealed.Identity
    opened: int = 0

    def sealed(self, cid: CID, block: bytes | None = None) -> dict[str, Any]:
        """A sealed value for people: its recipients count, and the value when a key opens it."""
        from cidboot.dataflow.sealing import decode_sealed, open_value
        from cidboot.trust.private.sealed import HeaderMacError, NoMatchingIdentity

        try:
            blk = block if block is not None else self.get(cid)
        except NotFoundError:
            return {"sealed": str(cid), "missing": "not in the store"}
        sv = decode_sealed(blk, cid)
        out: dict[str, Any] = {"sealed": str(cid), "summary": f"sealed (age, {sv.recipients} recipient"
                               f"{'s' if sv.recipients != 1 else ''})"}
        if self.identities:
            try:
                out["value"] = plain(open_value(blk, self.identities, cid))
            except (NoMatchingIdentity, HeaderMacError) as e:
                raise WrongOwnerKey(f"sealed value {cid}: the --key identity does not open it ({e}): "
                                    "not the flow owner's key") from None
            self.opened += 1
        return out


@dataclass
class Shown:
    """One decoded block: what it is, its content for people, and the links it holds."""

    cid: CID
    kind: str
    size: int
    value: Any  # JSON-able: str/int/bool/None/list/dict only
    links: list[tuple[str, CID]] = field(default_factory=list)
    note: str | None = None  # e.g. why a block of our shape fell back to the generic view


def iso(ts: int) -> str:
    return datetime.datetime.fromtimestamp(ts, datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def plain(obj: Any) -> Any:
    """A decoded value for JSON and text: CIDs as strings, bytes as hex, tuples as lists."""
    if isinstance(obj, CID):
        return str(obj)
    if isinstance(obj, bytes | bytearray):
        return bytes(obj).hex()
    if isinstance(obj, dict):
        return {str(k): plain(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [plain(v) for v in obj]
    if isinstance(obj, cbor2.CBORTag):
        return {"tag": obj.tag, "value": plain(obj.value)}
    return obj


def links_in(obj: Any, path: str = "") -> list[tuple[str, CID]]:
    """Every CID in a decoded DAG-CBOR value, named by its path (`manifest/layers/0/cid`)."""
    if isinstance(obj, CID):
        return [(path, obj)]
    if isinstance(obj, dict):
        return [lk for k, v in obj.items() for lk in links_in(v, f"{path}/{k}" if path else str(k))]
    if isinstance(obj, list | tuple):
        return [lk for i, v in enumerate(obj) for lk in links_in(v, f"{path}/{i}" if path else str(i))]
    return []


def _key(raw: bytes) -> dict[str, Any]:
    """An encoded COSE_Key as its key id (what signatures name) and algorithm family."""
    try:
        pub = decode_public_key(raw)
    except CidbootError as e:
        return {"undecodable": str(e), "bytes": raw.hex()}
    return {"key_id": key_id(pub).hex(), "type": type(pub).__name__.removeprefix("_").replace("PublicKey", "")}


ALGS = {-8: "EdDSA", -7: "ES256", -35: "ES384", -36: "ES512"}


def _alg(alg: int | None) -> str | int | None:
    return ALGS.get(alg, alg) if alg is not None else None


def _signers(sign_multi: bytes) -> list[dict[str, Any]]:
    """Who signed (key id, algorithm); whether they may is `imagebuilder verify`'s question."""
    msg = cose.decode_sign(sign_multi)
    return [{"kid": (s.kid or b"").hex(), "alg": _alg(s.alg)} for s in msg.signatures]


def _root(root: Any) -> dict[str, Any]:
    return {"version": root.version, "threshold": root.threshold, "keys": [_key(k) for k in root.keys]}


def _manifest(m: Any) -> dict[str, Any]:
    from cidboot.trust.manifest import Manifest

    man = Manifest.from_obj(m)
    return {
        "name": man.name, "version": man.version, "expires": iso(man.expires), "cmdline": man.cmdline,
        "layers": [{"role": lyr.role, "cid": str(lyr.cid), "size": lyr.size} for lyr in man.layers],
        "root": _root(man.root),
        "measurements": {k: v.hex() for k, v in sorted(man.measurements.items())},
        "flow": str(man.flow) if man.flow else None,
        "operations": {k: str(v) for k, v in sorted(man.operations.items())},
        "placement": man.placement, "policies": plain(man.policies),
        **({"owner": plain(man.owner)} if man.owner is not None else {}),
    }


def _signed_manifest(doc: dict[str, Any], block: bytes) -> dict[str, Any]:
    from cidboot.trust.manifest import SignedManifest

    sm = SignedManifest.decode(block)
    return {"manifest": _manifest(doc["manifest"]), "signatures": _signers(sm.signatures),
            "rotations": [{"root": _root(r.root), "signatures": _signers(r.signatures)} for r in sm.rotations]}


def _provenance(cid: CID, block: bytes, opener: Opener | None) -> dict[str, Any]:
    from cidboot.dataflow.provenance import decode, verify_signature

    node = decode(block, cid)
    try:
        verify_signature(node)
        sig = "valid (by the producer key it names)"
    except CidbootError as e:
        sig = f"INVALID: {e}"
    value: Any = plain(node.value)
    if node.sealed is not None:
        got = opener.sealed(node.sealed) if opener is not None else {"sealed": str(node.sealed)}
        value = got["value"] if "value" in got else got.get("summary", f"sealed in {node.sealed}")
        return {"definition": node.definition, "value": value, "sealed": str(node.sealed), "origin": node.origin,
                "operation": node.operation, "producer": _key(node.producer), "flow": str(node.flow),
                "parents": [str(p) for p in node.parents], "signature": sig}
    return {"definition": node.definition, "value": value, "origin": node.origin,
            "operation": node.operation, "producer": _key(node.producer), "flow": str(node.flow),
            "parents": [str(p) for p in node.parents], "signature": sig}


def _audit(doc: dict[str, Any]) -> dict[str, Any]:
    body = doc["entry"]
    s1 = cose.decode_sign1(doc["sig"])
    return {"seq": body.get("seq"), "decision": body.get("decision"), "operation": body.get("operation"),
            "reason": body.get("reason"), "inputs": plain(body.get("inputs")), "prev": plain(body.get("prev")),
            "signature": {"alg": _alg(s1.alg), "kid": (s1.kid or b"").hex() or None,
                          "note": "checked against the agent's alias key by `verify_log`, not here"}}


def _registry(doc: dict[str, Any]) -> dict[str, Any]:
    """Devices with their keys by key id; the other fields as they are. Read by shape, not by
    cidboot.trust.registry's parser, which verifies (that needs the root of trust)."""
    reg = doc["registry"]
    if not isinstance(reg, dict) or not isinstance(reg.get("devices"), list):
        raise ShowError("device registry: content must be {devices: [...], ...}")
    devices = []
    for d in reg["devices"]:
        if not isinstance(d, dict):
            raise ShowError("device registry: each device must be a map")
        devices.append({k: _key(v) if k == "key" and isinstance(v, bytes) else plain(v) for k, v in d.items()})
    rest = {k: plain(v) for k, v in reg.items() if k != "devices"}
    return {"devices": devices, **rest, "signatures": _signers(doc["signatures"])}


def _cert(data: bytes | cose.Sign1) -> dict[str, Any]:
    from cidboot.trust.dice.cert import parse_certificate

    c = parse_certificate(data)
    out: dict[str, Any] = {"issuer": c.issuer, "subject": c.subject, "mode": c.mode.name,
                           "code_hash": c.code_hash.hex(), "authority_hash": c.authority_hash.hex(),
                           "subject_key": _key(c.subject_public_key_raw), "key_usage": c.key_usage.hex()}
    for name in ("code_descriptor", "config_descriptor", "config_hash", "authority_descriptor"):
        v = getattr(c, name)
        if v is not None:
            out[name] = v.hex()
    if c.profile_name:
        out["profile_name"] = c.profile_name
    return out


def _chain(items: list[Any]) -> list[Any]:
    """A DICE chain [root COSE_Key, cert L0, cert L1, ...] with each certificate decoded."""
    out: list[Any] = [{"root_key": _key(cbor2.dumps(items[0]))}]
    for c in items[1:]:
        out.append(_cert(cbor2.dumps(list(c) if isinstance(c, tuple) else c)))
    return out


def _eat(block: bytes) -> tuple[dict[str, Any], list[tuple[str, CID]]]:
    from cidboot.trust.eat import parse_evidence

    ev = parse_evidence(block)
    out = {"nonce": ev.nonce.hex(), "ueid": ev.ueid.hex(), "iat": iso(ev.iat), "boot_mode": ev.boot_mode,
           "role": ev.role, "manifest": str(ev.manifest_cid) if ev.manifest_cid else None,
           "measurements": {k: v.hex() for k, v in sorted(ev.measurements.items())},
           "signature": {"alg": _alg(ev.sign1.alg), "note": "by the chain's leaf key; `agent verify-evidence` appraises it"},
           "dice_chain": _chain(cose.cbor_loads_exact(ev.chain, "DICE chain"))}
    return out, [("manifest", ev.manifest_cid)] if ev.manifest_cid else []


def _sealed_value(cid: CID, block: bytes, opener: Opener | None) -> dict[str, Any]:
    from cidboot.dataflow.sealing import FORMAT, decode_sealed

    if opener is not None:
        got = opener.sealed(cid, block)
    else:
        sv = decode_sealed(block, cid)
        got = {"summary": f"sealed (age, {sv.recipients} recipient{'s' if sv.recipients != 1 else ''})"}
    return {"format": FORMAT, "sealed": got["summary"], **({"value": got["value"]} if "value" in got else {})}


def _dag_cbor(cid: CID, block: bytes, opener: Opener | None = None) -> Shown:
    doc = dagcbor.decode(block)
    generic = Shown(cid, "dag-cbor", len(block), plain(doc), links_in(doc))
    if not isinstance(doc, dict):
        return generic
    keys = set(doc)
    decoders: list[tuple[str, bool, Callable[[], Any]]] = [
        ("signed-manifest", keys == SIGNED_MANIFEST, lambda: _signed_manifest(doc, block)),
        ("provenance-node", keys == PROVENANCE, lambda: _provenance(cid, block, opener)),
        ("sealed-value", keys == SEALED, lambda: _sealed_value(cid, block, opener)),
        ("audit-entry", keys == AUDIT and isinstance(doc.get("entry"), dict), lambda: _audit(doc)),
        ("device-registry", keys == REGISTRY, lambda: _registry(doc)),
        ("manifest", MANIFEST_REQUIRED <= keys, lambda: _manifest(doc)),
        ("flow", "operations" in keys and "definitions" in keys, lambda: plain(doc)),
    ]
    for kind, matches, decode in decoders:
        if matches:
            try:
                return Shown(cid, kind, len(block), decode(), generic.links)
            except WrongOwnerKey:
                raise
            except (CidbootError, KeyError, TypeError, ValueError) as e:
                generic.note = f"shaped like a {kind} but does not decode as one: {e}"
                return generic
    return generic


def _dag_pb(cid: CID, block: bytes) -> Shown:
    from cidboot.ipld.unixfs.data import TYPE_NAMES, UnixFSData

    node = dagpb.decode(block)
    links = [(lk.name or str(i), lk.cid) for i, lk in enumerate(node.links)]
    value: dict[str, Any] = {"links": [{"name": lk.name, "cid": str(lk.cid), "tsize": lk.tsize} for lk in node.links]}
    try:
        ufs = UnixFSData.decode(node.data)
    except CidbootError:
        value["data"] = (node.data or b"").hex()
        return Shown(cid, "dag-pb", len(block), value, links)
    value = {"type": TYPE_NAMES.get(ufs.type, str(ufs.type)), **value}
    if ufs.filesize is not None:
        value["filesize"] = ufs.filesize
    if ufs.data:
        value["data"] = _preview(ufs.data)
    if ufs.fanout:
        value["fanout"] = ufs.fanout
    return Shown(cid, f"unixfs-{value['type']}", len(block), value, links)


def _preview(data: bytes) -> dict[str, Any]:
    head = data[:PREVIEW]
    try:
        text = head.decode("utf-8")
        shown: dict[str, Any] = {"text": text} if text.isprintable() or set(text) <= set(text.strip() + "\n\t ") \
            else {"hex": head.hex()}
    except UnicodeDecodeError:
        shown = {"hex": head.hex()}
    if len(data) > PREVIEW:
        shown["truncated"] = f"first {PREVIEW} of {len(data)} bytes"
    return shown


def _raw(cid: CID, block: bytes) -> Shown:
    """COSE evidence and certificates are raw blocks; anything else is a file chunk or blob."""
    try:
        obj = cose.cbor_loads_exact(block, "block")
    except CidbootError:
        obj = None
    if obj is not None:
        from cidboot.trust.dice.cert import CODE_HASH
        from cidboot.trust.eat import EAT_NONCE

        try:
            s1 = cose.decode_sign1(block)
            claims = cose.cbor_loads_exact(s1.payload or b"", "claims")
        except CidbootError:
            s1, claims = None, None
        try:
            if isinstance(claims, dict) and EAT_NONCE in claims:
                value, links = _eat(block)
                return Shown(cid, "eat", len(block), value, links)
            if isinstance(claims, dict) and CODE_HASH in claims:
                return Shown(cid, "dice-cert", len(block), _cert(block))
            if isinstance(obj, list) and len(obj) >= 2 and isinstance(obj[0], dict):
                return Shown(cid, "dice-chain", len(block), _chain(obj))
        except CidbootError as e:
            return Shown(cid, "cbor", len(block), plain(obj), note=f"COSE-shaped but not ours: {e}")
    shown = Shown(cid, "raw", len(block), {"sha256": hashlib.sha256(block).hexdigest(), **_preview(block)})
    if obj is not None:
        shown.note = "also parses as CBOR: " + repr(plain(obj))[:200]
    return shown


def decode_block(cid: CID, block: bytes, opener: Opener | None = None) -> Shown:
    """What this block is, by codec and shape (see the module docstring); `opener` shows
    sealed values' recipients (and, with identities, opens them)."""
    if cid.codec == DAG_CBOR:
        return _dag_cbor(cid, block, opener)
    if cid.codec == DAG_PB:
        return _dag_pb(cid, block)
    if cid.codec == RAW:
        return _raw(cid, block)
    return Shown(cid, cid.codec_name, len(block), _preview(block))


def show(cid: CID, get: GetBlock, depth: int = 0, seen: set[CID] | None = None,
         opener: Opener | None = None) -> dict[str, Any]:
    """The block as a JSON-able tree; with depth > 0 its links' blocks under "linked"."""
    seen = set() if seen is None else seen
    opener = opener if opener is not None else Opener(get)
    seen.add(cid)
    try:
        block = get(cid)
    except NotFoundError:
        return {"cid": str(cid), "missing": "not in the store"}
    s = decode_block(cid, block, opener)
    out: dict[str, Any] = {"cid": str(cid), "kind": s.kind, "size": s.size, "value": s.value}
    if s.note:
        out["note"] = s.note
    if s.links:
        out["links"] = [{"name": n, "cid": str(c)} for n, c in s.links]
    if depth > 0 and s.links:
        out["linked"] = [{"name": n, **({"cid": str(c), "seen": "shown above"} if c in seen else show(c, get, depth - 1, seen, opener))}
                         for n, c in s.links]
    return out


def render(node: dict[str, Any], write: Callable[[str], None], indent: int = 0) -> None:
    """Readable text: one header line per block, its value as an indented outline."""
    pad = "  " * indent
    if "kind" not in node:
        write(f"{pad}{node.get('name', '')}: {node['cid']} ({node.get('missing') or node.get('seen')})")
        return
    via = f"{node['name']}: " if "name" in node else ""
    write(f"{pad}{via}{node['cid']}  {node['kind']}, {node['size']} bytes")
    if node.get("note"):
        write(f"{pad}  note: {node['note']}")
    _outline(node["value"], write, indent + 1)
    for child in node.get("linked", []):
        render(child, write, indent + 1)


def _outline(v: Any, write: Callable[[str], None], indent: int, label: str | None = None) -> None:
    pad = "  " * indent
    head = f"{pad}{label}:" if label is not None else None
    if isinstance(v, dict) and v:
        if head:
            write(head)
        for k, x in v.items():
            _outline(x, write, indent + (1 if head else 0), str(k))
    elif isinstance(v, list) and v:
        if head:
            write(head)
        for x in v:
            if isinstance(x, dict) and x:
                items = list(x.items())
                first_k, first_v = items[0]
                if isinstance(first_v, dict | list) and first_v:
                    write(f"{pad}  -")
                    _outline(x, write, indent + 2)
                else:
                    write(f"{pad}  - {first_k}: {_scalar(first_v)}")
                    for k, y in items[1:]:
                        _outline(y, write, indent + 2, str(k))
            else:
                _outline(x, write, indent + 1, "-") if isinstance(x, list) else write(f"{pad}  - {_scalar(x)}")
    else:
        write(f"{head} {_scalar(v)}" if head else f"{pad}{_scalar(v)}")


def _scalar(v: Any) -> str:
    if v is None:
        return "null"
    if v == "":
        return '""'
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, dict | list):
        return "{}" if isinstance(v, dict) else "[]"
    return str(v)


def resolve_arg(spec: str, get: GetBlock) -> CID:
    """`CID` or `CID/path/inside`, resolved through DAG-CBOR fields and UnixFS directories."""
    root_s, _, path = spec.partition("/")
    root = CID.parse(root_s)
    if not path.strip("/"):
        return root
    from cidboot.store.gateway.pathing import resolve

    return resolve(root, [p for p in path.split("/") if p], get).terminal


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("show", help="decode any cidboot block (manifest, flow, provenance, audit, EAT, DICE...)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("cid", help="CID, or CID/path/inside (DAG-CBOR fields, UnixFS directory entries)")
    p.add_argument("--store", type=Path, help="block store directory (default: $CIDBOOT_STORE)")
    p.add_argument("--depth", type=int, default=0, metavar="N", help="follow links N levels (default 0)")
    p.add_argument("--json", action="store_true", help="one JSON document instead of text")
    p.add_argument("--key", type=Path, metavar="IDENTITY_FILE",
                   help="the flow owner's age identity: open sealed values (a key that opens none is an error)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.depth < 0:
        from cidboot.cli import UsageError

        raise UsageError(f"--depth must be 0 or more, got {args.depth}")
    store = Blockstore(args.store)
    cid = resolve_arg(args.cid, store.get)
    store.get(cid)  # a missing top block is an error, not a "missing" entry
    opener = Opener(store.get)
    if args.key is not None:
        from cidboot.trust.private.sealed import load_identities

        try:
            opener.identities = load_identities(args.key.read_text())
        except OSError as e:
            raise NotFoundError(f"--key {args.key}: cannot read: {e.strerror}") from None
    tree = show(cid, store.get, args.depth, opener=opener)
    if args.key is not None and opener.opened == 0:
        raise WrongOwnerKey(f"--key {args.key}: no sealed value was opened: none in what is shown (give a result's "
                            "CID, or --depth), or its sealed block is not in the store")
    if args.json:
        print_json(tree)
    else:
        render(tree, lambda line: print(line, file=sys.stdout))
    return 0
