"""Make/activate credential without a TPM: `make_credential`'s output decrypted by an independent
software ActivateCredential (TPM 2.0 Part 1 §24 read the other way), the refusals of the EK
certificate checks, and the marshalling of the device's commands (the swtpm test is
tests/integration/test_tpm_credential.py)."""

from __future__ import annotations

import datetime
import hashlib
import hmac
import struct

import pytest
from cryptography import x509
from cryptography.hazmat.decrepit.ciphers.modes import CFB
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

from cidboot.trust.tpm import commands as c
from cidboot.trust.tpm.credential import check_activated, ek_public_key, kdfa, make_credential
from cidboot.trust.tpm.errors import CredentialActivationError, EkCertificateError

EK = rsa.generate_private_key(65537, 2048)
AK_NAME = b"\x00\x0b" + hashlib.sha256(b"an AK").digest()


def soft_activate(ek: rsa.RSAPrivateKey, name: bytes, blob: bytes, enc_secret: bytes) -> bytes:
    """What TPM2_ActivateCredential does, written from the spec: seed from the EK, HMAC over
    encIdentity || the loaded key's name, then decrypt."""
    (n,) = struct.unpack_from(">H", enc_secret)
    seed = ek.decrypt(enc_secret[2:2 + n], padding.OAEP(mgf=padding.MGF1(hashes.SHA256()), algorithm=hashes.SHA256(),
                                                        label=b"IDENTITY\0"))
    (m,) = struct.unpack_from(">H", blob)
    id_object = blob[2:2 + m]
    (h,) = struct.unpack_from(">H", id_object)
    outer, enc_identity = id_object[2:2 + h], id_object[2 + h:]
    key = kdfa(seed, b"INTEGRITY", b"", b"", 256)
    if not hmac.compare_digest(outer, hmac.new(key, enc_identity + name, hashlib.sha256).digest()):
        raise ValueError("integrity")
    dec = Cipher(algorithms.AES(kdfa(seed, b"STORAGE", name, b"", 128)), CFB(bytes(16))).decryptor()
    plain = dec.update(enc_identity) + dec.finalize()
    (k,) = struct.unpack_from(">H", plain)
    return plain[2:2 + k]


def test_make_credential_is_recovered_only_for_the_aks_name_by_the_eks_holder() -> None:
    cred = make_credential(EK.public_key(), AK_NAME)
    assert len(cred.secret) == 32
    got = soft_activate(EK, AK_NAME, cred.credential_blob, cred.encrypted_secret)
    assert got == cred.secret
    check_activated(cred, got)
    with pytest.raises(ValueError, match="integrity"):  # another key loaded in the TPM
        soft_activate(EK, b"\x00\x0b" + bytes(32), cred.credential_blob, cred.encrypted_secret)
    with pytest.raises(ValueError):  # another TPM's EK cannot decrypt the seed
        soft_activate(rsa.generate_private_key(65537, 2048), AK_NAME, cred.credential_blob, cred.encrypted_secret)
    with pytest.raises(CredentialActivationError):
        check_activated(cred, bytes(32))
    assert make_credential(EK.public_key(), AK_NAME).secret != cred.secret  # fresh every time


def test_kdfa_counter_mode_and_name_checks() -> None:
    one = hmac.new(b"k", b"\0\0\0\x01" + b"L\0" + b"u" + b"v" + struct.pack(">I", 512), hashlib.sha256).digest()
    two = hmac.new(b"k", b"\0\0\0\x02" + b"L\0" + b"u" + b"v" + struct.pack(">I", 512), hashlib.sha256).digest()
    assert kdfa(b"k", b"L", b"u", b"v", 512) == one + two
    assert len(kdfa(b"k", b"L", b"", b"", 128)) == 16
    with pytest.raises(CredentialActivationError, match="SHA-256"):
        make_credential(EK.public_key(), b"\x00\x04" + bytes(20))


