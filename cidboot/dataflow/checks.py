"""The semantic checks of a flow: one validator for every tool that reads one.

`imagebuilder lock|build|inspect`, `agent run` (flow.yaml or signed manifest) and the QEMU
harness all call `check()`, which reads the flow through the one model (`cidboot.dataflow.model.DataFlow`,
so auto-flow is connected exactly as the orchestrator connects it) and returns every problem
at once. Each `Problem` carries a `code` (what kind of failure, for code to branch on), a
`path` into the flow document (`("dataflow", "operations", "a")`, for a YAML front end to turn
into `file:line:col`) and a precise message. `FlowError` carries the list.

What is checked, and why:
- shape: unknown keys anywhere (a misspelt `polices:` must not silently drop every policy),
  primitives from `PRIMITIVES`, `module:function` implementations, origins;
- references: every definition, operation and output a flow, seed, placement or policy names;
- cycles through the connections the model makes, auto-flow included (a cycle that exists
  only through auto-flow runs nothing, and the run would "succeed");
- seeds: each value has its definition's primitive (`value_problem`, also used on outputs at
  run time by the orchestrator);
- implementations: the module defines the function, and each input name is one of its
  parameters and each parameter without a default is fed (read with `ast`, never imported);
- placement: it names existing operations, and when a flow has a placement every operation is
  placed on a role (an unplaced operation never runs anywhere);
- policies (`policy_problems`, shared with agent.policy's enforcement): `producer` is a role
  of the placement or `"seed"`, `operation`/`definition` exist, `measurement` is a layer. A
  rule that names nothing real would never match: that turns a security rule off, so it is
  an error here and a veto of everything on the agent.
"""

from __future__ import annotations

import ast
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cidboot.dataflow.model import SEED, STAGES, DataFlow, Definition, FlowFormatError, Operation
from cidboot.errors import CidbootError, FormatError, NotFoundError

Path_ = tuple[str | int, ...]

PRIMITIVES = ("str", "int", "float", "bool", "bytes", "map", "array")
LAYERS = ("firmware", "bootstrap", "image")
FILE_KEYS = frozenset({"name", "version", "target", "arch", "encrypt", "image", "dataflow", "placement", "policies",
                       "trust"})
DATAFLOW_KEYS = frozenset({"definitions", "operations", "seed", "flow"})
DEFINITION_KEYS = frozenset({"primitive", "lock"})
OPERATION_KEYS = frozenset({"implementation", "inputs", "outputs", "conditions", "stage", "expand"})
SEED_KEYS = frozenset({"definition", "value"})
CONNECTION_KEYS = frozenset({"inputs", "conditions"})
POLICY_KEYS = frozenset({"name", "veto", "unless"})
VETO_KEYS = frozenset({"operation", "definition", "producer", "measurement"})
UNLESS_KEYS = frozenset({"measurement", "equals"})
# DFFML exports spell primitives their own way; these are the spellings a value can be checked
# against. "any"/"generic" (DFFML's unconstrained primitives, never in a flow.yaml: not in
# PRIMITIVES) say explicitly that every value is one. Any other primitive cannot be checked,
# so a value of it is refused (fail closed).
_KINDS = {"any": "any", "generic": "any", "str": "str", "string": "str", "int": "int", "integer": "int", "float": "float", "bool": "bool",
          "boolean": "bool", "bytes": "bytes", "map": "map", "dict": "map", "array": "array", "list": "array"}


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a flow: `code` (kind), `path` (where in the document), `message`.
    `key` says the path names a key (point at the key, not its value)."""

    code: str
    path: Path_
    message: str
    key: bool = False

    @property
    def dotted(self) -> str:
        return ".".join(str(x) for x in self.path) or "<root>"

    def __str__(self) -> str:
        return f"{self.dotted}: {self.message}"


class FlowError(FormatError):
    """A flow is malformed or inconsistent. `details` are the Problems (code, path, message);
    `problems` the rendered lines (`file:line:col: dotted.key: message` for a YAML file,
    `dotted.key: message` prefixed by its source otherwise), all of them, in order."""

    def __init__(self, details: Sequence[Problem], lines: Sequence[str] | None = None) -> None:
        self.details = list(details)
        self.problems = list(lines) if lines is not None else [str(p) for p in self.details]
        super().__init__("\n".join(self.problems))

    @property
    def codes(self) -> list[str]:
        return [p.code for p in self.details]


def raise_for(problems: Sequence[Problem], origin: str) -> None:
    """Raise a FlowError for problems of a flow that did not come from a file with positions
    (`origin`, e.g. "manifest bafy...": each line is `origin: dotted.key: message`)."""
    if problems:
        raise FlowError(problems, [f"{origin}: {p}" for p in problems])


# -- implementations ---------------------------------------------------------------------------
class ModuleMissing(NotFoundError):
    """The operation's module cannot be read (the message says why)."""


