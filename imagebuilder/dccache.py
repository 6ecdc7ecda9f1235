"""The stage's table of dataclass method code (cidboot.stage.dccache), recorded at build time.

Two steps, each in a subprocess of the builder's interpreter (the one that compiles the stage's
bytecode: same magic number as the target's, imagebuilder.pycompile):

1. record: import every project module the stage ships (its import graph's modules under the
   repository, in name order; not `__main__` modules, whose import runs a CLI) with
   `dataclasses.exec` hooked, and collect each source text `dataclasses` compiles;
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

TABLE_PATH = dccache.TABLE_PATH.lstrip("/")
FORMAT = dccache.FORMAT

_RECORD = r"""
import json, sys
sys.path[:0] = json.loads(sys.argv[1])
import dataclasses
texts = set()
_exec = exec
def record(source, globals=None, locals=None, /):
    if type(source) is str:
        texts.add(source)
    return _exec(source, globals, locals)
dataclasses.exec = record
for name in json.loads(sys.argv[2]):
    __import__(name)
sys.stdout.write(json.dumps(sorted(texts)))
"""

_COMPILE = r"""
import json, sys
sys.path[:0] = [sys.argv[1]]
from cidboot.stage import dccache
texts = json.loads(sys.stdin.buffer.read())
sys.stdout.buffer.write(dccache.encode({t: dccache.compile_text(t) for t in texts}))
"""


class DataclassTableError(CidbootError):
    """Recording or compiling the stage's dataclass code table failed (names the step)."""


def project_modules(modules: dict[str, Path], repo: Path) -> list[str]:
    """The module names of an import graph (name -> file) whose files live under `repo`: the
    project code the app layer ships; `__main__` modules left out (importing one runs it)."""
    out = []
    for name, path in modules.items():
        try:
            path.relative_to(repo)
        except ValueError:
            continue
        if path.suffix == ".py" and name.rsplit(".", 1)[-1] != "__main__":
            out.append(name)
    return sorted(out)


def _run(code: str, args: list[str], stdin: bytes, step: str, *, site: bool = False) -> bytes:
    """`code` in a new interpreter: isolated (-I: no PYTHONPATH, no user site), no bytecode
    written, a fixed hash seed; without `site` no site-packages either."""
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "PYTHONHASHSEED": "0", "LC_ALL": "C.UTF-8"}
    proc = subprocess.run([sys.executable, "-I", *([] if site else ["-S"]), "-B", "-c", code, *args], input=stdin, capture_output=True,
                          env=env, check=False)
    if proc.returncode != 0:
        tail = proc.stderr.decode(errors="replace").strip().splitlines()[-1:] or ["no message"]
        raise DataclassTableError(f"dataclass code table: {step} failed: {tail[0]}")
    return proc.stdout


def record(modules: Iterable[str], paths: Iterable[Path]) -> list[str]:
    """Every text `dataclasses` compiles while `modules` are imported (with `paths` first on
    sys.path), sorted."""
    out = _run(_RECORD, [json.dumps([str(p) for p in paths]), json.dumps(list(modules))], b"", "record",
               site=True)  # the stage's wheels (cryptography, cbor2) are the build host's site packages here
    texts = json.loads(out)
    if not isinstance(texts, list) or not all(isinstance(t, str) for t in texts):
        raise DataclassTableError("dataclass code table: record gave no list of texts")
    return texts


def compile_table(texts: Iterable[str], repo: Path) -> bytes:
    """The marshalled table for `texts` (cidboot.stage.dccache.encode), from a fresh interpreter."""
    return _run(_COMPILE, [str(repo)], json.dumps(sorted(set(texts))).encode(), "compile")


def table(modules: dict[str, Path], repo: Path) -> bytes:
    """The table for a stage whose import graph is `modules` (name -> file)."""
    return compile_table(record(project_modules(modules, repo), [repo]), repo)


def table_entry(modules: dict[str, Path], repo: Path) -> Entry:
    """The table as the app layer's archive member."""
    return Entry.file(TABLE_PATH, table(modules, repo))
