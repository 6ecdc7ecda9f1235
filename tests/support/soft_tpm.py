"""A software "TPM" for unit tests: the structures a TPM emits (TPM2B_PUBLIC of an AK,
TPMS_ATTEST of a quote, TPMT_SIGNATURE), built by hand and signed with `cryptography` keys, so
quotes over any PCR values and nonce can be made without swtpm. Real swtpm quotes are in
tests/vectors/tpm and the `tpm` integration tests."""

from __future__ import annotations

import hashlib
import struct
from typing import Any

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

from cidboot.trust.tpm import eventlog, quote


def _tpm2b(b: bytes) -> bytes:
    return struct.pack(">H", len(b)) + b


def public_area(key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey, scheme: int, attrs: int = quote.AK_ATTRS) -> bytes:
    head = lambda typ: struct.pack(">HHI", typ, eventlog.ALG_SHA256, attrs) + _tpm2b(b"")  # noqa: E731
    if isinstance(key, rsa.RSAPrivateKey):
        n = key.public_key().public_numbers().n.to_bytes(key.key_size // 8, "big")
        return head(quote.TPM_ALG_RSA) + struct.pack(">HHHHI", quote.TPM_ALG_NULL, scheme, eventlog.ALG_SHA256,
                                                     key.key_size, 0) + _tpm2b(n)
    nums = key.public_key().public_numbers()
    return head(quote.TPM_ALG_ECC) + struct.pack(">HHHHH", quote.TPM_ALG_NULL, quote.TPM_ALG_ECDSA,
                                                 eventlog.ALG_SHA256, quote.TPM_ECC_NIST_P256, quote.TPM_ALG_NULL) \
        + _tpm2b(nums.x.to_bytes(32, "big")) + _tpm2b(nums.y.to_bytes(32, "big"))


def attest_bytes(nonce: bytes, pcrs: dict[int, bytes], select: list[int], *, typ: int = quote.TPM_ST_ATTEST_QUOTE,
                 alg: int = eventlog.ALG_SHA256) -> bytes:
    bits = bytearray(3)
    for i in select:
        bits[i // 8] |= 1 << (i % 8)
    digest = hashlib.sha256(b"".join(pcrs[i] for i in sorted(select))).digest()
    return (struct.pack(">IH", quote.TPM_GENERATED_VALUE, typ) + _tpm2b(b"\x00\x0b" + bytes(32)) + _tpm2b(nonce)
            + struct.pack(">QIIBQ", 1000, 1, 0, 1, 0x2000) + struct.pack(">IHB", 1, alg, 3) + bytes(bits)
            + _tpm2b(digest))


def sign(key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey, scheme: int, msg: bytes) -> bytes:
    if isinstance(key, ec.EllipticCurvePrivateKey):
        r, s = decode_dss_signature(key.sign(msg, ec.ECDSA(hashes.SHA256())))
        return struct.pack(">HH", scheme, eventlog.ALG_SHA256) + _tpm2b(r.to_bytes(32, "big")) + _tpm2b(s.to_bytes(32, "big"))
    pad = padding.PKCS1v15() if scheme == quote.TPM_ALG_RSASSA else padding.PSS(padding.MGF1(hashes.SHA256()), 32)
    return struct.pack(">HH", scheme, eventlog.ALG_SHA256) + _tpm2b(key.sign(msg, pad, hashes.SHA256()))


class SoftTpm:
    def __init__(self, kind: str = "rsapss") -> None:
        self.scheme = {"rsapss": quote.TPM_ALG_RSAPSS, "rsassa": quote.TPM_ALG_RSASSA, "ecdsa": quote.TPM_ALG_ECDSA}[kind]
        self.key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey = (
            ec.generate_private_key(ec.SECP256R1()) if kind == "ecdsa" else rsa.generate_private_key(65537, 2048))
        self.public = _tpm2b(public_area(self.key, self.scheme))
        self.name = quote.parse_public(self.public).name
        self.events: list[tuple[int, int, bytes, bytes]] = []

    def measure(self, pcr: int, etype: int, digest: bytes, data: bytes = b"") -> None:
        self.events.append((pcr, etype, digest, data))

    def quote(self, nonce: bytes, select: list[int], extra: tuple[tuple[int, bytes], ...] = ()) -> tuple[bytes, bytes]:
        """A quote over the PCRs the events extend to, then `extra` (pcr, digest) extensions that
        are not in the event log (what a bootstrap extends after ExitBootServices)."""
        pcrs = eventlog.parse(eventlog.build(self.events)).replay()
        for pcr, digest in extra:
            pcrs[pcr] = hashlib.sha256(pcrs[pcr] + digest).digest()
        a = attest_bytes(nonce, pcrs, select)
        return a, sign(self.key, self.scheme, a)

    def log(self) -> bytes:
        return eventlog.build(self.events)


class SoftTpmDevice:
    """A whole TPM-rooted device in software, for appraisal tests: UEFI measures firmware and the
    UKI's two applications (PCR 0, 4, 7; a real OVMF log is the integration tests' business), the
    bootstrap L1 extends PCR 15 with the manifest and its layers (not in the firmware log), and
    its DICE chain from L1 (key from a CDI standing in for the TPM-bound one) certifies the image
    whose alias key signs the EAT. `evidence(nonce)` is what `agent attest` would receive."""

    def __init__(self, manifest_cid: Any, manifest: Any, signer_ids: list[bytes], *, kind: str = "ecdsa",
                 role: str | None = "worker", cdi: bytes | None = None, uki: bytes | None = None) -> None:
        """`uki`: the bootstrap UKI booted (PCR 4 and the stub's PCR 11 events derived from it);
        without one, two made-up application digests and no PCR 11."""
        import os

        from cidboot.trust.dice.software import derive_layers
        from cidboot.trust.measure import image_inputs
        from cidboot.trust.tpm.evidence import measure_manifest
        from cidboot.trust.tpm.reference import uki_applications

        self.tpm = SoftTpm(kind)
        self.uki = uki
        self.apps = list(uki_applications(uki)) if uki is not None else [
            hashlib.sha256(b"uki " + os.urandom(8)).digest(), hashlib.sha256(b"kernel").digest()]
        action = b"Calling EFI Application from Boot Option"
        self.tpm.measure(0, eventlog.EV_EFI_PLATFORM_FIRMWARE_BLOB, hashlib.sha256(b"OVMF").digest())
        self.tpm.measure(7, eventlog.EV_EFI_VARIABLE_DRIVER_CONFIG, hashlib.sha256(b"SecureBoot=0").digest())
        self.tpm.measure(4, eventlog.EV_EFI_ACTION, hashlib.sha256(action).digest(), action)
        for pcr in (0, 4, 7):
            self.tpm.measure(pcr, eventlog.EV_SEPARATOR, hashlib.sha256(bytes(4)).digest(), bytes(4))
        for app in self.apps:
            self.tpm.measure(4, eventlog.EV_EFI_BOOT_SERVICES_APPLICATION, app)
        self.pcrs = [0, 4, 7, 15]
        if uki is not None:
            from cidboot.trust.tpm.reference import uki_pcr11_events

            for e in uki_pcr11_events(uki):
                self.tpm.measure(e.pcr, e.event_type, e.digest, e.data or b"")
            self.pcrs = [0, 4, 7, 11, 15]
        self.boot_events = measure_manifest(manifest_cid, [layer.cid for layer in manifest.layers])
        self.manifest_cid, self.role = manifest_cid, role
        self.dice = derive_layers(cdi or os.urandom(32), [image_inputs(manifest_cid, manifest, signer_ids)])

    def device(self) -> Any:
        """The enrolment record: AK and the firmware baseline of this (known-good) boot."""
        from cidboot.trust.appraisal import TpmDevice

        pcrs = eventlog.parse(eventlog.build(self.tpm.events)).replay()
        return TpmDevice(self.tpm.public, {0: pcrs[0], 7: pcrs[7]})

    def references(self) -> Any:
        from cidboot.trust.tpm.appraise import TpmReferences

        return TpmReferences.for_uki(self.uki) if self.uki is not None else TpmReferences(list(self.apps))

    def attester(self) -> Any:
        """The agent side: an Attester whose evidence carries a fresh quote for each nonce."""
        from agent.attestation_api import Attester
        from cidboot.trust.tpm.evidence import ueid

        return Attester.from_chain(self.dice.leaf_key, self.dice.chain, manifest_cid=self.manifest_cid, role=self.role,
                                   tpm=self.tpm_evidence, ueid=ueid(self.tpm.name))

    def tpm_evidence(self, quote_nonce: bytes, *, events: Any = None, log: bytes | None = None) -> Any:
        from cidboot.trust.tpm.evidence import TpmEvidence, qualifying_data

        evs = tuple(self.boot_events if events is None else events)
        a, s = self.tpm.quote(qualifying_data(quote_nonce, self.dice.root_public_key), self.pcrs,
                              tuple((e.pcr, e.digest) for e in self.boot_events))
        return TpmEvidence(a, s, self.tpm.public, self.tpm.log() if log is None else log, evs, tuple(self.pcrs))

    def evidence(self, nonce: bytes, *, quote_nonce: bytes | None = None, events: Any = None,
                 log: bytes | None = None) -> bytes:
        from cidboot.trust.eat import TPM_MEASURED, build_evidence
        from cidboot.trust.tpm.evidence import ueid

        tev = self.tpm_evidence(nonce if quote_nonce is None else quote_nonce, events=events, log=log)
        return build_evidence(nonce=nonce, leaf_key=self.dice.leaf_key, chain=self.dice.chain, ueid=ueid(self.tpm.name),
                              measurements={}, manifest_cid=self.manifest_cid, boot_mode=TPM_MEASURED,
                              role=self.role, tpm=tev)


def small_uki(cmdline: bytes = b"console=ttyS0") -> bytes:
    """A tiny but well-formed UKI (PE with .osrel .cmdline .linux .initrd; .linux itself a PE),
    enough to derive PCR 4 and 11 references from."""
    from tests.support.swtpm import make_pe

    kernel = make_pe([(".text", b"kernel code")])
    return make_pe([(".osrel", b"ID=cidboot\n"), (".cmdline", cmdline), (".linux", kernel), (".initrd", b"initrd bytes")])
