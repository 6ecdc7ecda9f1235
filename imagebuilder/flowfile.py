"""Load and check flow.yaml: schema validation and semantic checks, each error at file:line:column.

A flow file is what users write first, and a build must never start from a flow that cannot
run, so every problem is reported before anything reaches a store, in the form
`flow.yaml:12:7: dataflow.operations.hello.inputs.name: undefined definition 'nme'`.
Positions come from PyYAML's composer nodes (the value's position; for an unknown key, the
key's); duplicate keys, which PyYAML would silently merge, are errors too.
"""

from __future__ import annotations

import ast
import json
from dataclasses import dataclass, field
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

import jsonschema
import yaml

from cidboot.errors import FormatError

Path_ = tuple[str | int, ...]


class FlowFileError(FormatError):
    """The flow file is malformed or inconsistent; `problems` lists every finding."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


@dataclass
class FlowFile:
    """A checked flow file: the plain data plus where each value was written."""

    path: Path
    data: dict[str, Any]
    marks: dict[Path_, tuple[int, int]] = field(default_factory=dict)
    key_marks: dict[Path_, tuple[int, int]] = field(default_factory=dict)

    @property
    def dir(self) -> Path:
        return self.path.parent

    @property
    def name(self) -> str:
        return str(self.data["name"])

    @property
    def target(self) -> str:
        return str(self.data.get("target", "image"))

    def where(self, at: Path_, key: bool = False) -> str:
        """`file:line:column: dotted.key` for a data path (nearest known ancestor if needed)."""
        table = self.key_marks if key and at in self.key_marks else self.marks
        p = at
        while p not in table and p:
            p = p[:-1]
        line, col = table.get(p, (1, 1))
        dotted = ".".join(str(x) for x in at) or "<root>"
        return f"{self.path}:{line}:{col}: {dotted}"

    def error(self, at: Path_, message: str, key: bool = False) -> str:
        return f"{self.where(at, key)}: {message}"


@cache
def schema() -> dict[str, Any]:
    text = resources.files("imagebuilder").joinpath("schema/flow.schema.json").read_text()
    return dict(json.loads(text))


def _to_data(loader: yaml.SafeLoader, node: yaml.Node, at: Path_, ff: FlowFile, problems: list[str]) -> Any:
    ff.marks[at] = (node.start_mark.line + 1, node.start_mark.column + 1)
    if isinstance(node, yaml.MappingNode):
        out: dict[str, Any] = {}
        for knode, vnode in node.value:
            key = loader.construct_object(knode, deep=True)
            if not isinstance(key, str):
                key = str(key)  # the schema then rejects it by name where names are constrained
            kat = (*at, key)
            if key in out:
                line, col = knode.start_mark.line + 1, knode.start_mark.column + 1
                problems.append(f"{ff.path}:{line}:{col}: {'.'.join(map(str, kat))}: duplicate key")
                continue
            ff.key_marks[kat] = (knode.start_mark.line + 1, knode.start_mark.column + 1)
            out[key] = _to_data(loader, vnode, kat, ff, problems)
        return out
    if isinstance(node, yaml.SequenceNode):
        return [_to_data(loader, v, (*at, i), ff, problems) for i, v in enumerate(node.value)]
    return loader.construct_object(node, deep=True)


def parse(text: str, path: Path) -> FlowFile:
    """YAML text to a FlowFile with positions; YAML syntax errors keep their own position."""
    ff = FlowFile(path, {})
    problems: list[str] = []
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            raise FlowFileError([f"{path}:1:1: <root>: empty flow file"])
        data = _to_data(loader, node, (), ff, problems)
    except yaml.MarkedYAMLError as e:
        m = e.problem_mark or e.context_mark
        pos = f"{m.line + 1}:{m.column + 1}" if m else "1:1"
        raise FlowFileError([f"{path}:{pos}: <yaml>: {e.problem or e.context}"]) from None
    except yaml.YAMLError as e:
        raise FlowFileError([f"{path}:1:1: <yaml>: {e}"]) from None
    finally:
        loader.dispose()
    if problems:
        raise FlowFileError(problems)
    if not isinstance(data, dict):
        raise FlowFileError([f"{path}:1:1: <root>: a flow file is a mapping, got {type(data).__name__}"])
    ff.data = data
    return ff


def _schema_problems(ff: FlowFile) -> list[str]:
    out: list[tuple[tuple[int, int], str]] = []
    validator = jsonschema.Draft202012Validator(schema())
    for err in validator.iter_errors(ff.data):
        # a oneOf failure is clearer through its closest branch
        best = jsonschema.exceptions.best_match([err])
        at: Path_ = tuple(best.absolute_path)
        if best.validator == "additionalProperties" and isinstance(best.instance, dict):
            allowed = set(best.schema.get("properties", {}))
            for extra in sorted(k for k in best.instance if k not in allowed):
                kat = (*at, extra)
                out.append((ff.key_marks.get(kat, (1, 1)), ff.error(kat, "unknown key", key=True)))
            if allowed:
                continue
        if best.validator == "required":
            # point at the mapping's own key ("trust:"), where the missing entry belongs
            out.append((ff.key_marks.get(at, ff.marks.get(at, (1, 1))), ff.error(at, best.message, key=True)))
            continue
        elif best.validator in ("type", "enum", "const", "pattern", "minimum", "maximum", "minItems",
                                "minProperties", "uniqueItems", "minLength", "maxLength", "maxProperties"):
            msg = f"{best.message} (schema: {best.validator})"
        else:
            msg = best.message
        out.append((ff.marks.get(at, (1, 1)), ff.error(at, msg)))
    return [m for _, m in sorted(out)]


def _function_names(module_file: Path) -> set[str]:
    tree = ast.parse(module_file.read_text(), str(module_file))
    return {n.name for n in tree.body if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef)}


def implementation_file(ff: FlowFile, implementation: str) -> Path:
    """Where the operation's module lives: `pkg.mod:fn` is `pkg/mod.py` beside the flow file."""
    module = implementation.split(":", 1)[0]
    return ff.dir / (module.replace(".", "/") + ".py")


