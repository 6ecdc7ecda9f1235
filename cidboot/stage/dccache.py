"""Build-time code for the methods `dataclasses` generates, so a stage does not compile them at start.

Why: in 3.11 every `@dataclass` writes the source text of its `__init__`, `__repr__`, `__eq__`
(and for a frozen one `__hash__`, `__setattr__`, `__delattr__`) and compiles it with `exec(text)`
(`dataclasses._create_fn`). Under TCG the compiler's work is a large part of a dataclass's cost
(~2-4 M guest instructions for a frozen one), and each stage creates tens of them before its
first line. The image builder (imagebuilder.dccache) imports the stage's modules on the build
host, records every text `dataclasses` compiles and ships `TABLE_PATH`: the code object of each
text, compiled exactly as `exec` compiles it (filename "<string>", no inherited `__future__`
flags), marshalled, inside the stage's measured app layer (so its code hash covers it, as it
covers the modules' own bytecode).

`install()` (cidboot.stage.pid1.run_stage, before the stage is imported) loads the table and makes
`dataclasses` look its texts up there: the module's `exec` global shadows the builtin, and only
`_create_fn` calls `exec`. The key is the whole generated text, so the code run is the code of
exactly that text: a text the table lacks (a class changed since the build, another Python's
dataclasses, a module imported only at run time) is compiled as without the table, and a
missing, unreadable or foreign table (another format or interpreter) leaves `dataclasses` as it
is. Nothing else changes: the function objects are made by the same `exec` into the same
namespaces, so the classes are the same as without the table.
"""

from __future__ import annotations

import marshal
import sys

TYPE_CHECKING = False  # mypy takes any TYPE_CHECKING as true; typing is not imported at start
if TYPE_CHECKING:
    from collections.abc import Callable, Iterable, Mapping
    from types import CodeType

TABLE_PATH = "/opt/cidboot/dataclass-code.marshal"
FORMAT = "cidboot-dataclass-code/1"

_builtin_exec = exec
_builtin_compile = compile
_CODE = type(compile("", "<string>", "exec"))
stats: dict[str, int] = {"hits": 0, "misses": 0}  # for tests and profiles: texts found in / compiled beside the table


def encode(pairs: Mapping[str, CodeType] | Iterable[tuple[str, CodeType]], cache_tag: str | None = None) -> bytes:
    """The table's bytes: FORMAT, the interpreter's cache tag and (text, marshalled code) pairs
    sorted by text. Each code object is marshalled on its own, so a stage unmarshals only the
    ones it uses (the table also holds classes of modules a stage imports late or never)."""
    items = sorted((text, marshal.dumps(code)) for text, code in dict(pairs).items())
    return marshal.dumps((FORMAT, cache_tag or sys.implementation.cache_tag, tuple(items)))


def decode(data: bytes) -> dict[str, bytes]:
    """text -> marshalled code of a table's bytes; ValueError when they are not a table for this interpreter."""
    try:
        doc = marshal.loads(data)
    except (EOFError, ValueError, TypeError) as e:
        raise ValueError(f"not a dataclass code table: {e}") from None
    if type(doc) is not tuple or len(doc) != 3 or doc[0] != FORMAT:
        raise ValueError("not a dataclass code table (format)")
    if doc[1] != sys.implementation.cache_tag:
        raise ValueError(f"a table for {doc[1]}, not {sys.implementation.cache_tag}")
    table: dict[str, bytes] = {}
    for item in doc[2]:
        if type(item) is not tuple or len(item) != 2 or type(item[0]) is not str or type(item[1]) is not bytes:
            raise ValueError("not a dataclass code table (entry)")
        table[item[0]] = item[1]
    return table


def compile_text(text: str) -> CodeType:
    """`text` compiled as `exec(text)` in `dataclasses` compiles it (no __future__ flags there)."""
    return _builtin_compile(text, "<string>", "exec", dont_inherit=True)


def code_for(table: Mapping[str, bytes], text: str) -> CodeType:
    """The code of `text`: the table's, else compiled now (also when the table's entry is not a
    code object: then as if it were not there)."""
    raw = table.get(text)
    if raw is not None:
        try:
            code = marshal.loads(raw)
        except (EOFError, ValueError, TypeError):
            code = None
        if type(code) is _CODE:
            stats["hits"] += 1
            return code
    stats["misses"] += 1
    return compile_text(text)


def hook(table: Mapping[str, bytes]) -> Callable[..., None]:
    """The `exec` dataclasses calls: a text runs the code `code_for` gives it, any other source
    is run as the builtin `exec` runs it."""

    def _exec(source: object, globals: dict[str, object] | None = None, locals: Mapping[str, object] | None = None,
              /) -> None:
        if type(source) is str:
            source = code_for(table, source)
        _builtin_exec(source, globals, locals)  # type: ignore[arg-type]

    return _exec


def install(path: str = TABLE_PATH) -> int:
    """Load the table at `path` and hook `dataclasses` to it; returns how many texts it holds
    (0: no table, or not one for this interpreter: `dataclasses` is left as it is)."""
    try:
        with open(path, "rb") as f:
            table = decode(f.read())
    except (OSError, ValueError):
        return 0
    import dataclasses

    dataclasses.exec = hook(table)  # type: ignore[attr-defined]
    return len(table)
