"""Unified kernel images (UKI): the bootstrap as one PE file UEFI firmware loads directly.

A UKI is systemd's EFI stub (Debian's `systemd-boot-efi`: /usr/lib/systemd/boot/efi/
linuxx64.efi.stub) with the kernel, the initramfs, the kernel command line and an os-release
added as PE sections. The stub (systemd 252 in Debian 12) finds them by name: `.linux` (the
bzImage, started through the kernel's EFI handover protocol), `.initrd` (handed to the kernel by
the LINUX_INITRD_MEDIA_GUID device path and the setup header), `.cmdline` (UTF-8, no NUL; used
unless the firmware passes load options and Secure Boot is off) and `.osrel` (os-release text,
what boot menus show). This is what `ukify` and the older `objcopy --add-section ...
--change-section-vma ...` recipe do, written here in Python so the result depends on nothing but
the input bytes:

- the stub's bytes are kept verbatim (its COFF symbol table included: loaders ignore it); new
  section headers go into the header slack after the stub's section table (refused when there is
  none: nothing is moved), new section data is appended at FileAlignment boundaries;
- section virtual addresses follow the stub's last section, each page aligned (a multiple of the
  stub's SectionAlignment), in the order .osrel .cmdline .initrd .linux (ukify's: the kernel
  last);
- the header is rewritten deterministically: TimeDateStamp 0, NumberOfSections, SizeOfImage,
  SizeOfCode / SizeOfInitializedData, and the PE CheckSum computed over the result.

Same stub, kernel, initrd, cmdline and os-release: same bytes, hence the same CID.
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass
from pathlib import Path

from cidboot.errors import CidbootError, FormatError
from cidboot.ipld.cid import CID

STUB_DIR = Path("/usr/lib/systemd/boot/efi")
STUB_PACKAGE = "systemd-boot-efi"
# flow.yaml `arch` (Debian names) -> (stub file, PE machine, UEFI file name suffix)
ARCHES = {"amd64": ("linuxx64.efi.stub", 0x8664, "x86_64"), "arm64": ("linuxaa64.efi.stub", 0xAA64, "arm64")}
UKI_SECTIONS = (".osrel", ".cmdline", ".initrd", ".linux")  # the order they are laid out in

_PE32PLUS = 0x20B
_SUBSYSTEM_EFI_APPLICATION = 10
_SCN_CNT_CODE = 0x00000020
_SCN_CNT_INITIALIZED_DATA = 0x00000040
_SCN_MEM_EXECUTE = 0x20000000
_SCN_MEM_READ = 0x40000000
_SECTION_HEADER = struct.Struct("<8sIIIIIIHHI")  # 40 bytes
_PAGE = 0x1000


class UkiError(FormatError):
    """A stub or UKI that is not a PE image this module can read or extend (the message says why)."""


class StubMissing(CidbootError):
    """The EFI stub for the architecture is not installed."""


@dataclass(frozen=True)
class Section:
    """One PE section header, plus where its header sits in the file (for rewriting it)."""

    name: str
    virtual_size: int
    virtual_address: int
    raw_size: int
    raw_offset: int
    characteristics: int
    header_offset: int

    def data(self, image: bytes) -> bytes:
        """The section's initialised bytes (the raw data, cut at the virtual size when smaller)."""
        n = min(self.raw_size, self.virtual_size) if self.virtual_size else self.raw_size
        return image[self.raw_offset:self.raw_offset + n]


@dataclass(frozen=True)
class PeImage:
    """The header fields of a PE32+ image that a UKI assembly reads or rewrites."""

    machine: int
    coff_offset: int  # the COFF file header (after "PE\\0\\0")
    opt_offset: int  # the optional header
    section_table: int  # offset of the first section header
    section_alignment: int
    file_alignment: int
    size_of_headers: int
    subsystem: int
    certificate_table: tuple[int, int]  # data directory 4 (Authenticode signature): offset, size
    sections: tuple[Section, ...]

    @property
    def checksum_offset(self) -> int:
        return self.opt_offset + 64


def _u16(b: bytes, off: int) -> int:
    return int(struct.unpack_from("<H", b, off)[0])


def _u32(b: bytes, off: int) -> int:
    return int(struct.unpack_from("<I", b, off)[0])


