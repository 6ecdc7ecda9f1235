"""A YAML document with the position of every value, so problems point at `file:line:col`.

The flow file is what users write first; a problem reported as a dotted key alone sends them
hunting. Positions come from PyYAML's composer nodes (the value's position; for a key, the
key's); duplicate keys, which PyYAML would silently merge, are errors. PyYAML is imported
only when a file is parsed: host tools (imagebuilder, `agent run`, the harness) use this,
the device image does not carry PyYAML.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cidboot.dataflow.checks import FlowError, Path_, Problem


@dataclass
class Located:
    """Plain data read from a file, plus where each value (and each key) was written."""

    path: Path
    data: dict[str, Any]
    marks: dict[Path_, tuple[int, int]] = field(default_factory=dict)
    key_marks: dict[Path_, tuple[int, int]] = field(default_factory=dict)

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

    def position(self, at: Path_, key: bool = False) -> tuple[int, int]:
        """(line, column) used to sort problems in file order."""
        table = self.key_marks if key and at in self.key_marks else self.marks
        p = at
        while p not in table and p:
            p = p[:-1]
        return table.get(p, (1, 1))

    def fail(self, problems: list[Problem]) -> FlowError:
        """A FlowError whose lines carry this file's positions, in file order."""
        ordered = sorted(problems, key=lambda p: self.position(p.path, p.key))
        return FlowError(ordered, [self.error(p.path, p.message, p.key) for p in ordered])


def _problem(path: Path, line: int, col: int, at: str, message: str) -> FlowError:
    return FlowError([Problem("yaml", (), message)], [f"{path}:{line}:{col}: {at}: {message}"])


def parse_yaml(text: str, path: Path) -> Located:
    """YAML text to Located data; YAML syntax errors keep their own position."""
    import yaml  # host tools only: see the module docstring

    doc = Located(path, {})
    dups: list[tuple[Problem, str]] = []

    def to_data(node: yaml.Node, at: Path_) -> Any:
        doc.marks[at] = (node.start_mark.line + 1, node.start_mark.column + 1)
        if isinstance(node, yaml.MappingNode):
            out: dict[str, Any] = {}
            for knode, vnode in node.value:
                key = loader.construct_object(knode, deep=True)
                if not isinstance(key, str):
                    key = str(key)  # checks then reject it by name where names are constrained
                kat = (*at, key)
                if key in out:
                    line, col = knode.start_mark.line + 1, knode.start_mark.column + 1
                    dups.append((Problem("duplicate-key", kat, "duplicate key", key=True),
                                 f"{path}:{line}:{col}: {'.'.join(map(str, kat))}: duplicate key"))
                    continue
                doc.key_marks[kat] = (knode.start_mark.line + 1, knode.start_mark.column + 1)
                out[key] = to_data(vnode, kat)
            return out
        if isinstance(node, yaml.SequenceNode):
            return [to_data(v, (*at, i)) for i, v in enumerate(node.value)]
        return loader.construct_object(node, deep=True)

    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            raise _problem(path, 1, 1, "<root>", "empty flow file")
        data = to_data(node, ())
    except yaml.MarkedYAMLError as e:
        m = e.problem_mark or e.context_mark
        line, col = (m.line + 1, m.column + 1) if m else (1, 1)
        raise _problem(path, line, col, "<yaml>", str(e.problem or e.context)) from None
    except yaml.YAMLError as e:
        raise _problem(path, 1, 1, "<yaml>", str(e)) from None
    finally:
        loader.dispose()
    if dups:
        raise FlowError([p for p, _ in dups], [line for _, line in dups])
    if not isinstance(data, dict):
        raise _problem(path, 1, 1, "<root>", f"a flow file is a mapping, got {type(data).__name__}")
    doc.data = data
    return doc


def load_yaml(path: str | Path) -> Located:
    """Read and parse a YAML flow file (an unreadable file is a FlowError too)."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise FlowError([Problem("unreadable", (), f"cannot read: {e.strerror}")],
                        [f"{path}: cannot read: {e.strerror}"]) from None
    return parse_yaml(text, path)
