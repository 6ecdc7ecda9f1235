"""The dataflow orchestrator (asyncio), with DFFML's semantics and provenance gating.

- An operation is dispatched for every *complete input set*: one input per parameter, each
  from an origin the flow connects to that parameter, plus a True input for each condition.
- Each unique input set (by input CIDs) runs once.
- Stages run in order: processing until nothing more can run, then cleanup, then output.
- `expand` turns a list output into one input per item.
- Definitions are locked to parameters: an input feeds a parameter only if its definition is
  the parameter's (and its origin is one the flow connects there). A `lock: true` definition
  is, as in DFFML, also used by one operation at a time.
- Only operations placed on this agent's role run here. Outputs that operations of other roles
  consume go to `send(role, blocks)` (agent.peers, after mutual attestation), with their
  provenance closure so the receiver can validate the parents; inputs from peers arrive
  through `accept(blocks, sender)`.
- A flow with an owner (cidboot.dataflow.sealing) has its results (seal: results) or every
  value (seal: all) sealed to the owner's age recipients before they are stored: the node links
  the sealed-value block, the plaintext stays in this process (`Result.value`) and crosses to a
  peer only as an opening (the age file key) beside the sealed block, over the attested channel.
  With an owner, audit reasons carry no values (a refused output's value, an exception's text).
- Before a run, every input is validated (agent.validate) and the policies are evaluated
  (agent.policy); every decision goes to the audit log. Outputs are signed provenance nodes
  (cidboot.dataflow.provenance) signed with the agent's DICE alias key.

Public API (what agent.device / agent.peers call):

    ctx = FlowContext(flow, flow_cid, role, alias_key, placement={role: [op...]}, policies=[...],
                      measurements={layer: bytes}, references={layer: bytes},
                      authority_keys=frozenset({raw_pub}), seed_key=None)
    ops = load_operations(flow, ops_dir, names=None)          # {op: callable}, "module:function"
    orch = Orchestrator(ctx, ops, store, attested=AttestedAgents(), audit=None, send=None,
                        validate=True, remote_wait=300.0, on_result=None)
    results = await orch.run()            # [Result(definition, value, cid, operation)]
    orch.accept([(cid, block), ...], sender_appraisal) -> [admitted input CIDs]   # thread-safe
                                          # validated first; only what validated is stored
    orch.closure(cid) -> [(cid, block)]   # a node and its provenance ancestors
    orch.stop()                           # stop waiting for peers
    orch.audit.head                       # CID of the newest audit entry

`send(role, blocks)` may be sync or async; blocks are the output's node plus its ancestry.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import importlib
import importlib.util
import inspect
import itertools
import logging
import sys
import threading
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from agent.attested import AttestedAgents
from agent.audit import AuditLog, BlockSink
from agent.policy import RunContext
from agent.validate import PolicyVeto, Validator, check_policies
from cidboot.dataflow.checks import PolicyScope, value_problem
from cidboot.dataflow.model import SEED, STAGES, DataFlow, Operation
from cidboot.dataflow.provenance import InputNode, ProvenanceFormatError, decode, make_input
from cidboot.dataflow.sealing import (
    Owner,
    decode_opening,
    decode_sealed,
    make_opening,
    open_with_opening,
    seal_value,
)
from cidboot.errors import CidbootError, FormatError
from cidboot.ipld.cid import CID
from cidboot.trust.appraisal import AppraisalResult
from cidboot.trust.cose import PrivateKey
from cidboot.trust.cose_key import raw_public_bytes

log = logging.getLogger("agent.orchestrator")

Block = tuple[CID, bytes]
Send = Callable[[str, list[Block]], Awaitable[Any] | Any]
ACCEPT_BLOCKS = 4096  # blocks in one `accept` (agent.peers.MAX_BLOCKS)
ACCEPT_BYTES = 4 << 20  # bytes in one `accept` (agent.peers.MAX_BYTES)
PEER_BUDGET = 64 << 20  # bytes of peers' blocks this orchestrator keeps in its store, in all
REFUSALS_PER_ACCEPT = 16  # audit entries for single refused inputs per `accept`; the rest summarised


class OperationFailed(CidbootError):
    """An operation raised or returned something that is not {output: value}."""


@dataclass(frozen=True)
class Result:
    definition: str
    value: Any
    cid: CID
    operation: str
    sealed: CID | None = None  # the sealed-value block the node links (the value is then not stored in clear)


@dataclass
class FlowContext:
    """What the agent knows about the flow it runs and about itself."""

    flow: DataFlow
    flow_cid: CID
    role: str
    key: PrivateKey  # the DICE alias key
    placement: Mapping[str, list[str]] = field(default_factory=dict)
    policies: Sequence[Mapping[str, Any]] = ()
    measurements: Mapping[str, bytes] = field(default_factory=dict)  # own, from the DICE chain
    references: Mapping[str, bytes] = field(default_factory=dict)  # the manifest's
    authority_keys: frozenset[bytes] = frozenset()  # raw public keys that may sign seeds
    seed_key: PrivateKey | None = None  # signs this agent's seed inputs; None: the alias key
    owner: Owner | None = None  # the flow owner (the signed manifest's): values sealed to it

    def local(self, op: str) -> bool:
        return not self.placement or op in self.placement.get(self.role, [])

    def roles_of(self, op: str) -> list[str]:
        return sorted(r for r, ops in self.placement.items() if op in ops)


def load_operations(flow: DataFlow, ops_dir: str | Path, names: Sequence[str] | None = None) -> dict[str, Callable[..., Any]]:
    """Import each operation's `module:function` from the module file in ops_dir (only those
    named, if given). Modules are loaded by path under a name private to ops_dir, so two flows'
    `ops` modules never shadow each other in one process."""
    d = Path(ops_dir)
    tag = hashlib.sha256(str(d.resolve()).encode()).hexdigest()[:12]
    out = {}
    for op in flow.operations.values():
        if names is not None and op.name not in names:
            continue
        mod, _, fn = op.implementation.partition(":")
        name = f"cidboot_ops_{tag}.{mod}"
        try:
            module = sys.modules.get(name)
            if module is None:
                spec = importlib.util.spec_from_file_location(name, d / (mod.replace(".", "/") + ".py"))
                if spec is None or spec.loader is None:
                    raise ImportError(f"no module file for {mod}")
                module = importlib.util.module_from_spec(spec)
                spec.loader.exec_module(module)
                sys.modules[name] = module
            out[op.name] = getattr(module, fn)
        except (ImportError, AttributeError, OSError) as e:
            raise FormatError(f"operation {op.name}: cannot load {op.implementation} from {d}: {e}") from None
    return out


class Orchestrator:
    def __init__(self, ctx: FlowContext, ops: Mapping[str, Callable[..., Any]], store: BlockSink, *,
                 attested: AttestedAgents | None = None, audit: AuditLog | None = None, send: Send | None = None,
                 validate: bool = True, remote_wait: float = 300.0,
                 on_result: Callable[[Result], None] | None = None, accept_blocks: int = ACCEPT_BLOCKS,
                 accept_bytes: int = ACCEPT_BYTES, peer_budget: int = PEER_BUDGET) -> None:
        self.ctx, self.ops, self.store = ctx, ops, store
        self.accept_blocks, self.accept_bytes, self.peer_budget = accept_blocks, accept_bytes, peer_budget
        self.peer_bytes = 0  # bytes of peers' blocks stored so far (against peer_budget)
        self._pending: dict[CID, bytes] = {}  # the batch `accept` is validating: read before the store
        self._from_pending: set[CID] = set()  # pending blocks the validation of one input read
        self._quota: int | None = None  # single refusals still audited in this `accept` (None: no limit)
        self._quieted = 0
        self._kept: set[CID] = set()  # peers' blocks stored after they validated
        self._accept_lock = threading.RLock()
        self.attested = attested or AttestedAgents()
        self.attested.add_self(raw_public_bytes(ctx.key.public_key()), ctx.role)
        self.audit = audit or AuditLog(ctx.key, store)
        self.send, self.validate_inputs, self.remote_wait = send, validate, remote_wait
        self.on_result = on_result
        self._opened: dict[CID, tuple[Any, bytes]] = {}  # sealed-value CID -> (plaintext, file key) known here
        self._batch_opened: dict[CID, tuple[Any, bytes]] = {}  # opened in the `accept` being validated
        self.validator = Validator(ctx.flow, ctx.flow_cid, ctx.placement, self.attested, self._get, ctx.authority_keys,
                                   values=self._value_of)
        self.network: dict[CID, InputNode] = {}  # validated inputs available to local operations
        self._by_def: dict[str, dict[CID, InputNode]] = {}  # the same, by definition (dispatch looks up by it)
        self._order: dict[CID, bytes] = {}  # sort key per input: runs (and so audit logs) are deterministic
        # dispatch re-examines only operations that got a new input since they were last examined
        self._consumers: dict[str, set[str]] = {}
        for op in ctx.flow.operations.values():
            if ctx.local(op.name):
                for d in [*op.inputs.values(), *op.conditions]:
                    self._consumers.setdefault(d, set()).add(op.name)
        self._dirty: set[str] = {op for op in ctx.flow.operations if ctx.local(op)}
        # parents and sealed-value link of nodes decoded or made here: closures without decoding
        self._links: dict[CID, tuple[tuple[CID, ...], CID | None]] = {}
        self.refused: dict[CID, str] = {}
        self.ran: set[tuple[str, tuple[CID, ...]]] = set()
        self.results: list[Result] = []
        self._arrived: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._locks: dict[str, asyncio.Lock] = {}
        self.waiting = False  # True while blocked on inputs only another role can produce
        self._stopped = False

    # -- inputs ---------------------------------------------------------------------------------
    def _put(self, cid: CID, block: bytes) -> None:
        has = getattr(self.store, "has", None)
        if has is None or not has(cid):
            self.store.put(cid, block)

    def _get(self, cid: CID) -> bytes:
        """The validator's block source: the batch being accepted (not stored yet), then the store."""
        block = self._pending.get(cid)
        if block is not None:
            self._from_pending.add(cid)
            return block
        return self.store.get(cid)

    def _value_of(self, sealed: CID) -> tuple[bool, Any]:
        got = self._opened.get(sealed) or self._batch_opened.get(sealed)
        return (True, got[0]) if got is not None else (False, None)

    def _seal(self, definition: str, value: Any, origin: str | tuple[str, str]) -> CID | None:
        """Seal the value to the owner when the flow says so (`results`: nothing the flow connects
        this origin to consumes it); store the sealed block; keep the plaintext and file key in
        memory (for local operations and peers' openings)."""
        owner = self.ctx.owner
        flow = self.ctx.flow
        consumed = any(flow.allows(c, p, origin) for c, p in flow.consumers_of(definition))
        if owner is None or not owner.seals(seed=origin == SEED, consumed=consumed):
            return None
        try:
            scid, block, file_key = seal_value(value, owner.raw)
        except FormatError as e:  # e.g. a set or a NaN: not DAG-CBOR, so neither a node nor a sealed value
            raise ProvenanceFormatError(f"{definition} value: not DAG-CBOR data: {e}") from None
        self._put(scid, block)
        self._opened[scid] = (value, file_key)
        return scid

    def _consumed_here(self, node: InputNode) -> bool:
        origin = SEED if node.is_seed else (str(node.operation), str(node.output))
        return any(self.ctx.local(op) and self.ctx.flow.allows(op, param, origin)
                   for op, param in self.ctx.flow.consumers_of(node.definition))

    def _admit(self, node: InputNode) -> bool:
        if node.cid in self.network:
            return True
        if node.cid in self.refused:
            return False
        if node.sealed is not None:
            known, value = self._value_of(node.sealed)
            if not known:
                self._refuse(node.cid, f"SealedValueUnknown: input {node.cid}: its {node.definition} value is sealed "
                             "and no opening for it came with it")
                return False
            node = replace(node, value=value)
        if self.validate_inputs:
            try:
                self.validator.validate(node.cid, node)
            except CidbootError as e:  # a ProvenanceError, ForgedSignature (cidboot.dataflow.provenance), ...
                self._refuse(node.cid, f"{type(e).__name__}: {e}")
                return False
        self.network[node.cid] = node
        self._by_def.setdefault(node.definition, {})[node.cid] = node
        self._order[node.cid] = bytes(node.cid)
        self._dirty |= self._consumers.get(node.definition, set())
        return True

    def _refuse(self, cid: CID, reason: str) -> None:
        self.refused[cid] = reason
        if self._quota is not None:
            if self._quota <= 0:
                self._quieted += 1
                return
            self._quota -= 1
        self.audit.record("refused", reason, inputs=[cid])

    def _refuse_batch(self, cids: Sequence[CID], reason: str) -> None:
        """One audit entry for many blocks (a flood must not become as many signed entries)."""
        self.audit.record("refused", reason, inputs=list(cids[:REFUSALS_PER_ACCEPT]))

    def accept(self, blocks: Sequence[Block], sender: AppraisalResult | None = None) -> list[CID]:
        """Inputs from a peer (already attested by agent.peers; validated again here). Safe to call
        from another thread: it hands over to the orchestrator's loop when one runs."""
        if self._loop is not None and self._loop.is_running():
            try:
                running = asyncio.get_running_loop()
            except RuntimeError:
                running = None
            if running is not self._loop:
                fut = asyncio.run_coroutine_threadsafe(self._accept_async(list(blocks), sender), self._loop)
                return fut.result(60)
        return self._accept(list(blocks), sender)

    async def _accept_async(self, blocks: list[Block], sender: AppraisalResult | None) -> list[CID]:
        return self._accept(blocks, sender)

    def _accept(self, blocks: list[Block], sender: AppraisalResult | None) -> list[CID]:
        """Validate first, store only what validated (issue 11 #4): every block must be a
        provenance node of its CID; an input this role consumes is validated with its ancestors
        read from the batch, and only then are it and the ancestors its validation read stored.
        Blocks no admitted input needed are dropped. Bounded per call (accept_blocks,
        accept_bytes) and in all (peer_budget); every refusal is audited, floods as one entry."""
        with self._accept_lock:
            try:
                self._quota, self._quieted = REFUSALS_PER_ACCEPT, 0
                admitted = self._accept_batch(blocks, f"from {sender.role} {sender.device_id}" if sender is not None
                                              else "from a peer")
            finally:
                self._pending, self._from_pending, self._quota = {}, set(), None
                self._keep_openings()
            if self._quieted:
                self.audit.record("refused", f"{self._quieted} more input(s) refused in the same exchange "
                                  "(reasons not recorded one by one)")
        if self._arrived is not None:
            self._arrived.set()
        return admitted

    def _accept_batch(self, blocks: list[Block], who: str) -> list[CID]:
        total = sum(len(b) for _, b in blocks)
        if len(blocks) > self.accept_blocks or total > self.accept_bytes:
            self._refuse_batch([c for c, _ in blocks], f"PeerLimit: {len(blocks)} block(s) of {total} bytes {who}: "
                               f"more than {self.accept_blocks} blocks or {self.accept_bytes} bytes in one exchange, "
                               "nothing stored")
            return []
        has = getattr(self.store, "has", None)
        nodes: dict[CID, InputNode] = {}
        sealed: dict[CID, bytes] = {}  # sealed-value blocks (stored only if an admitted node links them)
        openings: dict[CID, bytes] = {}  # sealed CID -> file key (never stored)
        known: list[CID] = []  # admitted before (a retry, or an ancestor of a later input)
        junk: dict[CID, int] = {}
        for cid, block in blocks:
            if cid in nodes or cid in junk or cid in sealed:
                continue
            if cid in self.network:
                known.append(cid)
                continue
            if cid in self.validator.memo or cid in self._kept:
                continue  # validated and stored before (a closure resends its ancestors each hop)
            try:
                nodes[cid] = decode(block, cid)  # checks the block against its CID
                continue
            except CidbootError:
                pass
            try:
                opening = decode_opening(block, cid)
                if opening is not None:
                    openings[opening[0]] = opening[1]
                    continue
                decode_sealed(block, cid)
                sealed[cid] = block
            except CidbootError:
                junk[cid] = len(block)
        if junk:
            self._refuse_batch(list(junk), f"TamperedInput: {len(junk)} block(s) {who} are not provenance nodes, "
                               f"sealed values or openings of their CID ({sum(junk.values())} bytes): not stored")
        self._open(openings, sealed, who)
        self._pending = {c: b for c, b in blocks if (c in nodes or c in sealed) and (has is None or not has(c))}
        new = sum(len(b) for b in self._pending.values())
        if self.peer_bytes + new > self.peer_budget:
            self._refuse_batch(list(self._pending), f"PeerLimit: {len(self._pending)} new block(s) of {new} bytes "
                               f"{who} exceed what this agent keeps from peers ({self.peer_bytes} of "
                               f"{self.peer_budget} bytes used): nothing stored")
            return []
        admitted = known
        for cid, node in nodes.items():
            if cid in self.refused:
                continue
            if not any(self.ctx.local(op) for op, _p in self.ctx.flow.consumers_of(node.definition)):
                continue  # an ancestor in the closure: stored only if an admitted input's validation reads it
            self._from_pending = set()
            if not self._admit(node):
                continue
            # validation off (benchmarks): nothing was read, so keep every node of the exchange
            read = (self._from_pending if self.validate_inputs else set(self._pending)) | {cid}
            if not self._consumed_here(node):
                del self.network[cid]
                del self._by_def[node.definition][cid]
                for c in read:  # validated but not kept: the validator must not vouch for blocks not stored
                    self.validator.memo.pop(c, None)
                origin = "a seed" if node.is_seed else f"{node.operation}.{node.output}"
                self._refuse(cid, f"UnknownOperation: input {cid} {who}: {origin} feeds no operation of this role")
                continue
            for c in sorted(read, key=bytes):  # validated: now it may be kept
                self._store_peer(c, nodes.get(c))
            admitted.append(cid)
            self.audit.record("accepted", f"input {node.definition} {who}", inputs=[cid])
        return admitted

    def _store_peer(self, cid: CID, node: InputNode | None) -> None:
        """A validated node (or, node None, a sealed-value block a validated node links)."""
        block = self._pending.pop(cid, None)
        if block is None:
            return  # already in the store
        self._put(cid, block)
        self.peer_bytes += len(block)
        if node is not None:
            self._links[cid] = (node.parents, node.sealed)
        self._kept.add(cid)

    def _open(self, openings: Mapping[CID, bytes], sealed: Mapping[CID, bytes], who: str) -> None:
        """Check each opening against its sealed block (in the batch or the store): only a file key
        that opens exactly that block gives a value; a bad one is refused, its value stays unknown."""
        bad: list[CID] = []
        for scid, file_key in sorted(openings.items(), key=lambda kv: bytes(kv[0])):
            if scid in self._opened:
                continue
            try:
                block = sealed[scid] if scid in sealed else self.store.get(scid)
                self._batch_opened[scid] = (open_with_opening(block, file_key, scid), file_key)
            except (CidbootError, LookupError, OSError):
                bad.append(scid)
        if bad:
            self._refuse_batch(bad, f"TamperedInput: {len(bad)} opening(s) {who} do not open their sealed value")

    def _keep_openings(self) -> None:
        """After an `accept`: keep the values of sealed blocks now held (a validated node links
        them); the rest are forgotten, so a peer cannot make this agent hold values it refused."""
        has = getattr(self.store, "has", None)
        for scid, got in self._batch_opened.items():
            if scid in self._kept or (has is not None and has(scid)):
                self._opened[scid] = got
        self._batch_opened = {}

    def _seed(self) -> None:
        for s in self.ctx.flow.seed:
            sealed = self._seal(s.definition, s.value, SEED)
            cid, block = make_input(value=s.value, definition=s.definition, flow=self.ctx.flow_cid,
                                    parents=[self.ctx.flow_cid], key=self.ctx.seed_key or self.ctx.key, sealed=sealed)
            self._put(cid, block)
            node = decode(block, cid)
            if self._consumed_here(node):
                self._admit(node)

    # -- dispatch -------------------------------------------------------------------------------
    def _candidates(self, op: Operation, param: str, definition: str, *, condition: bool = False) -> list[InputNode]:
        out = []
        for node in self._by_def.get(definition, {}).values():
            origin = SEED if node.is_seed else (str(node.operation), str(node.output))
            if not self.ctx.flow.allows(op.name, param, origin):
                continue
            if condition and node.value is not True:
                continue
            out.append(node)
        return sorted(out, key=lambda n: self._order[n.cid])

    def _input_sets(self, op: Operation) -> list[dict[str, InputNode]]:
        params = sorted(op.inputs) + [f"?{c}" for c in op.conditions]
        pools = [self._candidates(op, p, op.inputs[p]) if not p.startswith("?")
                 else self._candidates(op, p[1:], p[1:], condition=True) for p in params]
        sets = []
        for combo in itertools.product(*pools):
            chosen = dict(zip(params, combo, strict=True))
            key = (op.name, tuple(n.cid for n in combo))
            if key not in self.ran:
                sets.append(chosen)
        return sets

    def _waiting_for_remote(self, stage: str) -> bool:
        """A local operation of this stage lacks an input only another role can produce."""
        for op in self.ctx.flow.operations.values():
            if op.stage != stage or not self.ctx.local(op.name):
                continue
            for p, d in op.inputs.items():
                remote = [o for o in self.ctx.flow.connections.get(op.name, {}).get(p, [])
                          if o != SEED and not self.ctx.local(o[0])]
                if remote and not self._candidates(op, p, d):
                    return True
        return False

    async def _run_stage(self, stage: str) -> bool:
        todo = []
        ops = self.ctx.flow.operations
        now = sorted(name for name in self._dirty if ops[name].stage == stage)
        self._dirty.difference_update(now)
        for op in (ops[name] for name in now):
            for chosen in self._input_sets(op):
                self.ran.add((op.name, tuple(n.cid for n in chosen.values())))
                todo.append((op, chosen))
        if todo:
            await asyncio.gather(*(self._run_one(op, chosen) for op, chosen in todo))
        return bool(todo)

    async def _run_one(self, op: Operation, chosen: dict[str, InputNode]) -> None:
        cids = [n.cid for n in chosen.values()]
        roles = []
        for n in chosen.values():
            a = self.attested.get(raw_public_bytes(n.producer_key()))
            roles.append(SEED if n.is_seed else (a.role if a else "?"))
        try:
            check_policies(self.ctx.policies, RunContext(op.name, [n.definition for n in chosen.values()], roles,
                                                         self.ctx.measurements, self.ctx.references,
                                                         PolicyScope.of(self.ctx.flow, self.ctx.placement)))
        except PolicyVeto as e:
            self.audit.record("veto", str(e), operation=op.name, inputs=cids)
            return
        fn = self.ops.get(op.name)
        if fn is None:
            raise OperationFailed(f"operation {op.name}: no implementation loaded")
        kwargs = {p: chosen[p].value for p in op.inputs}
        locks = [self._locks.setdefault(d, asyncio.Lock()) for d in sorted({op.inputs[p] for p in op.inputs})
                 if self.ctx.flow.definitions[d].lock]
        async with contextlib.AsyncExitStack() as stack:
            for lk in locks:
                await stack.enter_async_context(lk)
            self.audit.record("run", f"{op.name} on {len(cids)} validated input(s)", operation=op.name, inputs=cids)
            try:
                out = await fn(**kwargs) if inspect.iscoroutinefunction(fn) else await asyncio.to_thread(fn, **kwargs)
            except Exception as e:  # an operation's own failure: an error, not a refusal; the flow goes on
                log.info("operation %s raised", op.name, exc_info=True)  # the traceback, under -v
                text = "" if self.ctx.owner is not None else f": {e}"  # an exception's text may hold a value
                self.audit.record("error", f"{op.name} raised {type(e).__name__}{text}{_where(e)}", operation=op.name,
                                  inputs=cids)
                return
        # an operation that does not return what it declares failed (an error); an output that is
        # not a value of its definition is refused by the flow's checks (below)
        if not isinstance(out, Mapping) or not set(out) <= set(op.outputs):
            self.audit.record("error", f"{op.name} returned {type(out).__name__} without its outputs "
                              f"{sorted(op.outputs)}", operation=op.name, inputs=cids)
            return
        for name, value in sorted(out.items()):
            if name in op.expand and not isinstance(value, list):
                self.audit.record("error", f"{op.name}.{name} is expanded but returned {type(value).__name__}, "
                                  "not a list", operation=op.name, inputs=cids)
                continue
            for v in value if name in op.expand else [value]:
                # an output is a value of its definition, or it never becomes an input anywhere
                wrong = value_problem(self.ctx.flow.definitions[op.outputs[name]], v)
                if wrong is not None:
                    if self.ctx.owner is not None:  # the message shows the value
                        wrong = f"not a value of definition {op.outputs[name]!r} (value withheld: the flow has an owner)"
                    self.audit.record("refused", f"{op.name}.{name}: {wrong}", operation=op.name, inputs=cids)
                    continue
                try:
                    await self._emit(op, name, v, cids)
                except ProvenanceFormatError as e:  # e.g. a set or a NaN: it cannot become a provenance node
                    self.audit.record("error", f"{op.name}.{name}: {e}", operation=op.name, inputs=cids)

    async def _emit(self, op: Operation, output: str, value: Any, parents: list[CID]) -> None:
        definition = op.outputs[output]
        sealed = self._seal(definition, value, (op.name, output))
        cid, block = make_input(value=value, definition=definition, flow=self.ctx.flow_cid, parents=parents,
                                key=self.ctx.key, operation=op.name, output=output, sealed=sealed)
        self._put(cid, block)
        node = decode(block, cid)
        self._links[cid] = (node.parents, node.sealed)
        result = Result(definition, value, cid, op.name, sealed)
        self.results.append(result)
        self.audit.record("result", f"{op.name}.{output} -> {definition}", operation=op.name, inputs=[cid])
        if self.on_result is not None:
            self.on_result(result)
        if self._consumed_here(node):
            # validated like any input (memoised: its parents were validated before the run), so
            # "an operation runs only if every input validates" holds for our own outputs too
            self._admit(node)
        remote_roles = sorted({r for c, p in self.ctx.flow.consumers_of(definition) if not self.ctx.local(c)
                               and self.ctx.flow.allows(c, p, (op.name, output)) for r in self.ctx.roles_of(c)})
        if remote_roles and self.send is not None:
            closure = self.closure(cid)
            closure += self.openings(closure)
            for role in remote_roles:
                res = self.send(role, closure)
                if inspect.isawaitable(res):
                    await res

    def closure(self, cid: CID) -> list[Block]:
        """The node and all its provenance ancestors (not the flow block), with the sealed-value
        blocks they link: what a peer needs."""
        out: dict[CID, bytes] = {}
        stack = [cid]
        while stack:
            c = stack.pop()
            if c in out or c == self.ctx.flow_cid:
                continue
            block = self.store.get(c)
            out[c] = block
            links = self._links.get(c)
            if links is None:
                node = decode(block, c)
                links = self._links[c] = (node.parents, node.sealed)
            parents, sealed = links
            if sealed is not None and sealed not in out:
                out[sealed] = self.store.get(sealed)
            stack.extend(parents)
        return list(out.items())

    def openings(self, blocks: Sequence[Block]) -> list[Block]:
        """An opening (the age file key) for each sealed value among `blocks` this agent can open:
        sent beside them to an attested peer, which needs the values it validates and computes on."""
        return [make_opening(c, self._opened[c][1]) for c, _b in blocks if c in self._opened]

    async def run(self) -> list[Result]:
        """Seed, then each stage until nothing more runs (waiting for peers' inputs when a local
        operation needs them), and return this agent's results."""
        self._loop = asyncio.get_running_loop()
        self._arrived = asyncio.Event()
        self._seed()
        deadline = self._loop.time() + self.remote_wait
        for stage in STAGES:
            while True:
                if await self._run_stage(stage):
                    continue
                if not self._stopped and self._waiting_for_remote(stage) and self._loop.time() < deadline:
                    self._arrived.clear()
                    self.waiting = True
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._arrived.wait(), max(0.1, deadline - self._loop.time()))
                    self.waiting = False
                    continue
                break
        return self.results

    @property
    def idle(self) -> bool:
        """Blocked on peers' inputs with none arrived since (nothing to do until one does)."""
        return self.waiting and self._arrived is not None and not self._arrived.is_set()

    def stop(self) -> None:
        """Stop waiting for peers' inputs: the run finishes what it can and returns (used when
        every role runs in one process and none of them can make progress any more)."""
        self._stopped = True
        if self._arrived is not None:
            if self._loop is not None and self._loop.is_running():
                self._loop.call_soon_threadsafe(self._arrived.set)  # from another thread: wake the loop
            else:
                self._arrived.set()


def _where(e: BaseException) -> str:
    """Where an operation raised (its innermost frame), for the one-line audit reason; the whole
    traceback goes to the log under -v."""
    tb = e.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    if tb is None:
        return ""
    code = tb.tb_frame.f_code
    return f" (at {Path(code.co_filename).name}:{tb.tb_lineno} in {code.co_name})"