ModuleSource = Callable[[str], tuple[str, str]]
"""module name ("ops", "pkg.mod") -> (name to show, Python source); raises ModuleMissing."""


def modules_beside(directory: Path) -> ModuleSource:
    """Modules as files beside a flow: `pkg.mod` is DIR/pkg/mod.py."""

    def read(module: str) -> tuple[str, str]:
        rel = module.replace(".", "/") + ".py"
        try:
            return rel, (directory / rel).read_text()
        except (OSError, UnicodeDecodeError):
            raise ModuleMissing(f"module file {rel} not found beside the flow") from None

    return read


def modules_by_cid(dataflow: Any, operations: Mapping[str, Any], read: Callable[[Any], bytes]) -> ModuleSource:
    """Modules as a signed manifest carries them: operation name -> module file CID
    (`operations`), read with `read(cid)` (e.g. a UnixFS export from a block store)."""
    by_module: dict[str, Any] = {}
    ops = dataflow.get("operations") if isinstance(dataflow, Mapping) else None
    for name, op in (ops if isinstance(ops, Mapping) else {}).items():
        impl = op.get("implementation") if isinstance(op, Mapping) else None
        if isinstance(impl, str) and name in operations:
            by_module.setdefault(impl.partition(":")[0], operations[name])

    def load(module: str) -> tuple[str, str]:
        shown = module.replace(".", "/") + ".py"
        if module not in by_module:
            raise ModuleMissing(f"the manifest carries no code for module {module}")
        try:
            return shown, read(by_module[module]).decode()
        except (CidbootError, UnicodeDecodeError) as e:
            raise ModuleMissing(f"module file {shown} ({by_module[module]}) cannot be read: {e}") from None

    return load


@dataclass(frozen=True)
class Signature:
    """What a call by keyword needs to know about a function: its keyword-passable
    parameters, those without a default, and whether it takes **kwargs."""

    params: tuple[str, ...]
    required: frozenset[str]
    var_keyword: bool


def _signatures(source: str, filename: str) -> dict[str, Signature]:
    tree = ast.parse(source, filename)
    out = {}
    for n in tree.body:
        if not isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef):
            continue
        a = n.args
        positional = a.posonlyargs + a.args
        with_default = {x.arg for x in positional[len(positional) - len(a.defaults):]} if a.defaults else set()
        with_default |= {x.arg for x, d in zip(a.kwonlyargs, a.kw_defaults, strict=True) if d is not None}
        posonly_required = {x.arg for x in a.posonlyargs} - with_default
        params = tuple(x.arg for x in a.args + a.kwonlyargs)
        # a positional-only parameter without a default can never be passed by keyword
        required = frozenset(({x.arg for x in a.args + a.kwonlyargs} - with_default) | posonly_required)
        out[n.name] = Signature(params, required, a.kwarg is not None)
    return out


