"""A real software TPM 2.0 for tests: `swtpm` in socket mode on loopback, manufactured by
`swtpm_setup --tpm2 --create-ek-cert` with a local CA of its own (under the state dir, not the
machine-wide /var/lib/swtpm-localca), driven with `tpm2-tools` over the swtpm TCTI.

The swtpm itself (manufacture, start, stop) is the harness's (qemu.harness.tpm.Swtpm); this adds
tpm2-tools. Used by tests/integration/test_tpm_quote_integration.py and bench/bench_trust.py. The TPM is the
"factory-fresh" device: `create_ak()` makes an EK and an AK under it (the enrolment a real server
gets from tpm2_createek / tpm2_createak), `quote()` signs the SHA-256 PCRs over a nonce.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from qemu.harness import tpm as harness_tpm

TOOLS = ("swtpm", "swtpm_setup", "tpm2_quote", "tpm2_createak", "tpm2_pcrextend")


def missing() -> str | None:
    """Why a swtpm test cannot run here (None: it can)."""
    absent = [t for t in TOOLS if shutil.which(t) is None]
    if absent:
        return f"needs {', '.join(absent)} (Debian swtpm, swtpm-tools, tpm2-tools: .ci/apt-packages.txt)"
    return None


@dataclass
class AkFiles:
    ctx: Path  # the loaded AK's context (tpm2_quote -c)
    public: Path  # TPM2B_PUBLIC (tpm2_createak -u)
    pem: Path  # the public key as PEM (tpm2_readpublic -f pem)
    name: Path  # the AK's TPM name (tpm2_createak -n)
    scheme: str = "rsassa"  # its signing scheme (tpm2_quote --scheme)


class Swtpm(harness_tpm.Swtpm):
    """The harness's swtpm (manufacture, life cycle: qemu.harness.tpm.Swtpm) driven by tpm2-tools."""

    def __enter__(self) -> Swtpm:
        self.start()
        return self

    # -- tpm2-tools -----------------------------------------------------------------------------
    @property
    def tcti(self) -> str:
        return f"swtpm:host=127.0.0.1,port={self.port}"

    def tool(self, *argv: str | Path) -> bytes:
        """Run one tpm2-tools command against this TPM (in the base dir); its stdout."""
        env = {**os.environ, "TPM2TOOLS_TCTI": self.tcti}
        proc = subprocess.run([str(a) for a in argv], cwd=self.base, env=env, capture_output=True, timeout=120)
        if proc.returncode:
            raise RuntimeError(f"{' '.join(map(str, argv))}: exit {proc.returncode}: {proc.stderr.decode(errors='replace')}")
        return proc.stdout

    def create_ak(self, name: str = "ak", *, key_alg: str = "rsa", scheme: str = "rsassa") -> AkFiles:
        """An EK (tpm2_createek) and an AK under it (tpm2_createak), the AK's public part as TPM2B_PUBLIC and PEM."""
        d = self.base / name
        d.mkdir(exist_ok=True)
        ek = d / "ek.ctx"
        self.tool("tpm2_createek", "-c", ek, "-G", "rsa", "-u", d / "ek.pub")
        f = AkFiles(d / "ak.ctx", d / "ak.pub", d / "ak.pem", d / "ak.name", scheme)
        self.tool("tpm2_createak", "-C", ek, "-c", f.ctx, "-G", key_alg, "-g", "sha256", "-s", scheme,
                  "-u", f.public, "-n", f.name, "-r", d / "ak.priv")
        self.tool("tpm2_flushcontext", "-t")  # swtpm has three transient slots: EK and AK are still loaded
        self.tool("tpm2_readpublic", "-c", f.ctx, "-f", "pem", "-o", f.pem)
        self.tool("tpm2_flushcontext", "-t")
        return f

    def send(self, command: bytes) -> bytes:
        """One raw TPM command (tpm2_send); the raw response."""
        env = {**os.environ, "TPM2TOOLS_TCTI": self.tcti}
        proc = subprocess.run(["tpm2_send"], input=command, cwd=self.base, env=env, capture_output=True, timeout=120)
        if proc.returncode:
            raise RuntimeError(f"tpm2_send: exit {proc.returncode}: {proc.stderr.decode(errors='replace')}")
        return proc.stdout

    def extend(self, pcr: int, sha256: bytes) -> None:
        self.tool("tpm2_pcrextend", f"{pcr}:sha256={sha256.hex()}")

    def quote(self, ak: AkFiles, nonce: bytes, pcrs: list[int], out: str = "quote") -> tuple[bytes, bytes]:
        """(TPMS_ATTEST, TPMT_SIGNATURE) of a quote over sha256:`pcrs` with `nonce` as qualifying data."""
        msg, sig = self.base / f"{out}.msg", self.base / f"{out}.sig"
        self.tool("tpm2_quote", "-c", ak.ctx, "-l", "sha256:" + ",".join(map(str, pcrs)), "-q", nonce.hex(),
                  "-m", msg, "-s", sig, "-g", "sha256", "--scheme", ak.scheme)
        self.tool("tpm2_flushcontext", "-t")
        return msg.read_bytes(), sig.read_bytes()

    def pcr_read(self, pcrs: list[int]) -> bytes:
        return self.tool("tpm2_pcrread", "sha256:" + ",".join(map(str, pcrs)))