def parse_pe(image: bytes, what: str = "PE image") -> PeImage:
    """Read the headers of a PE32+ image; UkiError naming the field when they are not sane."""
    if len(image) < 0x40 or image[:2] != b"MZ":
        raise UkiError(f"{what}: not a PE image (no MZ header)")
    pe = _u32(image, 0x3C)
    if pe + 24 > len(image) or image[pe:pe + 4] != b"PE\0\0":
        raise UkiError(f"{what}: no PE signature at e_lfanew {pe:#x}")
    coff = pe + 4
    machine, nsections = _u16(image, coff), _u16(image, coff + 2)
    opt_size = _u16(image, coff + 16)
    opt = coff + 20
    if opt + opt_size > len(image) or opt_size < 112 or _u16(image, opt) != _PE32PLUS:
        raise UkiError(f"{what}: not a PE32+ optional header")
    ndirs = _u32(image, opt + 108)
    cert = (_u32(image, opt + 112 + 4 * 8), _u32(image, opt + 112 + 4 * 8 + 4)) if ndirs > 4 else (0, 0)
    table = opt + opt_size
    if table + nsections * _SECTION_HEADER.size > len(image):
        raise UkiError(f"{what}: section table runs past the end of the file")
    sections = []
    for i in range(nsections):
        off = table + i * _SECTION_HEADER.size
        name, vsize, va, rsize, roff, _r, _l, _nr, _nl, ch = _SECTION_HEADER.unpack_from(image, off)
        if rsize and roff + rsize > len(image):
            raise UkiError(f"{what}: section {i} raw data ({roff:#x}+{rsize:#x}) runs past the end of the file")
        sections.append(Section(name.rstrip(b"\0").decode("ascii", "replace"), vsize, va, rsize, roff, ch, off))
    sa, fa = _u32(image, opt + 32), _u32(image, opt + 36)
    for n, v in (("SectionAlignment", sa), ("FileAlignment", fa)):
        if v == 0 or v & (v - 1):
            raise UkiError(f"{what}: {n} {v:#x} is not a power of two")
    return PeImage(machine, coff, opt, table, sa, fa, _u32(image, opt + 60), _u16(image, opt + 68), cert,
                   tuple(sections))


def pe_checksum(image: bytes, checksum_offset: int) -> int:
    """The PE optional header CheckSum: the 16-bit one's-complement sum of the file's
    little-endian words (the CheckSum field counted as zero), plus the file length.

    2**16 is 1 modulo 0xFFFF, so the folded sum is the file read as one little-endian integer
    modulo 0xFFFF (0xFFFF instead of 0 for a non-zero sum): linear time in C, not a Python loop."""
    data = image[:checksum_offset] + b"\0\0\0\0" + image[checksum_offset + 4:]
    n = int.from_bytes(data, "little")
    folded = n % 0xFFFF
    if folded == 0 and n:
        folded = 0xFFFF
    return (folded + len(image)) & 0xFFFFFFFF


def _round_up(n: int, a: int) -> int:
    return (n + a - 1) // a * a


_AARCH64_NOP = struct.pack("<I", 0xD503201F)


def _aarch64_nops(slack: bytes, machine: int) -> bool:
    """Header padding of NOP instructions: Debian's arm64 stub (gnu-efi's hand-written PE header in
    its crt0, aligned with `.align` in a code section) pads the headers with them. They are never
    executed (the entry point is in .text), so they are as free as zeros to put section headers in."""
    if machine != 0xAA64:
        return False
    body = slack.rstrip(b"\0")  # a NOP ends in 0xd5: stripping zeros never cuts one
    return len(body) % 4 == 0 and all(body[i:i + 4] == _AARCH64_NOP for i in range(0, len(body), 4))


def assemble(stub: bytes, sections: list[tuple[str, bytes]], what: str = "EFI stub") -> bytes:
    """The stub with `sections` (name, content) appended as read-only PE sections; see the
    module docstring for the layout. `.linux` is marked code (the stub jumps into it in place
    through the EFI handover protocol), the others initialised data."""
    pe = parse_pe(stub, what)
    if pe.subsystem != _SUBSYSTEM_EFI_APPLICATION:
        raise UkiError(f"{what}: subsystem {pe.subsystem} is not an EFI application (10)")
    if pe.certificate_table != (0, 0):
        raise UkiError(f"{what}: carries an Authenticode signature; sign the UKI, not the stub")
    have = {s.name for s in pe.sections}
    for name, _ in sections:
        if name in have or len(name.encode()) > 8 or not name.startswith("."):
            raise UkiError(f"{what}: cannot add section {name!r} (already there, or not a short .name)")
        have.add(name)
    first_raw = min((s.raw_offset for s in pe.sections if s.raw_size), default=pe.size_of_headers)
    table_end = pe.section_table + (len(pe.sections) + len(sections)) * _SECTION_HEADER.size
    if table_end > min(pe.size_of_headers, first_raw):
        raise UkiError(f"{what}: no room for {len(sections)} more section headers "
                       f"(table would end at {table_end:#x}, headers end at {pe.size_of_headers:#x})")
    slack = stub[pe.section_table + len(pe.sections) * _SECTION_HEADER.size:table_end]
    if slack.strip(b"\0") and not _aarch64_nops(slack, pe.machine):
        raise UkiError(f"{what}: the header space after the section table is not empty")

    valign = max(pe.section_alignment, _PAGE)
    vend = max((s.virtual_address + max(s.virtual_size, s.raw_size) for s in pe.sections), default=0)
    out = bytearray(stub)
    out += bytes(_round_up(len(out), pe.file_alignment) - len(out))
    headers = b""
    code = init = 0
    last_va = last_vsize = 0
    for name, content in sections:
        va = _round_up(vend, valign)
        raw_size = _round_up(len(content), pe.file_alignment)
        is_code = name == ".linux"
        ch = _SCN_MEM_READ | ((_SCN_CNT_CODE | _SCN_MEM_EXECUTE) if is_code else _SCN_CNT_INITIALIZED_DATA)
        headers += _SECTION_HEADER.pack(name.encode(), len(content), va, raw_size, len(out), 0, 0, 0, 0, ch)
        out += content + bytes(raw_size - len(content))
        code, init = code + raw_size * is_code, init + raw_size * (not is_code)
        vend, last_va, last_vsize = va + len(content), va, len(content)
    start = pe.section_table + len(pe.sections) * _SECTION_HEADER.size
    out[start:start + len(headers)] = headers
    struct.pack_into("<H", out, pe.coff_offset + 2, len(pe.sections) + len(sections))
    struct.pack_into("<I", out, pe.coff_offset + 4, 0)  # TimeDateStamp: none, for reproducibility
    o = pe.opt_offset
    struct.pack_into("<I", out, o + 4, _u32(stub, o + 4) + code)  # SizeOfCode
    struct.pack_into("<I", out, o + 8, _u32(stub, o + 8) + init)  # SizeOfInitializedData
    if sections:
        struct.pack_into("<I", out, o + 56, _round_up(last_va + last_vsize, pe.section_alignment))  # SizeOfImage
    struct.pack_into("<I", out, pe.checksum_offset, 0)
    struct.pack_into("<I", out, pe.checksum_offset, pe_checksum(bytes(out), pe.checksum_offset))
    return bytes(out)


