"""One exception per way TPM evidence can fail (python-tuf style): callers and tests branch on the
type, never on the message text. Format errors: the bytes are not a well-formed TCG structure (the
message says which field, at which offset). Verification errors: well formed, but not to be trusted."""

from cidboot.errors import FormatError, VerificationError


class TpmFormatError(FormatError):
    """Base of the TPM structure format errors."""


class EventLogFormatError(TpmFormatError):
    """A TCG PC Client event log is truncated, garbled, oversized or not crypto-agile with SHA-256."""


class AttestFormatError(TpmFormatError):
    """A TPMS_ATTEST / TPMS_QUOTE_INFO is truncated, garbled, oversized or not a quote."""


class SignatureFormatError(TpmFormatError):
    """A TPMT_SIGNATURE is truncated, garbled or of an unsupported scheme."""


class PublicKeyFormatError(TpmFormatError):
    """A TPM2B_PUBLIC is truncated, garbled, or not an attestation key (restricted, signing, fixedTPM)."""


class PeFormatError(TpmFormatError):
    """A PE/COFF image cannot be hashed the way UEFI measures it (headers or sections out of bounds)."""


class TpmVerificationError(VerificationError):
    """Base: the TPM evidence must not be trusted."""


class AkNotEnrolledError(TpmVerificationError):
    """The quote was made by an attestation key that is not enrolled for the device."""


class QuoteSignatureError(TpmVerificationError):
    """The quote's signature does not verify with the enrolled AK (tampered quote, wrong key or scheme)."""


class NonceMismatchError(TpmVerificationError):
    """The quote's qualifying data (extraData) is not the fresh nonce the verifier sent: a replayed quote."""


class PcrSelectionError(TpmVerificationError):
    """The quote does not cover the PCRs the verifier requires, or covers another bank than SHA-256."""


class PcrDigestMismatchError(TpmVerificationError):
    """Replaying the event log does not give the PCR values the TPM quoted (log edited, truncated or forged)."""


class ReferenceMismatchError(TpmVerificationError):
    """A measured event differs from the reference value derived from the signed manifest (names the PCR/event)."""


class EkCertificateError(TpmVerificationError):
    """An EK certificate is malformed, not issued by the TPM vendor's CA given, or not for an RSA-2048 EK."""


class CredentialActivationError(TpmVerificationError):
    """Make/activate credential failed: the TPM holding the EK of the certificate did not recover the
    secret bound to the AK's name, so the AK is not shown to live in that TPM (never enrolled)."""
