"""The Authenticode hash UEFI measures EFI applications by: known values from two independent
signers (sbsign + osslsigncode computed the same digests for these synthetic images), invariance
under signing and the CheckSum, sensitivity to every other byte, bad headers, and a fuzzer."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cidboot.trust.tpm.errors import PeFormatError
from cidboot.trust.tpm.pe import authenticode_digest
from tests.support.swtpm import make_pe

PE64 = make_pe([(".text", bytes(range(256)) * 5), (".data", b"cidboot" * 100)], trailer=b"T" * 64)
PE32 = make_pe([(".text", bytes(range(256)) * 5)], pe32plus=False)


def test_known_values_from_sbsign_and_osslsigncode() -> None:
    # `sbsign` then `osslsigncode verify` ("Current message digest") and `osslsigncode sign` agree on these
    assert authenticode_digest(PE64).hex() == "ac4065056d3befbbe9ceaf47d70847233e5a24a50c451380215e0f09e0bb8be5"
    assert authenticode_digest(PE32).hex() == "0f0878bb7451ea7c0c1949432cfc218462d66d6d093d9384f4a737ca1416cd65"


def test_signing_and_checksum_do_not_change_the_digest() -> None:
    signed = make_pe([(".text", bytes(range(256)) * 5), (".data", b"cidboot" * 100)], trailer=b"T" * 64,
                     cert_table=b"\x08\x02\x00\x00" + b"C" * 1020)
    assert authenticode_digest(signed) == authenticode_digest(PE64)
    cks = PE64.index(struct.pack("<I", 0x1234))
    assert authenticode_digest(PE64[:cks] + b"\xff" * 4 + PE64[cks + 4:]) == authenticode_digest(PE64)


def test_every_other_byte_changes_the_digest() -> None:
    base = authenticode_digest(PE64)
    cks = PE64.index(struct.pack("<I", 0x1234))
    sec_dir = 0x80 + 24 + 112 + 4 * 8
    for i in range(0, len(PE64), 13):
        if cks <= i < cks + 4 or sec_dir <= i < sec_dir + 8:
            continue
        b = bytearray(PE64)
        b[i] ^= 0x01
        try:
            assert authenticode_digest(bytes(b)) != base, f"byte {i} is not covered"
        except PeFormatError:
            pass  # a header field flipped into nonsense is refused, which is as good


@pytest.mark.parametrize("cut,why", [(1, "MZ"), (0x40, "e_lfanew"), (0x90, "truncated"), (0x300, "runs past")])
def test_truncated_images_are_refused(cut: int, why: str) -> None:
    with pytest.raises(PeFormatError):
        authenticode_digest(PE64[:cut])


def test_certificate_table_larger_than_the_tail_is_refused() -> None:
    b = bytearray(PE64)
    sec_dir = 0x80 + 24 + 112 + 4 * 8
    b[sec_dir:sec_dir + 8] = struct.pack("<II", len(b) - 10, 1 << 20)
    with pytest.raises(PeFormatError, match="Certificate Table"):
        authenticode_digest(bytes(b))


@settings(max_examples=400, deadline=None)
@given(st.data())
def test_fuzz_mutated_pe_raises_only_pe_format_error(data: st.DataObject) -> None:
    raw = bytearray(PE64)
    for _ in range(data.draw(st.integers(1, 4))):
        i = data.draw(st.integers(0, 0x400))
        raw[i] = data.draw(st.integers(0, 255))
    try:
        authenticode_digest(bytes(raw[:data.draw(st.integers(0, len(raw)))]))
    except PeFormatError:
        pass