def make_pe(sections: list[tuple[str, bytes]], *, pe32plus: bool = True, trailer: bytes = b"",
            cert_table: bytes = b"", file_align: int = 0x200) -> bytes:
    """A minimal but well-formed PE image with these sections (for Authenticode tests): DOS stub,
    COFF header, optional header with 16 data directories, section table; `trailer` is data after
    the last section (hashed), `cert_table` an attribute certificate table at the end (not hashed)."""
    import struct
    align = lambda n: -(-n // file_align) * file_align  # noqa: E731
    opt_size = (112 if pe32plus else 96) + 16 * 8
    pe_off = 0x80
    headers = align(pe_off + 24 + opt_size + 40 * len(sections))
    body, table, raw = b"", b"", headers
    for i, (name, data) in enumerate(sections):
        padded = data + bytes(align(len(data)) - len(data))
        table += struct.pack("<8sIIIIIIHHI", name.encode()[:8], len(data), 0x1000 * (i + 1), len(padded), raw,
                             0, 0, 0, 0, 0x40000040)
        body += padded
        raw += len(padded)
    image_end = headers + len(body) + len(trailer)
    dd = [(0, 0)] * 16
    if cert_table:
        dd[4] = (image_end, len(cert_table))
    magic = 0x20B if pe32plus else 0x10B
    opt = struct.pack("<HBBIIIII", magic, 14, 0, len(body), 0, 0, 0x1000, 0x1000)
    opt += struct.pack("<Q", 0x140000000) if pe32plus else struct.pack("<II", 0, 0x400000)
    opt += struct.pack("<IIHHHHHHIIIIHH", 0x1000, file_align, 0, 0, 0, 0, 0, 0, 0,
                       0x1000 * (len(sections) + 1), headers, 0x1234, 10, 0)
    opt += struct.pack("<QQQQ", 0, 0, 0, 0) if pe32plus else struct.pack("<IIII", 0, 0, 0, 0)
    opt += struct.pack("<II", 0, 16) + b"".join(struct.pack("<II", a, s) for a, s in dd)
    assert len(opt) == opt_size
    coff = struct.pack("<HHIIIHH", 0x8664, len(sections), 0, 0, 0, opt_size, 0x22)
    head = b"MZ" + bytes(0x3A) + struct.pack("<I", pe_off) + bytes(pe_off - 0x40) + b"PE\0\0" + coff + opt + table
    return head + bytes(headers - len(head)) + body + trailer + cert_table

