"""imagebuilder.elfstrip: the static symbol table goes, what the loader reads stays, bytes reproducible."""

from __future__ import annotations

import ctypes
import shutil
import subprocess
from pathlib import Path

import pytest
from elftools.elf.elffile import ELFFile

from imagebuilder.elfstrip import strip_symbols


def _sections(path: Path) -> list[str]:
    with path.open("rb") as f:
        return [s.name for s in ELFFile(f).iter_sections()]


@pytest.fixture()
def shared_object(tmp_path: Path) -> Path:
    """A debug-built shared object with a static symbol table, as wheels ship their extensions."""
    if shutil.which("gcc") is None:
        pytest.skip("needs gcc")
    src = tmp_path / "m.c"
    src.write_text("static int twice(int x) { return 2 * x; }\nint answer(int x) { return twice(x) + 1; }\n")
    out = tmp_path / "m.so"
    subprocess.run(["gcc", "-shared", "-fPIC", "-g", "-O1", "-o", str(out), str(src)], check=True, capture_output=True)
    return out


def test_symtab_and_debug_sections_go_and_the_object_still_loads(shared_object: Path, tmp_path: Path) -> None:
    data = shared_object.read_bytes()
    before = _sections(shared_object)
    assert ".symtab" in before and ".strtab" in before and any(n.startswith(".debug_") for n in before)
    out = strip_symbols(data)
    assert len(out) < len(data)
    stripped = tmp_path / "stripped.so"
    stripped.write_bytes(out)
    after = _sections(stripped)
    assert ".symtab" not in after and ".strtab" not in after and not any(n.startswith(".debug_") for n in after)
    assert [n for n in before if n in after] == after  # nothing else dropped, order kept
    assert {".dynsym", ".dynstr", ".text", ".shstrtab"} <= set(after)
    # what the loader maps is the original's byte for byte: only the section metadata after it moved
    with shared_object.open("rb") as f:
        loaded_end = max(seg["p_offset"] + seg["p_filesz"] for seg in ELFFile(f).iter_segments())
    assert out[0x40:loaded_end] == data[0x40:loaded_end] and out[:0x28] == data[:0x28]
    assert ctypes.CDLL(str(stripped)).answer(20) == 41  # the loader resolves through .dynsym
    assert strip_symbols(out) == out  # nothing left to strip: unchanged
    assert strip_symbols(data) == out  # reproducible


def test_anything_else_is_returned_unchanged() -> None:
    for blob in (b"", b"#!/bin/sh\n", b"\x7fELF" + b"\0" * 10, b"\x7fELF\x02\x01" + b"\xff" * 100):
        assert strip_symbols(blob) == blob
