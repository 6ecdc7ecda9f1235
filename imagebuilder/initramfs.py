"""Assemble a stage's root file system as cpio entries: no shell, no busybox, Python as /init.

The parts are produced separately so each can become its own layer: the runtime (interpreter,
the stdlib modules the stage imports with their bytecode, extension modules, and the shared
libraries they reach), the project code (cidboot plus the stage's component), the operations
and the config. Linux unpacks concatenated compressed cpio archives in order into one rootfs,
so the layers together form the initramfs.
"""

from __future__ import annotations

import hashlib
import os
import stat
from collections.abc import Iterable
from pathlib import Path

from imagebuilder import elfdeps
from imagebuilder.cpio import Entry
from imagebuilder.debpkg import read_deb
from imagebuilder.elfstrip import strip_symbols
from imagebuilder.pycompile import compile_source, pyc_path, sourceless_path
from imagebuilder.pyimports import ImportGraph

PYTHON = "/usr/bin/python3.11"
STDLIB = "usr/lib/python3.11"
DIST_PACKAGES = "usr/lib/python3/dist-packages"  # Debian's python3-* packages; shipped like wheels, under APP/lib
APP = "opt/cidboot"  # project code and wheels
OPS = "opt/cidboot/ops"


def _into_place(tmp: Path, root: Path) -> Path:
    """Mark the tree unpacked in `tmp` complete and rename it to `root` whole; if another build
    put the same tree there first, keep that one and drop ours."""
    import shutil

    (tmp / ".complete").touch()
    if root.exists() and not (root / ".complete").exists():
        shutil.rmtree(root, ignore_errors=True)  # an unfinished tree of an older builder
    try:
        tmp.rename(root)
    except OSError:  # another build put the same tree there first
        shutil.rmtree(tmp, ignore_errors=True)
        if not (root / ".complete").exists():
            raise
    return root


def stage_sysroot(debs: Iterable[Path], root_base: Path) -> Path:
    """Unpack pinned .debs into a directory named for their hashes (reused while unchanged).

    Builds run concurrently (a test session's boot servers build the amd64 and arm64 bootstraps at
    once, over one cache): each unpacks into its own temporary directory and renames it into place
    whole; a build that finds the tree already there when it is done keeps that one and drops its
    own. A shared `.tmp` name, removed by whichever build came second, once left a tree without
    its stdlib marked complete."""
    import tempfile

    debs = sorted(debs)
    key = hashlib.sha256("\n".join(p.name for p in debs).encode()).hexdigest()[:20]
    root = root_base / key
    if (root / ".complete").exists():
        return root
    root_base.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f"{key}.", suffix=".tmp", dir=root_base))
    for deb in debs:
        for f in read_deb(deb):
            dest = tmp / f.path
            if f.kind == "dir":
                dest.mkdir(parents=True, exist_ok=True)
                continue
            dest.parent.mkdir(parents=True, exist_ok=True)
            if dest.is_symlink() or dest.exists():
                dest.unlink()
            if f.kind == "symlink":
                dest.symlink_to(f.target)
            else:
                dest.write_bytes(f.data)
                dest.chmod(f.mode & 0o755 | 0o600)
    return _into_place(tmp, root)


def python_entries(files: dict[str, bytes], sources: bool = True, docstrings: bool = True) -> list[Entry]:
    """Unchecked-hash bytecode for each image path -> source: with `sources`, the source and its
    bytecode in __pycache__/; without, the bytecode alone at the sourceless location (`mod.pyc`
    beside where `mod.py` would be), which the import system loads when there is no source (it
    ignores __pycache__/ then). The bytecode is the same bytes either way (its code objects name
    the `.py` path, so a traceback points at the file in the pinned package or the repository).
    `docstrings=False`: `__doc__` None throughout (pycompile.compile_source)."""
    out = []
    for path, src in sorted(files.items()):
        code = compile_source(src, path, docstrings)
        if sources:
            out.append(Entry.file(path, src))
            out.append(Entry.file(pyc_path(path), code))
        else:
            out.append(Entry.file(sourceless_path(path), code))
    return out


