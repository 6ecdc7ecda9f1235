"""What a stage signs attestation evidence with: its DICE alias key, its chain and its claims.

One definition for every stage that attests: the agent (its /attestation API and its peers) and
the bootstrap (its key request to the key broker, docs/privacy.md, which must be the very evidence
the agent would give, so the broker's appraisal is the agent's). The alias key is derived from
CDI_Attest as the DICE profile defines it (`cidboot.trust.dice.key_from_cdi`), the measurements
are read back from the chain's certificates, so evidence never claims what the chain does not
carry. Guest code: cidboot and `cryptography` only.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from cidboot.ipld.cid import CID
from cidboot.trust.cose import PrivateKey
from cidboot.trust.cose_key import raw_public_bytes
from cidboot.trust.dice.chain import verify_chain
from cidboot.trust.dice.derive import key_from_cdi
from cidboot.trust.eat import TPM_MEASURED, build_evidence, ueid_for

if TYPE_CHECKING:  # a TPM-rooted device's quoter passes these in; cidboot.trust.tpm is not every agent's to import
    # (a software identity is for development and tests: not imported by the agent's start)
    from cidboot.trust.dice.software import DerivedIdentity
    from cidboot.trust.tpm.evidence import TpmEvidence

LAYERS = ("firmware", "bootstrap", "image")


@dataclass
class Attester:
    """What this agent signs evidence with: its DICE alias key and chain, and the claims it makes.

    The measurements claimed are read back from the chain's certificates, so the evidence never
    claims what the chain does not carry."""

    leaf_key: PrivateKey
    chain: bytes
    ueid: bytes
    manifest_cid: CID | None = None
    boot_mode: str = "measured"
    role: str | None = None
    measurements: dict[str, bytes] = field(default_factory=dict)
    # a TPM-rooted device: nonce -> its TpmEvidence, quoted with qualifying data
    # cidboot.trust.tpm.evidence.qualifying_data(nonce, L1 key) (the chain's root)
    tpm: Callable[[bytes], TpmEvidence] | None = None

    @classmethod
    def from_chain(cls, leaf_key: PrivateKey, chain: bytes, *, manifest_cid: CID | None, boot_mode: str = "measured",
                   role: str | None = None, tpm: Callable[[bytes], TpmEvidence] | None = None,
                   ueid: bytes | None = None) -> Attester:
        """`tpm` (with the device's `ueid`, tpm.evidence.ueid of its AK name): a TPM-rooted
        device, whose chain starts at L1 and measures the image only."""
        vc = verify_chain(chain, allow_debug=True)  # appraisal judges debug mode; we only read it
        layers = ("image",) if tpm is not None else LAYERS
        meas = {layers[i]: e.code_hash for i, e in enumerate(vc.entries[:len(layers)])}
        if tpm is not None:
            boot_mode = TPM_MEASURED
        return cls(leaf_key, chain, ueid or ueid_for(raw_public_bytes(vc.root_public_key)), manifest_cid, boot_mode,
                   role, meas, tpm)

    @classmethod
    def from_cdi(cls, cdi_attest: bytes, chain: bytes, **kw: Any) -> Attester:
        """The device case: the alias key derived from CDI_2 as the DICE profile defines it."""
        return cls.from_chain(key_from_cdi(cdi_attest), chain, **kw)

    @classmethod
    def from_derived(cls, ident: DerivedIdentity, **kw: Any) -> Attester:
        """A software identity (cidboot.trust.dice.software.derive_layers), for development and tests."""
        return cls.from_chain(ident.leaf_key, ident.chain, **kw)

    @property
    def public_key_raw(self) -> bytes:
        return raw_public_bytes(self.leaf_key.public_key())

    def evidence(self, nonce: bytes) -> bytes:
        return build_evidence(nonce=nonce, leaf_key=self.leaf_key, chain=self.chain, ueid=self.ueid,
                              measurements=self.measurements, manifest_cid=self.manifest_cid,
                              boot_mode=self.boot_mode, role=self.role,
                              tpm=self.tpm(nonce) if self.tpm is not None else None)


def evidence_from_handover(handover: bytes, *, manifest_cid: CID | None, role: str | None,
                           boot_mode: str = "measured", **tpm: Any) -> Callable[[bytes], bytes]:
    """nonce -> evidence signed by the alias key of the encoded DICE hand-over `handover` ({1:
    CDI_Attest, 2: CDI_Seal, 3: chain}), as the stage that receives it would sign (the agent's
    `Attester.from_cdi`; `tpm`: its `tpm=` quoter and `ueid=` on a TPM-rooted boot). The decoded
    CDI copies are wiped at once; the key stays in the closure."""
    from cidboot.stage.console import wipe
    from cidboot.trust.dice import decode_handover

    h = decode_handover(handover)
    try:
        att = Attester.from_cdi(h.cdi_attest, h.chain, manifest_cid=manifest_cid, boot_mode=boot_mode, role=role, **tpm)
    finally:
        wipe(h.cdi_attest)
        wipe(h.cdi_seal)
    return att.evidence


__all__ = ["LAYERS", "Attester", "evidence_from_handover"]
