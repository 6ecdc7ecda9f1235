"""Shared-library closures from real ELF files (gcc-built and the system's), never ldd."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from imagebuilder.elfdeps import (
    DirTree,
    ElfFormatError,
    ElfMachineError,
    MemTree,
    MissingLibraryError,
    closure,
    parse,
)

EM_AARCH64 = 183


def _build(tmp: Path) -> Path:
    """A tree /app/bin/hello -> $ORIGIN/../lib/libgreet.so.1 (RUNPATH), plus the system libc."""
    src = tmp / "src"
    src.mkdir()
    (src / "greet.c").write_text('#include <stdio.h>\nvoid greet(void){puts("hi");}\n')
    (src / "main.c").write_text("void greet(void);\nint main(void){greet();return 0;}\n")
    root = tmp / "root"
    (root / "app/lib").mkdir(parents=True)
    (root / "app/bin").mkdir(parents=True)
    subprocess.run(["gcc", "-shared", "-fPIC", "-Wl,-soname,libgreet.so.1", "-o",
                    str(root / "app/lib/libgreet.so.1.0"), str(src / "greet.c")], check=True)
    (root / "app/lib/libgreet.so.1").symlink_to("libgreet.so.1.0")
    subprocess.run(["gcc", "-o", str(root / "app/bin/hello"), str(src / "main.c"), "-L", str(root / "app/lib"),
                    "-l:libgreet.so.1.0", "-Wl,--enable-new-dtags,-rpath,$ORIGIN/../lib"], check=True)
    return root


def _add_libc(root: Path) -> None:
    for name in ("libc.so.6", "ld-linux-x86-64.so.2"):
        d = root / "usr/lib/x86_64-linux-gnu"
        d.mkdir(parents=True, exist_ok=True)
        shutil.copy(Path("/usr/lib/x86_64-linux-gnu") / name, d / name)
    (root / "lib64").mkdir(exist_ok=True)
    (root / "lib64/ld-linux-x86-64.so.2").symlink_to("/usr/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2")
    (root / "lib").symlink_to("usr/lib")


def test_runpath_origin_and_interpreter(tmp_path: Path) -> None:
    root = _build(tmp_path)
    _add_libc(root)
    info = parse((root / "app/bin/hello").read_bytes(), "hello")
    assert info.runpath == ("$ORIGIN/../lib",) and info.needed[0].startswith("libgreet")
    c = closure(DirTree(root), ["/app/bin/hello"])
    assert c.files == ["/app/bin/hello", "/app/lib/libgreet.so.1.0",
                       "/usr/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2", "/usr/lib/x86_64-linux-gnu/libc.so.6"]
    assert c.links["/lib64/ld-linux-x86-64.so.2"] == "/usr/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2"


def test_system_binary_through_merged_usr_symlinks() -> None:
    c = closure(DirTree("/"), ["/bin/ls"])
    assert "/usr/bin/ls" in c.files
    assert "/usr/lib/x86_64-linux-gnu/libc.so.6" in c.files
    assert c.links.get("/bin") == "usr/bin"
    assert c.files == sorted(c.files)


def test_missing_library_names_who_needs_it(tmp_path: Path) -> None:
    root = _build(tmp_path)
    _add_libc(root)
    (root / "app/lib/libgreet.so.1.0").unlink()
    with pytest.raises(MissingLibraryError, match=r"libgreet.so.1, needed by /app/bin/hello, not found for amd64 "
                                                  r"in /app/bin/../lib"):
        closure(DirTree(root), ["/app/bin/hello"])


def _retarget(data: bytes, machine: int) -> bytes:
    return data[:18] + machine.to_bytes(2, "little") + data[20:]


def test_wrong_machine_root_is_rejected() -> None:
    data = _retarget(Path("/usr/bin/true").read_bytes(), EM_AARCH64)
    with pytest.raises(ElfMachineError, match="/bin/true: built for EM_AARCH64 ELF64, target amd64 needs EM_X86_64"):
        closure(MemTree({"/bin/true": data}), ["/bin/true"])


def test_wrong_machine_library_is_skipped_then_reported(tmp_path: Path) -> None:
    root = _build(tmp_path)
    _add_libc(root)
    lib = root / "app/lib/libgreet.so.1.0"
    lib.write_bytes(_retarget(lib.read_bytes(), EM_AARCH64))
    with pytest.raises(MissingLibraryError, match=r"only /app/lib/libgreet.so.1.0 \(EM_AARCH64\) was found"):
        closure(DirTree(root), ["/app/bin/hello"])


def test_aarch64_target_rejects_x86_binaries() -> None:
    with pytest.raises(ElfMachineError, match="target arm64 needs EM_AARCH64"):
        closure(DirTree("/"), ["/bin/ls"], arch="arm64")


def test_not_elf_and_truncated() -> None:
    with pytest.raises(ElfFormatError, match="x: not an ELF file"):
        parse(b"#!/bin/sh\n", "x")
    with pytest.raises(ElfFormatError, match="y: corrupt ELF"):
        parse(Path("/usr/bin/true").read_bytes()[:70], "y")
