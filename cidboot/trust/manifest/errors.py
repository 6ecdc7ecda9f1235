"""One exception per way a manifest can fail verification (python-tuf style), so callers and
tests can tell the attacks apart."""

from cidboot.errors import VerificationError


class ManifestVerificationError(VerificationError):
    """Base: the manifest must not be used."""


class SignatureError(ManifestVerificationError):
    """A signature is malformed or does not verify (arbitrary-software attack)."""


class SignatureKindError(SignatureError):
    """The signatures were made for another kind of object (their content-type label differs)."""


class ThresholdError(ManifestVerificationError):
    """Fewer distinct trusted keys signed than the root's threshold."""


class RollbackError(ManifestVerificationError):
    """The version is below the highest already accepted for this name."""


class ExpiredError(ManifestVerificationError):
    """The manifest's expiry has passed (indefinite-freeze attack)."""


class RootRotationError(ManifestVerificationError):
    """A root rotation is not signed by the previous root's threshold, or skips a version."""


class RootMismatchError(ManifestVerificationError):
    """The manifest names a root other than the one trusted now (e.g. signed under revoked keys)."""


class LayerNotListedError(ManifestVerificationError):
    """A layer the device was handed is not in the signed manifest (mix-and-match)."""


class SizeLimitError(ManifestVerificationError):
    """Data is larger than the signed manifest allows (endless-data attack)."""


class ManifestNameError(ManifestVerificationError):
    """The manifest is signed and current but has another name than the one this device may boot
    (its role's manifest in the signed registry, or the name pinned in its trust state)."""


class VersionConflictError(ManifestVerificationError):
    """Another manifest (another CID) was already accepted under this name and version: one
    version names one signed block, so the same version with different content is refused."""


class RegistryRollbackError(ManifestVerificationError):
    """The device registry's version is below the highest one already accepted."""
