"""TPM 2.0 quotes: the TPMS_ATTEST a TPM signs (TPM2_Quote), its TPMT_SIGNATURE, the AK's
TPM2B_PUBLIC, and the verification a remote verifier runs (TPM 2.0 Library, Part 2: Structures,
10.12 TPMS_ATTEST / TPMS_QUOTE_INFO, 11.3 TPMT_SIGNATURE, 12.2 TPMT_PUBLIC). All integers are
big-endian; every TPM2B is bounded by its structure's maximum.

What a verified quote proves: the TPM holding the enrolled AK's private part (an AK is restricted,
so it signs only TPM-generated TPMS_ATTEST, never outside data that merely starts with the TPM
magic) attested that its selected SHA-256 PCRs hashed to `pcr_digest` at a time after the verifier
chose `nonce` (extraData). What it does not prove alone: which events produced those PCRs; that is
the event log's job, checked by `check_pcrs` against the log's replay.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Collection, Mapping
from dataclasses import dataclass

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from cidboot.trust.tpm._wire import Reader
from cidboot.trust.tpm.errors import (
    AkNotEnrolledError,
    AttestFormatError,
    NonceMismatchError,
    PcrDigestMismatchError,
    PcrSelectionError,
    PublicKeyFormatError,
    QuoteSignatureError,
    SignatureFormatError,
)
from cidboot.trust.tpm.eventlog import ALG_SHA1, ALG_SHA256, ALG_SHA384, ALG_SHA512, NUM_PCRS

TPM_GENERATED_VALUE = 0xFF544347
TPM_ST_ATTEST_QUOTE = 0x8018
TPM_ALG_RSA, TPM_ALG_ECC, TPM_ALG_NULL = 0x0001, 0x0023, 0x0010
TPM_ALG_RSASSA, TPM_ALG_RSAPSS, TPM_ALG_ECDSA = 0x0014, 0x0016, 0x0018
TPM_ECC_NIST_P256, TPM_ECC_NIST_P384, TPM_ECC_NIST_P521 = 0x0003, 0x0004, 0x0005
# TPMA_OBJECT bits an attestation key must have: it lives and dies in this TPM and signs only TPM data
ATTR_FIXED_TPM, ATTR_FIXED_PARENT, ATTR_SENSITIVE_DATA_ORIGIN = 1 << 1, 1 << 4, 1 << 5
ATTR_RESTRICTED, ATTR_DECRYPT, ATTR_SIGN = 1 << 16, 1 << 17, 1 << 18
AK_ATTRS = ATTR_FIXED_TPM | ATTR_FIXED_PARENT | ATTR_SENSITIVE_DATA_ORIGIN | ATTR_RESTRICTED | ATTR_SIGN

MAX_ATTEST = 1024  # sizeof(TPMS_ATTEST) is well under this for every attestation type
MAX_DIGEST = 64  # TPM2B_DIGEST: the largest hash (SHA-512)
MAX_NAME = 2 + MAX_DIGEST  # TPM2B_NAME: algorithm id + digest
MAX_DATA = 2 + MAX_DIGEST  # TPM2B_DATA: sizeof(TPMT_HA)
MAX_RSA = 512  # 4096-bit keys
MAX_ECC = 66  # P-521 coordinates
MAX_PCR_SELECTIONS = 16
MAX_SIZEOF_SELECT = 4
_HASHES: dict[int, type[hashes.HashAlgorithm]] = {ALG_SHA1: hashes.SHA1, ALG_SHA256: hashes.SHA256,
                                                  ALG_SHA384: hashes.SHA384, ALG_SHA512: hashes.SHA512}
_NAME_HASHES = {ALG_SHA1: "sha1", ALG_SHA256: "sha256", ALG_SHA384: "sha384", ALG_SHA512: "sha512"}
_CURVES: dict[int, type[ec.EllipticCurve]] = {TPM_ECC_NIST_P256: ec.SECP256R1, TPM_ECC_NIST_P384: ec.SECP384R1,
                                              TPM_ECC_NIST_P521: ec.SECP521R1}


@dataclass(frozen=True)
class Quote:
    """A parsed TPMS_ATTEST of type quote (`attest`: the exact bytes the AK signed)."""

    attest: bytes
    qualified_signer: bytes
    extra_data: bytes
    clock: int
    reset_count: int
    restart_count: int
    safe: bool
    firmware_version: int
    selection: tuple[tuple[int, tuple[int, ...]], ...]  # (hash algorithm, PCR indexes ascending), in quote order
    pcr_digest: bytes


@dataclass(frozen=True)
class Signature:
    """A TPMT_SIGNATURE: scheme, hash, and the signature (RSA: the bytes; ECDSA: DER of (r, s))."""

    scheme: int
    hash_alg: int
    value: bytes


@dataclass(frozen=True)
class AttestationKey:
    """An AK's public part (from its TPM2B_PUBLIC): the key, its TPM name (what enrolment records) and scheme."""

    public_key: rsa.RSAPublicKey | ec.EllipticCurvePublicKey
    name: bytes  # nameAlg || H_nameAlg(TPMT_PUBLIC)
    scheme: int
    scheme_hash: int
    attributes: int
    public_area: bytes  # the TPMT_PUBLIC


