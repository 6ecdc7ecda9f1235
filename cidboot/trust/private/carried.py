"""What an encrypted image carries inside itself instead of publishing in clear (docs/privacy.md).

A manifest names its flow (one DAG-CBOR block) and each operation's source (a UnixFS file) by
CID, and provenance links the flow's CID (every seed's parent). For a plain image these are the
clear blocks, published beside the layers. For an encrypted image (`encrypt: true`) the image
builder encrypts them like the layers (`keys.encrypt_layer` under the same flow secret, roles
`flow` and `operation`) and the manifest names the *ciphertext* CIDs: what is published, pinned
and linked (recursive pins of the manifest or of a result's provenance find every block) is
ciphertext only. The device reads the flow in clear from its own image: the config layer (itself
encrypted, decrypted by the bootstrap and checked against the signed plaintext hash) holds the
plain flow block at `FLOW_PATH`; the operations' code is the operations layer, as for every image.

Nothing in an image names a ciphertext CID: the image's plaintext, hence its measurement, does not
depend on the flow secret (a verifier computes reference values without it).

Guest code: stdlib and cidboot only.
"""

from __future__ import annotations

import os
from pathlib import Path

from cidboot.errors import VerificationError
from cidboot.trust.manifest.model import Manifest

FLOW_PATH = "etc/cidboot/flow.cbor"
FLOW_ROLE = "flow"  # the key-derivation role of the flow block (cidboot.trust.private.keys.layer_key)
OPERATION_ROLE = "operation"  # and of each operation's source file
MAX_FLOW = 1 << 22  # as the gateway client's per-block bound for the flow block


class CarriedFlowMissing(VerificationError):
    """An encrypted image without the flow block it must carry (or one too large): not started."""


def private(manifest: Manifest) -> bool:
    """Whether the manifest's flow and operation CIDs name ciphertext (some layer is encrypted)."""
    return any(layer.encrypted for layer in manifest.layers)


def flow_block(root: str | os.PathLike[str], manifest: Manifest) -> bytes | None:
    """The plain flow block of an encrypted image rooted at `root` (its `manifest.flow` is the
    ciphertext's CID); None for a plain image, whose flow is the block `manifest.flow` itself."""
    if not private(manifest):
        return None
    p = Path(root) / FLOW_PATH
    try:
        with open(p, "rb") as f:
            data = f.read(MAX_FLOW + 1)
    except OSError as e:
        raise CarriedFlowMissing(f"{p}: an encrypted image carries its flow here, and cannot be read: "
                                 f"{e.strerror or e}") from None
    if len(data) > MAX_FLOW:
        raise CarriedFlowMissing(f"{p}: larger than {MAX_FLOW} bytes")
    return data
