"""The Authenticode hash of a PE/COFF image: what UEFI firmware measures into PCR 4 as the digest
of an EV_EFI_BOOT_SERVICES_APPLICATION event when it loads an EFI application (the bootstrap UKI).

Microsoft's "Windows Authenticode Portable Executable Signature Format" and the PE/COFF spec
define it, and EDK2 (Tcg2Dxe / DxeTpm2MeasureBootLib, `Tcg2MeasurePeImage`) implements it the way
OVMF measures; this follows that implementation step by step:

1. hash the headers from the start up to the optional header's CheckSum, skip CheckSum (4 bytes);
2. if the image has a Certificate Table directory entry (NumberOfRvaAndSizes > 4), hash up to it,
   skip it (8 bytes), and hash the rest of the headers up to SizeOfHeaders; else hash the rest of
   the headers after CheckSum;
3. hash every section with raw data, in ascending PointerToRawData order, SizeOfRawData bytes each;
4. hash what follows, from offset "bytes hashed so far" to the end of the file less the
   Certificate Table's size (the attribute certificates of a signed image are never hashed).

So signing an image (appending a certificate table) does not change its hash; changing any byte
of the headers (but CheckSum), of a section, or of the trailing data does.
"""

from __future__ import annotations

import hashlib
import struct

from cidboot.trust.tpm.errors import PeFormatError

MAX_IMAGE = 1 << 30
_PE32, _PE32PLUS = 0x10B, 0x20B
_IMAGE_DIRECTORY_ENTRY_SECURITY = 4


def _u16(b: bytes, off: int, what: str) -> int:
    if off < 0 or off + 2 > len(b):
        raise PeFormatError(f"PE image: truncated at {what} (offset {off})")
    return int(struct.unpack_from("<H", b, off)[0])


def _u32(b: bytes, off: int, what: str) -> int:
    if off < 0 or off + 4 > len(b):
        raise PeFormatError(f"PE image: truncated at {what} (offset {off})")
    return int(struct.unpack_from("<I", b, off)[0])


def authenticode_digest(image: bytes, algorithm: str = "sha256") -> bytes:
    """The Authenticode digest of `image` (see the module docstring); PeFormatError if the headers
    or sections point outside the file."""
    if len(image) > MAX_IMAGE:
        raise PeFormatError(f"PE image: {len(image)} bytes exceeds {MAX_IMAGE}")
    if image[:2] != b"MZ":
        raise PeFormatError("PE image: no MZ header")
    pe = _u32(image, 0x3C, "e_lfanew")
    if image[pe:pe + 4] != b"PE\x00\x00":
        raise PeFormatError(f"PE image: no PE signature at e_lfanew {pe:#x}")
    nsections = _u16(image, pe + 6, "NumberOfSections")
    opt_size = _u16(image, pe + 20, "SizeOfOptionalHeader")
    opt = pe + 24
    magic = _u16(image, opt, "optional header magic")
    if magic == _PE32:
        nrva_off, dd_off = opt + 92, opt + 96
    elif magic == _PE32PLUS:
        nrva_off, dd_off = opt + 108, opt + 112
    else:
        raise PeFormatError(f"PE image: optional header magic {magic:#x} is neither PE32 nor PE32+")
    size_of_headers = _u32(image, opt + 60, "SizeOfHeaders")
    nrva = _u32(image, nrva_off, "NumberOfRvaAndSizes")
    checksum_off = opt + 64
    sec_dir = dd_off + 8 * _IMAGE_DIRECTORY_ENTRY_SECURITY
    has_sec = nrva > _IMAGE_DIRECTORY_ENTRY_SECURITY
    if dd_off + 8 * min(nrva, 16) > opt + opt_size or opt + opt_size > len(image):
        raise PeFormatError(f"PE image: {nrva} data directories do not fit the optional header of {opt_size} bytes")
    if not (sec_dir + 8 if has_sec else checksum_off + 4) <= size_of_headers <= len(image):
        raise PeFormatError(f"PE image: SizeOfHeaders {size_of_headers:#x} is outside the file or inside the "
                            "optional header")
    h = hashlib.new(algorithm)
    h.update(image[:checksum_off])
    if has_sec:
        h.update(image[checksum_off + 4:sec_dir])
        h.update(image[sec_dir + 8:size_of_headers])
        cert_size = _u32(image, sec_dir + 4, "Certificate Table size")
    else:
        h.update(image[checksum_off + 4:size_of_headers])
        cert_size = 0
    table = opt + opt_size
    if table + 40 * nsections > size_of_headers:
        raise PeFormatError(f"PE image: {nsections} section headers do not fit in SizeOfHeaders {size_of_headers:#x}")
    sections = []
    for i in range(nsections):
        raw_size, raw_ptr = struct.unpack_from("<II", image, table + 40 * i + 16)
        if raw_size == 0:
            continue
        if raw_ptr + raw_size > len(image):
            raise PeFormatError(f"PE image: section {i} ({raw_ptr:#x}+{raw_size:#x}) runs past the end of the file")
        sections.append((raw_ptr, i, raw_size))
    hashed = size_of_headers
    for raw_ptr, _, raw_size in sorted(sections):
        h.update(image[raw_ptr:raw_ptr + raw_size])
        hashed += raw_size
    if len(image) > hashed:
        if cert_size > len(image) - hashed:
            raise PeFormatError(f"PE image: Certificate Table size {cert_size:#x} is larger than the unhashed tail")
        h.update(image[hashed:len(image) - cert_size])
    return h.digest()


def sections(image: bytes) -> list[tuple[str, bytes]]:
    """(name, initialised bytes) of each section in header order, cut at VirtualSize when that is
    smaller than SizeOfRawData (the file alignment padding is not part of the section): what
    systemd's stub measures of a UKI's sections, and where it finds .linux."""
    if image[:2] != b"MZ":
        raise PeFormatError("PE image: no MZ header")
    pe = _u32(image, 0x3C, "e_lfanew")
    if image[pe:pe + 4] != b"PE\x00\x00":
        raise PeFormatError(f"PE image: no PE signature at e_lfanew {pe:#x}")
    n, opt_size = _u16(image, pe + 6, "NumberOfSections"), _u16(image, pe + 20, "SizeOfOptionalHeader")
    table = pe + 24 + opt_size
    if table + 40 * n > len(image):
        raise PeFormatError(f"PE image: {n} section headers run past the end of the file")
    out = []
    for i in range(n):
        name, vsize, _, raw_size, raw_ptr = struct.unpack_from("<8sIIII", image, table + 40 * i)
        if raw_ptr + raw_size > len(image):
            raise PeFormatError(f"PE image: section {i} runs past the end of the file")
        size = min(vsize, raw_size) if vsize else raw_size
        out.append((name.rstrip(b"\x00").decode("ascii", "replace"), image[raw_ptr:raw_ptr + size]))
    return out