def _selection(r: Reader) -> tuple[tuple[int, tuple[int, ...]], ...]:
    count = r.u32("pcrSelect count")
    if count > MAX_PCR_SELECTIONS:
        raise r.fail(f"{count} PCR selections exceed the maximum of {MAX_PCR_SELECTIONS}")
    out = []
    for i in range(count):
        alg = r.u16(f"pcrSelect {i} hash")
        n = r.u8(f"pcrSelect {i} sizeofSelect")
        if n > MAX_SIZEOF_SELECT:
            raise r.fail(f"pcrSelect {i}: sizeofSelect {n} exceeds {MAX_SIZEOF_SELECT}")
        bits = r.take(n, f"pcrSelect {i} bitmap")
        pcrs = tuple(b * 8 + j for b in range(n) for j in range(8) if bits[b] >> j & 1)
        if pcrs and pcrs[-1] >= NUM_PCRS:
            raise r.fail(f"pcrSelect {i}: PCR {pcrs[-1]} does not exist (0..{NUM_PCRS - 1})")
        out.append((alg, pcrs))
    return tuple(out)


def parse_attest(data: bytes) -> Quote:
    """Parse the TPMS_ATTEST of a quote (`tpm2_quote -m`); a TPM2B_ATTEST's buffer, without its size."""
    if len(data) > MAX_ATTEST:
        raise AttestFormatError(f"TPMS_ATTEST: {len(data)} bytes exceeds the maximum of {MAX_ATTEST}")
    r = Reader(data, AttestFormatError, "TPMS_ATTEST", little=False)
    if r.u32("magic") != TPM_GENERATED_VALUE:
        raise r.fail("magic is not TPM_GENERATED_VALUE: not produced by a TPM")
    if (t := r.u16("type")) != TPM_ST_ATTEST_QUOTE:
        raise r.fail(f"type {t:#06x} is not TPM_ST_ATTEST_QUOTE")
    signer = r.tpm2b("qualifiedSigner", MAX_NAME)
    extra = r.tpm2b("extraData", MAX_DATA)
    clock, resets, restarts, safe = r.u64("clock"), r.u32("resetCount"), r.u32("restartCount"), r.u8("safe")
    if safe > 1:
        raise r.fail(f"safe is {safe}, not a TPMI_YES_NO")
    fw = r.u64("firmwareVersion")
    sel = _selection(r)
    digest = r.tpm2b("pcrDigest", MAX_DIGEST)
    r.end()
    return Quote(bytes(data), signer, extra, clock, resets, restarts, bool(safe), fw, sel, digest)


def parse_signature(data: bytes) -> Signature:
    """Parse a TPMT_SIGNATURE (`tpm2_quote -s`, the default "tss" format): RSASSA, RSAPSS or ECDSA."""
    r = Reader(data, SignatureFormatError, "TPMT_SIGNATURE", little=False)
    scheme = r.u16("sigAlg")
    if scheme not in (TPM_ALG_RSASSA, TPM_ALG_RSAPSS, TPM_ALG_ECDSA):
        raise r.fail(f"signature scheme {scheme:#06x} is not RSASSA, RSAPSS or ECDSA")
    h = r.u16("hash")
    if h not in _HASHES:
        raise r.fail(f"hash algorithm {h:#06x} is not SHA-1/256/384/512")
    if scheme == TPM_ALG_ECDSA:
        sr, ss = r.tpm2b("signatureR", MAX_ECC), r.tpm2b("signatureS", MAX_ECC)
        value = encode_dss_signature(int.from_bytes(sr, "big"), int.from_bytes(ss, "big"))
    else:
        value = r.tpm2b("sig", MAX_RSA)
    r.end()
    return Signature(scheme, h, value)


def _sym_null(r: Reader, what: str) -> None:
    if (alg := r.u16(f"{what} symmetric")) != TPM_ALG_NULL:
        raise r.fail(f"{what}: symmetric algorithm {alg:#06x}: a signing key has none (TPM_ALG_NULL)")


