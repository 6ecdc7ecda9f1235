"""The agent's TPM quotes on a TPM-measured boot (docs/tpm.md, "The agent's quote"): the quoter
lives in cidboot.trust.tpm.quoter, shared with the bootstrap's key request (docs/privacy.md)."""

from __future__ import annotations

from cidboot.trust.tpm.quoter import QUOTE_PCRS, TpmQuoter

__all__ = ["QUOTE_PCRS", "TpmQuoter"]
