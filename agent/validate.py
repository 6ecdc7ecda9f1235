"""Provenance validation: may this input be used? Checked before an operation runs.

For an input node (cidboot.dataflow.provenance), in this order, each failure its own exception type:
1. the block hashes to its CID and parses;                  -> TamperedInput
2. it is signed by the producer key it names;               -> ForgedSignature
3. it belongs to this flow (flow CID);                      -> WrongFlow
4. a seed's (definition, value) is one of the flow's seeds, signed by the flow authority or
   an attested agent;                                       -> UnknownSeed / UnattestedProducer
   an operation's output: the operation exists, outputs this definition, and is placed on
   the role its producer was attested in;                   -> UnknownOperation
   the producer is an attested agent (agent.attested: affirming appraisal = DICE chain to a
   registered device, measurements equal to the manifest's reference values);
                                                            -> UnattestedProducer
5. every parent validates, recursively;                     -> TamperedParent (naming the path)
Results are memoised by CID: a DAG shared by many inputs is checked once.

Sealed values (cidboot.dataflow.sealing): a node that links a sealed-value block is checked the
same way, and its sealed block must be there, hash to its CID and be a well-formed age file
(else MissingInput / TamperedInput). The two checks that read a value (a seed is one of the
flow's, a condition was true) use `values(sealed CID)`: the plaintext this reader holds (its own
outputs, a peer's opening, the owner's key). An agent has them all (fail closed:
SealedValueUnavailable otherwise); a third party without keys validates `blind=True`: those
checks are then listed in `unchecked`, not passed, and nothing else is skipped.
Policies are per run, not per input: `check_policies` raises PolicyVeto with agent.policy's reason.

Public API:
    v = Validator(flow, flow_cid, placement, attested, get_block, authority_keys=frozenset())
    v.validate(cid) -> InputNode          # raises one ProvenanceError subclass (or ForgedSignature)
    check_policies(policies, run_context) # raises PolicyVeto
Every exception is a cidboot.errors.VerificationError, so callers that only care "valid or not"
catch that; the orchestrator records type name and message in the audit log.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from agent.attested import AttestedAgents
from agent.policy import RunContext, veto_reason
from cidboot.dataflow.model import DataFlow
from cidboot.dataflow.provenance import ForgedSignature, InputNode, decode, verify_signature
from cidboot.dataflow.sealing import SealedValueUnavailable, decode_sealed
from cidboot.errors import FormatError, VerificationError
from cidboot.ipld import dagcbor
from cidboot.ipld.cid import CID
from cidboot.trust.cose_key import raw_public_bytes

__all__ = ["ForgedSignature", "MissingInput", "PolicyVeto", "ProvenanceError", "SealedValueUnknown", "TamperedInput", "TamperedParent",
           "UnattestedProducer", "UnknownOperation", "UnknownSeed", "Validator", "WrongFlow", "check_policies"]


class ProvenanceError(VerificationError):
    """An input's provenance does not validate (subclasses say which check)."""


class TamperedInput(ProvenanceError):
    """The block does not hash to its CID, or is not a provenance node."""


class WrongFlow(ProvenanceError):
    """The input belongs to another flow."""


class UnknownSeed(ProvenanceError):
    """A seed the flow does not declare."""


class UnknownOperation(ProvenanceError):
    """Produced by an operation not in the flow, not outputting this definition, or not placed
    on the producer's role."""


class UnattestedProducer(ProvenanceError):
    """The producer is neither the flow authority nor an agent attested affirming."""


class TamperedParent(ProvenanceError):
    """A parent (or an ancestor) does not validate."""


class MissingInput(ProvenanceError):
    """A parent block is not available."""


class SealedValueUnknown(ProvenanceError, SealedValueUnavailable):
    """A check needs a sealed value this validator cannot open (not blind: fail closed)."""


class PolicyVeto(ProvenanceError):
    """A manifest policy vetoes the operation."""


