"""imagebuilder.uki: the bootstrap as a Unified Kernel Image, from small fake kernel/initrd inputs
and Debian's real systemd-boot-efi stub (.ci/apt-packages.txt installs it); no downloads.

Reproducibility is the point: the same stub, kernel, initrd, cmdline and os-release give the same
bytes and the same CID. The layout is checked against binutils' own PE reader (objdump), so this
module is not only agreeing with itself.
"""

from __future__ import annotations

import hashlib
import json
import re
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from imagebuilder import uki
from imagebuilder.build import BuildError, build_uki
from imagebuilder.layers import BuiltLayer, layer_cid

REPO = Path(__file__).resolve().parents[2]
KERNEL = b"MZ fake bzImage " + bytes(range(256)) * 40  # 10 KiB: the stub only copies it, we never boot it
INITRD = b"070701 fake newc archive " * 3000
CMDLINE = "console=ttyS0 quiet panic=-1"


@pytest.fixture(scope="module")
def stub() -> bytes:
    return uki.stub_path("amd64").read_bytes()


def _layers(kernel: bytes = KERNEL, initrd: bytes = INITRD) -> list[BuiltLayer]:
    half = len(initrd) // 2
    return [BuiltLayer(role, data, layer_cid(data)) for role, data in
            (("kernel", kernel), ("runtime", initrd[:half]), ("agent", initrd[half:]), ("operations", b""),
             ("config", b""))]


def test_same_inputs_twice_give_the_same_bytes_and_cid(tmp_path: Path) -> None:
    a = build_uki("cidboot-bootstrap", 1, CMDLINE, _layers())
    b = build_uki("cidboot-bootstrap", 1, CMDLINE, _layers())
    assert a.data == b.data and a.cid == b.cid
    assert a.name == "bootstrap-x86_64.efi"
    # any input changes the bytes: kernel, initrd, cmdline, os-release
    for other in (build_uki("cidboot-bootstrap", 1, CMDLINE, _layers(kernel=KERNEL + b"x")),
                  build_uki("cidboot-bootstrap", 1, CMDLINE, _layers(initrd=INITRD + b"x")),
                  build_uki("cidboot-bootstrap", 1, CMDLINE + " x", _layers()),
                  build_uki("cidboot-bootstrap", 2, CMDLINE, _layers())):
        assert other.cid != a.cid


def test_sections_hold_the_inputs_at_aligned_vmas_after_the_stub(stub: bytes) -> None:
    osrel = uki.os_release("cidboot-bootstrap", 1)
    data = uki.build_uki(stub, KERNEL, INITRD, CMDLINE, osrel)
    assert data[:len(stub)][:0x3C] == stub[:0x3C]
    pe, spe = uki.parse_pe(data), uki.parse_pe(stub)
    names = [s.name for s in pe.sections]
    assert names == [s.name for s in spe.sections] + list(uki.UKI_SECTIONS)
    got = {s.name: s for s in pe.sections}
    assert got[".linux"].data(data) == KERNEL
    assert got[".initrd"].data(data) == INITRD
    assert got[".cmdline"].data(data) == CMDLINE.encode()
    assert got[".osrel"].data(data) == osrel.encode()
    # the stub's own sections are untouched, the new ones come after its last, page aligned, no overlap
    for old in spe.sections:
        assert got[old.name] == old and got[old.name].data(data) == old.data(stub)
    stub_end = max(s.virtual_address + s.virtual_size for s in spe.sections)
    prev_end = stub_end
    for name in uki.UKI_SECTIONS:
        s = got[name]
        assert s.virtual_address % 0x1000 == 0 and s.virtual_address >= prev_end
        assert s.raw_offset % spe.file_alignment == 0 and s.raw_offset >= len(stub)
        prev_end = s.virtual_address + s.virtual_size
    assert got[".linux"].characteristics & 0x20  # code: the stub jumps into it (EFI handover)
    size_of_image = struct.unpack_from("<I", data, pe.opt_offset + 56)[0]
    assert size_of_image >= prev_end and size_of_image % spe.section_alignment == 0


def test_header_is_deterministic_no_timestamp_and_a_valid_checksum(stub: bytes) -> None:
    data = uki.build_uki(stub, KERNEL, INITRD, CMDLINE, uki.os_release("x", 1))
    pe = uki.parse_pe(data)
    assert struct.unpack_from("<I", data, pe.coff_offset + 4)[0] == 0  # TimeDateStamp
    stored = struct.unpack_from("<I", data, pe.checksum_offset)[0]
    assert stored == uki.pe_checksum(data, pe.checksum_offset) != 0
    # the checksum routine agrees with the one the stub was linked with
    spe = uki.parse_pe(stub)
    assert uki.pe_checksum(stub, spe.checksum_offset) == struct.unpack_from("<I", stub, spe.checksum_offset)[0]


def test_binutils_reads_the_same_sections(stub: bytes, tmp_path: Path) -> None:
    f = tmp_path / "bootstrap-x86_64.efi"
    f.write_bytes(uki.build_uki(stub, KERNEL, INITRD, CMDLINE, uki.os_release("x", 1)))
    out = subprocess.run(["objdump", "-h", str(f)], capture_output=True, text=True, check=True).stdout
    rows = {m[1]: (int(m[2], 16), int(m[3], 16)) for m in
            re.finditer(r"^\s*\d+\s+(\S+)\s+([0-9a-f]+)\s+([0-9a-f]+)\s", out, re.M)}
    pe = uki.parse_pe(f.read_bytes())
    for s in pe.sections:
        assert rows[s.name] == (s.virtual_size, s.virtual_address), s.name


