"""Make/activate credential at enrolment on real swtpms (marker tpm): the verifier's half in
software (cidboot.trust.tpm.credential: KDFa, RSA-OAEP seed, AES-CFB, HMAC), the device's half by
TPM2_ActivateCredential over raw commands with a PolicySecret(endorsement) session for the EK.
The right AK activates; an AK of another TPM does not; another TPM's EK certificate (same vendor
CA) and a certificate not from the vendor CA are refused; `enrol_device` records nothing then."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509

from cidboot.trust.tpm import credential, quote
from cidboot.trust.tpm.device import SocketTransport, Tpm
from cidboot.trust.tpm.enrol import EK_CERT_INDEX, activate_ak, enrol_device
from cidboot.trust.tpm.errors import CredentialActivationError, EkCertificateError
from qemu.harness.tpm import Swtpm, missing

pytestmark = [pytest.mark.tpm, pytest.mark.skipif(missing() is not None, reason=str(missing()))]


class Device:
    """One manufactured swtpm (EK certificate from its own local CA) with its persistent AK."""

    def __init__(self, base: Path) -> None:
        self.sw = Swtpm(base).start()
        self.tpm = Tpm(SocketTransport("127.0.0.1", self.sw.port))
        self.ak_public = self.tpm.persist_ak()
        self.ak_name = quote.parse_public(self.ak_public).name
        self.ek_cert = self.tpm.nv_read(EK_CERT_INDEX)
        self.ca = x509.load_pem_x509_certificate((base / "localca" / "issuercert.pem").read_bytes())

    def close(self) -> None:
        self.tpm.transport.close()
        self.sw.stop()


@pytest.fixture
def two(tmp_path: Path) -> Iterator[tuple[Device, Device]]:
    a = Device(tmp_path / "a")
    b = Device(tmp_path / "b")
    try:
        yield a, b
    finally:
        a.close()
        b.close()


def test_make_activate_credential_binds_the_ak_to_the_ek_of_its_tpm(two: tuple[Device, Device]) -> None:
    a, b = two
    # the right AK activates: the secret comes back (and again, with a fresh one: no state left)
    for _ in range(2):
        cred = credential.make_credential(credential.ek_public_key(a.ek_cert, a.ca), a.ak_name)
        assert a.tpm.activate_credential(cred.credential_blob, cred.encrypted_secret) == cred.secret
    activate_ak(a.tpm, a.ak_public, a.ek_cert, a.ca)
    dev = enrol_device(a.tpm, ek_ca=a.ca)
    assert dev.ak_public == a.ak_public and dev.ek_cert == a.ek_cert

    # an AK from another TPM: the credential is bound to B's AK name, TPM A holds only its own AK
    with pytest.raises(CredentialActivationError, match="ActivateCredential"):
        activate_ak(a.tpm, b.ak_public, a.ek_cert, a.ca)
    # another TPM's EK certificate (a real one, the same kind of CA): TPM A cannot decrypt the seed
    with pytest.raises(CredentialActivationError, match="ActivateCredential"):
        activate_ak(a.tpm, a.ak_public, b.ek_cert, b.ca)
    # an EK certificate that the vendor CA given did not issue
    with pytest.raises(EkCertificateError, match="not issued by"):
        activate_ak(a.tpm, a.ak_public, a.ek_cert, b.ca)
    with pytest.raises(EkCertificateError, match="not issued by"):
        enrol_device(a.tpm, ek_ca=b.ca)
    with pytest.raises(EkCertificateError, match="not DER"):
        activate_ak(a.tpm, a.ak_public, b"garbage", a.ca)
    # a secret that does not come back is refused even when the TPM answered
    cred = credential.make_credential(credential.ek_public_key(a.ek_cert, a.ca), a.ak_name)
    with pytest.raises(CredentialActivationError, match="another secret"):
        credential.check_activated(cred, bytes(len(cred.secret)))
    # after all the refusals the TPM still activates the right AK (sessions and EK handles flushed)
    activate_ak(a.tpm, a.ak_public, a.ek_cert, a.ca)


def test_the_bootstraps_key_binding_from_a_real_tpm_verifies_its_stage_events_at_the_fleet(tmp_path: Path) -> None:
    """bootstrap.stage.tpm.key_binding on a real swtpm (the enrolled AK's quote over
    qualifying_data(EVENTS_NONCE, L1 key)): the boot server's fleet verifies the bootstrap's signed
    event as that TPM device's, and rejects it once the registry holds another AK."""
    import os
    import time

    from bootstrap.server.fleet import REJECTED, VERIFIED, verify_event
    from bootstrap.stage.tpm import key_binding
    from cidboot.stage import events
    from cidboot.trust.appraisal import DeviceRoots, TpmDevice
    from cidboot.trust.dice.software import derive_layers
    from cidboot.trust.tpm.evidence import device_id

    a = Device(tmp_path / "a")
    try:
        d = derive_layers(os.urandom(32), [])  # CDI_1 -> [L1 key]
        binding = key_binding(a.tpm, d.root_public_key)
    finally:
        a.close()
    assert binding is not None
    ev = {"v": 1, "stage": "bootstrap", "kind": "start", "seq": 1, "t": int(time.time() * 1000),
          "mac": "52:54:00:00:00:01", "boot_mode": "measured", "arch": "x86_64", "detail": {}}
    body = events.encode_event(ev, events.Identity(d.leaf_key, d.chain, binding))
    roots = DeviceRoots()
    roots.add_tpm(TpmDevice(a.ak_public, {}), "node", "worker")
    v = verify_event(body, roots)
    assert (v.trust, v.device_id) == (VERIFIED, device_id(a.ak_name)), v.reason
    other = DeviceRoots()
    other.add_tpm(TpmDevice(_other_ak(tmp_path), {}), "else", "worker")
    assert verify_event(body, other).trust == REJECTED


def _other_ak(tmp_path: Path) -> bytes:
    b = Device(tmp_path / "b")
    try:
        return b.ak_public
    finally:
        b.close()
