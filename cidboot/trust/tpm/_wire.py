"""A bounds-checked big/little-endian reader shared by the TPM parsers: every read says what it
was reading and where when the bytes run out, so a truncated structure gives a precise error of
the caller's type instead of an IndexError or struct.error."""

from __future__ import annotations

import struct

from cidboot.trust.tpm.errors import TpmFormatError


class Reader:
    """Reads fields from `data` at `pos`; raises `error` (a TpmFormatError subclass) on overrun."""

    def __init__(self, data: bytes, error: type[TpmFormatError], what: str, *, little: bool) -> None:
        self.data, self.pos, self.error, self.what = bytes(data), 0, error, what
        self._e = "<" if little else ">"

    def fail(self, why: str) -> TpmFormatError:
        return self.error(f"{self.what}: {why} (at offset {self.pos})")

    def take(self, n: int, field: str) -> bytes:
        if n < 0 or self.pos + n > len(self.data):
            raise self.fail(f"truncated {field}: needs {n} bytes, {len(self.data) - self.pos} left")
        out = self.data[self.pos:self.pos + n]
        self.pos += n
        return out

    def u8(self, field: str) -> int:
        return self.take(1, field)[0]

    def u16(self, field: str) -> int:
        return int(struct.unpack(self._e + "H", self.take(2, field))[0])

    def u32(self, field: str) -> int:
        return int(struct.unpack(self._e + "I", self.take(4, field))[0])

    def u64(self, field: str) -> int:
        return int(struct.unpack(self._e + "Q", self.take(8, field))[0])

    def tpm2b(self, field: str, limit: int) -> bytes:
        """A TPM2B_*: a u16 size, then that many bytes (at most `limit`, the structure's own maximum)."""
        n = self.u16(field + " size")
        if n > limit:
            raise self.fail(f"{field} of {n} bytes exceeds its maximum of {limit}")
        return self.take(n, field)

    @property
    def left(self) -> int:
        return len(self.data) - self.pos

    def end(self) -> None:
        if self.left:
            raise self.fail(f"{self.left} trailing bytes after the structure")
