"""Enrolment of a TPM device, the parts every factory shares (the QEMU harness's and `agent
enrol` on a real server; docs/tpm.md, "Enrolment"):

- `enrol_device(tpm, ek_ca=)`: the AK made persistent at AK_HANDLE (or the key already there), the
  EK certificate from its NV index (checked against the vendor CA when given), and make/activate
  credential (`activate_ak`): a TpmDevice for the verifiers' roots file only once the TPM holding
  that certificate's EK recovered a secret bound to the AK's name;
- `firmware_baseline(evidence, nonce, device)`: the factory's known-good boot: the device's
  evidence for the factory's nonce, its quote verified with the enrolled AK (qualifying data
  binding the nonce and the chain's L1 key), the firmware log plus the bootstrap's events
  replayed to the quoted PCRs; PCRs 0-3, 5-7 are the baseline;
- `record_baseline(roots_file, device_id, baseline)`.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from cidboot.trust.appraisal import DeviceRoots, TpmDevice
from cidboot.trust.tpm.appraise import FIRMWARE_PCRS
from cidboot.trust.tpm.commands import AK_HANDLE, TpmResponseError
from cidboot.trust.tpm.device import Tpm
from cidboot.trust.tpm.errors import CredentialActivationError, EkCertificateError

if TYPE_CHECKING:
    from cryptography import x509

EK_CERT_INDEX = 0x01C00002  # TCG EK Credential Profile: the RSA-2048 EK certificate's NV index


def enrol_device(tpm: Tpm, handle: int = AK_HANDLE, *, ek_ca: x509.Certificate | None = None) -> TpmDevice:
    """The AK at `handle` (made there from AK_TEMPLATE if empty) and the EK certificate, once
    make/activate credential showed the AK lives in the TPM of that EK (`activate_ak`). A TPM
    without an EK certificate at EK_CERT_INDEX is refused (EkCertificateError): there is nothing
    to bind the AK to. `ek_ca`: the vendor CA the certificate must be issued by."""
    ak_public = tpm.persist_ak(handle)
    try:
        ek_cert = tpm.nv_read(EK_CERT_INDEX)
    except TpmResponseError as e:
        if e.rc is None:
            raise
        raise EkCertificateError(f"the TPM has no EK certificate at NV {EK_CERT_INDEX:#010x} (rc {e.rc:#x}): "
                                 "nothing to bind the AK to") from None
    activate_ak(tpm, ak_public, ek_cert, ek_ca, handle)
    return TpmDevice(ak_public, {}, ek_cert)


def activate_ak(tpm: Tpm, ak_public: bytes, ek_cert: bytes, ek_ca: x509.Certificate | None = None,
                handle: int = AK_HANDLE) -> None:
    """Make/activate credential (cidboot.trust.tpm.credential): the verifier's half in software
    with the certificate's EK public key and the name of `ak_public`, the device's half by
    TPM2_ActivateCredential with the AK at `handle`. Returns only if the TPM gave the secret back;
    CredentialActivationError (the AK is another TPM's, or the certificate another TPM's EK) or
    EkCertificateError (not the vendor's, not RSA-2048) otherwise."""
    from cidboot.trust.tpm import credential, quote

    ek = credential.ek_public_key(ek_cert, ek_ca)
    cred = credential.make_credential(ek, quote.parse_public(ak_public).name)
    try:
        recovered = tpm.activate_credential(cred.credential_blob, cred.encrypted_secret, handle)
    except TpmResponseError as e:
        raise CredentialActivationError(f"TPM2_ActivateCredential refused the credential for AK "
                                        f"{quote.parse_public(ak_public).name.hex()[:20]}..: {e}") from None
    credential.check_activated(cred, recovered)


def firmware_baseline(evidence: bytes, nonce: bytes, device: TpmDevice) -> dict[int, bytes]:
    """The factory's known-good boot: PCRs 0-3, 5-7 from the device's evidence for `nonce`, once
    its quote verifies with the enrolled AK (qualifying data binding the nonce and the chain's L1
    key) and the firmware log plus the bootstrap's events replay to the quoted PCRs. Raises the
    precise TPM verification error otherwise."""
    from cidboot.trust import cose
    from cidboot.trust.cose_key import decode_public_key
    from cidboot.trust.eat import parse_evidence
    from cidboot.trust.tpm import eventlog, quote
    from cidboot.trust.tpm.errors import PcrSelectionError
    from cidboot.trust.tpm.evidence import qualifying_data

    ev = parse_evidence(evidence)
    if ev.tpm is None:
        raise PcrSelectionError(f"evidence of boot mode {ev.boot_mode!r} carries no TPM quote")
    l1 = decode_public_key(cose.cbor_loads_exact(ev.chain, "DICE chain")[0])
    ak = quote.parse_public(ev.tpm.ak_public)
    q = quote.verify_quote(ev.tpm.quote, ev.tpm.signature, ak, nonce=qualifying_data(nonce, l1),
                           enrolled=frozenset({device.ak_name}))
    log = eventlog.parse(ev.tpm.uefi_log)
    whole = eventlog.EventLog(log.spec_id, log.events + tuple(ev.tpm.log_events(len(log.events))), log.startup_locality)
    pcrs = whole.replay()
    quote.check_pcrs(q, pcrs, FIRMWARE_PCRS)
    return {i: pcrs[i] for i in FIRMWARE_PCRS}


def record_baseline(roots_file: Path, device_id: str, baseline: Mapping[int, bytes]) -> TpmDevice:
    """Write the firmware baseline into the verifiers' roots file for that TPM device."""
    roots = DeviceRoots.load(roots_file)
    old = roots.tpm[device_id]
    new = TpmDevice(old.ak_public, dict(baseline), old.ek_cert)
    roots.tpm[device_id] = new
    roots.save(roots_file)
    return new
