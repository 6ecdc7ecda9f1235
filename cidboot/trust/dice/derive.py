"""The Open Profile for DICE derivations, exactly as open-dice computes them.

CDIs: HKDF-SHA512 with the current CDI as key material and the SHA-512 of the layer's inputs
as salt. Key pairs: a 32-byte seed from CDI_Attest (HKDF, fixed salt, info "Key Pair"), then
Ed25519 directly, or for P-256/P-384 open-dice's deterministic HMAC-SHA512 DRBG (so that the
same CDI gives the same key on every implementation). IDs: 20 bytes of HKDF over the raw
public key, top bit cleared.
"""

from __future__ import annotations

import hashlib
import hmac
from enum import IntEnum

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from cidboot.errors import FormatError
from cidboot.trust.cose import PrivateKey, PublicKey
from cidboot.trust.cose_key import raw_public_bytes

CDI_SIZE = 32
HASH_SIZE = 64
HIDDEN_SIZE = 64
INLINE_CONFIG_SIZE = 64
SEED_SIZE = 32
ID_SIZE = 20

ASYM_SALT = bytes.fromhex(
    "63b6a04d2c077fc10f639f21da793844356cc2b0b441b3a77124035c03f8e1be"
    "6035d31f282821a7450a02222ab1b3cff1679b05ab1ca5d1affb789ccd2b0b3b"
)
ID_SALT = bytes.fromhex(
    "dbdbaebc8020da9ff0dd5a24c83aa5a54286dfc263031e329b4da148430659fe"
    "62cdb5b7e1e00fc680306711eb444af77209359496fcff1db9520ba51c7b29ea"
)
KEY_ALGS = ("ed25519", "p256", "p384")


class DiceInputError(FormatError):
    """DICE inputs have the wrong sizes or an unknown mode/config type."""


class DiceMode(IntEnum):
    NOT_INITIALIZED = 0
    NORMAL = 1
    DEBUG = 2
    MAINTENANCE = 3


class DiceConfigType(IntEnum):
    """How a layer's configuration enters the CDI: 64 inline bytes, or a descriptor's SHA-512."""

    INLINE = 0
    DESCRIPTOR = 1


class DiceInputs:
    """One layer's DICE input values (open-dice's DiceInputValues). A value (field equality and
    hash, never changed; the constructor validates), written out rather than a frozen dataclass,
    whose generated methods cost each stage ~3-4 M guest instructions at import (all three
    derive or check a layer)."""

    __slots__ = ("code_hash", "code_descriptor", "config_value", "config_descriptor", "authority_hash",
                 "authority_descriptor", "mode", "hidden", "profile_name")

    def __init__(self, code_hash: bytes = bytes(HASH_SIZE), code_descriptor: bytes = b"",
                 config_value: bytes | None = bytes(INLINE_CONFIG_SIZE), config_descriptor: bytes | None = None,
                 authority_hash: bytes = bytes(HASH_SIZE), authority_descriptor: bytes = b"",
                 mode: DiceMode = DiceMode.NOT_INITIALIZED, hidden: bytes = bytes(HIDDEN_SIZE),
                 profile_name: str | None = None) -> None:
        self.code_hash = code_hash
        self.code_descriptor = code_descriptor
        self.config_value = config_value  # inline config (64 B) ...
        self.config_descriptor = config_descriptor  # ... or a descriptor whose SHA-512 is the config
        self.authority_hash = authority_hash
        self.authority_descriptor = authority_descriptor
        self.mode = mode
        self.hidden = hidden
        self.profile_name = profile_name
        self.__post_init__()

    def _key(self) -> tuple[object, ...]:
        return tuple(getattr(self, n) for n in self.__slots__)

    def __eq__(self, other: object) -> bool:
        return type(other) is DiceInputs and self._key() == other._key()

    def __hash__(self) -> int:
        return hash(self._key())

    def __repr__(self) -> str:
        return f"DiceInputs({', '.join(f'{n}={getattr(self, n)!r}' for n in self.__slots__)})"

    def __post_init__(self) -> None:
        for name, size in (("code_hash", HASH_SIZE), ("authority_hash", HASH_SIZE), ("hidden", HIDDEN_SIZE)):
            if len(getattr(self, name)) != size:
                raise DiceInputError(f"{name} must be {size} bytes, got {len(getattr(self, name))}")
        if self.config_descriptor is None:
            if self.config_value is None or len(self.config_value) != INLINE_CONFIG_SIZE:
                raise DiceInputError(f"inline config must be {INLINE_CONFIG_SIZE} bytes")
        try:
            DiceMode(self.mode)
        except ValueError:
            raise DiceInputError(f"unknown DICE mode {self.mode!r}") from None

    @property
    def config_is_descriptor(self) -> bool:
        return self.config_descriptor is not None

    @property
    def config_type(self) -> DiceConfigType:
        return DiceConfigType.DESCRIPTOR if self.config_descriptor is not None else DiceConfigType.INLINE

    def config_input(self) -> bytes:
        if self.config_descriptor is not None:
            return hashlib.sha512(self.config_descriptor).digest()
        assert self.config_value is not None
        return self.config_value


