"""The dataflow model (DFFML's): definitions, operations, seed inputs and flow connections.

One model, two sources: the `dataflow` section of a flow.yaml (exactly the DAG-CBOR block the
manifest's `flow` CID names) and a flow exported by DFFML (`dffml dataflow create ...`, its
JSON/YAML export). The orchestrator, the provenance validator and the policies all read it.

Connections say where each parameter may take its inputs from: `"seed"` or an
(operation, output) pair. Without an explicit `flow`, auto-flow applies as in DFFML: a
parameter is fed by the seed and by every operation that outputs its definition.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from cidboot import dagcbor
from cidboot.cid import CID, DAG_CBOR
from cidboot.errors import FormatError

STAGES = ("processing", "cleanup", "output")
SEED = "seed"
Origin = str | tuple[str, str]  # "seed" or (operation, output)
# keys DFFML writes into an export that cidboot has no use for (configs, implementations...)
DFFML_EXTRAS = frozenset({"configs", "forward", "by_origin", "implementations", "linked", "instance_name", "retry",
                          "validator", "spec", "subspec", "links", "lock", "name"})


class FlowFormatError(FormatError):
    """A dataflow document is malformed (the message names the key)."""


@dataclass(frozen=True)
class Definition:
    name: str
    primitive: str
    lock: bool = False  # DFFML: an input of a locked definition is used by one operation at a time


@dataclass(frozen=True)
class Operation:
    name: str
    implementation: str  # "module:function"
    inputs: Mapping[str, str]  # parameter -> definition
    outputs: Mapping[str, str]  # output name -> definition
    conditions: tuple[str, ...] = ()  # definitions whose value must be True
    stage: str = "processing"
    expand: tuple[str, ...] = ()  # outputs whose list value becomes one input per item


@dataclass(frozen=True)
class Seed:
    definition: str
    value: Any


@dataclass
class DataFlow:
    definitions: dict[str, Definition]
    operations: dict[str, Operation]
    seed: list[Seed] = field(default_factory=list)
    connections: dict[str, dict[str, list[Origin]]] = field(default_factory=dict)  # op -> param -> origins
    condition_sources: dict[str, dict[str, list[Origin]]] = field(default_factory=dict)
    source: Any = None  # the document it was read from (its CID is the flow CID)

    # -- reading ------------------------------------------------------------------------------
    @classmethod
    def from_obj(cls, doc: Any) -> DataFlow:
        """The `dataflow` section of a flow.yaml / the manifest's flow block."""
        d = _map(doc, "dataflow")
        _only(d, {"definitions", "operations", "seed", "flow"}, "dataflow")
        defs = {}
        for name, spec in _map(d.get("definitions"), "dataflow.definitions").items():
            s = _map(spec, f"dataflow.definitions.{name}")
            _only(s, {"primitive", "lock"}, f"dataflow.definitions.{name}")
            defs[name] = Definition(name, _str(s.get("primitive"), f"dataflow.definitions.{name}.primitive"),
                                    bool(s.get("lock", False)))
        ops = {name: _operation(name, spec, f"dataflow.operations.{name}", set())
               for name, spec in _map(d.get("operations"), "dataflow.operations").items()}
        seeds = [_seed(s, f"dataflow.seed[{i}]") for i, s in enumerate(_list(d.get("seed", []), "dataflow.seed"))]
        flow = cls(defs, ops, seeds, source=doc)
        flow._connect(d.get("flow"), "dataflow.flow")
        return flow

    @classmethod
    def from_dffml(cls, doc: Any) -> DataFlow:
        """A DFFML DataFlow export: definitions/operations keyed by name, `seed` as a list of
        {definition, value}, `flow` as {op: {inputs: {param: ["seed" | {op: output}]}}}."""
        d = _map(doc, "DFFML dataflow")
        _only(d, {"definitions", "operations", "seed", "flow"} | DFFML_EXTRAS, "DFFML dataflow")
        defs = {}
        for name, spec in _map(d.get("definitions"), "definitions").items():
            s = _map(spec, f"definitions.{name}")
            defs[name] = Definition(name, _str(s.get("primitive"), f"definitions.{name}.primitive"),
                                    bool(s.get("lock", False)))
        ops = {}
        for name, spec in _map(d.get("operations"), "operations").items():
            s = dict(_map(spec, f"operations.{name}"))
            s.setdefault("implementation", f"{s.get('name', name)}:{s.get('name', name)}")
            ops[name] = _operation(name, s, f"operations.{name}", DFFML_EXTRAS)
        seeds = [_seed(s, f"seed[{i}]", DFFML_EXTRAS) for i, s in enumerate(_list(d.get("seed", []), "seed"))]
        flow = cls(defs, ops, seeds, source=doc)
        flow._connect(d.get("flow"), "flow")
        return flow

    def _connect(self, explicit: Any, where: str) -> None:
        for op in self.operations.values():
            for dname in [*op.inputs.values(), *op.outputs.values(), *op.conditions]:
                if dname not in self.definitions:
                    raise FlowFormatError(f"{where}: operation {op.name}: undefined definition {dname!r}")
        for seed in self.seed:
            if seed.definition not in self.definitions:
                raise FlowFormatError(f"{where}: seed: undefined definition {seed.definition!r}")
        if explicit is None:
            for op in self.operations.values():
                self.connections[op.name] = {p: self._auto(d) for p, d in op.inputs.items()}
                self.condition_sources[op.name] = {c: self._auto(c) for c in op.conditions}
            return
        conns = _map(explicit, where)
        for opname, spec in conns.items():
            if opname not in self.operations:
                raise FlowFormatError(f"{where}.{opname}: no such operation")
            s = _map(spec, f"{where}.{opname}")
            _only(s, {"inputs", "conditions"}, f"{where}.{opname}")
            op = self.operations[opname]
            self.connections[opname] = {}
            for param, origins in _map(s.get("inputs", {}), f"{where}.{opname}.inputs").items():
                if param not in op.inputs:
                    raise FlowFormatError(f"{where}.{opname}.inputs.{param}: not a parameter of {opname}")
                self.connections[opname][param] = [self._origin(o, op.inputs[param], f"{where}.{opname}.inputs.{param}")
                                                   for o in _list(origins, f"{where}.{opname}.inputs.{param}")]
            conds = s.get("conditions", [])
            self.condition_sources[opname] = {}
            for i, o in enumerate(_list(conds, f"{where}.{opname}.conditions")):
                origin = self._origin(o, None, f"{where}.{opname}.conditions[{i}]")
                if i >= len(op.conditions):
                    raise FlowFormatError(f"{where}.{opname}.conditions[{i}]: {opname} declares no such condition")
                self.condition_sources[opname].setdefault(op.conditions[i], []).append(origin)
        for op in self.operations.values():  # parameters the explicit flow leaves out: auto-flow
            self.connections.setdefault(op.name, {})
            for p, dname in op.inputs.items():
                self.connections[op.name].setdefault(p, self._auto(dname))
            self.condition_sources.setdefault(op.name, {})
            for c in op.conditions:
                self.condition_sources[op.name].setdefault(c, self._auto(c))

    def _auto(self, definition: str) -> list[Origin]:
        out: list[Origin] = [SEED]
        out += [(op.name, o) for op in sorted(self.operations.values(), key=lambda x: x.name)
                for o, d in sorted(op.outputs.items()) if d == definition]
        return out

    def _origin(self, raw: Any, definition: str | None, where: str) -> Origin:
        if raw == SEED or (isinstance(raw, Mapping) and set(raw) == {SEED}):  # DFFML also writes {"seed": [defs]}
            return SEED
        if isinstance(raw, Mapping) and len(raw) == 1:
            (opname, output), = raw.items()
            op = self.operations.get(opname)
            if op is None or output not in op.outputs:
                raise FlowFormatError(f"{where}: {opname}.{output} is not an output of the flow")
            if definition is not None and op.outputs[output] != definition:
                raise FlowFormatError(f"{where}: {opname}.{output} is a {op.outputs[output]}, not a {definition}")
            return (str(opname), str(output))
        raise FlowFormatError(f"{where}: an origin is \"seed\" or {{operation: output}}, got {raw!r}")

    # -- questions the orchestrator and validator ask -------------------------------------
    def producers_of(self, definition: str) -> list[tuple[str, str]]:
        return [(op.name, o) for op in self.operations.values() for o, d in op.outputs.items() if d == definition]

    def consumers_of(self, definition: str) -> list[tuple[str, str]]:
        """(operation, parameter) pairs that take this definition (as input or condition)."""
        out = [(op.name, p) for op in self.operations.values() for p, d in op.inputs.items() if d == definition]
        out += [(op.name, c) for op in self.operations.values() for c in op.conditions if c == definition]
        return out

    def allows(self, op: str, param: str, origin: Origin) -> bool:
        srcs = self.connections.get(op, {}).get(param)
        if srcs is None:
            srcs = self.condition_sources.get(op, {}).get(param, [])
        return origin in srcs

    def to_obj(self) -> dict[str, Any]:
        """Canonical form (what `cid` hashes when the flow was not read from a block)."""
        return {
            "definitions": {n: {"primitive": d.primitive, **({"lock": True} if d.lock else {})}
                            for n, d in sorted(self.definitions.items())},
            "operations": {n: {"implementation": o.implementation, "inputs": dict(o.inputs), "outputs": dict(o.outputs),
                               "stage": o.stage, **({"conditions": list(o.conditions)} if o.conditions else {}),
                               **({"expand": list(o.expand)} if o.expand else {})}
                           for n, o in sorted(self.operations.items())},
            "seed": [{"definition": s.definition, "value": s.value} for s in self.seed],
            "flow": {op: {"inputs": {p: [o if o == SEED else {o[0]: o[1]} for o in origins]
                                     for p, origins in sorted(params.items())}}
                     for op, params in sorted(self.connections.items())},
        }

    @property
    def cid(self) -> CID:
        """The flow CID: of the block it was read from (manifest `flow`), else of to_obj()."""
        return CID.of(dagcbor.encode(self.source if self.source is not None else self.to_obj()), DAG_CBOR)


