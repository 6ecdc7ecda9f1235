"""`agent run FLOW.yaml|MANIFEST_CID --identity DIR`: run a flow off-device, for development.

The same orchestrator, validation, policies and audit log as on a device, with a software DICE
identity (agent.identity) instead of CDI_2. Every role of the placement runs here, each as its
own development agent (its own alias key; each registers the others in its own AttestedAgents
only if their self-attestation is affirming, as agent.peers does after mutual attestation),
and outputs travel between them through the orchestrators' `send`/`accept`, exactly as
between devices but without HTTP; `--role` runs one role alone. Seeds are signed by
the flow authority: the first `trust.keys` entry beside a flow.yaml, else DIR/authority.pem
(made on first use); with a manifest, seeds are signed by the agent's alias key and the
manifest's root keys are the authority. Results, their provenance nodes and the audit logs go
to the block store (pinned), so `imagebuilder cat`, the gateway and `car export` read them by CID.

`--json` prints {"results": {definition: value}, "result_cids": {definition: cid},
"audit_head": {role: cid}, "flow": cid, "refused": [...], "vetoed": [...], "errors": [...]}; a definition
produced more than once (expand, several input sets) maps to the list of its values/CIDs.
Exit status 1 when an input was refused, an operation vetoed or failed (the reasons go to stderr; an
operation's traceback with -v).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent import identity
from agent.attested import AttestedAgents
from agent.audit import AuditLog
from agent.orchestrator import Block, FlowContext, Orchestrator, load_operations
from cidboot.cli import EXIT_ERROR, EXIT_OK, UsageError, print_json
from cidboot.dataflow import checks
from cidboot.dataflow.model import DataFlow
from cidboot.dataflow.source import load_yaml
from cidboot.errors import CidbootError, FormatError
from cidboot.ipld import dagcbor
from cidboot.ipld.cid import CID, DAG_CBOR
from cidboot.store.blockstore import Blockstore, default_store_path
from cidboot.trust import keys
from cidboot.trust.appraisal import AppraisalResult
from cidboot.trust.cose import PrivateKey
from cidboot.trust.cose_key import decode_public_key, raw_public_bytes
from cidboot.trust.manifest import Manifest, SignedManifest

LOCAL = "local"  # the role name when a flow has no placement: everything runs on one agent


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("run", help="run a flow off-device with a software DICE identity", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("flow", help="flow.yaml, or the CID of a signed manifest in --store")
    p.add_argument("--identity", required=True, type=Path, help="identity dir (its UDS is created on first use)")
    p.add_argument("--store", type=Path, help="block store (default: the user's cidboot store)")
    p.add_argument("--role", help="run only the operations placed on this role (default: every role)")
    p.add_argument("--no-validate", action="store_true", help="skip provenance validation (benchmarks only)")
    p.add_argument("--json", action="store_true", help="results, their CIDs and the audit heads as JSON")
    p.add_argument("--publish", metavar="kubo=URL|cluster=URL[,replication=MIN:MAX]",
                   help="also copy each result's provenance DAG and the audit logs to a Kubo node (its RPC API) or "
                        "an IPFS Cluster (a peer's REST API; pinned MIN:MAX, default 2:3, waiting for MIN peers) "
                        "and pin them")
    p.set_defaults(func=run)


@dataclass
class Loaded:
    """A flow to run, from either source."""

    dataflow: Any  # the flow block's content
    flow_cid: CID
    ops_dir: Path
    placement: dict[str, list[str]]
    policies: list[Mapping[str, Any]]
    seed_key: PrivateKey | None
    authority: frozenset[bytes]
    manifest: Manifest | None = None
    manifest_cid: CID | None = None


def _from_yaml(path: Path, store: Blockstore, ident_dir: Path) -> Loaded:
    # the checks imagebuilder lock/build run, with the same file:line:col messages: a flow
    # that would not be signed does not run here either (PyYAML is imported only by load_yaml)
    src = load_yaml(path)
    _flow, problems = checks.check(src.data, modules=checks.modules_beside(path.parent), file_keys=True)
    if problems:
        raise src.fail(problems)
    doc = src.data
    trust_keys = [path.parent / k for k in (doc.get("trust") or {}).get("keys") or []]
    seed_key = keys.load_private_key(trust_keys[0]) if trust_keys and trust_keys[0].exists() \
        else identity.authority_key(ident_dir)
    flow_cid = store.put_block(dagcbor.encode(doc["dataflow"]), DAG_CBOR)
    return Loaded(doc["dataflow"], flow_cid, path.parent, dict(doc.get("placement") or {}),
                  list(doc.get("policies") or []), seed_key, frozenset({raw_public_bytes(seed_key.public_key())}))


def _from_manifest(cid: CID, store: Blockstore, tmp: Path) -> Loaded:
    from cidboot.ipld.unixfs import export_file

    m = SignedManifest.decode(store.get(cid)).manifest
    if m.flow is None:
        raise FormatError(f"manifest {cid} names no flow")
    from cidboot.trust.private.carried import private

    if private(m):  # its flow and operation CIDs name ciphertext (docs/privacy.md)
        raise FormatError(f"manifest {cid} is a private image (encrypt: true): its flow and operations are "
                          f"stored encrypted and only a device holding the layer keys reads them; "
                          f"run the flow file instead (agent run flow.yaml)")
    dataflow = dagcbor.decode(store.get(m.flow))
    flow = DataFlow.from_obj(dataflow)
    for name, op in flow.operations.items():  # each operation's module file, by its CID
        if name not in m.operations:
            raise FormatError(f"manifest {cid}: no implementation CID for operation {name}")
        module = op.implementation.split(":", 1)[0]
        target = tmp / f"{module.replace('.', '/')}.py"
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(b"".join(export_file(m.operations[name], store.get)))
    # a signed flow is checked like a flow file: a signature says who wrote it, not that it runs
    checks.checked({"dataflow": dataflow, "placement": m.placement, "policies": m.policies},
                   modules=checks.modules_beside(tmp), origin=f"manifest {cid}")
    authority = frozenset(raw_public_bytes(decode_public_key(k)) for k in m.root.keys)
    return Loaded(dataflow, m.flow, tmp, dict(m.placement), list(m.policies), None, authority, m, cid)


def _load(args: argparse.Namespace, store: Blockstore, tmp: Path) -> Loaded:
    path = Path(args.flow)
    if path.exists():
        return _from_yaml(path, store, args.identity)
    try:
        cid = CID.parse(args.flow)
    except FormatError:
        raise CidbootError(f"{args.flow}: neither a flow file nor a manifest CID") from None
    return _from_manifest(cid, store, tmp)


async def run_roles(orchs: dict[str, Orchestrator]) -> None:
    """Run every role's orchestrator in this loop; when all that are still running wait only
    for each other's inputs, none can progress any more: stop them (they finish and return)."""
    tasks = {role: asyncio.create_task(o.run()) for role, o in orchs.items()}
    while not all(t.done() for t in tasks.values()):
        await asyncio.sleep(0.005)
        live = [orchs[r] for r, t in tasks.items() if not t.done()]
        if live and all(o.idle for o in live):
            for o in live:
                o.stop()
    for t in tasks.values():
        t.result()  # re-raise an orchestrator's own failure


