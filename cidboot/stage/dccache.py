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

`collections.namedtuple` does the same for one method (`__new__`, a lambda it compiles with
`eval`; the stdlib's `urllib.parse`, `selectors` and `functools` make five at start), so its
`eval` global is hooked to the same table (entries compiled in "eval" mode). With both, a stage's
start runs no compiler at all: under TCG the compiler's code is translated anew in every
interpreter (each stage's, after its exec), so not running it saves that translation too.

The file: a marshalled header (FORMAT, the interpreter's cache tag, an index from the CRC-32 of
a text's UTF-8 to where its entries lie, counted from the file's end) followed by the entries,
each a marshalled (mode, text, code), mode "exec" (dataclasses) or "eval" (namedtuple). Loading
reads only the header (a few hundred integers); a lookup unmarshals the entries under its text's
CRC and runs one only if its mode and text are the very ones asked for (the CRC only narrows the
search). So a stage pays for the classes it creates, not for the whole table (which also holds
classes of modules it imports late or never).
"""

from __future__ import annotations

import marshal
import sys
import zlib  # built into Debian's python3.11, as marshal is

TYPE_CHECKING = False  # mypy takes any TYPE_CHECKING as true; typing is not imported at start
if TYPE_CHECKING:
    from collections.abc import Callable, Iterable, Mapping
    from types import CodeType

    Index = dict[int, tuple[tuple[int, int], ...]]

TABLE_PATH = "/opt/cidboot/dataclass-code.marshal"
FORMAT = "cidboot-dataclass-code/2"

_builtin_exec = exec
_builtin_eval = eval
_builtin_compile = compile
_CODE = type((lambda: None).__code__)  # not compile(): importing this module must not run the compiler
MODES = ("exec", "eval")
stats: dict[str, int] = {"hits": 0, "misses": 0}  # for tests and profiles: texts found in / compiled beside the table


class Table:
    """A loaded table: the index and the file's bytes (entries are unmarshalled at lookup)."""

    __slots__ = ("index", "data")

    def __init__(self, index: Index, data: bytes) -> None:
        self.index = index
        self.data = data

    def __len__(self) -> int:
        return sum(len(v) for v in self.index.values())

    def get(self, text: str, mode: str = "exec") -> CodeType | None:
        """The code compiled from exactly `text` in `mode`, or None (not in the table, or an entry
        that is not a (mode, text, code) triple: then as if it were not there)."""
        end = len(self.data)
        for back, size in self.index.get(zlib.crc32(text.encode()), ()):
            try:
                entry = marshal.loads(memoryview(self.data)[end - back:end - back + size])
            except (EOFError, ValueError, TypeError):
                continue
            if (type(entry) is tuple and len(entry) == 3 and entry[0] == mode and entry[1] == text
                    and type(entry[2]) is _CODE):
                return entry[2]
        return None


def encode(entries: Iterable[tuple[str, str, CodeType]], cache_tag: str | None = None) -> bytes:
    """The table's bytes for (mode, text, code) `entries` (in (text, mode) order; the builder's
    compile step calls this in a fresh interpreter)."""
    items = sorted({(text, mode): code for mode, text, code in entries}.items())
    raws = [marshal.dumps((mode, text, code)) for (text, mode), code in items]
    total = sum(map(len, raws))
    index: dict[int, list[tuple[int, int]]] = {}
    at = 0
    for ((text, _mode), _code), raw in zip(items, raws, strict=True):
        index.setdefault(zlib.crc32(text.encode()), []).append((total - at, len(raw)))
        at += len(raw)
    head = (FORMAT, cache_tag or sys.implementation.cache_tag, {k: tuple(v) for k, v in sorted(index.items())})
    return marshal.dumps(head) + b"".join(raws)


def decode(data: bytes) -> Table:
    """A table's bytes, loaded (only the header is read); ValueError when they are not a table
    for this interpreter."""
    try:
        doc = marshal.loads(data)  # the header: marshal stops at its end
    except (EOFError, ValueError, TypeError) as e:
        raise ValueError(f"not a dataclass code table: {e}") from None
    if type(doc) is not tuple or len(doc) != 3 or doc[0] != FORMAT:
        raise ValueError("not a dataclass code table (format)")
    if doc[1] != sys.implementation.cache_tag:
        raise ValueError(f"a table for {doc[1]}, not {sys.implementation.cache_tag}")
    if type(doc[2]) is not dict:
        raise ValueError("not a dataclass code table (index)")
    return Table(doc[2], data)


def compile_text(text: str, mode: str = "exec") -> CodeType:
    """`text` compiled as `exec(text)` in `dataclasses` (or `eval(text)` in `collections`)
    compiles it: filename "<string>", no __future__ flags (neither module has any)."""
    return _builtin_compile(text, "<string>", mode, dont_inherit=True)


def code_for(table: Table, text: str, mode: str = "exec") -> CodeType:
    """The code of `text`: the table's, else compiled now."""
    code = table.get(text, mode)
    if code is not None:
        stats["hits"] += 1
        return code
    stats["misses"] += 1
    return compile_text(text, mode)


def hook(table: Table, mode: str = "exec") -> Callable[..., object]:
    """The `exec` dataclasses calls (`mode` "exec") or the `eval` collections.namedtuple calls
    ("eval"): a text runs the code `code_for` gives it, any other source is run as the builtin
    runs it."""
    builtin = _builtin_exec if mode == "exec" else _builtin_eval

    def _run(source: object, globals: dict[str, object] | None = None, locals: Mapping[str, object] | None = None,
             /) -> object:
        if type(source) is str:
            source = code_for(table, source, mode)
        return builtin(source, globals, locals)  # type: ignore[arg-type]

    return _run


def install(path: str = TABLE_PATH) -> int:
    """Load the table at `path` and hook `dataclasses` and `collections` to it; returns how many
    texts it holds (0: no table, or not one for this interpreter: both are left as they are)."""
    try:
        with open(path, "rb") as f:
            table = decode(f.read())
    except (OSError, ValueError):
        return 0
    import collections

    collections.eval = hook(table, "eval")  # type: ignore[attr-defined]  # first: dataclasses imports functools,
    import dataclasses  # whose _CacheInfo is a namedtuple

    dataclasses.exec = hook(table)  # type: ignore[attr-defined]
    return len(table)
