"""Rollback state (cidboot.manifest.TrustState) persisted on a raw block device.

Rollback protection needs the highest manifest version accepted to survive power-off, and the
bootstrap has no file system to keep it in: under QEMU the harness gives each device a 1 MiB raw
virtio-blk disk (`/dev/vda`); on a board an RPMB partition or TPM NV index plays this part.

Layout at offset 0: a 48-byte header, then the state as canonical JSON:

    magic "CIDBNVR\\0" (8) | format version u32 BE (4) | JSON length u32 BE (4) | SHA-256 of JSON (32)

An all-zero header is a fresh device (first boot: the state starts from the trust anchor).
Anything else that does not verify is refused with NvramError: resetting silently would hand
an attacker who can scribble on the disk a rollback to any old, signed, vulnerable manifest.
"""

from __future__ import annotations

import hashlib
import os
import struct
from pathlib import Path

from cidboot.errors import CidbootError, FormatError
from cidboot.manifest import RootOfTrust, TrustState

DEFAULT_DEVICE = "/dev/vda"
MAGIC = b"CIDBNVR\0"
FORMAT_VERSION = 1
HEADER = struct.Struct(">8sII32s")
MAX_STATE = 64 * 1024  # a root and a handful of versions are well under 1 KiB


class NvramError(CidbootError):
    """The NVRAM cannot be read or written, or its content is damaged (the message names the device)."""


def encode_record(payload: bytes) -> bytes:
    """Header + payload, as written at offset 0."""
    if len(payload) > MAX_STATE:
        raise NvramError(f"trust state of {len(payload)} bytes exceeds {MAX_STATE}")
    return HEADER.pack(MAGIC, FORMAT_VERSION, len(payload), hashlib.sha256(payload).digest()) + payload


def decode_record(raw: bytes, where: str) -> bytes | None:
    """The payload, or None for a fresh (all-zero) device; NvramError for anything damaged."""
    if len(raw) < HEADER.size:
        raise NvramError(f"{where}: device is {len(raw)} bytes, smaller than the {HEADER.size}-byte header")
    head = raw[:HEADER.size]
    if head == bytes(HEADER.size):
        return None
    magic, version, length, digest = HEADER.unpack(head)
    if magic != MAGIC:
        raise NvramError(f"{where}: not cidboot rollback state (magic {magic!r}); refusing to reset it")
    if version != FORMAT_VERSION:
        raise NvramError(f"{where}: rollback state format {version}, this bootstrap reads {FORMAT_VERSION}")
    if length > MAX_STATE or HEADER.size + length > len(raw):
        raise NvramError(f"{where}: rollback state length {length} is out of range")
    payload = raw[HEADER.size:HEADER.size + length]
    if hashlib.sha256(payload).digest() != digest:
        raise NvramError(f"{where}: rollback state checksum mismatch (corrupted); refusing to reset it")
    return payload


class Nvram:
    """One device (or a regular file standing in for it in tests). Never truncated or created:
    a missing device is an error, since booting without rollback state would disable the check."""

    def __init__(self, path: str | os.PathLike[str] = DEFAULT_DEVICE) -> None:
        self.path = Path(path)

    def read(self) -> bytes | None:
        try:
            with open(self.path, "rb", buffering=0) as f:
                raw = f.read(HEADER.size + MAX_STATE)
        except OSError as e:
            raise NvramError(f"{self.path}: cannot read rollback state: {e.strerror or e}") from None
        return decode_record(raw, str(self.path))

    def write(self, payload: bytes) -> None:
        record = encode_record(payload)
        try:
            fd = os.open(self.path, os.O_WRONLY)  # no O_TRUNC/O_CREAT: a block device, not a file to make
            try:
                os.pwrite(fd, record, 0)
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError as e:
            raise NvramError(f"{self.path}: cannot write rollback state: {e.strerror or e}") from None

    def load_state(self, anchor: RootOfTrust) -> TrustState:
        """The persisted TrustState, or a fresh one rooted at `anchor` on an all-zero device."""
        payload = self.read()
        if payload is None:
            return TrustState(anchor, {}, None)
        try:
            return TrustState.from_bytes(payload, anchor, f"{self.path}")
        except FormatError as e:
            raise NvramError(str(e)) from None

    def save_state(self, state: TrustState) -> None:
        self.write(state.to_bytes())
