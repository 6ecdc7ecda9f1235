"""How each boot stage is measured into its DICE inputs: defined once, used by the stages
that measure (firmware, bootstrap) and by the verifiers that compare.

- firmware and bootstrap: `code_hash` = SHA-512 over the SHA-512 of each part in order
  (kernel, then each initrd as it is served: `boot_code_hash`), so parts can be hashed as they
  stream in, and a part already running can be named by its recorded hash;
- image (L2): code = SHA-512 of the image layer CIDs in manifest order (an encrypted layer
  counts as the raw CID of its plaintext: `layer_identity`), config = the manifest
  CID as the configuration descriptor (its SHA-512 enters the CDI), authority = SHA-512 of the
  sorted key ids that signed the manifest.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

from cidboot.trust.dice.derive import DiceInputs, DiceMode

TYPE_CHECKING = False  # mypy takes any TYPE_CHECKING as true
if TYPE_CHECKING:
    from cidboot.ipld.cid import CID
    from cidboot.trust.manifest.model import Layer, Manifest

# The manifest model and the CID classes are imported where an image is measured, not with this
# module: the firmware measures L1 from file hashes only (boot_code_hash_of_parts) and, under
# TCG, creating the manifest's dataclasses and their CID/multihash imports cost it ~0.1 s.


def code_hash_of_parts(part_hashes: Iterable[bytes]) -> bytes:
    return hashlib.sha512(b"".join(part_hashes)).digest()


def code_hash_of_blobs(blobs: Iterable[bytes]) -> bytes:
    return code_hash_of_parts(hashlib.sha512(b).digest() for b in blobs)


def boot_code_hash_of_parts(kernel_sha512: bytes, initrd_sha512s: Iterable[bytes]) -> bytes:
    """`boot_code_hash` from the parts' SHA-512s (a part not fetched because it is running is
    named by the SHA-512 the running image records for it)."""
    return code_hash_of_parts([kernel_sha512, *initrd_sha512s])


def boot_code_hash(kernel: bytes, initrds: Iterable[bytes]) -> bytes:
    """The code hash a stage takes of a next stage it boots from files (L0 of L1: boot.ipxe's
    kernel and each of its initrds, in order; the DICE engine of L0: its kernel and initrd), and
    so the reference value for it: SHA-512 over the SHA-512 of the kernel and of each initrd. The
    one definition the firmware, `firmware measure`, the image builder's reference values and the
    verifiers share (docs/boot-chain.md, "DICE layers")."""
    return code_hash_of_blobs([kernel, *initrds])


def served_initrds(layers: list[bytes]) -> list[bytes]:
    """An image's initramfs layers (manifest order, the kernel left out) as a boot server lists
    them for a stage that boots it over TFTP (boot.ipxe): the runtime layer on its own (the
    first, shared by every stage, so a stage running it need not fetch it), then the others
    concatenated. The reference value of such a stage is `boot_code_hash(kernel, served_initrds(...))`."""
    return [layers[0], b"".join(layers[1:])] if len(layers) > 1 else list(layers)


def layer_identity(layer: Layer) -> bytes:
    """What the image measurement takes of one layer: its CID's bytes; for an encrypted layer the
    CIDv1 (raw, sha2-256) its plaintext would have as one block, i.e. the plaintext SHA-256 in a
    self-delimiting form. The measurement thus names the code that runs, whatever key it was
    stored under: a verifier can compute the reference value from a reproducible build of the
    plaintext without the flow secret (which it must not hold). The bootstrap measures this only
    after the decrypted bytes matched the plaintext hash."""
    if layer.plaintext is None:
        return bytes(layer.cid)
    from cidboot.ipld.cid import CID, RAW
    from cidboot.ipld.multihash import SHA2_256, Multihash

    return bytes(CID(1, RAW, Multihash(SHA2_256, layer.plaintext.sha256)))


def image_code_hash(manifest: Manifest) -> bytes:
    return hashlib.sha512(b"".join(layer_identity(layer) for layer in manifest.layers)).digest()


def authority_hash(signer_key_ids: Iterable[bytes]) -> bytes:
    return hashlib.sha512(b"".join(sorted(signer_key_ids))).digest()


def image_inputs(manifest_cid: CID, manifest: Manifest, signer_key_ids: Iterable[bytes], *,
                 mode: DiceMode = DiceMode.NORMAL, profile_name: str | None = None) -> DiceInputs:
    return DiceInputs(code_hash=image_code_hash(manifest), config_value=None, config_descriptor=bytes(manifest_cid),
                      authority_hash=authority_hash(signer_key_ids), mode=mode, profile_name=profile_name)