def implementation_problems(flow: DataFlow, modules: ModuleSource) -> list[Problem]:
    """Each operation's function exists and its input names are its parameters (ast only)."""
    out: list[Problem] = []
    cache: dict[str, tuple[str, dict[str, Signature]] | Problem] = {}
    for name, op in flow.operations.items():
        at: Path_ = ("dataflow", "operations", name, "implementation")
        module, _, fn = op.implementation.partition(":")
        if module not in cache:
            try:
                shown, text = modules(module)
                cache[module] = (shown, _signatures(text, shown))
            except ModuleMissing as e:
                cache[module] = Problem("missing-implementation", at, f"missing implementation: {e}")
            except SyntaxError as e:
                cache[module] = Problem("missing-implementation", at,
                                        f"missing implementation: {Path(e.filename or module).name}:{e.lineno}: {e.msg}")
        got = cache[module]
        if isinstance(got, Problem):
            out.append(Problem(got.code, at, got.message))
            continue
        shown, sigs = got
        sig = sigs.get(fn)
        if sig is None:
            out.append(Problem("missing-implementation", at, f"missing implementation: {shown} defines no function {fn!r}"))
            continue
        for param in op.inputs:
            if param not in sig.params and not sig.var_keyword:
                out.append(Problem("unknown-parameter", ("dataflow", "operations", name, "inputs", param),
                                   f"{op.implementation} has no parameter {param!r} (it takes {list(sig.params)})",
                                   key=True))
        for param in sorted(sig.required - set(op.inputs)):
            out.append(Problem("unfed-parameter", ("dataflow", "operations", name, "inputs"),
                               f"{op.implementation} requires parameter {param!r}, which no input of {name} feeds",
                               key=True))
    return out


# -- values ------------------------------------------------------------------------------------
def primitive_kind(primitive: str) -> str | None:
    """The checkable kind of a primitive (DFFML's `Dict[...]`/`List[...]` included), or None."""
    p = primitive.strip()
    base = p.split("[", 1)[0].strip().lower()
    return _KINDS.get(p) or _KINDS.get(base)


def value_problem(definition: Definition, value: Any) -> str | None:
    """Why `value` is not a value of `definition`'s primitive, or None when it is."""
    kind = primitive_kind(definition.primitive)
    ok = {
        "str": lambda v: isinstance(v, str),
        "int": lambda v: isinstance(v, int) and not isinstance(v, bool),
        "float": lambda v: isinstance(v, float),
        "bool": lambda v: isinstance(v, bool),
        "bytes": lambda v: isinstance(v, bytes | bytearray),
        "map": lambda v: isinstance(v, Mapping) and all(isinstance(k, str) for k in v),
        "array": lambda v: isinstance(v, list | tuple),
        "any": lambda v: True,
    }.get(kind or "")
    if ok is None:
        return f"definition {definition.name!r} has primitive {definition.primitive!r}, which no value can be checked against"
    if ok(value):
        return None
    shown = repr(value) if len(repr(value)) <= 40 else repr(value)[:37] + "..."
    return f"{shown} ({type(value).__name__}) is not a {definition.primitive} (definition {definition.name!r})"


# -- shape -------------------------------------------------------------------------------------
class _Shape:
    """Shape checks over the raw document, collecting every problem with its path."""

    def __init__(self) -> None:
        self.out: list[Problem] = []

    def add(self, code: str, at: Path_, message: str, key: bool = False) -> None:
        self.out.append(Problem(code, at, message, key))

    def map(self, v: Any, at: Path_, allowed: Collection[str] | None = None) -> Mapping[str, Any]:
        if not isinstance(v, Mapping):
            self.add("type", at, f"must be a map, got {type(v).__name__}")
            return {}
        for k in v:
            if not isinstance(k, str):
                self.add("type", (*at, str(k)), "keys must be strings", key=True)
            elif allowed is not None and k not in allowed:
                self.add("unknown-key", (*at, k), "unknown key", key=True)
        return {k: x for k, x in v.items() if isinstance(k, str) and (allowed is None or k in allowed)}

    def list(self, v: Any, at: Path_) -> list[Any]:
        if not isinstance(v, list | tuple):
            self.add("type", at, f"must be a list, got {type(v).__name__}")
            return []
        return list(v)

    def name(self, v: Any, at: Path_) -> str | None:
        if not isinstance(v, str) or not v:
            self.add("type", at, f"must be a non-empty string, got {v!r}")
            return None
        return v


