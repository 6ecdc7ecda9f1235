"""A device's whole DICE derivation in software: UDS -> firmware -> bootstrap -> image.

On hardware and in the QEMU harness each stage derives its own layer; this runs them all in
one process, for `agent run --identity DIR` (developing flows without QEMU), for verifiers'
tests and for benchmarks. The derivation is the same one the stages use.
"""

from __future__ import annotations

from dataclasses import dataclass

from cidboot.trust.cose import PrivateKey, PublicKey
from cidboot.trust.dice import main_flow
from cidboot.trust.dice.chain import encode_chain
from cidboot.trust.dice.derive import DiceInputs, key_from_cdi


@dataclass(frozen=True)
class DerivedIdentity:
    """The end of a software derivation: the root key, the last layer's CDIs, chain and key."""

    root_public_key: PublicKey
    cdi_attest: bytes
    cdi_seal: bytes
    chain: bytes
    leaf_key: PrivateKey


def derive_layers(uds: bytes, layers: list[DiceInputs], *, key_alg: str = "ed25519") -> DerivedIdentity:
    """Run the DICE main flow once per layer, starting from the UDS (the engine's CDI_0 source)."""
    root = key_from_cdi(uds, key_alg).public_key()
    attest = seal = uds
    certs = []
    for inputs in layers:
        attest, seal, cert = main_flow(attest, seal, inputs, key_alg=key_alg)
        certs.append(cert)
    return DerivedIdentity(root, attest, seal, encode_chain(root, certs), key_from_cdi(attest, key_alg))