@dataclass
class Validator:
    flow: DataFlow
    flow_cid: CID
    placement: Mapping[str, list[str]]
    attested: AttestedAgents
    get_block: Callable[[CID], bytes]
    authority_keys: frozenset[bytes] = frozenset()  # raw public keys of the flow authority
    memo: dict[CID, InputNode] = field(default_factory=dict)
    # sealed values: sealed-value CID -> (known, plaintext); blind: a third party without keys
    values: Callable[[CID], tuple[bool, Any]] | None = None
    blind: bool = False
    unchecked: list[str] = field(default_factory=list)  # value checks a blind validation could not make

    def validate(self, cid: CID, node: InputNode | None = None) -> InputNode:
        """Check `cid` and all its ancestors (iteratively: provenance chains can be thousands deep).
        `node`: the caller already decoded the block against `cid` (saves one fetch and decode)."""
        done = self.memo.get(cid)
        if done is not None:
            return done
        checked: dict[CID, InputNode] = {}
        stack: list[tuple[CID, CID | None]] = [(cid, None)]
        while stack:
            c, child = stack.pop()
            if c in self.memo or c in checked:
                continue
            try:
                n = self._check(c, node if c == cid else None)
            except VerificationError as e:  # ForgedSignature comes from cidboot.dataflow.provenance
                if child is None:
                    raise
                raise TamperedParent(f"input {cid}: ancestor {c} (a parent of {child}): {e}") from None
            checked[c] = n
            if not n.is_seed:
                stack.extend((p, c) for p in n.parents)
        for c, n in checked.items():  # parents exist and validate: now, are they an input set?
            if not n.is_seed:
                try:
                    self._check_input_set(n, checked)
                except ProvenanceError as e:
                    if c == cid:
                        raise
                    raise TamperedParent(f"input {cid}: ancestor {c}: {e}") from None
        self.memo.update(checked)
        return checked[cid]

    def _load(self, cid: CID) -> InputNode:
        try:
            block = self.get_block(cid)
        except VerificationError as e:  # a store that checks CIDs on read found other bytes
            raise TamperedInput(f"input {cid}: {e}") from None
        except (LookupError, OSError, FormatError) as e:
            raise MissingInput(f"input {cid}: block not available: {e}") from None
        try:
            return decode(block, cid)
        except (VerificationError, FormatError) as e:
            raise TamperedInput(f"input {cid}: {e}") from None

    def _check(self, cid: CID, known: InputNode | None = None) -> InputNode:
        """Everything about one node except its parents."""
        node = known if known is not None and known.cid == cid else self._load(cid)
        verify_signature(node)
        if node.sealed is not None:
            node = self._sealed(node)
        if node.flow != self.flow_cid:
            raise WrongFlow(f"input {cid}: belongs to flow {node.flow}, not {self.flow_cid}")
        producer = raw_public_bytes(node.producer_key())
        agent = self.attested.get(producer)
        if node.is_seed:
            if self._readable(node, "seed value not compared with the flow's seeds"):
                value = dagcbor.encode(node.value)  # by encoding: 1 is not true, 2.0 is not 2
                if not any(s.definition == node.definition and dagcbor.encode(s.value) == value for s in self.flow.seed):
                    shown = "(sealed)" if node.sealed is not None else f"{node.value!r}"  # no plaintext in the audit
                    raise UnknownSeed(f"input {cid}: seed {node.definition}={shown} is not in the flow")
            if producer not in self.authority_keys and agent is None:
                raise UnattestedProducer(f"input {cid}: seed signed by a key that is neither the flow authority "
                                         "nor an attested agent")
            if list(node.parents) != [self.flow_cid]:
                raise TamperedParent(f"input {cid}: a seed's only parent is the flow")
            return node
        op = self.flow.operations.get(str(node.operation))
        if op is None:
            raise UnknownOperation(f"input {cid}: produced by operation {node.operation!r}, which is not in the flow")
        if op.outputs.get(str(node.output)) != node.definition:
            raise UnknownOperation(f"input {cid}: {op.name} has no output {node.output!r} of {node.definition}")
        if agent is None:
            raise UnattestedProducer(f"input {cid}: produced by an agent that is not attested affirming")
        if self.placement and op.name not in self.placement.get(agent.role, []):
            raise UnknownOperation(f"input {cid}: {op.name} is not placed on role {agent.role!r}, "
                                   "the role its producer was attested in")
        return node


    def _check_input_set(self, n: InputNode, checked: Mapping[CID, InputNode]) -> None:
        """The parents of an operation's output are one complete input set of that operation, in
        the orchestrator's order (parameters sorted by name, then conditions): one per parameter,
        of its definition, from an origin the flow connects there; a condition's is True. Without
        this an attested producer could claim an output with no inputs, or from the wrong ones."""
        op = self.flow.operations[str(n.operation)]
        params = [(p, op.inputs[p], False) for p in sorted(op.inputs)] + [(c, c, True) for c in op.conditions]
        if len(n.parents) != len(params):
            raise TamperedParent(f"input {n.cid}: {op.name} takes {len(params)} input(s), the node names "
                                 f"{len(n.parents)} parent(s)")
        for (param, definition, condition), pcid in zip(params, n.parents, strict=True):
            p = checked.get(pcid) or self.memo[pcid]
            origin = "seed" if p.is_seed else (str(p.operation), str(p.output))
            if p.definition != definition or not self.flow.allows(op.name, param, origin):
                raise TamperedParent(f"input {n.cid}: parent {pcid} ({p.definition} from {p.origin}) cannot feed "
                                     f"{op.name}.{param}")
            if condition and self._readable(p, f"condition {param} of {op.name} not checked true") \
                    and p.value is not True:
                raise TamperedParent(f"input {n.cid}: condition {param} of {op.name} was not true")

    def _sealed(self, node: InputNode) -> InputNode:
        """The sealed block is there and well formed; the value filled in when this reader has it."""
        assert node.sealed is not None
        try:
            block = self.get_block(node.sealed)
        except VerificationError as e:
            raise TamperedInput(f"input {node.cid}: sealed value {node.sealed}: {e}") from None
        except (LookupError, OSError, FormatError) as e:
            raise MissingInput(f"input {node.cid}: sealed value {node.sealed} not available: {e}") from None
        try:
            decode_sealed(block, node.sealed)
        except (VerificationError, FormatError) as e:
            raise TamperedInput(f"input {node.cid}: sealed value {node.sealed}: {e}") from None
        known, value = self.values(node.sealed) if self.values is not None else (False, None)
        return replace(node, value=value) if known else node

    def _readable(self, node: InputNode, what: str) -> bool:
        """Can a check read this node's value? A sealed one unopened: blind -> noted, else refused."""
        if node.sealed is None or (self.values is not None and self.values(node.sealed)[0]):
            return True
        if self.blind:
            self.unchecked.append(f"input {node.cid} ({node.definition}, sealed): {what}")
            return False
        raise SealedValueUnknown(f"input {node.cid}: its {node.definition} value is sealed and this agent has no "
                                 "opening for it")


def check_policies(policies: Sequence[Mapping[str, Any]], ctx: RunContext) -> None:
    """Raise PolicyVeto when a policy vetoes this run (a malformed policy vetoes everything)."""
    why = veto_reason(policies, ctx)
    if why is not None:
        raise PolicyVeto(why)