def _shape(doc: Mapping[str, Any], file_keys: bool) -> tuple[list[Problem], set[str], set[str], set[str]]:
    """Shape and reference problems, one checker per section; also the operation, definition
    and role names found (the later checks and the policy scope use them)."""
    s = _Shape()
    if file_keys:
        s.map(doc, (), FILE_KEYS)
        if "encrypt" in doc and not isinstance(doc["encrypt"], bool):  # the image builder's (docs/privacy.md)
            s.add("type", ("encrypt",), f"must be true or false, got {type(doc['encrypt']).__name__}")
    if "dataflow" not in doc:
        s.add("missing", (), "no dataflow section")
    df = s.map(doc.get("dataflow", {}), ("dataflow",), DATAFLOW_KEYS)
    for section in ("definitions", "operations"):
        if section not in df and "dataflow" in doc:
            s.add("missing", ("dataflow",), f"'{section}' is a required property", key=True)
    defs = _definitions(s, df)
    ops = _operations(s, df, defs)
    _seed(s, df, defs)
    _connections(s, df, ops)
    roles = _placement(s, doc, ops)
    return s.out, set(ops), defs, roles


def _definitions(s: _Shape, df: Mapping[str, Any]) -> set[str]:
    defs: set[str] = set()
    raw_defs = s.map(df.get("definitions"), ("dataflow", "definitions")) if "definitions" in df else {}
    for dname, spec in raw_defs.items():
        at: Path_ = ("dataflow", "definitions", dname)
        d = s.map(spec, at, DEFINITION_KEYS)
        defs.add(dname)
        if "primitive" not in d:
            s.add("missing", at, "'primitive' is a required property", key=True)
        elif d["primitive"] not in PRIMITIVES:
            s.add("primitive", (*at, "primitive"), f"{d['primitive']!r} is not one of {list(PRIMITIVES)}")
        if "lock" in d and not isinstance(d["lock"], bool):
            s.add("type", (*at, "lock"), "must be true or false")
    return defs


def _operations(s: _Shape, df: Mapping[str, Any], defs: set[str]) -> dict[str, Mapping[str, Any]]:
    ops: dict[str, Mapping[str, Any]] = {}
    for oname, spec in (s.map(df.get("operations"), ("dataflow", "operations")) if "operations" in df else {}).items():
        at: Path_ = ("dataflow", "operations", oname)
        o = ops[oname] = s.map(spec, at, OPERATION_KEYS)
        impl = o.get("implementation")
        if impl is None:
            s.add("missing", at, "'implementation' is a required property", key=True)
        elif not isinstance(impl, str) or impl.count(":") != 1 or not all(
                part and all(p.isidentifier() for p in part.split(".")) for part in impl.split(":")):
            s.add("implementation", (*at, "implementation"), f"{impl!r} is not module:function")
        named = [((*at, sec, k), d) for sec in ("inputs", "outputs") for k, d in s.map(o.get(sec, {}), (*at, sec)).items()]
        named += [((*at, "conditions", i), d) for i, d in enumerate(s.list(o.get("conditions", []), (*at, "conditions")))]
        for where, d in named:
            if s.name(d, where) is not None and d not in defs:
                s.add("undefined-definition", where, f"undefined definition {d!r}")
        if "stage" in o and o["stage"] not in STAGES:
            s.add("stage", (*at, "stage"), f"{o['stage']!r} is not one of {list(STAGES)}")
        outputs = _submap(o, "outputs")
        for i, e in enumerate(s.list(o.get("expand", []), (*at, "expand"))):
            if e not in outputs:
                s.add("expand", (*at, "expand", i), f"{e!r} is not an output of {oname}")
    return ops