def os_release(name: str, version: int | str, pretty: str | None = None) -> str:
    """The .osrel text: os-release(5) lines naming the image (what a boot menu shows)."""
    def q(v: str) -> str:
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return (f"ID=cidboot\nNAME=cidboot\nIMAGE_ID={name}\nIMAGE_VERSION={version}\n"
            f"PRETTY_NAME={q(pretty or f'{name} {version}')}\n")


def stub_path(arch: str = "amd64", stub_dir: Path = STUB_DIR) -> Path:
    """The installed stub for a flow architecture; StubMissing naming the Debian package."""
    if arch not in ARCHES:
        raise StubMissing(f"no UKI stub known for arch {arch!r} (known: {', '.join(sorted(ARCHES))})")
    p = stub_dir / ARCHES[arch][0]
    if not p.is_file():
        raise StubMissing(f"{p} is missing: install Debian's {STUB_PACKAGE} package (apt-get install {STUB_PACKAGE})")
    return p


def build_uki(stub: bytes, kernel: bytes, initrd: bytes, cmdline: str, osrel: str,
              arch: str = "amd64") -> bytes:
    """Kernel + initrd + cmdline + os-release on the stub: the UKI's bytes."""
    want = ARCHES[arch][1] if arch in ARCHES else None
    machine = parse_pe(stub, "EFI stub").machine
    if want is not None and machine != want:
        raise UkiError(f"EFI stub: PE machine {machine:#x} is not {arch}'s {want:#x}")
    return assemble(stub, [(".osrel", osrel.encode()), (".cmdline", cmdline.encode()),
                           (".initrd", initrd), (".linux", kernel)])


def file_name(component: str, arch: str = "amd64") -> str:
    """`bootstrap-x86_64.efi`: the name boot servers offer (UEFI names its architectures so)."""
    return f"{component}-{ARCHES[arch][2]}.efi"


@dataclass(frozen=True)
class SectionInfo:
    name: str
    virtual_address: int
    virtual_size: int
    raw_offset: int
    raw_size: int
    sha256: str

    def to_json(self) -> dict[str, object]:
        return {"name": self.name, "vma": hex(self.virtual_address), "size": self.virtual_size,
                "offset": hex(self.raw_offset), "raw_size": self.raw_size, "sha256": self.sha256}


def describe(image: bytes, what: str = "UKI") -> dict[str, object]:
    """Every section with the SHA-256 of its bytes, plus the image's own hash and checksum state:
    what `imagebuilder inspect` prints for a UKI."""
    pe = parse_pe(image, what)
    infos = [SectionInfo(s.name, s.virtual_address, s.virtual_size, s.raw_offset, s.raw_size,
                         hashlib.sha256(s.data(image)).hexdigest()) for s in pe.sections]
    stored = _u32(image, pe.checksum_offset)
    text = {s.name: s.data(image).decode("utf-8", "replace") for s in pe.sections if s.name in (".cmdline", ".osrel")}
    return {"size": len(image), "sha256": hashlib.sha256(image).hexdigest(), "machine": hex(pe.machine),
            "checksum_ok": stored == pe_checksum(image, pe.checksum_offset),
            "unified": all(n in {s.name for s in pe.sections} for n in (".linux", ".initrd")),
            "cmdline": text.get(".cmdline"), "osrel": text.get(".osrel"),
            "sections": [i.to_json() for i in infos]}


@dataclass(frozen=True)
class BuiltUki:
    """A UKI made by `imagebuilder build --uki`: its file name, bytes and UnixFS CID (CIDv1,
    raw leaves, as the layers), so a boot server can serve it by name and fetch it by CID."""

    name: str
    data: bytes
    cid: CID
    stub: Path

    @property
    def size(self) -> int:
        return len(self.data)