def kdf(length: int, ikm: bytes, salt: bytes, info: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA512(), length=length, salt=salt, info=info).derive(ikm)


def next_cdis(cdi_attest: bytes, cdi_seal: bytes, inputs: DiceInputs) -> tuple[bytes, bytes]:
    if len(cdi_attest) != CDI_SIZE or len(cdi_seal) != CDI_SIZE:
        raise DiceInputError(f"CDIs must be {CDI_SIZE} bytes")
    authority_mode_hidden = inputs.authority_hash + bytes([inputs.mode]) + inputs.hidden
    attest_hash = hashlib.sha512(inputs.code_hash + inputs.config_input() + authority_mode_hidden).digest()
    seal_hash = hashlib.sha512(authority_mode_hidden).digest()
    return (kdf(CDI_SIZE, cdi_attest, attest_hash, b"CDI_Attest"), kdf(CDI_SIZE, cdi_seal, seal_hash, b"CDI_Seal"))


def private_key_seed(cdi_attest: bytes) -> bytes:
    return kdf(SEED_SIZE, cdi_attest, ASYM_SALT, b"Key Pair")


def derive_cdi_private_key_seed(cdi_attest: bytes) -> bytes:
    """open-dice's DiceDeriveCdiPrivateKeySeed: the 32-byte seed every key algorithm starts from."""
    if len(cdi_attest) != CDI_SIZE:
        raise DiceInputError(f"CDI_Attest must be {CDI_SIZE} bytes, got {len(cdi_attest)}")
    return private_key_seed(cdi_attest)


def _hmac(k: bytes, *parts: bytes) -> bytes:
    h = hmac.new(k, digestmod=hashlib.sha512)
    for p in parts:
        h.update(p)
    return h.digest()


def _ec_scalar(seed: bytes, order: int, size: int) -> int:
    # open-dice's derivePrivateKey: an HMAC-SHA512 DRBG (RFC 6979 style) with rejection sampling
    v, k = b"\x01" * 64, b"\x00" * 64
    k = _hmac(k, v, b"\x00", seed)
    v = _hmac(k, v)
    k = _hmac(k, v, b"\x01", seed)
    while True:
        v = _hmac(k, v)
        v = _hmac(k, v)
        candidate = int.from_bytes(v[:size], "big")
        k = _hmac(k, v, b"\x00")
        if 0 < candidate < order:
            return candidate


_ORDERS = {
    "p256": (ec.SECP256R1(), 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551, 32),
    "p384": (ec.SECP384R1(), int("ffffffffffffffffffffffffffffffffffffffffffffffffc7634d81f4372ddf581a0db248b0a77aecec196accc52973", 16), 48),
}


def keypair_from_seed(seed: bytes, alg: str = "ed25519") -> PrivateKey:
    if alg == "ed25519":
        return ed25519.Ed25519PrivateKey.from_private_bytes(seed)
    if alg not in _ORDERS:
        raise DiceInputError(f"unknown DICE key algorithm {alg!r} (one of {', '.join(KEY_ALGS)})")
    curve, order, size = _ORDERS[alg]
    return ec.derive_private_key(_ec_scalar(seed, order, size), curve)


def derive_id(public_raw: bytes) -> bytes:
    out = bytearray(kdf(ID_SIZE, public_raw, ID_SALT, b"ID"))
    out[0] &= 0x7F
    return bytes(out)


def key_from_cdi(cdi_attest: bytes, alg: str = "ed25519") -> PrivateKey:
    """The attestation key pair of the layer whose CDI_Attest this is."""
    return keypair_from_seed(private_key_seed(cdi_attest), alg)


def id_of_key(key: PrivateKey) -> bytes:
    return derive_id(raw_public_bytes(key.public_key()))


def uds_keypair(uds: bytes, alg: str = "ed25519") -> PrivateKey:
    """The key pair the DICE engine derives from the UDS.

    In open-dice the UDS is the "current CDI" of the first main flow, so the first certificate
    is signed with the key derived from the UDS exactly as from any CDI_Attest; its public key
    is the root of the chain (Android's UDS_Pub).
    """
    if len(uds) != CDI_SIZE:
        raise DiceInputError(f"UDS must be {CDI_SIZE} bytes, got {len(uds)}")
    return key_from_cdi(uds, alg)


def root_public_key_from_uds(uds: bytes, alg: str = "ed25519") -> PublicKey:
    return uds_keypair(uds, alg).public_key()