def _seed(s: _Shape, df: Mapping[str, Any], defs: set[str]) -> None:
    for i, raw in enumerate(s.list(df.get("seed", []), ("dataflow", "seed"))):
        at: Path_ = ("dataflow", "seed", i)
        seed = s.map(raw, at, SEED_KEYS)
        if "value" not in seed:
            s.add("missing", at, "'value' is a required property")
        sdef = seed.get("definition")
        if sdef is None:
            s.add("missing", at, "'definition' is a required property")
        elif s.name(sdef, (*at, "definition")) is not None and sdef not in defs:
            s.add("undefined-definition", (*at, "definition"), f"undefined definition {sdef!r}")


def _connections(s: _Shape, df: Mapping[str, Any], ops: Mapping[str, Mapping[str, Any]]) -> None:
    for oname, spec in (s.map(df["flow"], ("dataflow", "flow")) if "flow" in df else {}).items():
        at: Path_ = ("dataflow", "flow", oname)
        if oname not in ops:
            s.add("unknown-operation", at, f"flow names unknown operation {oname!r}", key=True)
            continue
        conn = s.map(spec, at, CONNECTION_KEYS)
        op_inputs = _submap(ops[oname], "inputs")
        for k, origins in s.map(conn.get("inputs", {}), (*at, "inputs")).items():
            if k not in op_inputs:
                s.add("unknown-input", (*at, "inputs", k), f"operation {oname!r} has no input {k!r}", key=True)
            for j, origin in enumerate(s.list(origins, (*at, "inputs", k))):
                _origin(s, origin, (*at, "inputs", k, j), ops, [op_inputs[k]] if k in op_inputs else None)
        raw_conditions = ops[oname].get("conditions")
        conditions = [str(c) for c in raw_conditions] if isinstance(raw_conditions, list) else []
        for j, origin in enumerate(s.list(conn.get("conditions", []), (*at, "conditions"))):
            _origin(s, origin, (*at, "conditions", j), ops, conditions)


def _placement(s: _Shape, doc: Mapping[str, Any], ops: Mapping[str, Mapping[str, Any]]) -> set[str]:
    placement = s.map(doc.get("placement") or {}, ("placement",))
    for role, names in placement.items():
        for i, n in enumerate(s.list(names, ("placement", role))):
            if s.name(n, ("placement", role, i)) is not None and n not in ops:
                s.add("unknown-operation", ("placement", role, i), f"unknown operation {n!r}")
    return set(placement)


def _submap(m: Mapping[str, Any], key: str) -> Mapping[str, Any]:
    v = m.get(key)
    return v if isinstance(v, Mapping) else {}


def _origin(s: _Shape, o: Any, at: Path_, ops: Mapping[str, Mapping[str, Any]], fed: list[str] | None) -> None:
    """One origin of a connection; `fed`: the definitions it may carry (the parameter's, or the
    operation's conditions), None when unknown (already reported)."""
    if o == SEED:
        return
    if isinstance(o, list) and len(o) == 1 and isinstance(o[0], Mapping):
        o = o[0]  # DFFML also accepts [{origin}] for {origin}
    if not isinstance(o, Mapping) or len(o) != 1:
        s.add("origin", at, f"an origin is \"seed\" or {{operation: output}}, got {o!r}")
        return
    (src, out), = o.items()
    if isinstance(out, list):  # DFFML alternate definitions {"seed": [defs]}: the model checks them
        return
    if src not in ops:
        s.add("unknown-operation", (*at, src), f"unknown operation {src!r}")
    elif not isinstance(ops[src].get("outputs"), Mapping) or out not in ops[src]["outputs"]:
        s.add("unknown-output", (*at, src), f"operation {src!r} has no output {out!r}")
    elif fed is not None and ops[src]["outputs"][out] not in fed:
        what = f"a {fed[0]}" if len(fed) == 1 else f"one of the conditions {fed}"
        s.add("definition-mismatch", (*at, src),
              f"{src}.{out} is a {ops[src]['outputs'][out]}, not {what} (definitions are locked to parameters)")