def operation_edges(df: dict[str, Any]) -> dict[str, set[str]]:
    """op -> ops it feeds. Explicit `flow` origins win; otherwise auto-flow by definition."""
    ops: dict[str, Any] = df.get("operations", {})
    producers: dict[str, set[str]] = {}
    for name, op in ops.items():
        for d in (op.get("outputs") or {}).values():
            producers.setdefault(d, set()).add(name)
    edges: dict[str, set[str]] = {n: set() for n in ops}
    flow = df.get("flow")
    for name, op in ops.items():
        if flow is not None and name in flow:
            spec = flow[name]
            for origins in list((spec.get("inputs") or {}).values()) + [spec.get("conditions") or []]:
                for o in origins:
                    if isinstance(o, dict):
                        for src in o:
                            if src in edges:
                                edges[src].add(name)
        else:
            for d in list((op.get("inputs") or {}).values()) + list(op.get("conditions") or []):
                for src in producers.get(d, ()):
                    edges[src].add(name)
    return edges


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
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


def _semantic_problems(ff: FlowFile, require_keys: bool = True) -> list[str]:
    p: list[str] = []
    df = ff.data["dataflow"]
    defs = set(df["definitions"])
    ops: dict[str, Any] = df["operations"]
    base: Path_ = ("dataflow", "operations")
    for name, op in ops.items():
        for section in ("inputs", "outputs"):
            for k, d in (op.get(section) or {}).items():
                if d not in defs:
                    p.append(ff.error((*base, name, section, k), f"undefined definition {d!r}"))
        for i, d in enumerate(op.get("conditions") or []):
            if d not in defs:
                p.append(ff.error((*base, name, "conditions", i), f"undefined definition {d!r}"))
        impl = op["implementation"]
        f = implementation_file(ff, impl)
        at = (*base, name, "implementation")
        if not f.is_file():
            p.append(ff.error(at, f"missing implementation: module file {f.relative_to(ff.dir)} not found beside the flow"))
        else:
            try:
                fns = _function_names(f)
            except SyntaxError as e:
                p.append(ff.error(at, f"missing implementation: {f.name}:{e.lineno}: {e.msg}"))
                continue
            fn = impl.split(":", 1)[1]
            if fn not in fns:
                p.append(ff.error(at, f"missing implementation: {f.relative_to(ff.dir)} defines no function {fn!r}"))
    for i, s in enumerate(df.get("seed") or []):
        if s["definition"] not in defs:
            p.append(ff.error(("dataflow", "seed", i, "definition"), f"undefined definition {s['definition']!r}"))
    for name, spec in (df.get("flow") or {}).items():
        if name not in ops:
            p.append(ff.error(("dataflow", "flow", name), f"flow names unknown operation {name!r}", key=True))
            continue
        for k, origins in (spec.get("inputs") or {}).items():
            if k not in (ops[name].get("inputs") or {}):
                p.append(ff.error(("dataflow", "flow", name, "inputs", k), f"operation {name!r} has no input {k!r}", key=True))
            for j, o in enumerate(origins):
                if isinstance(o, dict):
                    for src, out in o.items():
                        oat: Path_ = ("dataflow", "flow", name, "inputs", k, j, src)
                        if src not in ops:
                            p.append(ff.error(oat, f"unknown operation {src!r}"))
                        elif out not in (ops[src].get("outputs") or {}):
                            p.append(ff.error(oat, f"operation {src!r} has no output {out!r}"))
    cycle = find_cycle(operation_edges(df))
    if cycle:
        p.append(ff.error(("dataflow", "operations", cycle[0]), f"cycle: {' -> '.join(cycle)}", key=True))
    placed: set[str] = set()
    for role, names in (ff.data.get("placement") or {}).items():
        for i, n in enumerate(names):
            if n not in ops:
                p.append(ff.error(("placement", role, i), f"unknown operation {n!r}"))
            placed.add(n)
    for i, pol in enumerate(ff.data.get("policies") or []):
        veto = pol["veto"]
        for k in ("operation", "producer"):
            if k in veto and veto[k] not in ops:
                p.append(ff.error(("policies", i, "veto", k), f"unknown operation {veto[k]!r}"))
        if "definition" in veto and veto["definition"] not in defs:
            p.append(ff.error(("policies", i, "veto", "definition"), f"undefined definition {veto['definition']!r}"))
    trust = ff.data["trust"]
    if trust["threshold"] > len(trust["keys"]):
        p.append(ff.error(("trust", "threshold"), f"threshold {trust['threshold']} exceeds the {len(trust['keys'])} key(s)"))
    for i, k in enumerate(trust["keys"] if require_keys else []):
        if not (ff.dir / k).is_file():
            p.append(ff.error(("trust", "keys", i), f"signing key {k} not found beside the flow"))
    image = ff.data["image"]
    kpath = image["kernel"].get("path")
    if kpath and not (ff.dir / kpath).is_file():
        p.append(ff.error(("image", "kernel", "path"), f"kernel file {kpath} not found beside the flow"))
    for dest, src in (image.get("files") or {}).items():
        if not (ff.dir / src).is_file():
            p.append(ff.error(("image", "files", dest), f"file {src} not found beside the flow"))
    return p


