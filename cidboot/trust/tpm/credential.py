"""Make/activate credential, the verifier's half (TPM 2.0 Part 1 §24, "Credential Protection";
Part 3 TPM2_MakeCredential), in software: stdlib + `cryptography`, no TPM on the verifier.

Enrolment must know that an AK is a restricted key of *the* TPM whose EK certificate the vendor
signed, not a key the device made up. The verifier encrypts a fresh secret so that only that
TPM can recover it, and only for a key with the AK's name loaded in it:

- seed: 32 random bytes (the EK's nameAlg is SHA-256), RSA-OAEP(SHA-256) encrypted to the EK's
  public key with label "IDENTITY\\0" -> `secret` (TPM2B_ENCRYPTED_SECRET);
- symKey = KDFa(SHA-256, seed, "STORAGE", AK name, "", 128), the EK's symmetric AES-128 key;
  encIdentity = AES-128-CFB(symKey, IV = 0) of TPM2B_DIGEST(credential);
- HMACkey = KDFa(SHA-256, seed, "INTEGRITY", "", "", 256);
  outerHMAC = HMAC-SHA-256(HMACkey, encIdentity || AK name);
  `credential_blob` (TPM2B_ID_OBJECT) = TPM2B_DIGEST(outerHMAC) || encIdentity.

TPM2_ActivateCredential (device.Tpm.activate_credential) decrypts the seed with the EK's private
key, recomputes the HMAC with the *loaded* AK's name (so another key, or the same name in another
TPM, fails the integrity check) and returns the credential. `activate` compares it in constant
time; enrolment records the AK only then (cidboot.trust.tpm.enrol).
"""

from __future__ import annotations

import hashlib
import hmac
import os
import struct
from dataclasses import dataclass

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

try:  # AES-CFB is what TPM 2.0 specifies for credential protection; cryptography >= 44 moved it
    from cryptography.hazmat.decrepit.ciphers.modes import CFB
except ImportError:  # pragma: no cover - older cryptography
    from cryptography.hazmat.primitives.ciphers.modes import CFB  # type: ignore[no-redef,attr-defined,unused-ignore]

from cidboot.trust.tpm.errors import CredentialActivationError, EkCertificateError

SECRET_BYTES = 32


def kdfa(key: bytes, label: bytes, context_u: bytes, context_v: bytes, bits: int) -> bytes:
    """KDFa with SHA-256 (Part 1 §11.4.10.2, SP 800-108 counter mode, HMAC): the label with its
    terminating NUL, the output length in bits after the contexts, cut to `bits`."""
    out, counter = b"", 0
    while len(out) * 8 < bits:
        counter += 1
        out += hmac.new(key, struct.pack(">I", counter) + label + b"\0" + context_u + context_v
                        + struct.pack(">I", bits), hashlib.sha256).digest()
    return out[:(bits + 7) // 8]


@dataclass(frozen=True)
class Credential:
    """What the verifier sends the device (both with their TPM2B size prefixes) and keeps (`secret`)."""

    credential_blob: bytes  # TPM2B_ID_OBJECT
    encrypted_secret: bytes  # TPM2B_ENCRYPTED_SECRET
    secret: bytes  # what a correct activation returns; never sent


def ek_public_key(ek_cert: bytes, ca: x509.Certificate | None = None) -> rsa.RSAPublicKey:
    """The EK's RSA-2048 public key from its DER certificate, which must be issued by `ca` (the
    TPM vendor's CA; the local CA of `swtpm_setup` for a QEMU device) when one is given."""
    try:
        cert = x509.load_der_x509_certificate(ek_cert)
    except ValueError as e:
        raise EkCertificateError(f"EK certificate: not DER X.509: {e}") from None
    if ca is not None:
        try:
            cert.verify_directly_issued_by(ca)
        except (ValueError, TypeError, InvalidSignature) as e:
            why = "the CA's signature does not verify" if isinstance(e, InvalidSignature) else str(e)
            raise EkCertificateError(f"EK certificate ({cert.issuer.rfc4514_string() or 'no issuer'}) is not "
                                     f"issued by the EK CA {ca.subject.rfc4514_string()}: {why}") from None
    key = cert.public_key()
    if not isinstance(key, rsa.RSAPublicKey) or key.key_size != 2048:
        raise EkCertificateError("EK certificate: not an RSA-2048 EK (the only EK template enrolment uses)")
    return key


def make_credential(ek: rsa.RSAPublicKey, ak_name: bytes, secret: bytes | None = None) -> Credential:
    """TPM2_MakeCredential(EK, secret, AK name) in software; `secret` random unless given."""
    if len(ak_name) != 34 or ak_name[:2] != b"\x00\x0b":
        raise CredentialActivationError(f"AK name must be SHA-256 (000b || 32 bytes), got {len(ak_name)} bytes")
    secret = os.urandom(SECRET_BYTES) if secret is None else secret
    if not 1 <= len(secret) <= 32:
        raise ValueError("credential secret must be 1..32 bytes (a TPM2B_DIGEST)")
    seed = os.urandom(32)
    enc_seed = ek.encrypt(seed, padding.OAEP(mgf=padding.MGF1(hashes.SHA256()), algorithm=hashes.SHA256(),
                                             label=b"IDENTITY\0"))
    sym = kdfa(seed, b"STORAGE", ak_name, b"", 128)
    enc = Cipher(algorithms.AES(sym), CFB(bytes(16))).encryptor()
    enc_identity = enc.update(struct.pack(">H", len(secret)) + secret) + enc.finalize()
    hmac_key = kdfa(seed, b"INTEGRITY", b"", b"", 256)
    outer = hmac.new(hmac_key, enc_identity + ak_name, hashlib.sha256).digest()
    id_object = struct.pack(">H", len(outer)) + outer + enc_identity
    return Credential(struct.pack(">H", len(id_object)) + id_object, struct.pack(">H", len(enc_seed)) + enc_seed, secret)


def check_activated(cred: Credential, recovered: bytes) -> None:
    """The device's answer must be the secret (constant time), else CredentialActivationError."""
    if not hmac.compare_digest(cred.secret, recovered):
        raise CredentialActivationError("the TPM returned another secret: the AK and the EK are not in one TPM")
