"""`TpmDevice`: what enrolment recorded for a TPM-rooted device (docs/tpm.md, "Enrolment").

Its own module so that a booting agent, which verifies a device registry before `agent ready`,
creates this class only when the registry has a TPM device (cidboot.trust.registry imports it
there); cidboot.trust.appraisal re-exports it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cached_property
from typing import TYPE_CHECKING, Any

from cidboot.errors import FormatError

if TYPE_CHECKING:
    from cidboot.trust.tpm.appraise import TpmEnrolment


@dataclass(frozen=True)
class TpmDevice:
    """What enrolment recorded for a TPM-rooted device (docs/tpm.md, "Enrolment"): its AK's
    TPM2B_PUBLIC (the name is computed from it, never taken on trust), the firmware PCR baseline
    of a known-good boot (empty: not yet recorded, and then appraisal never affirms) and, for
    the record, the EK certificate the AK was shown to belong to (DER; None if not kept)."""

    ak_public: bytes
    firmware_pcrs: Mapping[int, bytes] = field(default_factory=dict)
    ek_cert: bytes | None = None

    def __post_init__(self) -> None:
        from cidboot.trust.tpm.quote import parse_public

        parse_public(self.ak_public)  # raises PublicKeyFormatError: not an attestation key
        for i, v in self.firmware_pcrs.items():
            if type(i) is not int or not 0 <= i < 24 or not isinstance(v, bytes) or len(v) != 32:
                raise FormatError(f"TPM enrolment: firmware PCR {i!r} must be a PCR 0..23 with a 32-byte SHA-256 value")

    @cached_property
    def ak_name(self) -> bytes:
        from cidboot.trust.tpm.quote import parse_public

        return parse_public(self.ak_public).name

    @cached_property
    def _enrolment(self) -> TpmEnrolment:
        from cidboot.trust.tpm.appraise import TpmEnrolment

        return TpmEnrolment(frozenset({self.ak_name}), dict(self.firmware_pcrs))

    def enrolment(self) -> TpmEnrolment:
        return self._enrolment

    def to_json(self) -> dict[str, Any]:
        return {"ak": self.ak_public.hex(), "ak_name": self.ak_name.hex(),
                "firmware_pcrs": {str(i): v.hex() for i, v in sorted(self.firmware_pcrs.items())},
                "ek_cert": self.ek_cert.hex() if self.ek_cert is not None else None}

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> TpmDevice:
        if not isinstance(d, Mapping) or set(d) - {"ak", "ak_name", "firmware_pcrs", "ek_cert"}:
            raise FormatError("tpm must be {ak, ak_name?, firmware_pcrs?, ek_cert?}")
        dev = cls(bytes.fromhex(d["ak"]), {int(i): bytes.fromhex(v) for i, v in (d.get("firmware_pcrs") or {}).items()},
                  bytes.fromhex(d["ek_cert"]) if d.get("ek_cert") else None)
        if "ak_name" in d and d["ak_name"] != dev.ak_name.hex():
            raise FormatError(f"tpm: ak_name {d['ak_name']} is not the name of the AK given")
        return dev