def load(path: str | Path, *, require_keys: bool = True) -> FlowFile:
    """Read, validate and check a flow file; raises FlowFileError listing every problem.
    `require_keys=False` (for `lock`, which signs nothing) skips the signing-key files check."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise FlowFileError([f"{path}: cannot read: {e.strerror}"]) from None
    ff = parse(text, path)
    problems = _schema_problems(ff)
    if problems:
        raise FlowFileError(problems)
    problems = _semantic_problems(ff, require_keys)
    if problems:
        raise FlowFileError(problems)
    return ff


def check_lock(ff: FlowFile, debs: dict[str, Any], wheels: dict[str, Any]) -> None:
    """Every Debian package and wheel the flow names must be pinned in its lock."""
    p: list[str] = []
    image = ff.data["image"]
    kernel = image["kernel"]
    if "package" in kernel:
        pin = debs.get(kernel["package"])
        if pin is None:
            p.append(ff.error(("image", "kernel", "package"),
                              f"unknown kernel package {kernel['package']!r}: not in the lock (run `imagebuilder lock {ff.path}`)"))
        elif kernel.get("version") and pin["version"] != kernel["version"]:
            p.append(ff.error(("image", "kernel", "version"),
                              f"lock pins {pin['version']}, flow asks {kernel['version']} (run `imagebuilder lock {ff.path}`)"))
    py = image.get("python") or {}
    for i, name in enumerate((py.get("runtime") or {}).get("packages", [])):
        if name not in debs:
            p.append(ff.error(("image", "python", "runtime", "packages", i),
                              f"unknown package {name!r}: not in the lock (run `imagebuilder lock {ff.path}`)"))
    for i, name in enumerate(py.get("wheels") or []):
        if name.partition("==")[0].lower() not in wheels:
            p.append(ff.error(("image", "python", "wheels", i),
                              f"unknown wheel {name!r}: not in the lock (run `imagebuilder lock {ff.path}`)"))
    if p:
        raise FlowFileError(p)