def _cert(subject_key: object, issuer_key: object, cn: str = "EK") -> bytes:
    name = x509.Name([x509.NameAttribute(x509.oid.NameOID.COMMON_NAME, cn)])
    now = datetime.datetime.now(datetime.UTC)
    return (x509.CertificateBuilder().subject_name(name).issuer_name(x509.Name([
        x509.NameAttribute(x509.oid.NameOID.COMMON_NAME, "vendor")])).public_key(subject_key)  # type: ignore[arg-type]
        .serial_number(1).not_valid_before(now).not_valid_after(now + datetime.timedelta(days=1))
        .sign(issuer_key, hashes.SHA256()).public_bytes(serialization.Encoding.DER))  # type: ignore[arg-type]


def test_ek_certificate_checks() -> None:
    vendor = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(x509.oid.NameOID.COMMON_NAME, "vendor")])
    now = datetime.datetime.now(datetime.UTC)
    ca = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(vendor.public_key())
          .serial_number(2).not_valid_before(now).not_valid_after(now + datetime.timedelta(days=1))
          .sign(vendor, hashes.SHA256()))
    good = _cert(EK.public_key(), vendor)
    assert ek_public_key(good, ca).public_numbers() == EK.public_key().public_numbers()
    with pytest.raises(EkCertificateError, match="not issued by"):
        ek_public_key(_cert(EK.public_key(), ec.generate_private_key(ec.SECP256R1())), ca)
    with pytest.raises(EkCertificateError, match="RSA-2048"):
        ek_public_key(_cert(ec.generate_private_key(ec.SECP256R1()).public_key(), vendor), ca)
    with pytest.raises(EkCertificateError, match="not DER"):
        ek_public_key(b"\x30\x03abc", ca)


def test_activate_credential_and_policy_secret_marshalling() -> None:
    cmd = c.activate_credential(c.AK_HANDLE, 0x80000001, 0x03000000, b"\x00\x02ab", b"\x00\x01c")
    tag, size, cc = struct.unpack_from(">HII", cmd)
    assert (tag, size, cc) == (c.ST_SESSIONS, len(cmd), c.CC_ACTIVATE_CREDENTIAL)
    assert struct.unpack_from(">II", cmd, 10) == (c.AK_HANDLE, 0x80000001)
    (auth_size,) = struct.unpack_from(">I", cmd, 18)
    auth = cmd[22:22 + auth_size]
    assert auth == struct.pack(">IHBH", c.RS_PW, 0, 0, 0) + struct.pack(">IHBH", 0x03000000, 0, 0, 0)  # AK, then EK
    assert cmd[22 + auth_size:] == b"\x00\x02ab\x00\x01c"
    ps = c.policy_secret(c.RH_ENDORSEMENT, 0x03000000)
    assert struct.unpack_from(">HIIII", ps)[2:] == (c.CC_POLICY_SECRET, c.RH_ENDORSEMENT, 0x03000000)
    assert ps.endswith(bytes(6) + bytes(4))  # empty nonceTPM, cpHashA, policyRef; expiration 0
    assert len(c.EK_TEMPLATE) == 2 + 2 + 4 + 2 + 32 + 2 + 2 + 2 + 2 + 2 + 4 + 2 + 256
    # PolicySecret(TPM_RH_ENDORSEMENT)'s digest is the EK template's authPolicy (Part 3 23.4)
    digest = hashlib.sha256(bytes(32) + struct.pack(">I", c.CC_POLICY_SECRET)
                            + b"\x40\x00\x00\x0b").digest()  # the name of a permanent handle is the handle
    assert hashlib.sha256(digest).digest() == c.EK_POLICY  # then policyRef (empty): SHA-256(digest || "")


def test_dictionary_attack_and_shutdown_marshalling() -> None:
    assert c.shutdown() == struct.pack(">HIIH", c.ST_NO_SESSIONS, 12, c.CC_SHUTDOWN, c.SU_CLEAR)
    reset = c.dictionary_attack_lock_reset()
    assert struct.unpack_from(">HIII", reset) == (c.ST_SESSIONS, len(reset), c.CC_DA_LOCK_RESET, c.RH_LOCKOUT)
    params = c.dictionary_attack_parameters(1000, 1, 1)
    assert struct.unpack_from(">I", params, 6)[0] == c.CC_DA_PARAMETERS and params.endswith(struct.pack(">III", 1000, 1, 1))