def parse_public(data: bytes, *, tpm2b: bool = True) -> AttestationKey:
    """Parse an AK's TPM2B_PUBLIC (`tpm2_createak -u`, `tpm2_readpublic -o`) into its key and name,
    refusing a key that cannot be an AK: not restricted + sign + fixedTPM + fixedParent +
    sensitiveDataOrigin, or able to decrypt (a restricted signing key is what makes a quote a quote)."""
    if tpm2b:
        outer = Reader(data, PublicKeyFormatError, "TPM2B_PUBLIC", little=False)
        data = outer.tpm2b("publicArea", 1024)
        outer.end()
    r = Reader(data, PublicKeyFormatError, "TPMT_PUBLIC", little=False)
    typ, name_alg, attrs = r.u16("type"), r.u16("nameAlg"), r.u32("objectAttributes")
    if name_alg not in _NAME_HASHES:
        raise r.fail(f"nameAlg {name_alg:#06x} is not SHA-1/256/384/512")
    if attrs & AK_ATTRS != AK_ATTRS or attrs & ATTR_DECRYPT:
        raise r.fail(f"objectAttributes {attrs:#010x} are not an attestation key's "
                     "(restricted, sign, fixedTPM, fixedParent, sensitiveDataOrigin, no decrypt)")
    r.tpm2b("authPolicy", MAX_DIGEST)
    key: rsa.RSAPublicKey | ec.EllipticCurvePublicKey
    if typ == TPM_ALG_RSA:
        _sym_null(r, "RSA parameters")
        scheme = r.u16("scheme")
        shash = r.u16("scheme hash") if scheme != TPM_ALG_NULL else TPM_ALG_NULL
        if scheme not in (TPM_ALG_RSASSA, TPM_ALG_RSAPSS):
            raise r.fail(f"RSA AK scheme {scheme:#06x} is not RSASSA or RSAPSS")
        bits, exponent = r.u16("keyBits"), r.u32("exponent")
        n = r.tpm2b("unique (modulus)", MAX_RSA)
        if bits not in (1024, 2048, 3072, 4096) or len(n) * 8 != bits:
            raise r.fail(f"RSA modulus of {len(n)} bytes for keyBits {bits}")
        try:
            key = rsa.RSAPublicNumbers(exponent or 65537, int.from_bytes(n, "big")).public_key()
        except ValueError as e:
            raise r.fail(f"RSA public key: {e}") from None
    elif typ == TPM_ALG_ECC:
        _sym_null(r, "ECC parameters")
        scheme = r.u16("scheme")
        shash = r.u16("scheme hash") if scheme != TPM_ALG_NULL else TPM_ALG_NULL
        if scheme != TPM_ALG_ECDSA:
            raise r.fail(f"ECC AK scheme {scheme:#06x} is not ECDSA")
        curve = r.u16("curveID")
        if (kdf := r.u16("kdf")) != TPM_ALG_NULL:
            raise r.fail(f"ECC kdf {kdf:#06x}: a signing key has none")
        x, y = r.tpm2b("unique x", MAX_ECC), r.tpm2b("unique y", MAX_ECC)
        if curve not in _CURVES:
            raise r.fail(f"curve {curve:#06x} is not NIST P-256/384/521")
        try:
            key = ec.EllipticCurvePublicNumbers(int.from_bytes(x, "big"), int.from_bytes(y, "big"),
                                                _CURVES[curve]()).public_key()
        except (ValueError, UnsupportedAlgorithm) as e:
            raise r.fail(f"ECC public key: {e}") from None
    else:
        raise r.fail(f"key type {typ:#06x} is not RSA or ECC")
    if shash not in _HASHES:
        raise r.fail(f"scheme hash {shash:#06x} is not SHA-1/256/384/512")
    r.end()
    name = name_alg.to_bytes(2, "big") + hashlib.new(_NAME_HASHES[name_alg], data).digest()
    return AttestationKey(key, name, scheme, shash, attrs, bytes(data))


