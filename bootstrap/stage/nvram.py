"""Rollback state (cidboot.trust.manifest.TrustState) persisted on a raw block device, in two slots.

Rollback protection needs the highest manifest version accepted to survive power-off, and the
bootstrap has no file system to keep it in: under QEMU the harness gives each device a 1 MiB raw
virtio-blk disk (`/dev/vda`); on a board an RPMB partition or TPM NV index plays this part.

A power cut in the middle of a write must not leave the device unbootable, so the state is kept
in two alternating records (A at offset 0, B at offset SLOT_SIZE), each with a sequence number
and a SHA-256 over its header fields and the state:

    magic "CIDBNVR\\0" (8) | format 2 u32 BE (4) | JSON length u32 BE (4) | SHA-256 (32) | sequence u64 BE (8)

A write goes to the slot that does not hold the newest valid record (a damaged or empty slot
first, else the older one), with the next sequence number; a read takes the valid record with the
highest sequence. A torn or garbled write therefore damages only the slot being written, and the
other still holds the state as it was before that write.

An all-zero header is an empty slot; both empty is a fresh device (first boot: the state starts
from the trust anchor). A slot that is neither empty nor valid is damaged. When no slot is valid
and at least one is damaged, the device is refused with NvramError saying what to do: resetting
silently would hand an attacker who can scribble on the disk a rollback to any old, signed,
vulnerable manifest. (A damaged slot beside a valid one is only reported: it is what a torn
write looks like, and the next write repairs it.)

Migration: format 1, the single record this module wrote before (a 48-byte header without a
sequence, at offset 0), is read as slot A with sequence 0; the next write goes to slot B.
"""

from __future__ import annotations

import hashlib
import os
import struct
from pathlib import Path

from cidboot.errors import CidbootError, FormatError
from cidboot.trust.manifest import RootOfTrust, TrustState

DEFAULT_DEVICE = "/dev/vda"
MAGIC = b"CIDBNVR\0"
FORMAT_VERSION = 2
LEGACY_VERSION = 1  # the single-record format: read, never written
HEADER = struct.Struct(">8sII32sQ")
LEGACY_HEADER = struct.Struct(">8sII32s")
MAX_STATE = 64 * 1024  # a root and a handful of versions are well under 1 KiB
SLOT_SIZE = 128 * 1024  # >= HEADER.size + MAX_STATE; slot B starts here
SLOTS = ("A", "B")
RECOVERY = ("the device cannot tell which manifests it already booted, so it boots nothing: restore this "
            "NVRAM from a backup, or re-provision the device (erasing the NVRAM with physical access "
            "resets rollback protection to the trust anchor)")


class NvramError(CidbootError):
    """The NVRAM cannot be read or written, or its content is damaged (the message names the device)."""


def _digest(version: int, length: int, seq: int, payload: bytes) -> bytes:
    return hashlib.sha256(MAGIC + struct.pack(">IIQ", version, length, seq) + payload).digest()


def encode_record(payload: bytes, seq: int = 1) -> bytes:
    """Header + payload, as written at the start of a slot."""
    if len(payload) > MAX_STATE:
        raise NvramError(f"trust state of {len(payload)} bytes exceeds {MAX_STATE}")
    if not 0 <= seq < 1 << 64:
        raise NvramError(f"sequence number {seq} out of range")
    return HEADER.pack(MAGIC, FORMAT_VERSION, len(payload), _digest(FORMAT_VERSION, len(payload), seq, payload),
                       seq) + payload


class Slot:
    """One slot as read: `payload` None with `error` None is empty; `error` set is damaged. A plain
    record (a frozen dataclass costs ~3 M guest instructions at the bootstrap's import)."""

    __slots__ = ("name", "seq", "payload", "error")

    def __init__(self, name: str, seq: int = -1, payload: bytes | None = None, error: str | None = None) -> None:
        self.name = name
        self.seq = seq
        self.payload = payload
        self.error = error

    def __repr__(self) -> str:
        return f"Slot({self.name!r}, seq={self.seq}, payload={'None' if self.payload is None else len(self.payload)}, error={self.error!r})"

    @property
    def valid(self) -> bool:
        return self.payload is not None

    @property
    def empty(self) -> bool:
        return self.payload is None and self.error is None


