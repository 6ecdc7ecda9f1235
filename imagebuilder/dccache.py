"""The stage's table of dataclass method code (cidboot.stage.dccache), recorded at build time.

Two steps, each in a subprocess of the builder's interpreter (the one that compiles the stage's
bytecode: same magic number as the target's, imagebuilder.pycompile):

1. record: import every project module the stage ships (its import graph's modules under the
   repository, in name order; not `__main__` modules, whose import runs a CLI) with
   `dataclasses.exec` and `collections.eval` hooked, and collect each source text they compile
   (dataclass methods, namedtuple `__new__`s);
2. compile: in a fresh `-I -S` interpreter that imports nothing but what it needs to read the
   texts, compile each (as `dataclasses`' own `exec` would: cidboot.stage.dccache.compile_text)
   and marshal the sorted table.

Why a fresh process for step 2: marshal writes an object shared elsewhere in the process as a
reference, so the bytes of a code object depend on what else the process holds; a process that
only reads the texts and compiles them holds the same things every time: the same texts give
the same bytes (tests/integration/test_build_repro.py builds twice and compares).

Every module the stage ships, not only those it imports before its first line: the stages import
much of their work path inside functions (the DHCP codec, the gateway client, DICE), and those
classes are created before the hand-over too. A flow's operation modules are not run at build
time (the builder never executes a flow's code); their dataclasses compile as before.

The table goes into the stage's app layer at cidboot.stage.dccache.TABLE_PATH, inside the
measurement, beside the modules' bytecode. A text the target's `dataclasses` writes differently
is only a miss there (compiled as before), never different code.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterable
from pathlib import Path

from cidboot.errors import CidbootError
from cidboot.stage import dccache
from imagebuilder.cpio import Entry
from imagebuilder.pyimports import sources_under

TABLE_PATH = dccache.TABLE_PATH.lstrip("/")
FORMAT = dccache.FORMAT

_RECORD = r"""
import collections
texts = set()
_exec, _eval = exec, eval
def record_eval(source, globals=None, locals=None, /):
    if type(source) is str:
        texts.add(("eval", source))
    return _eval(source, globals, locals)
collections.eval = record_eval  # first: dataclasses imports functools, whose _CacheInfo is a namedtuple
import dataclasses
def record_exec(source, globals=None, locals=None, /):
    if type(source) is str:
        texts.add(("exec", source))
    return _exec(source, globals, locals)
dataclasses.exec = record_exec
import sys
sys.path[:0] = sys.argv[1].split(":")
for name in sys.argv[2].split():
    __import__(name)
import json
sys.stdout.write(json.dumps(sorted(texts)))
"""

_COMPILE = r"""
import json, sys
sys.path[:0] = [sys.argv[1]]
from cidboot.stage import dccache
texts = json.loads(sys.stdin.buffer.read())
sys.stdout.buffer.write(dccache.encode([(mode, t, dccache.compile_text(t, mode)) for mode, t in texts]))
"""


class DataclassTableError(CidbootError):
    """Recording or compiling the stage's dataclass code table failed (names the step)."""


def project_modules(modules: dict[str, Path], repo: Path) -> list[str]:
    """The project code the app layer ships, by module name (`pyimports.sources_under`: the
    files the recorder, with `repo` first on its path, imports), `__main__` modules left out
    (importing one runs it)."""
    return sorted(n for n in sources_under(modules, repo) if n.rsplit(".", 1)[-1] != "__main__")


def _run(code: str, args: list[str], stdin: bytes, step: str) -> bytes:
    """`code` in a new interpreter: isolated (-I: no PYTHONPATH, no user site), no `site`
    (-S), no bytecode written, a fixed hash seed."""
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "PYTHONHASHSEED": "0", "LC_ALL": "C.UTF-8"}
    proc = subprocess.run([sys.executable, "-I", "-S", "-B", "-c", code, *args], input=stdin, capture_output=True,
                          env=env, check=False)
    if proc.returncode != 0:
        tail = proc.stderr.decode(errors="replace").strip().splitlines()[-1:] or ["no message"]
        raise DataclassTableError(f"dataclass code table: {step} failed: {tail[0]}")
    return proc.stdout


def record(modules: Iterable[str], paths: Iterable[Path]) -> list[tuple[str, str]]:
    """Every (mode, text) `dataclasses` ("exec") and `collections.namedtuple` ("eval") compile
    while `modules` are imported (with `paths` first on sys.path: the repository, then the image's
    own Python packages, Debian's dist-packages (cryptography, _cffi_backend) and the unpacked
    wheels (cbor2), so the guest's copy of a module is the one recorded; this interpreter's
    site-packages only after them, for anything else), sorted.
    The recording interpreter runs no `site` and hooks both before it imports anything else: a
    module imported before the hooks would create its classes unseen (the stdlib's too)."""
    site = [p for p in sys.path if Path(p).name in ("site-packages", "dist-packages")]
    out = _run(_RECORD, [":".join([*map(str, paths), *site]), " ".join(modules)], b"", "record")
    got = json.loads(out)
    if not isinstance(got, list) or not all(isinstance(t, list) and len(t) == 2 and t[0] in dccache.MODES
                                            and isinstance(t[1], str) for t in got):
        raise DataclassTableError("dataclass code table: record gave no list of (mode, text)")
    return [(m, t) for m, t in got]


def compile_table(texts: Iterable[tuple[str, str]], repo: Path) -> bytes:
    """The marshalled table for (mode, text) pairs (cidboot.stage.dccache.encode), from a fresh interpreter."""
    return _run(_COMPILE, [str(repo)], json.dumps(sorted(set(texts))).encode(), "compile")


def table(modules: dict[str, Path], repo: Path, packages: Iterable[Path] = ()) -> bytes:
    """The table for a stage whose import graph is `modules` (name -> file), `packages` the
    directories of the image's own non-stdlib modules (searched after `repo`)."""
    return compile_table(record(project_modules(modules, repo), [repo, *packages]), repo)


def table_entry(modules: dict[str, Path], repo: Path, packages: Iterable[Path] = ()) -> Entry:
    """The table as the app layer's archive member."""
    return Entry.file(TABLE_PATH, table(modules, repo, packages))
