"""The flow owner: who may read a flow's values (docs/privacy.md, "Private results").

flow.yaml's `owner: {recipients: [age1...], seal: results | all}`, carried in the signed
manifest's `owner` field. Here, in the trust package, because the manifest (read by the
bootstrap too) validates it; what the agent does with it is cidboot.dataflow.sealing.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from cidboot.errors import FormatError
from cidboot.trust.private import sealed as age

SEAL_MODES = ("results", "all")


class OwnerFormatError(FormatError):
    """The flow's `owner` section is malformed (the message names the field)."""


@dataclass(frozen=True)
class Owner:
    """Who may read the flow's values: age X25519 recipients; `seal` says which values."""

    recipients: tuple[str, ...]
    seal: str = "results"

    def __post_init__(self) -> None:
        if not self.recipients:
            raise OwnerFormatError("owner.recipients: at least one age1... recipient")
        for i, r in enumerate(self.recipients):
            try:
                age.parse_recipient(r)
            except FormatError as e:
                raise OwnerFormatError(f"owner.recipients[{i}]: {r!r:.80}: {e}") from None
        if self.seal not in SEAL_MODES:
            raise OwnerFormatError(f"owner.seal: must be one of {list(SEAL_MODES)}, got {self.seal!r}")

    @property
    def raw(self) -> list[bytes]:
        return [age.parse_recipient(r) for r in self.recipients]

    def to_obj(self) -> dict[str, Any]:
        return {"recipients": list(self.recipients), "seal": self.seal}

    @classmethod
    def from_obj(cls, d: Any, where: str = "owner") -> Owner:
        if not isinstance(d, Mapping):
            raise OwnerFormatError(f"{where}: must be a map {{recipients: [age1...], seal: results|all}}")
        extra = sorted(set(d) - {"recipients", "seal"})
        if extra:
            raise OwnerFormatError(f"{where}: unknown keys {extra}")
        rec = d.get("recipients")
        if not isinstance(rec, list | tuple) or not all(isinstance(r, str) for r in rec):
            raise OwnerFormatError(f"{where}.recipients: must be a list of age1... strings")
        if len(set(rec)) != len(rec):
            raise OwnerFormatError(f"{where}.recipients: a recipient is listed twice")
        return cls(tuple(rec), d.get("seal", "results"))

    def seals(self, *, seed: bool, consumed: bool) -> bool:
        """Is a value of this kind sealed? results: values nothing consumes; all: every value."""
        return self.seal == "all" or (not seed and not consumed)
