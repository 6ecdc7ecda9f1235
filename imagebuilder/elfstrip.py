"""Drop the static symbol table of an ELF object, in pure Python and byte for byte reproducibly.

Debian strips its libraries and programs; wheels often do not: cryptography's Rust extension
carries a 2.3 MB `.symtab` + `.strtab` (13.7 -> 11.4 MB; gzip 4.53 -> 4.03 MB), cbor2's 0.4 MB.
Nothing at run time reads them: the dynamic loader resolves through `.dynsym`/`.dynstr` (kept),
and only debuggers and symbolised Rust backtraces (`RUST_BACKTRACE`, never set in a stage) use
the static table. Every stage fetches (iPXE, UEFI HTTP) or decompresses these bytes, so the
runtime layer ships them stripped.

Why not `strip`: its output depends on the build host's binutils version, and the image's bytes
must follow from the pinned inputs alone (tests/integration build repro tests). This only
removes whole non-allocated sections that lie after everything the program loads: the file up
to the end of the last kept section or segment stays byte-identical, then `.shstrtab` (moved)
and the section header table follow. A removable section in the middle of the file (or one a
kept section names) is kept; an odd ELF is returned unchanged.
"""

from __future__ import annotations

import struct

SHT_NOBITS = 8
SHT_SYMTAB = 2
SHF_ALLOC = 0x2
SHF_INFO_LINK = 0x40
REMOVABLE_NAMES = (".comment",)  # the compilers' version strings; never loaded


def _removable(name: str, sh_type: int, flags: int) -> bool:
    if flags & SHF_ALLOC:
        return False
    return sh_type == SHT_SYMTAB or name in REMOVABLE_NAMES or name.startswith((".debug_", ".zdebug_"))


def strip_symbols(data: bytes) -> bytes:
    """`data` without its static symbol table (`.symtab` and the `.strtab` it links to), debug
    sections and `.comment`, when they can be cut off the end of the file; otherwise `data`."""
    if data[:4] != b"\x7fELF" or len(data) < 64 or data[4] not in (1, 2) or data[5] not in (1, 2):
        return data
    is64 = data[4] == 2
    end = "<" if data[5] == 1 else ">"
    if is64:
        ehdr = struct.Struct(end + "16sHHIQQQIHHHHHH")
        shdr = struct.Struct(end + "IIQQQQIIQQ")
        phdr = struct.Struct(end + "IIQQQQQQ")
    else:
        ehdr = struct.Struct(end + "16sHHIIIIIHHHHHH")
        shdr = struct.Struct(end + "IIIIIIIIII")
        phdr = struct.Struct(end + "IIIIIIII")
    (ident, e_type, e_machine, e_version, e_entry, e_phoff, e_shoff, e_flags, e_ehsize, e_phentsize, e_phnum,
     e_shentsize, e_shnum, e_shstrndx) = ehdr.unpack_from(data, 0)
    if (e_shentsize != shdr.size or e_shnum == 0 or e_shstrndx == 0 or e_shstrndx >= e_shnum
            or e_shoff + e_shnum * e_shentsize > len(data) or (e_phnum and e_phentsize != phdr.size)
            or e_phoff + e_phnum * e_phentsize > len(data)):
        return data  # section counts in extended form (e_shnum 0) and malformed headers: left as they are
    secs = [list(shdr.unpack_from(data, e_shoff + i * e_shentsize)) for i in range(e_shnum)]
    # fields: name, type, flags, addr, offset, size, link, info, addralign, entsize
    strtab = secs[e_shstrndx]
    names_raw = data[strtab[4]:strtab[4] + strtab[5]]

    def name_of(s: list[int]) -> str:
        stop = names_raw.find(b"\0", s[0])
        return names_raw[s[0]:stop if stop >= 0 else len(names_raw)].decode("ascii", "replace")

    drop = {i for i, s in enumerate(secs) if i and i != e_shstrndx and _removable(name_of(s), s[1], s[2])}
    drop |= {secs[i][6] for i in list(drop) if secs[i][1] == SHT_SYMTAB}  # the symtab's string table
    drop.discard(e_shstrndx)
    drop.discard(0)
    if not drop:
        return data
    phdrs = [phdr.unpack_from(data, e_phoff + i * e_phentsize) for i in range(e_phnum)]
    segs_end = max([ehdr.size, e_phoff + e_phnum * e_phentsize if e_phnum else 0]
                   + [(p[2] + p[5]) if is64 else (p[1] + p[4]) for p in phdrs])

    def cut_for(dropped: set[int]) -> int:
        """The end of everything kept: segments, headers, sections other than .shstrtab."""
        ends = [s[4] + s[5] for i, s in enumerate(secs) if i not in dropped and i != e_shstrndx and s[1] != SHT_NOBITS]
        return max([segs_end, *ends])

    while True:  # keep what cannot be cut off the end, and what a kept section names
        cut = cut_for(drop)
        keep = {i for i in drop if secs[i][1] != SHT_NOBITS and secs[i][5] and secs[i][4] < cut}
        keep |= {s[6] for i, s in enumerate(secs) if i not in drop and s[6] in drop}
        keep |= {s[7] for i, s in enumerate(secs) if i not in drop and s[2] & SHF_INFO_LINK and s[7] in drop}
        if not keep:
            break
        drop -= keep
    if not drop:
        return data
    index: dict[int, int] = {}
    for i in range(e_shnum):
        if i not in drop:
            index[i] = len(index)
    out = bytearray(data[:cut])
    kept = []
    for i, s in enumerate(secs):
        if i in drop:
            continue
        s = list(s)
        if s[6]:
            s[6] = index[s[6]]
        if s[2] & SHF_INFO_LINK and s[7]:
            s[7] = index[s[7]]
        if i == e_shstrndx:
            s[4] = len(out)
            out += names_raw
        kept.append(s)
    out += b"\0" * (-len(out) % 8)
    shoff = len(out)
    for s in kept:
        out += shdr.pack(*s)
    ehdr.pack_into(out, 0, ident, e_type, e_machine, e_version, e_entry, e_phoff, shoff, e_flags, e_ehsize,
                   e_phentsize, e_phnum, e_shentsize, len(kept), index[e_shstrndx])
    return bytes(out)