def _map(v: Any, where: str) -> Mapping[str, Any]:
    if not isinstance(v, Mapping) or not all(isinstance(k, str) for k in v):
        raise FlowFormatError(f"{where}: must be a map with string keys")
    return v


def _list(v: Any, where: str) -> list[Any]:
    if not isinstance(v, list | tuple):
        raise FlowFormatError(f"{where}: must be a list")
    return list(v)


def _str(v: Any, where: str) -> str:
    if not isinstance(v, str) or not v:
        raise FlowFormatError(f"{where}: must be a non-empty string")
    return v


def _only(d: Mapping[str, Any], allowed: set[str] | frozenset[str], where: str) -> None:
    extra = sorted(set(d) - set(allowed))
    if extra:
        raise FlowFormatError(f"{where}: unknown keys {extra}")


def _names(v: Any, where: str) -> Mapping[str, str]:
    m = _map(v if v is not None else {}, where)
    for k, d in m.items():
        _str(d, f"{where}.{k}")
    return dict(m)


def _operation(name: str, spec: Any, where: str, extras: frozenset[str] | set[str]) -> Operation:
    s = _map(spec, where)
    _only(s, {"implementation", "inputs", "outputs", "conditions", "stage", "expand"} | set(extras), where)
    stage = s.get("stage", "processing")
    if stage not in STAGES:
        raise FlowFormatError(f"{where}.stage: must be one of {STAGES}, got {stage!r}")
    impl = _str(s.get("implementation"), f"{where}.implementation")
    if ":" not in impl:
        raise FlowFormatError(f"{where}.implementation: must be module:function, got {impl!r}")
    outputs = _names(s.get("outputs"), f"{where}.outputs")
    expand = tuple(str(x) for x in _list(s.get("expand") or [], f"{where}.expand"))
    for e in expand:
        if e not in outputs:
            raise FlowFormatError(f"{where}.expand: {e!r} is not an output")
    return Operation(name, impl, _names(s.get("inputs"), f"{where}.inputs"), outputs,
                     tuple(str(c) for c in _list(s.get("conditions") or [], f"{where}.conditions")), str(stage), expand)


def _seed(raw: Any, where: str, extras: frozenset[str] | set[str] = frozenset()) -> Seed:
    s = _map(raw, where)
    _only(s, {"definition", "value"} | set(extras), where)
    if "value" not in s:
        raise FlowFormatError(f"{where}: missing value")
    return Seed(_str(s.get("definition"), f"{where}.definition"), s["value"])