# -- policies ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class PolicyScope:
    """The names a policy may use: the flow's operations and definitions, the placement's
    roles (a `producer` is one of them or "seed")."""

    operations: frozenset[str]
    definitions: frozenset[str]
    roles: frozenset[str]

    @classmethod
    def of(cls, flow: DataFlow, placement: Mapping[str, Any]) -> PolicyScope:
        return cls(frozenset(flow.operations), frozenset(flow.definitions), frozenset(placement))


def policy_problems(policy: Any, at: Path_, scope: PolicyScope | None) -> list[Problem]:
    """Problems of one policy: its shape and, given a scope, the names it uses. agent.policy
    enforces with this same function, so what validates is exactly what is enforced."""
    s = _Shape()
    p = s.map(policy, at, POLICY_KEYS)
    if isinstance(policy, Mapping) and "name" in p and not isinstance(p["name"], str):
        s.add("type", (*at, "name"), "must be a string")
    if isinstance(policy, Mapping) and "veto" not in p:
        s.add("missing", at, "'veto' is a required property", key=True)
    veto = s.map(p.get("veto", {}), (*at, "veto"), VETO_KEYS)
    if "veto" in p and isinstance(p["veto"], Mapping) and not p["veto"]:
        s.add("policy", (*at, "veto"), "selects nothing (give operation, definition, producer or measurement)")
    for k, v in veto.items():
        if s.name(v, (*at, "veto", k)) is None:
            continue
        if k == "measurement" and v not in LAYERS:
            s.add("unknown-layer", (*at, "veto", k), f"{v!r} is not one of {list(LAYERS)}")
        elif scope is None:
            continue
        elif k == "operation" and v not in scope.operations:
            s.add("unknown-operation", (*at, "veto", k), f"unknown operation {v!r}")
        elif k == "definition" and v not in scope.definitions:
            s.add("undefined-definition", (*at, "veto", k), f"undefined definition {v!r}")
        elif k == "producer" and v != SEED and v not in scope.roles:
            s.add("unknown-producer", (*at, "veto", k),
                  f"producer {v!r} is neither \"seed\" nor a role of the placement {sorted(scope.roles)}")
    if "unless" in p:
        unless = s.map(p["unless"], (*at, "unless"), UNLESS_KEYS)
        if isinstance(p["unless"], Mapping) and not p["unless"]:
            s.add("policy", (*at, "unless"), "lifts nothing (give measurement)")
        if "measurement" in unless and unless["measurement"] not in LAYERS:
            s.add("unknown-layer", (*at, "unless", "measurement"), f"{unless['measurement']!r} is not one of {list(LAYERS)}")
        if "equals" in unless:
            eq = unless["equals"]
            if "measurement" not in unless:
                s.add("policy", (*at, "unless", "equals"), "equals needs a measurement", key=True)
            if not (isinstance(eq, str) and len(eq) == 128 and all(c in "0123456789abcdef" for c in eq)):
                s.add("type", (*at, "unless", "equals"), "must be a sha512 digest in lower-case hex (128 digits)")
    return s.out


# -- the graph ---------------------------------------------------------------------------------
def operation_edges(flow: DataFlow | Mapping[str, Any]) -> dict[str, set[str]]:
    """op -> ops it feeds, through the connections the model makes (explicit `flow` origins,
    auto-flow for every parameter and condition they leave out): what the orchestrator runs."""
    model = flow if isinstance(flow, DataFlow) else DataFlow.from_obj(flow)
    edges: dict[str, set[str]] = {n: set() for n in model.operations}
    for table in (model.connections, model.condition_sources):
        for consumer, params in table.items():
            for origins in params.values():
                for o in origins:
                    if o != SEED and o[0] in edges:
                        edges[o[0]].add(consumer)
    return edges


