"""Static import analysis: which modules a stage's entry points can import, found in the
target's own stdlib tree (Debian's libpython3.11-stdlib), never in the build host's.

An image ships only the stdlib modules its code actually imports. Imports are read with `ast`
(never executed), following `import x`, `from x import y` (y may be a submodule) and relative
imports, through the staged tree's search roots. Imports that are in no root are either
interpreter built-ins or optional (guarded by try/except); they are reported, not fatal.
"""

from __future__ import annotations

import ast
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from cidboot.errors import FormatError

# what the interpreter itself imports before the entry module runs (with -I -S)
STARTUP = ("encodings", "encodings.aliases", "encodings.utf_8", "encodings.latin_1", "encodings.ascii",
           "codecs", "io", "abc", "os", "stat", "posixpath", "genericpath", "_collections_abc")

# modules that import others by name at run time, invisible to the AST: socket resolves str
# host names through the "idna" codec (LookupError: unknown encoding: idna without it)
IMPLIED = {"socket": ("encodings.idna",)}

# development-only stdlib parts, reached statically through debugging helpers (heapq's and
# typing's self-tests import doctest -> pdb -> readline); never shipped in an appliance
EXCLUDED = frozenset({"doctest", "pdb", "unittest", "test", "pydoc", "pydoc_data", "tkinter", "idlelib", "lib2to3",
                      "distutils", "ensurepip", "venv", "turtle", "turtledemo", "_testcapi", "_testinternalcapi",
                      "webbrowser", "readline", "rlcompleter", "bdb", "cmd", "code", "codeop", "tracemalloc",
                      "_aix_support", "_osx_support", "_bootsubprocess",
                      # host-only: the boot server's fleet state (bootstrap.server.fleet) is SQLite; the
                      # bootstrap image ships bootstrap/ whole but never serves, and carries no libsqlite3
                      "sqlite3", "_sqlite3"})

# pure-Python twins of C modules the runtime has: decimal imports _pydecimal only when _decimal
# fails to import, abc _py_abc only without the built-in _abc (built into CPython since 3.7). Not
# followed when the twin's C module is there (None: built in): 244 KB of bytecode in the runtime,
# ~40 KB of the L1 download (docs/images.md, 8 MiB budget)
TWINS = {"_pydecimal": "_decimal", "_py_abc": None}


def _is_main_guard(node: ast.AST) -> bool:
    """`if __name__ == "__main__":`: code that only runs as a script, not on import."""
    return (isinstance(node, ast.If) and isinstance(node.test, ast.Compare)
            and isinstance(node.test.left, ast.Name) and node.test.left.id == "__name__"
            and any(isinstance(c, ast.Constant) and c.value == "__main__" for c in node.test.comparators))


class ImportAnalysisError(FormatError):
    """A module that must be analysed cannot be parsed."""


@dataclass
class ImportGraph:
    """Modules found (name -> file), and names found nowhere (built-in or optional)."""

    modules: dict[str, Path] = field(default_factory=dict)
    unresolved: set[str] = field(default_factory=set)
    excluded: set[str] = field(default_factory=set)

    def files(self) -> list[Path]:
        return sorted(set(self.modules.values()))

    def sources_under(self, root: Path) -> dict[str, Path]:
        """The Python modules of the graph that are `root`'s own (`sources_under`)."""
        return sources_under(self.modules, root)


def sources_under(modules: dict[str, Path], root: Path) -> dict[str, Path]:
    """The `.py` modules (name -> file) whose file is where the name puts it under `root`
    (`a/b.py` or `a/b/__init__.py` for `a.b`): what an importer with `root` on its path loads.
    Not every file that merely lies below `root`: a flow kept inside the checkout (`make demo`
    builds under out/, the examples sit in examples/) has its `ops` below the project's root
    without being the project's code, and copying it into the app layer would make the layer
    (and its CID) depend on where the flow file sits."""
    out: dict[str, Path] = {}
    for name, path in modules.items():
        rel = Path(*name.split("."))
        if path.suffix == ".py" and path in (root / rel.with_suffix(".py"), root / rel / "__init__.py"):
            out[name] = path
    return out


def find_module(name: str, roots: list[Path]) -> Path | None:
    """The file defining `name` in the first root that has it (package, module or extension)."""
    rel = Path(*name.split("."))
    for root in roots:
        pkg = root / rel / "__init__.py"
        if pkg.is_file():
            return pkg
        mod = root / rel.with_suffix(".py")
        if mod.is_file():
            return mod
        parent = root / rel.parent
        if parent.is_dir():
            for ext in (sorted(parent.glob(rel.name + ".cpython-311-*.so")) + sorted(parent.glob(rel.name + ".abi3.so"))
                        + sorted(parent.glob(rel.name + ".so"))):
                return ext
    return None


def _imports(tree: ast.AST, name: str, is_pkg: bool) -> list[str]:
    out: list[str] = []
    pkg = name if is_pkg else name.rpartition(".")[0]
    stack = [tree]
    nodes: list[ast.AST] = []
    while stack:
        n = stack.pop()
        nodes.append(n)
        stack.extend(c for c in ast.iter_child_nodes(n) if not _is_main_guard(c))
    for node in nodes:
        if isinstance(node, ast.Import):
            out.extend(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = pkg.split(".") if pkg else []
                base_parts = parts[:len(parts) - (node.level - 1)] if node.level > 1 else parts
                base = ".".join(base_parts + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            if base:
                out.append(base)
                out.extend(f"{base}.{a.name}" for a in node.names if a.name != "*")
    return out


def analyse(entries: Iterable[str], roots: list[Path], extra: Iterable[str] = (),
            exclude: Iterable[str] = ()) -> ImportGraph:
    """The import closure of the entry modules (plus interpreter start-up modules).

    `exclude` names modules (and their submodules) never to follow: host-only code that a stage
    module imports lazily on a path the device never takes (cidboot.store.kubo from
    agent.publish); static analysis cannot know the path is dead, the builder does."""
    g = ImportGraph()
    queue = [*STARTUP, *extra, *entries]
    skip = tuple(exclude)
    while queue:
        name = queue.pop()
        if name in g.modules or name in g.unresolved or name in g.excluded:
            continue
        if name.split(".")[0] in EXCLUDED or any(name == x or name.startswith(x + ".") for x in skip):
            g.excluded.add(name)
            continue
        c_module = TWINS.get(name, "")
        if name in TWINS and (c_module is None or find_module(c_module, roots) is not None):
            g.excluded.add(name)
            continue
        # importing a.b.c imports a and a.b first
        parts = name.split(".")
        for i in range(1, len(parts)):
            queue.append(".".join(parts[:i]))
        path = find_module(name, roots)
        if path is None:
            g.unresolved.add(name)
            continue
        g.modules[name] = path
        queue.extend(IMPLIED.get(name, ()))
        if path.suffix != ".py":
            continue
        try:
            tree = ast.parse(path.read_bytes(), str(path))
        except SyntaxError as e:
            raise ImportAnalysisError(f"{path}:{e.lineno}: cannot parse: {e.msg}") from None
        queue.extend(_imports(tree, name, path.name == "__init__.py"))
    return g