def unpack_wheel(wheel: Path, base: Path) -> Path:
    """A wheel's files in a directory named for its content hash (a wheel is a zip, never run);
    unpacked aside and renamed into place whole, as `stage_sysroot` (concurrent builds)."""
    import tempfile
    import zipfile

    root = base / hashlib.sha256(wheel.read_bytes()).hexdigest()[:20]
    if (root / ".complete").exists():
        return root
    base.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f"{root.name}.", suffix=".tmp", dir=base))
    with zipfile.ZipFile(wheel) as z:
        for info in z.infolist():
            name = os.path.normpath(info.filename)
            if name.startswith(("/", "..")) or info.is_dir():
                continue
            dest = tmp / name
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.write_bytes(z.read(info))
    return _into_place(tmp, root)


def runtime_entries(sysroot: Path, graph: ImportGraph, arch: str = "amd64",
                    wheel_roots: Iterable[Path] = (), skip: Iterable[str] = ()) -> list[Entry]:
    """The interpreter, the imported stdlib and wheel modules and every library they reach.

    Modules ship as bytecode only (`python_entries(sources=False)`): Debian's and the wheels'
    sources are in the pinned packages, and they were a fifth of the runtime layer (5.1 of 44 MB,
    1.3 of 15.8 MB gzip). ELF objects ship without their static symbol table
    (`elfstrip.strip_symbols`: the wheels' extensions are not stripped; Debian's are already).
    Their bytecode has no docstrings (`__doc__` None, as under -OO, asserts kept:
    `pycompile.compile_source`); the project's own code (`code_entries`) keeps its.

    `skip`: archive paths another layer already holds (the shared runtime layer, when this is
    the operations layer's share: the modules only a flow's operations import, and the libraries
    only their extension modules reach). Skipped paths are neither compiled nor repeated, so a
    later layer never replaces a runtime member; with a skip set the interpreter itself is not
    added (the runtime has it)."""
    have = {p.lstrip("/") for p in skip}
    stdlib_root = sysroot / STDLIB
    py: dict[str, bytes] = {}
    elves = [PYTHON] if not have else []
    wheel_elves: list[Entry] = []
    wroots = list(wheel_roots)
    for path in graph.files():
        wroot = next((w for w in wroots if path.is_relative_to(w)), None)
        if wroot is not None:  # wheel code goes to /opt/cidboot/lib
            dest = f"{APP}/lib/{path.relative_to(wroot)}"
            if dest in have or (path.suffix == ".py" and sourceless_path(dest) in have):
                continue
            if path.suffix == ".py":
                py[dest] = path.read_bytes()
            else:
                wheel_elves.append(Entry.file(dest, strip_symbols(path.read_bytes()), 0o755))
            continue
        try:
            rel = path.relative_to(sysroot)
        except ValueError:
            continue  # not a runtime file (project code, ops)
        if str(rel) in have or (path.suffix == ".py" and sourceless_path(str(rel)) in have):
            continue
        if path.suffix == ".py":
            py[str(rel)] = path.read_bytes()
        else:
            elves.append("/" + str(rel))
    _, _, triplet = elfdeps.target(arch)
    for name, paths in DLOPENED.items():
        if name in graph.modules:
            for where in paths:
                loaded = where.format(triplet=triplet)
                if loaded not in have:
                    if not (sysroot / loaded).is_file():
                        raise elfdeps.MissingLibraryError(f"{name} loads /{loaded} at run time; no runtime package has it")
                    elves.append("/" + loaded)
    if have and not elves and not wheel_elves:
        return python_entries(py, sources=False, docstrings=False)
    # wheel extensions: their libraries must be in the Debian tree too (manylinux: libc and friends)
    tree = elfdeps.MemTree()
    for e in wheel_elves:
        tree.files["/" + e.path] = e.data
    # the interpreter locates its prefix by the landmark os.py, which analysis already included
    assert (stdlib_root / "os.py").is_file()
    closure = elfdeps.closure(_Overlay(tree, elfdeps.DirTree(sysroot)), elves + sorted(tree.files), arch)
    out = python_entries(py, sources=False, docstrings=False) + wheel_elves
    shipped = {"/" + e.path for e in wheel_elves}
    closure.files = [f for f in closure.files if f not in shipped]
    for f in closure.files:
        if f.lstrip("/") in have:
            continue
        host = sysroot / f.lstrip("/")
        out.append(Entry.file(f.lstrip("/"), strip_symbols(host.read_bytes()), 0o755))
    for link, target in closure.links.items():
        if link.lstrip("/") not in have:
            out.append(Entry.symlink(link.lstrip("/"), target))
    return out


