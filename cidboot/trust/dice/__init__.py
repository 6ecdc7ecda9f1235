"""Open Profile for DICE (open-dice compatible), DICE chains and the layer handover.

`main_flow` is one layer transition: from the current CDIs and the next layer's measured
inputs, the next CDIs and the certificate for the next layer's attestation key.
"""

from __future__ import annotations

from cidboot.trust.dice.cert import DiceCert, generate_certificate, parse_certificate
from cidboot.trust.dice.chain import (
    DiceChainError,
    Handover,
    VerifiedChain,
    append_to_chain,
    decode_handover,
    encode_chain,
    encode_handover,
    verify_chain,
)
from cidboot.trust.dice.derive import (
    CDI_SIZE,
    DiceConfigType,
    DiceInputError,
    DiceInputs,
    DiceMode,
    derive_cdi_private_key_seed,
    derive_id,
    id_of_key,
    key_from_cdi,
    keypair_from_seed,
    next_cdis,
    private_key_seed,
    root_public_key_from_uds,
    uds_keypair,
)


def main_flow(cdi_attest: bytes, cdi_seal: bytes, inputs: DiceInputs, *, key_alg: str = "ed25519") -> tuple[bytes, bytes, bytes]:
    """Return (next_cdi_attest, next_cdi_seal, certificate), exactly as open-dice's DiceMainFlow.

    The certificate is issued by the current layer's key (derived from `cdi_attest`) for the
    next layer's key (derived from `next_cdi_attest`); key_alg is "ed25519", "p256" or "p384".
    """
    next_attest, next_seal = next_cdis(cdi_attest, cdi_seal, inputs)
    cert = generate_certificate(key_from_cdi(next_attest, key_alg), key_from_cdi(cdi_attest, key_alg), inputs)
    return next_attest, next_seal, cert


__all__ = [
    "CDI_SIZE",
    "DiceCert",
    "DiceChainError",
    "DiceConfigType",
    "DiceInputError",
    "DiceInputs",
    "DiceMode",
    "Handover",
    "VerifiedChain",
    "append_to_chain",
    "decode_handover",
    "derive_cdi_private_key_seed",
    "derive_id",
    "encode_chain",
    "encode_handover",
    "id_of_key",
    "key_from_cdi",
    "keypair_from_seed",
    "main_flow",
    "parse_certificate",
    "private_key_seed",
    "root_public_key_from_uds",
    "uds_keypair",
    "verify_chain",
]
