"""Our Authenticode hash of a real UKI (Debian's systemd stub + sections, assembled by
imagebuilder.uki) equals the digest `sbsign` (sbsigntools, what Debian signs EFI binaries with)
signs, and is unchanged by signing, as UEFI's PCR 4 measurement must be for a verifier that hashes
the unsigned UKI.

A UKI has a gap: the stub's COFF symbol table stays between the stub's sections and ours. EDK2
(what OVMF measures with) and sbsign then hash "the rest" from offset headers + sum of section
sizes, as the Authenticode document says, so the gap's bytes are not covered and the file's last
bytes are hashed twice; osslsigncode hashes from the end of the last section instead and gets
another digest for such images (on gap-free images all three agree: tests/unit/test_tpm_pe.py)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from cidboot.trust.tpm.pe import authenticode_digest
from imagebuilder import uki

pytestmark = [pytest.mark.tpm]


def _signed_digest(sig_der: bytes) -> str:
    """The SpcIndirectDataContent digest in a detached Authenticode signature: the first 32-byte
    OCTET STRING of the PKCS#7 (the content precedes the signer infos)."""
    out = subprocess.run(["openssl", "asn1parse", "-inform", "DER"], input=sig_der, capture_output=True,
                         check=True).stdout.decode()
    m = re.search(r"OCTET STRING\s+\[HEX DUMP\]:([0-9A-F]{64})\n", out)
    assert m, out
    return m[1].lower()


def test_uki_authenticode_hash_equals_sbsign_and_osslsigncode(tmp_path: Path) -> None:
    for tool in ("sbsign", "sbattach", "openssl"):
        if shutil.which(tool) is None:
            pytest.fail(f"needs {tool} (.ci/apt-packages.txt)")
    stub = uki.stub_path("amd64")
    image = uki.build_uki(stub.read_bytes(), b"\x4d\x5a" + os.urandom(200_000), os.urandom(50_000),
                          "console=ttyS0", uki.os_release("bootstrap", 1))
    (tmp_path / "uki.efi").write_bytes(image)
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", tmp_path / "k.pem",
                    "-out", tmp_path / "c.pem", "-subj", "/CN=cidboot test", "-days", "1"], check=True, capture_output=True)
    subprocess.run(["sbsign", "--key", tmp_path / "k.pem", "--cert", tmp_path / "c.pem", "--output",
                    tmp_path / "sb.efi", tmp_path / "uki.efi"], check=True, capture_output=True)
    subprocess.run(["sbattach", "--detach", tmp_path / "sig.der", tmp_path / "sb.efi"], check=True, capture_output=True)
    ours = authenticode_digest(image).hex()
    assert _signed_digest((tmp_path / "sig.der").read_bytes()) == ours
    assert authenticode_digest((tmp_path / "sb.efi").read_bytes()).hex() == ours  # signing does not change it