class _Overlay:
    """Wheel extension modules (in memory) over the unpacked Debian tree."""

    def __init__(self, top: elfdeps.MemTree, base: elfdeps.DirTree) -> None:
        self.top, self.base = top, base

    def read(self, path: str) -> bytes | None:
        return self.top.read(path) if path in self.top.files else self.base.read(path)

    def readlink(self, path: str) -> str | None:
        return self.base.readlink(path)


def code_entries(graph: ImportGraph, src_root: Path, dest: str, sources: bool = True) -> list[Entry]:
    """The graph's modules that are `src_root`'s own (`ImportGraph.sources_under`: the file is
    where the module's name puts it), placed under `dest`, with their sources or as bytecode
    alone (`python_entries`)."""
    files: dict[str, bytes] = {}
    for path in sorted(set(graph.sources_under(src_root).values())):
        files[f"{dest}/{path.relative_to(src_root)}"] = path.read_bytes()
    return python_entries(files, sources)


def data_entries(files: dict[str, Path]) -> list[Entry]:
    """Extra files from the flow: image path -> file beside the flow."""
    return [Entry.file(dest, src.read_bytes(), stat.S_IMODE(os.stat(src).st_mode) & 0o755 | 0o444)
            for dest, src in sorted(files.items())]


# shared objects a module's native code loads by path at run time (dlopen), which neither the
# import analysis nor the ELF closure sees: Debian's cryptography 38 loads OpenSSL's "legacy"
# provider when its bindings initialise and fails to import without it (`DSO support routines::could
# not load the shared library`); OpenSSL looks for it in its built-in MODULESDIR, libssl3's
# /usr/lib/<triplet>/ossl-modules. Paths in the sysroot, `{triplet}` the arch's multiarch triplet.
DLOPENED = {"cryptography.hazmat.bindings._openssl": ("usr/lib/{triplet}/ossl-modules/legacy.so",)}

IMPORTTIME_ENV = "cidboot_importtime"  # kernel command line `cidboot_importtime=1`: see init_entries


def init_entries(entry_module: str) -> list[Entry]:
    """/init: the interpreter in isolated mode, PID-1 duties from cidboot.stage.pid1, then the stage.

    Measuring start-up: with `cidboot_importtime=1` on the kernel command line (no dot in the
    name: the kernel hands dotless `name=value` parameters to init as environment variables and
    keeps dotted ones for modules), /init re-executes itself once under `-X importtime`, so
    every import's cost is printed on the console (stderr). The knob only adds output; without
    it /init runs exactly as before, one interpreter start."""
    script = (f"#!{PYTHON} -IS\n"
              f'"""PID 1 of this stage: set up /dev, /proc, /sys, then run {entry_module}."""\n'
              f"import sys\n"
              f"if 'importtime' not in sys._xoptions and __import__('posix').environ.get(b'{IMPORTTIME_ENV}') == b'1':\n"
              f"    __import__('posix').execv('{PYTHON}', ['{PYTHON}', '-IS', '-X', 'importtime', '/init'])\n"
              f"sys.path[:0] = ['/{APP}', '/{APP}/lib', '/{OPS}']\n"
              f"from cidboot.stage.pid1 import run_stage\n"
              f"run_stage({entry_module!r})\n")
    return [Entry.file("init", script.encode(), 0o755), Entry.directory("dev"), Entry.directory("proc"),
            Entry.directory("sys"), Entry.directory("tmp", 0o1777), Entry.chardev("dev/console", 5, 1),
            # CPython seeds its hash before /init runs; early in boot getrandom() would block, so it
            # falls back to /dev/urandom, which must exist before devtmpfs is mounted
            Entry.chardev("dev/urandom", 1, 9, 0o444), Entry.chardev("dev/null", 1, 3, 0o666)]