def decode_slot(raw: bytes, name: str = "A") -> Slot:
    """Parse one slot's bytes (format 2, or format 1 read as sequence 0)."""
    if len(raw) < LEGACY_HEADER.size:
        return Slot(name, error=f"slot {name} is {len(raw)} bytes, smaller than the {LEGACY_HEADER.size}-byte header")
    if raw[:HEADER.size] == bytes(HEADER.size) or (len(raw) < HEADER.size and not any(raw)):
        return Slot(name)
    magic, version, length, digest = LEGACY_HEADER.unpack(raw[:LEGACY_HEADER.size])
    if magic != MAGIC:
        return Slot(name, error=f"slot {name}: not cidboot rollback state (magic {magic!r})")
    if version == LEGACY_VERSION:
        start, seq, want = LEGACY_HEADER.size, 0, None
    elif version == FORMAT_VERSION:
        if len(raw) < HEADER.size:
            return Slot(name, error=f"slot {name}: header cut short")
        start, seq = HEADER.size, HEADER.unpack(raw[:HEADER.size])[4]
        want = digest
    else:
        return Slot(name, error=f"slot {name}: rollback state format {version}, this bootstrap reads "
                                f"{LEGACY_VERSION} and {FORMAT_VERSION}")
    if length > MAX_STATE or start + length > len(raw):
        return Slot(name, error=f"slot {name}: rollback state length {length} is out of range")
    payload = raw[start:start + length]
    ok = (hashlib.sha256(payload).digest() == digest if want is None
          else _digest(version, length, seq, payload) == want)
    if not ok:
        return Slot(name, error=f"slot {name}: rollback state checksum mismatch (corrupted)")
    return Slot(name, seq, payload)


def decode_record(raw: bytes, where: str) -> bytes | None:
    """One record's payload, or None for an empty (all-zero) one; NvramError for anything damaged."""
    slot = decode_slot(raw, "A")
    if slot.error is not None:
        raise NvramError(f"{where}: {slot.error}; refusing to reset it")
    return slot.payload


def choose(slots: list[Slot], where: str) -> tuple[Slot | None, list[str]]:
    """The slot to read (None: fresh device) and notes on damaged slots beside a valid one.
    NvramError when no slot is valid but one is damaged, or two valid slots share a sequence."""
    valid = [s for s in slots if s.valid]
    damaged = [s for s in slots if s.error is not None]
    if not valid:
        if not damaged:
            return None, []
        problems = "; ".join(s.error for s in damaged if s.error)
        raise NvramError(f"{where}: no valid rollback state ({problems}); refusing to reset it: {RECOVERY}")
    best = max(valid, key=lambda s: s.seq)
    if sum(1 for s in valid if s.seq == best.seq) > 1:
        raise NvramError(f"{where}: both rollback state slots claim sequence {best.seq}; refusing to guess: {RECOVERY}")
    notes = [f"{where}: {s.error}; using slot {best.name} (sequence {best.seq}), the next write repairs it"
             for s in damaged]
    return best, notes


class Nvram:
    """One device (or a regular file standing in for it in tests). Never truncated or created:
    a missing device is an error, since booting without rollback state would disable the check.
    `notes` collects what the last read found damaged but could work around (for the log)."""

    def __init__(self, path: str | os.PathLike[str] = DEFAULT_DEVICE) -> None:
        self.path = Path(path)
        self.notes: list[str] = []

    def _slots(self) -> list[Slot]:
        try:
            with open(self.path, "rb", buffering=0) as f:
                raw = [f.read(SLOT_SIZE), f.read(SLOT_SIZE)]
        except OSError as e:
            raise NvramError(f"{self.path}: cannot read rollback state: {e.strerror or e}") from None
        if len(raw[0]) < LEGACY_HEADER.size:
            raise NvramError(f"{self.path}: device is {len(raw[0])} bytes, smaller than the "
                             f"{LEGACY_HEADER.size}-byte header")
        # a device too small for slot B (or a format-1 device cut short) has B empty
        # (an all-zero test by comparison: any() over 128 KiB walks it byte by byte, ~10 ms under TCG)
        return [decode_slot(raw[0], "A"), decode_slot(raw[1], "B") if raw[1] != bytes(len(raw[1])) else Slot("B")]

    def read(self) -> bytes | None:
        """The newest valid state's bytes, or None on a fresh device."""
        best, self.notes = choose(self._slots(), str(self.path))
        return None if best is None else best.payload

    def write(self, payload: bytes) -> None:
        """Write `payload` to the slot not holding the newest valid record, with the next sequence.
        Only that slot changes, so a write cut short leaves the other (the previous state) intact."""
        if not self.path.exists():
            raise NvramError(f"{self.path}: cannot write rollback state: no such device")
        slots = self._slots()
        valid = [s for s in slots if s.valid]
        newest = max(valid, key=lambda s: s.seq) if valid else None
        target = 1 if newest is not None and newest.name == "A" else 0
        record = encode_record(payload, (newest.seq + 1) if newest is not None else 1)
        try:
            fd = os.open(self.path, os.O_WRONLY)  # no O_TRUNC/O_CREAT: a block device, not a file to make
            try:
                size = os.lseek(fd, 0, os.SEEK_END)
                if target * SLOT_SIZE + len(record) > size:
                    raise NvramError(f"{self.path}: device of {size} bytes cannot hold slot {SLOTS[target]} "
                                     f"({len(record)} bytes at offset {target * SLOT_SIZE})")
                os.pwrite(fd, record, target * SLOT_SIZE)
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