def find_cycle(edges: Mapping[str, Iterable[str]]) -> list[str] | None:
    """One cycle as a path [a, b, ..., a], or None; deterministic (sorted) search."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(n: str) -> list[str] | None:
        state[n] = 1
        stack.append(n)
        for m in sorted(edges.get(n, ())):
            if state.get(m) == 1:
                return stack[stack.index(m):] + [m]
            if m not in state:
                found = visit(m)
                if found:
                    return found
        stack.pop()
        state[n] = 2
        return None

    for n in sorted(edges):
        if n not in state:
            found = visit(n)
            if found:
                return found
    return None


# -- the whole flow ----------------------------------------------------------------------------
def check(doc: Mapping[str, Any], *, modules: ModuleSource | None, file_keys: bool = False) -> tuple[DataFlow | None, list[Problem]]:
    """Every problem of a flow document ({"dataflow", "placement", "policies"}, a flow.yaml's
    top level with `file_keys=True`), and the model when there are none.

    `modules` reads the operations' modules; None is only for a caller that has no code to
    check against (the problems then say so: nothing unchecked passes)."""
    problems, op_names, def_names, roles = _shape(doc, file_keys)
    scope = PolicyScope(frozenset(op_names), frozenset(def_names), frozenset(roles))
    policies = doc.get("policies") or []
    if not isinstance(policies, list | tuple):
        problems.append(Problem("type", ("policies",), f"must be a list, got {type(policies).__name__}"))
        policies = []
    for i, pol in enumerate(policies):
        problems += policy_problems(pol, ("policies", i), scope)
    if problems:
        return None, problems
    try:
        flow = DataFlow.from_obj(doc["dataflow"])
    except FlowFormatError as e:  # what the shape checks above do not see (e.g. alternate definitions)
        return None, [Problem("format", ("dataflow",), str(e))]
    cycle = find_cycle(operation_edges(flow))
    if cycle:
        problems.append(Problem("cycle", ("dataflow", "operations", cycle[0]), f"cycle: {' -> '.join(cycle)}", key=True))
    for i, seed in enumerate(flow.seed):
        why = value_problem(flow.definitions[seed.definition], seed.value)
        if why:
            problems.append(Problem("seed-primitive", ("dataflow", "seed", i, "value"), why))
    if roles:
        placed = {n for names in (doc.get("placement") or {}).values() for n in names}
        for name in sorted(set(flow.operations) - placed):
            problems.append(Problem("unplaced", ("dataflow", "operations", name),
                                    f"operation {name!r} is placed on no role (placement has {sorted(roles)}): "
                                    "it would never run", key=True))
    if modules is None:
        problems.append(Problem("missing-implementation", ("dataflow", "operations"),
                                "no operation code to check the implementations against", key=True))
    else:
        problems += implementation_problems(flow, modules)
    return (None if problems else flow), problems


def checked(doc: Mapping[str, Any], *, modules: ModuleSource | None, origin: str) -> DataFlow:
    """`check`, raising a FlowError whose lines start with `origin` (e.g. "manifest bafy...")."""
    flow, problems = check(doc, modules=modules)
    raise_for(problems, origin)
    assert flow is not None
    return flow


__all__ = ["FILE_KEYS", "LAYERS", "PRIMITIVES", "FlowError", "ModuleMissing", "ModuleSource", "Operation", "PolicyScope",
           "Problem", "check", "checked", "find_cycle", "implementation_problems", "modules_beside", "modules_by_cid",
           "operation_edges", "policy_problems", "primitive_kind", "raise_for", "value_problem"]
