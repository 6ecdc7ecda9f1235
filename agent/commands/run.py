"""`agent run FLOW.yaml|MANIFEST_CID --identity DIR`: run a flow off-device, for development.

The same orchestrator, validation, policies and audit log as on a device, with a software DICE
identity (agent.identity) instead of CDI_2. Every role runs here (or only `--role`). Results,
their provenance nodes and the audit log go to the block store, so `imagebuilder cat`, the
gateway and `car export` can read them by CID.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
from pathlib import Path
from typing import Any

from agent import identity
from agent.audit import AuditLog
from agent.orchestrator import FlowContext, Orchestrator, load_operations
from cidboot import dagcbor
from cidboot.blockstore import Blockstore, default_store_path
from cidboot.cid import CID, DAG_CBOR
from cidboot.cli import print_json
from cidboot.errors import CidbootError, FormatError
from cidboot.flow import DataFlow
from cidboot.manifest import Manifest, SignedManifest


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("run", help="run a flow off-device with a software DICE identity", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("flow", help="flow.yaml, or the CID of a signed manifest in --store")
    p.add_argument("--identity", required=True, type=Path, help="identity dir (its UDS is created on first use)")
    p.add_argument("--store", type=Path, help="block store (default: the user's cidboot store)")
    p.add_argument("--role", help="run only the operations placed on this role (default: every role)")
    p.add_argument("--no-validate", action="store_true", help="skip provenance validation (benchmarks only)")
    p.add_argument("--json", action="store_true", help="results, their CIDs and the audit head as JSON")
    p.set_defaults(func=run)


def _from_yaml(path: Path, store: Blockstore) -> tuple[dict[str, Any], CID, Path, Manifest | None, CID | None]:
    import yaml

    try:
        doc = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise FormatError(f"{path}: not YAML: {e}") from None
    if not isinstance(doc, dict) or "dataflow" not in doc:
        raise FormatError(f"{path}: no dataflow section")
    flow_cid = store.put_block(dagcbor.encode(doc["dataflow"]), DAG_CBOR)
    return doc, flow_cid, path.parent, None, None


def _from_manifest(cid: CID, store: Blockstore, tmp: Path) -> tuple[dict[str, Any], CID, Path, Manifest, CID]:
    from cidboot.unixfs import export_file

    m = SignedManifest.decode(store.get(cid)).manifest
    if m.flow is None:
        raise FormatError(f"manifest {cid} names no flow")
    dataflow = dagcbor.decode(store.get(m.flow))
    for name, op in dataflow["operations"].items():  # each operation's module file, by CID
        module = str(op["implementation"]).split(":", 1)[0]
        (tmp / f"{module.replace('.', '/')}.py").write_bytes(b"".join(export_file(m.operations[name], store.get)))
    return {"dataflow": dataflow, "placement": m.placement, "policies": m.policies}, m.flow, tmp, m, cid


def run(args: argparse.Namespace) -> int:
    store = Blockstore(args.store or default_store_path())
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(args.flow)
        if path.exists():
            doc, flow_cid, ops_dir, manifest, mcid = _from_yaml(path, store)
        else:
            try:
                cid = CID.parse(args.flow)
            except FormatError:
                raise CidbootError(f"{args.flow}: neither a flow file nor a manifest CID") from None
            doc, flow_cid, ops_dir, manifest, mcid = _from_manifest(cid, store, Path(tmp))
        flow = DataFlow.from_obj(doc["dataflow"])
        placement = dict(doc.get("placement") or {})
        ident = identity.development(args.identity, mcid, manifest)
        roles = [args.role] if args.role else ["all"]
        results: list[dict[str, Any]] = []
        heads = {}
        for role in roles:
            ctx = FlowContext(flow, flow_cid, role, ident.key, placement if args.role else {},
                              list(doc.get("policies") or []), ident.measurements,
                              identity.references(manifest, ident.measurements))
            orch = Orchestrator(ctx, load_operations(flow, ops_dir), store, audit=AuditLog(ident.key, store),
                                validate=not args.no_validate, remote_wait=0)
            for res in asyncio.run(orch.run()):
                results.append({"definition": res.definition, "value": res.value, "cid": str(res.cid),
                                "operation": res.operation, "role": role})
            heads[role] = str(orch.audit.head)
            for e in orch.audit.entries:
                if e.decision in ("veto", "refused"):
                    print(f"agent: {e.decision}: {e.reason}", file=sys.stderr)
    if args.json:
        print_json({"results": results, "audit_head": heads, "flow": str(flow_cid)})
    else:
        for r in results:
            print(f"{r['definition']} = {r['value']!r}  ({r['cid']})")
        for role, head in heads.items():
            print(f"audit log ({role}): {head}")
    return 0