def test_inspect_lists_every_section_with_its_sha256(stub: bytes, tmp_path: Path) -> None:
    f = tmp_path / "bootstrap-x86_64.efi"
    f.write_bytes(uki.build_uki(stub, KERNEL, INITRD, CMDLINE, uki.os_release("x", 1)))
    proc = subprocess.run([sys.executable, "-m", "imagebuilder", "inspect", str(f), "--json"],
                          capture_output=True, text=True, cwd=REPO, timeout=60)
    assert proc.returncode == 0, proc.stderr
    d = json.loads(proc.stdout)
    secs = {s["name"]: s for s in d["sections"]}
    assert secs[".linux"]["sha256"] == hashlib.sha256(KERNEL).hexdigest()
    assert secs[".initrd"]["sha256"] == hashlib.sha256(INITRD).hexdigest()
    assert d["cmdline"] == CMDLINE and d["unified"] and d["checksum_ok"]
    assert d["sha256"] == hashlib.sha256(f.read_bytes()).hexdigest()
    text = subprocess.run([sys.executable, "-m", "imagebuilder", "inspect", str(f)],
                          capture_output=True, text=True, cwd=REPO, timeout=60).stdout
    assert ".linux    vma" in text and hashlib.sha256(KERNEL).hexdigest() in text


# -- what is refused, and why -----------------------------------------------------------------

def test_stub_with_an_authenticode_signature_is_refused(stub: bytes) -> None:
    """Appending sections after a signature would ship a UKI whose signature cannot verify."""
    pe = uki.parse_pe(stub)
    signed = bytearray(stub)
    struct.pack_into("<II", signed, pe.opt_offset + 112 + 4 * 8, len(stub), 8)
    with pytest.raises(uki.UkiError, match="Authenticode"):
        uki.build_uki(bytes(signed), KERNEL, INITRD, CMDLINE, "")


def test_stub_without_header_room_is_refused_not_overwritten(stub: bytes) -> None:
    """New section headers go only into empty header slack; the stub's first section is never overwritten."""
    pe = uki.parse_pe(stub)
    tight = bytearray(stub)
    struct.pack_into("<I", tight, pe.opt_offset + 60, pe.section_table + len(pe.sections) * 40 + 80)  # SizeOfHeaders
    with pytest.raises(uki.UkiError, match="no room"):
        uki.build_uki(bytes(tight), KERNEL, INITRD, CMDLINE, "")
    dirty = bytearray(stub)
    dirty[pe.section_table + len(pe.sections) * 40 + 5] = 1
    with pytest.raises(uki.UkiError, match="not empty"):
        uki.build_uki(bytes(dirty), KERNEL, INITRD, CMDLINE, "")


def test_a_uki_is_not_made_into_a_uki_again(stub: bytes) -> None:
    once = uki.build_uki(stub, KERNEL, INITRD, CMDLINE, "")
    with pytest.raises(uki.UkiError, match=r"\.osrel"):
        uki.build_uki(once, KERNEL, INITRD, CMDLINE, "")


def test_stub_of_another_architecture_is_refused(stub: bytes) -> None:
    with pytest.raises(uki.UkiError, match="arm64"):
        uki.build_uki(stub, KERNEL, INITRD, CMDLINE, "", arch="arm64")


@pytest.mark.parametrize("bad", [b"", b"\x7fELF" + bytes(100), b"MZ" + bytes(0x3A) + struct.pack("<I", 0x1000)])
def test_not_a_pe_image_is_refused(bad: bytes) -> None:
    with pytest.raises(uki.UkiError):
        uki.parse_pe(bad)


def test_missing_stub_names_the_debian_package(tmp_path: Path) -> None:
    with pytest.raises(uki.StubMissing, match="systemd-boot-efi"):
        uki.stub_path("amd64", tmp_path)
    with pytest.raises(BuildError, match="riscv64"):
        build_uki("x", 1, CMDLINE, _layers(), arch="riscv64")


def test_layers_without_the_kernel_first_are_refused() -> None:
    with pytest.raises(BuildError, match="kernel layer first"):
        build_uki("x", 1, CMDLINE, _layers()[1:])


def test_uefi_guest_boots_ovmf_with_a_private_vars_copy_and_no_ipxe_rom(tmp_path: Path) -> None:
    """The harness's firmware="uefi": OVMF code read-only, VARS writable and per guest, the NIC
    first in the boot order with no option ROM (so it is OVMF's PXE, not iPXE, that boots)."""
    from qemu.harness.vm import OVMF_CODE, GuestError, GuestSpec

    spec = GuestSpec("g", firmware="uefi", uefi_vars=tmp_path / "VARS.fd", user_tftp=tmp_path,
                     bootfile="bootstrap-x86_64.efi", network_boot=True)
    argv = " ".join(spec.argv(tmp_path / "qmp.sock"))
    assert f"if=pflash,format=raw,unit=0,readonly=on,file={OVMF_CODE}" in argv
    assert f"if=pflash,format=raw,unit=1,file={tmp_path / 'VARS.fd'}" in argv
    assert f"user,id=n0,tftp={tmp_path},bootfile=bootstrap-x86_64.efi" in argv
    assert "romfile=,bootindex=0" in argv and "-boot n" not in argv
    with pytest.raises(GuestError, match="firmware"):
        GuestSpec("g", firmware="coreboot").argv(tmp_path / "qmp.sock")
    with pytest.raises(GuestError, match="OVMF_VARS"):
        GuestSpec("g", firmware="uefi").argv(tmp_path / "qmp.sock")
