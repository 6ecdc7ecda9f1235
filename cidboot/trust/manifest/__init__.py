"""Signed workload manifests: the model, signing, and verification with TUF-grade protections."""

from cidboot.trust.manifest.errors import (
    ExpiredError,
    LayerNotListedError,
    ManifestNameError,
    ManifestVerificationError,
    RegistryRollbackError,
    RollbackError,
    RootMismatchError,
    RootRotationError,
    SignatureError,
    SignatureKindError,
    SizeLimitError,
    ThresholdError,
    VersionConflictError,
)
from cidboot.trust.manifest.model import Layer, Manifest, ManifestFormatError, Plaintext, RootOfTrust
from cidboot.trust.manifest.signed import (
    KIND_MANIFEST,
    KIND_REGISTRY,
    KIND_ROOT,
    SignedManifest,
    SignedRoot,
    sign_kind,
    sign_manifest,
    sign_root,
)
from cidboot.trust.manifest.verify import (
    Check,
    TrustState,
    check_layer,
    rotated_root,
    verify_manifest,
    verify_manifest_signers,
    verify_threshold,
)

__all__ = [
    "KIND_MANIFEST", "KIND_REGISTRY", "KIND_ROOT", "SignatureKindError", "sign_kind",
    "Check", "ExpiredError", "Layer", "LayerNotListedError", "Manifest", "ManifestFormatError", "ManifestNameError", "Plaintext",
    "ManifestVerificationError", "RegistryRollbackError", "RollbackError", "RootMismatchError", "RootOfTrust", "RootRotationError",
    "SignatureError", "SignedManifest", "SignedRoot", "SizeLimitError", "ThresholdError", "TrustState",
    "VersionConflictError", "check_layer", "rotated_root", "sign_manifest", "sign_root", "verify_manifest",
    "verify_manifest_signers", "verify_threshold",
]