def build(loaded: Loaded, store: Blockstore, ident_dir: Path, only_role: str | None,
          validate: bool) -> dict[str, Orchestrator]:
    """One orchestrator per role (or `only_role`), each with its own development identity."""
    flow = DataFlow.from_obj(loaded.dataflow)
    placement = loaded.placement
    known = sorted(placement) or [LOCAL]
    if only_role and only_role not in known:
        raise UsageError(f"--role {only_role}: the flow's roles are {', '.join(known)}")
    roles = [only_role] if only_role else known
    orchs: dict[str, Orchestrator] = {}
    appraisals: dict[str, AppraisalResult] = {}
    registries: dict[str, AttestedAgents] = {}
    for role in roles:
        ident = identity.development(ident_dir, loaded.manifest_cid, loaded.manifest,
                                     role=None if role == LOCAL else role)
        refs = identity.references(loaded.manifest, ident.measurements)
        appraisals[role] = identity.self_attestation(ident, role, refs, loaded.manifest_cid)
        registries[role] = attested = AttestedAgents()
        ctx = FlowContext(flow, loaded.flow_cid, role, ident.key, placement, loaded.policies, ident.measurements,
                          refs, authority_keys=loaded.authority, seed_key=loaded.seed_key)
        local = [op for op in flow.operations if ctx.local(op)]
        orchs[role] = Orchestrator(ctx, load_operations(flow, loaded.ops_dir, names=local), store, attested=attested,
                                   audit=AuditLog(ident.key, store), validate=validate,
                                   remote_wait=0 if only_role else 600.0)

    for role in roles:  # what agent.peers does after mutual attestation: only affirming peers count
        for peer, appraisal in appraisals.items():
            if peer != role and appraisal.affirming:
                registries[role].add(appraisal)
    for role, o in orchs.items():
        def send(to: str, blocks: list[Block], sender: str = role) -> None:
            if to in orchs:
                orchs[to].accept(blocks, appraisals[sender])
        o.send = send
    return orchs


