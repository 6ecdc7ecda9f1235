"""Signed workload manifests: the model, signing, and verification with TUF-grade protections."""

from cidboot.manifest.errors import (
    ExpiredError,
    LayerNotListedError,
    ManifestVerificationError,
    RollbackError,
    RootMismatchError,
    RootRotationError,
    SignatureError,
    SizeLimitError,
    ThresholdError,
)
from cidboot.manifest.model import Layer, Manifest, ManifestFormatError, RootOfTrust
from cidboot.manifest.signed import SignedManifest, SignedRoot, sign_manifest, sign_root
from cidboot.manifest.verify import Check, TrustState, check_layer, verify_manifest, verify_threshold

__all__ = [
    "Check", "ExpiredError", "Layer", "LayerNotListedError", "Manifest", "ManifestFormatError",
    "ManifestVerificationError", "RollbackError", "RootMismatchError", "RootOfTrust", "RootRotationError",
    "SignatureError", "SignedManifest", "SignedRoot", "SizeLimitError", "ThresholdError", "TrustState",
    "check_layer", "sign_manifest", "sign_root", "verify_manifest", "verify_threshold",
]