def _verify_signature(quote_bytes: bytes, sig: Signature, ak: AttestationKey) -> None:
    # a restricted key signs only with the scheme and hash fixed in its public area; SHA-1 is refused
    if (sig.scheme, sig.hash_alg) != (ak.scheme, ak.scheme_hash) or sig.hash_alg == ALG_SHA1:
        raise QuoteSignatureError(f"signature scheme {sig.scheme:#06x}/{sig.hash_alg:#06x} is not the AK's "
                                  f"{ak.scheme:#06x}/{ak.scheme_hash:#06x}, or uses SHA-1")
    h = _HASHES[sig.hash_alg]()
    try:
        if isinstance(ak.public_key, rsa.RSAPublicKey):
            if sig.scheme == TPM_ALG_RSASSA:
                ak.public_key.verify(sig.value, quote_bytes, padding.PKCS1v15(), h)
            elif sig.scheme == TPM_ALG_RSAPSS:
                # TPM 2.0 Part 1, B.7: the TPM's PSS salt is as long as the digest
                ak.public_key.verify(sig.value, quote_bytes, padding.PSS(padding.MGF1(h), h.digest_size), h)
            else:
                raise QuoteSignatureError(f"an ECDSA signature cannot come from an RSA AK ({ak.name.hex()})")
        else:
            if sig.scheme != TPM_ALG_ECDSA:
                raise QuoteSignatureError(f"an RSA signature cannot come from an ECC AK ({ak.name.hex()})")
            ak.public_key.verify(sig.value, quote_bytes, ec.ECDSA(h))
    except InvalidSignature:
        raise QuoteSignatureError(f"the quote's signature does not verify with AK {ak.name.hex()}") from None


def verify_quote(attest: bytes, signature: bytes, ak: AttestationKey, *, nonce: bytes,
                 enrolled: Collection[bytes]) -> Quote:
    """Parse and verify a quote: `ak` (the evidence's AK, by TPM name) must be one of the
    `enrolled` AK names, the signature must verify with it, and extraData must be `nonce`, the
    verifier's fresh challenge (compared in constant time). Returns the parsed quote, whose PCR
    digest the caller then checks against the event log (`check_pcrs`)."""
    if ak.name not in enrolled:
        raise AkNotEnrolledError(f"AK {ak.name.hex()} is not enrolled for this device")
    if not nonce:
        raise NonceMismatchError("no nonce to compare against: a quote without a challenge proves no freshness")
    if len(attest) > MAX_ATTEST:
        raise AttestFormatError(f"TPMS_ATTEST: {len(attest)} bytes exceeds the maximum of {MAX_ATTEST}")
    # the signature first: a bit flipped anywhere in the quote is a signature failure, and no field
    # of an unsigned structure is looked at
    return check_nonce(verify_signature(attest, signature, ak), nonce)


def verify_signature(attest: bytes, signature: bytes, ak: AttestationKey) -> Quote:
    """The AK's signature over the exact TPMS_ATTEST bytes, checked before any field is parsed;
    then the parsed quote (which says nothing about freshness yet: `check_nonce`)."""
    if len(attest) > MAX_ATTEST:
        raise AttestFormatError(f"TPMS_ATTEST: {len(attest)} bytes exceeds the maximum of {MAX_ATTEST}")
    _verify_signature(bytes(attest), parse_signature(signature), ak)
    return parse_attest(attest)


def check_nonce(q: Quote, nonce: bytes) -> Quote:
    """extraData is `nonce` (constant time); an empty nonce never passes."""
    if not nonce:
        raise NonceMismatchError("no nonce to compare against: a quote without a challenge proves no freshness")
    if not hmac.compare_digest(q.extra_data, nonce):
        raise NonceMismatchError("the quote's qualifying data is not this challenge's nonce (replayed quote)")
    return q


def pcr_digest(selection: tuple[tuple[int, tuple[int, ...]], ...], pcrs: Mapping[int, bytes]) -> bytes:
    """What TPM2_Quote puts in pcrDigest: SHA-256 over the selected SHA-256 PCR values, in selection order."""
    return hashlib.sha256(b"".join(pcrs[i] for _, idx in selection for i in idx)).digest()


def check_pcrs(quote: Quote, pcrs: Mapping[int, bytes], required: Collection[int]) -> None:
    """The quote covers the SHA-256 bank only, at least the `required` PCRs, and its pcrDigest is
    the digest of `pcrs` (the event log's replay): otherwise the log is not what the TPM measured."""
    algs = {alg for alg, idx in quote.selection if idx}
    if algs != {ALG_SHA256}:
        raise PcrSelectionError(f"the quote selects banks {sorted(algs)}, expected SHA-256 ({ALG_SHA256:#06x}) only")
    covered = {i for _, idx in quote.selection for i in idx}
    if not covered or not set(required) <= covered:
        raise PcrSelectionError(f"the quote covers PCRs {sorted(covered)}, the verifier requires {sorted(required)}")
    want = pcr_digest(quote.selection, pcrs)
    if not hmac.compare_digest(want, quote.pcr_digest):
        raise PcrDigestMismatchError(f"the event log replays to a PCR {sorted(covered)} digest of {want.hex()}, "
                                     f"the TPM quoted {quote.pcr_digest.hex()}")
