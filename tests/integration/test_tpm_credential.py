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
