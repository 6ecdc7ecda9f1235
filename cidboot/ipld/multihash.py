"""Multihash: a digest tagged with the hash function that made it.

Verification is the point of content addressing, so `verify` is the one place a digest is
compared (in constant time) against data.
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass

from cidboot.errors import FormatError, VerificationError
from cidboot.ipld import varint

IDENTITY = 0x00
SHA2_256 = 0x12
SHA2_512 = 0x13

NAMES = {IDENTITY: "identity", SHA2_256: "sha2-256", SHA2_512: "sha2-512"}
_LENGTHS = {SHA2_256: 32, SHA2_512: 64}
MAX_IDENTITY = 128  # bytes inlined in an identity multihash (Kubo's limit)


class MultihashError(FormatError):
    """A multihash is malformed or uses a hash function we do not support."""


class DigestMismatch(VerificationError):
    """Data does not hash to the expected digest."""


def _digest(code: int, data: bytes | bytearray | memoryview) -> bytes:
    if code == SHA2_256:
        return hashlib.sha256(data).digest()
    if code == SHA2_512:
        return hashlib.sha512(data).digest()
    if code == IDENTITY:
        return bytes(data)
    raise MultihashError(f"unsupported hash function 0x{code:x}")


def hasher(code: int) -> hashlib._Hash:
    """A hashlib object for streaming digests (not for identity)."""
    if code == SHA2_256:
        return hashlib.sha256()
    if code == SHA2_512:
        return hashlib.sha512()
    raise MultihashError(f"no streaming hasher for hash function 0x{code:x}")


@dataclass(frozen=True, slots=True)
class Multihash:
    """A hash function code with its digest, checked for the code's length on construction."""

    code: int
    digest: bytes

    def __post_init__(self) -> None:
        if self.code not in NAMES:
            raise MultihashError(f"unsupported hash function 0x{self.code:x}")
        want = _LENGTHS.get(self.code)
        if want is not None and len(self.digest) != want:
            raise MultihashError(f"{NAMES[self.code]} digest must be {want} bytes, got {len(self.digest)}")
        if self.code == IDENTITY and len(self.digest) > MAX_IDENTITY:
            raise MultihashError(f"identity multihash longer than {MAX_IDENTITY} bytes")

    @property
    def name(self) -> str:
        return NAMES[self.code]

    @classmethod
    def of(cls, data: bytes, code: int = SHA2_256) -> Multihash:
        return cls(code, _digest(code, data))

    def encode(self) -> bytes:
        return varint.encode(self.code) + varint.encode(len(self.digest)) + self.digest

    @classmethod
    def read(cls, buf: bytes | memoryview, offset: int = 0) -> tuple[Multihash, int]:
        code, off = varint.decode(buf, offset)
        length, off = varint.decode(buf, off)
        end = off + length
        if end > len(buf):
            raise MultihashError(f"multihash digest truncated: needs {length} bytes, has {len(buf) - off}")
        return cls(code, bytes(buf[off:end])), end

    @classmethod
    def decode(cls, raw: bytes) -> Multihash:
        mh, end = cls.read(raw)
        if end != len(raw):
            raise MultihashError(f"{len(raw) - end} trailing bytes after multihash")
        return mh

    def matches(self, data: bytes | bytearray | memoryview) -> bool:
        return hmac.compare_digest(_digest(self.code, data), self.digest)

    def verify(self, data: bytes | bytearray | memoryview) -> None:
        if not self.matches(data):
            raise DigestMismatch(f"data does not match {self.name} digest {self.digest.hex()}")
