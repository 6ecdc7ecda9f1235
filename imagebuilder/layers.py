"""Layers: the image's parts as separate UnixFS files, so an unchanged part keeps its CID.

Order and roles are fixed: kernel (the bare bzImage, so stages can kexec it), runtime
(interpreter + stdlib subset + libraries), agent (project code and /init), operations (the
flow's implementation modules) and config (the flow itself and extra files). The last four
are compressed newc archives that the kernel unpacks, concatenated, as one initramfs.
"""

from __future__ import annotations

from dataclasses import dataclass

from cidboot.ipld.cid import CID
from cidboot.ipld.unixfs import ImportOptions, import_bytes
from cidboot.ipld.unixfs.importer import BlockSink
from cidboot.trust.manifest import Plaintext
from cidboot.trust.private import keys as layer_keys

ROLES = ("kernel", "runtime", "agent", "operations", "config")
UNIXFS = ImportOptions(cid_version=1)  # CIDv1, raw leaves, 256 KiB chunks


@dataclass(frozen=True)
class BuiltLayer:
    """A layer as stored: `data`/`cid` are what storage holds (the ciphertext when `plaintext`
    is set, i.e. the layer is encrypted: see `encrypt`)."""

    role: str
    data: bytes
    cid: CID
    cached: bool = False
    plaintext: Plaintext | None = None

    @property
    def size(self) -> int:
        return len(self.data)


def encrypt(layer: BuiltLayer, secret: bytes) -> BuiltLayer:
    """The layer encrypted under its key from the flow secret (cidboot.trust.private.keys:
    age STREAM, key = HKDF(secret, SHA-256(plaintext), role)): same secret and bytes, same
    ciphertext and CID, so encrypted builds stay reproducible."""
    if layer.plaintext is not None:
        raise ValueError(f"{layer.role} layer is already encrypted")
    enc = layer_keys.encrypt_layer(secret, layer.data, layer.role)
    return BuiltLayer(layer.role, enc.ciphertext, layer_cid(enc.ciphertext), layer.cached,
                      Plaintext(enc.sha256, enc.size))


def layer_cid(data: bytes) -> CID:
    """The layer's UnixFS CID without storing anything."""
    return import_bytes(data, None, UNIXFS).cid


def publish(data: bytes, sink: BlockSink) -> CID:
    """Write the layer's UnixFS blocks to a sink (block store, Kubo, CAR)."""
    return import_bytes(data, sink, UNIXFS).cid
