"""The dataflow model (DFFML's): definitions, operations, seed inputs and flow connections.

One model, two sources: the `dataflow` section of a flow.yaml (exactly the DAG-CBOR block the
manifest's `flow` CID names) and a flow exported by DFFML (`dffml dataflow create ...`, its
JSON/YAML export). The orchestrator, the provenance validator and the policies all read it.

Connections say where each parameter may take its inputs from: `"seed"` or an
(operation, output) pair. Without an explicit `flow` (or for a parameter it leaves out),
auto-flow applies exactly as DFFML's DataFlow.auto_flow: a parameter is fed by every operation
that outputs its definition, and by the seed when no operation does. Conditions are connected
the same way; an explicit `conditions` list (DFFML: one flat list of origins per operation)
feeds each condition whose definition the origin produces ("seed" feeds them all).

DFFML exports come in two shapes and both load: linked (the `dffml dataflow create` default:
top-level `definitions`, operations naming definitions by name, `"linked": true`) and
unlinked (`-not-linked`: each operation input/output/condition and each seed's `definition`
an inline {name, primitive, ...}). DFFML keeps implementations out of the export (it finds
them by entry point); here operation NAME is implemented by `MODULE:NAME` (`module`, default
"ops"). An alternate-definition origin ({"seed": [defs]}) is accepted only when it names the
parameter's own definition: definitions are locked to parameters.

Public API:
    DataFlow.from_obj(dataflow_section) -> DataFlow           # flow.yaml / manifest flow block
    DataFlow.from_dffml(export, module="ops") -> DataFlow     # DFFML DataFlow.export()
    flow.allows(op, param_or_condition, origin) -> bool       # origin: "seed" | (op, output)
    flow.consumers_of(definition) / producers_of(definition)
    flow.cid                                                  # CID of the block it was read from
Malformed input raises FlowFormatError (a cidboot FormatError) naming the dotted key.

This is the one model: `cidboot.dataflow.checks` validates a flow (cycles through these very
connections, seeds, implementations, placement, policies) for every tool that reads one, so
nothing computes auto-flow or the operation graph a second way.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from cidboot.errors import FormatError
from cidboot.ipld import dagcbor
from cidboot.ipld.cid import CID, DAG_CBOR

STAGES = ("processing", "cleanup", "output")
SEED = "seed"
Origin = str | tuple[str, str]  # "seed" or (operation, output)
# keys DFFML (0.4) writes that cidboot has no use for; everything else unknown is an error
DFFML_TOP = frozenset({"definitions", "operations", "seed", "flow", "linked", "configs", "forward"})
DFFML_OP = frozenset({"name", "inputs", "outputs", "conditions", "stage", "expand", "retry", "instance_name",
                      "validator"})
DFFML_DEF = frozenset({"name", "primitive", "lock", "spec", "subspec", "validate", "default", "links"})


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
    _consumers: dict[str, list[tuple[str, str]]] | None = field(default=None, repr=False, compare=False)

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
            lock = s.get("lock", False)
            if not isinstance(lock, bool):
                raise FlowFormatError(f"dataflow.definitions.{name}.lock: must be true or false")
            defs[name] = Definition(name, _str(s.get("primitive"), f"dataflow.definitions.{name}.primitive"), lock)
        ops = {name: _operation(name, spec, f"dataflow.operations.{name}", set())
               for name, spec in _map(d.get("operations"), "dataflow.operations").items()}
        seeds = [_seed(s, f"dataflow.seed[{i}]") for i, s in enumerate(_list(d.get("seed", []), "dataflow.seed"))]
        flow = cls(defs, ops, seeds, source=doc)
        flow._connect(d.get("flow"), "dataflow.flow")
        return flow

    @classmethod
    def from_dffml(cls, doc: Any, module: str = "ops") -> DataFlow:
        """A DFFML DataFlow export (linked or not): see the module docstring."""
        d = _map(doc, "DFFML dataflow")
        _only(d, DFFML_TOP, "DFFML dataflow")
        defs: dict[str, Definition] = {}
        for name, spec in _map(d.get("definitions", {}), "definitions").items():
            defs[name] = _dffml_definition(spec, f"definitions.{name}", name)
        ops = {}
        for inst, spec in _map(d.get("operations"), "operations").items():
            where = f"operations.{inst}"
            s = _map(spec, where)
            _only(s, DFFML_OP, where)
            fn = _str(s.get("name", inst), f"{where}.name")
            converted = {
                "implementation": f"{module}:{fn}",
                "inputs": {p: _dffml_ref(v, defs, f"{where}.inputs.{p}")
                           for p, v in _map(s.get("inputs", {}), f"{where}.inputs").items()},
                "outputs": {o: _dffml_ref(v, defs, f"{where}.outputs.{o}")
                            for o, v in _map(s.get("outputs", {}), f"{where}.outputs").items()},
                "conditions": [_dffml_ref(c, defs, f"{where}.conditions[{i}]")
                               for i, c in enumerate(_list(s.get("conditions") or [], f"{where}.conditions"))],
                "stage": s.get("stage", "processing"), "expand": s.get("expand") or []}
            ops[inst] = _operation(inst, converted, where, set())
        seeds = []
        for i, raw in enumerate(_list(d.get("seed", []), "seed")):
            item = _map(raw, f"seed[{i}]")
            _only(item, {"definition", "value", "origin"}, f"seed[{i}]")
            if item.get("origin", SEED) != SEED:
                raise FlowFormatError(f"seed[{i}].origin: a seed's origin is \"seed\", got {item['origin']!r}")
            if "value" not in item:
                raise FlowFormatError(f"seed[{i}]: missing value")
            seeds.append(Seed(_dffml_ref(item.get("definition"), defs, f"seed[{i}].definition"), item["value"]))
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
            if "conditions" in s:
                self.condition_sources[opname] = {c: [] for c in op.conditions}
            for i, o in enumerate(_list(s.get("conditions", []), f"{where}.{opname}.conditions")):
                cw = f"{where}.{opname}.conditions[{i}]"
                origin = self._origin(o, None, cw)
                fed = [c for c in op.conditions
                       if origin == SEED or self.operations[origin[0]].outputs[origin[1]] == c]
                if not fed:
                    raise FlowFormatError(f"{cw}: {_show(origin)} feeds none of {opname}'s conditions "
                                          f"{list(op.conditions)}")
                for c in fed:
                    self.condition_sources[opname][c].append(origin)
        for op in self.operations.values():  # parameters the explicit flow leaves out: auto-flow
            self.connections.setdefault(op.name, {})
            for p, dname in op.inputs.items():
                self.connections[op.name].setdefault(p, self._auto(dname))
            self.condition_sources.setdefault(op.name, {})
            for c in op.conditions:
                self.condition_sources[op.name].setdefault(c, self._auto(c))

    def _auto(self, definition: str) -> list[Origin]:
        """DFFML's auto_flow: every producer of the definition, else the seed."""
        out: list[Origin] = [(op.name, o) for op in sorted(self.operations.values(), key=lambda x: x.name)
                             for o, d in sorted(op.outputs.items()) if d == definition]
        return out or [SEED]

    def _origin(self, raw: Any, definition: str | None, where: str) -> Origin:
        if isinstance(raw, list) and len(raw) == 1 and isinstance(raw[0], Mapping):
            raw = raw[0]  # DFFML also accepts [{origin}] for {origin}
        if isinstance(raw, Mapping) and len(raw) == 1 and isinstance(next(iter(raw.values())), list):
            (key, alternates), = raw.items()  # DFFML alternate definitions: {"seed": ["package"]}
            if key != SEED:
                raise FlowFormatError(f"{where}: alternate definitions only come from the seed, got {raw!r}")
            bad = [a for a in alternates if a != definition]
            if definition is None or bad:
                raise FlowFormatError(f"{where}: alternate definitions {bad or alternates} differ from the "
                                      f"parameter's {definition!r} (definitions are locked to parameters)")
            return SEED
        if raw == SEED:
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
        if self._consumers is None:  # asked for every input the orchestrator sees: index once
            index: dict[str, list[tuple[str, str]]] = {}
            for op in self.operations.values():
                for p, d in op.inputs.items():
                    index.setdefault(d, []).append((op.name, p))
            for op in self.operations.values():
                for c in op.conditions:
                    index.setdefault(c, []).append((op.name, c))
            self._consumers = index
        return list(self._consumers.get(definition, []))

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


def _show(origin: Origin) -> str:
    return SEED if origin == SEED else f"{origin[0]}.{origin[1]}"


def _dffml_definition(spec: Any, where: str, name: str | None = None) -> Definition:
    s = _map(spec, where)
    _only(s, DFFML_DEF, where)
    dname = _str(s.get("name", name), f"{where}.name")
    if name is not None and dname != name:
        raise FlowFormatError(f"{where}.name: {dname!r} under the key {name!r}")
    lock = s.get("lock", False)
    if not isinstance(lock, bool):
        raise FlowFormatError(f"{where}.lock: must be true or false")
    return Definition(dname, _str(s.get("primitive"), f"{where}.primitive"), lock)


def _dffml_ref(raw: Any, defs: dict[str, Definition], where: str) -> str:
    """A definition by name (linked export) or inline (unlinked), registered in `defs`."""
    if isinstance(raw, str):
        if raw not in defs:
            raise FlowFormatError(f"{where}: undefined definition {raw!r}")
        return raw
    d = _dffml_definition(raw, where)
    if d.name in defs and defs[d.name] != d:
        raise FlowFormatError(f"{where}: definition {d.name!r} conflicts with an earlier one ({defs[d.name]})")
    defs[d.name] = d
    return d.name


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
