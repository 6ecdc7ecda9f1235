"""Which agents this agent trusts as producers of inputs, and in which role.

An entry is made only from an affirming appraisal (agent.peers after mutual attestation, or
the local agent's own identity): the alias public key that signed the evidence, the role it
claimed there, and the appraisal itself. The validator asks: was this input's producer
attested affirming, and in which role?
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from cidboot.errors import VerificationError
from cidboot.trust.cose_key import raw_public_bytes

if TYPE_CHECKING:  # appraisal runs when a peer is appraised, after `agent ready`: not imported at start
    from cidboot.trust.appraisal import AppraisalResult


@dataclass(frozen=True)
class AttestedAgent:
    """One trusted producer: the role it was attested in, and how (None: this agent itself)."""

    role: str
    appraisal: AppraisalResult | None  # None: this agent itself (its identity is its boot)


@dataclass
class AttestedAgents:
    """The producers this agent trusts, by raw alias public key (thread-safe: peers register from
    the HTTP threads, the validator reads from the flow's loop)."""

    by_key: dict[bytes, AttestedAgent] = field(default_factory=dict)  # raw alias public key -> entry
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def add_self(self, alias_public_raw: bytes, role: str) -> None:
        with self._lock:
            self.by_key[alias_public_raw] = AttestedAgent(role, None)

    def add(self, appraisal: AppraisalResult) -> AttestedAgent:
        """Register a peer from its appraisal; only affirming appraisals with a leaf key and a role count."""
        if not appraisal.affirming or appraisal.leaf_public_key is None or not appraisal.role:
            raise VerificationError(f"peer not registered: appraisal {appraisal.status}, role {appraisal.role!r}")
        entry = AttestedAgent(appraisal.role, appraisal)
        with self._lock:
            self.by_key[raw_public_bytes(appraisal.leaf_public_key)] = entry
        return entry

    def get(self, alias_public_raw: bytes) -> AttestedAgent | None:
        with self._lock:
            return self.by_key.get(alias_public_raw)
