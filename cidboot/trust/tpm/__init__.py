"""TPM 2.0 evidence, verifier side: the UEFI event log (eventlog), quotes and attestation keys
(quote), the Authenticode hash UEFI measures EFI applications by (pe), reference values derived
from the signed manifest (reference) and their appraisal (appraise).

Stdlib + `cryptography` only, because agents appraise their peers with it. Talking to a TPM is
not here: tests drive a real swtpm with tpm2-tools (tests/support/swtpm.py). See docs/tpm.md.
"""