def _collect(orchs: dict[str, Orchestrator]) -> dict[str, Any]:
    values: dict[str, list[Any]] = {}
    cids: dict[str, list[str]] = {}
    for o in orchs.values():
        for r in o.results:
            values.setdefault(r.definition, []).append(r.value)
            cids.setdefault(r.definition, []).append(str(r.cid))
    return {
        "results": {d: v[0] if len(v) == 1 else v for d, v in values.items()},
        "result_cids": {d: c[0] if len(c) == 1 else c for d, c in cids.items()},
        "audit_head": {role: str(o.audit.head) if o.audit.head else None for role, o in orchs.items()},
        "refused": [{"role": role, "reason": e.reason} for role, o in orchs.items() for e in o.audit.find("refused")],
        "vetoed": [{"role": role, "operation": e.operation, "reason": e.reason}
                   for role, o in orchs.items() for e in o.audit.find("veto")],
        "errors": [{"role": role, "operation": e.operation, "reason": e.reason}
                   for role, o in orchs.items() for e in o.audit.find("error")],
    }


def run(args: argparse.Namespace) -> int:
    store = Blockstore(args.store or default_store_path())
    target = None
    if args.publish:  # a bad --publish is refused before the run, not after it
        from agent.publish import PublishTarget

        target = PublishTarget.parse(args.publish)
    with tempfile.TemporaryDirectory() as tmp:
        loaded = _load(args, store, Path(tmp))
        orchs = build(loaded, store, args.identity, args.role, not args.no_validate)
        asyncio.run(run_roles(orchs))
    out = _collect(orchs)
    out["flow"] = str(loaded.flow_cid)
    for o in orchs.values():
        for r in o.results:
            store.pin(r.cid)
        if o.audit.head is not None:
            store.pin(o.audit.head)
    if target is not None:
        from agent.publish import publish

        roots = [r.cid for o in orchs.values() for r in o.results]
        roots += [o.audit.head for o in orchs.values() if o.audit.head is not None]
        out["published"] = {"to": args.publish, "blocks": publish(store, roots, target, label=f"agent run {loaded.flow_cid}")}
    for kind, items in (("refused", out["refused"]), ("veto", out["vetoed"]), ("error", out["errors"])):
        for item in items:
            print(f"agent: {item['role']}: {kind}: {item['reason']}", file=sys.stderr)
    if args.json:
        print_json(out)
    else:
        for o in orchs.values():
            for r in o.results:
                print(f"{r.definition} = {r.value!r}  ({r.cid})")
        for role, head in out["audit_head"].items():
            print(f"audit log ({role}): {head}")
    return EXIT_ERROR if out["refused"] or out["vetoed"] or out["errors"] else EXIT_OK
