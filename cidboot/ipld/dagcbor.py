"""Strict DAG-CBOR: the one canonical encoding of manifests, flows and provenance nodes.

Because these objects are identified by the hash of their bytes, there must be exactly one
encoding of each value. `encode` produces it and `decode` refuses every other form instead of
normalising it: non-shortest integers and lengths, indefinite lengths, map keys that are not
strings or not in length-first canonical order, duplicate keys, tags other than 42 (CID links),
floats other than 64-bit or that are NaN/Infinity, simple values other than true/false/null,
invalid UTF-8 and trailing bytes. Depth and size are bounded so a hostile block cannot
exhaust the stack or memory.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Mapping, Sequence
from typing import Any

from cidboot.errors import FormatError
from cidboot.ipld.cid import CID, CIDError

DEFAULT_MAX_DEPTH = 64
DEFAULT_MAX_SIZE = 4 * 1024 * 1024
CID_TAG = 42


class DagCborError(FormatError):
    """Input is not strict, canonical DAG-CBOR (the message gives the byte offset)."""


# -- encoding -------------------------------------------------------------------------


def _head(major: int, n: int) -> bytes:
    mt = major << 5
    if n < 24:
        return bytes((mt | n,))
    if n < 0x100:
        return bytes((mt | 24, n))
    if n < 0x10000:
        return bytes((mt | 25,)) + n.to_bytes(2, "big")
    if n < 0x100000000:
        return bytes((mt | 26,)) + n.to_bytes(4, "big")
    if n < 0x10000000000000000:
        return bytes((mt | 27,)) + n.to_bytes(8, "big")
    raise DagCborError(f"integer {n} does not fit in 64 bits")


def _key_sort(k: bytes) -> tuple[int, bytes]:
    return (len(k), k)


def _encode(obj: Any, out: bytearray, depth: int) -> None:
    if depth > DEFAULT_MAX_DEPTH:
        raise DagCborError(f"value nested deeper than {DEFAULT_MAX_DEPTH}")
    if obj is None:
        out.append(0xF6)
    elif obj is True:
        out.append(0xF5)
    elif obj is False:
        out.append(0xF4)
    elif isinstance(obj, int):
        out += _head(0, obj) if obj >= 0 else _head(1, -1 - obj)
    elif isinstance(obj, bytes | bytearray | memoryview):
        b = bytes(obj)
        out += _head(2, len(b))
        out += b
    elif isinstance(obj, str):
        b = obj.encode("utf-8")
        out += _head(3, len(b))
        out += b
    elif isinstance(obj, CID):
        b = b"\x00" + bytes(obj)
        out += b"\xd8\x2a"
        out += _head(2, len(b))
        out += b
    elif isinstance(obj, float):
        if math.isnan(obj) or math.isinf(obj):
            raise DagCborError("NaN and Infinity are not allowed in DAG-CBOR")
        out.append(0xFB)
        out += struct.pack(">d", obj)
    elif isinstance(obj, Mapping):
        items = []
        for k, v in obj.items():
            if not isinstance(k, str):
                raise DagCborError(f"map keys must be strings, got {type(k).__name__}")
            items.append((k.encode("utf-8"), v))
        items.sort(key=lambda kv: _key_sort(kv[0]))
        out += _head(5, len(items))
        for kb, v in items:
            out += _head(3, len(kb))
            out += kb
            _encode(v, out, depth + 1)
    elif isinstance(obj, Sequence):
        out += _head(4, len(obj))
        for v in obj:
            _encode(v, out, depth + 1)
    else:
        raise DagCborError(f"cannot encode {type(obj).__name__} as DAG-CBOR")


def encode(obj: Any) -> bytes:
    """The canonical DAG-CBOR bytes of `obj` (dict, list, str, bytes, int, float, bool, None, CID)."""
    out = bytearray()
    _encode(obj, out, 0)
    return bytes(out)


def cid_of(obj: Any) -> CID:
    """The CIDv1 (dag-cbor, sha2-256) of `obj`'s canonical encoding."""
    from cidboot.ipld.cid import DAG_CBOR

    return CID.of(encode(obj), DAG_CBOR)


# -- decoding -------------------------------------------------------------------------


class _Decoder:
    __slots__ = ("buf", "pos", "max_depth")

    def __init__(self, buf: bytes, max_depth: int) -> None:
        self.buf = buf
        self.pos = 0
        self.max_depth = max_depth

    def fail(self, msg: str, at: int | None = None) -> DagCborError:
        return DagCborError(f"at byte {self.pos if at is None else at}: {msg}")

    def take(self, n: int) -> bytes:
        if n > len(self.buf) - self.pos:
            raise self.fail(f"truncated: need {n} bytes, {len(self.buf) - self.pos} left")
        b = self.buf[self.pos : self.pos + n]
        self.pos += n
        return b

    def head(self) -> tuple[int, int, int]:
        """Return (major type, additional info, argument) enforcing shortest form."""
        start = self.pos
        ib = self.take(1)[0]
        major, info = ib >> 5, ib & 0x1F
        if info < 24:
            return major, info, info
        if info == 31:
            raise self.fail("indefinite-length items are not allowed", start)
        if info > 27:
            raise self.fail(f"reserved additional information {info}", start)
        if major == 7:
            return major, info, 0
        size = 1 << (info - 24)
        n = int.from_bytes(self.take(size), "big")
        minimum = 24 if size == 1 else 1 << (8 * (size >> 1))
        if n < minimum:
            raise self.fail(f"integer or length {n} not in shortest form", start)
        return major, info, n

    def value(self, depth: int) -> Any:
        if depth > self.max_depth:
            raise self.fail(f"nesting deeper than {self.max_depth}")
        start = self.pos
        major, info, n = self.head()
        if major == 0:
            return n
        if major == 1:
            return -1 - n
        if major == 2:
            return self.take(n)
        if major == 3:
            raw = self.take(n)
            try:
                return raw.decode("utf-8")
            except UnicodeDecodeError:
                raise self.fail("string is not valid UTF-8", start) from None
        if major == 4:
            self._check_count(n, start)
            return [self.value(depth + 1) for _ in range(n)]
        if major == 5:
            self._check_count(n, start)
            out: dict[str, Any] = {}
            prev: bytes | None = None
            for _ in range(n):
                kstart = self.pos
                kmajor, _, klen = self.head()
                if kmajor != 3:
                    raise self.fail("map key is not a string", kstart)
                kraw = self.take(klen)
                try:
                    key = kraw.decode("utf-8")
                except UnicodeDecodeError:
                    raise self.fail("map key is not valid UTF-8", kstart) from None
                if prev is not None:
                    if kraw == prev:
                        raise self.fail(f"duplicate map key {key!r}", kstart)
                    if _key_sort(kraw) < _key_sort(prev):
                        raise self.fail(f"map key {key!r} out of canonical order", kstart)
                prev = kraw
                out[key] = self.value(depth + 1)
            return out
        if major == 6:
            if n != CID_TAG:
                raise self.fail(f"tag {n} is not allowed (only 42, CID)", start)
            bstart = self.pos
            bmajor, _, blen = self.head()
            if bmajor != 2:
                raise self.fail("tag 42 must wrap a byte string", bstart)
            raw = self.take(blen)
            if not raw or raw[0] != 0:
                raise self.fail("CID in tag 42 must start with the 0x00 multibase prefix", bstart)
            try:
                return CID.decode(raw[1:])
            except CIDError as e:
                raise self.fail(f"invalid CID in tag 42: {e}", bstart) from None
        # major 7
        if info == 20:
            return False
        if info == 21:
            return True
        if info == 22:
            return None
        if info == 27:
            (f,) = struct.unpack(">d", self.take(8))
            if math.isnan(f) or math.isinf(f):
                raise self.fail("NaN and Infinity are not allowed", start)
            return f
        if info in (25, 26):
            raise self.fail("floats must be 64-bit in DAG-CBOR", start)
        if info == 23:
            raise self.fail("'undefined' is not allowed", start)
        raise self.fail(f"simple value {info if info < 24 else n} is not allowed", start)

    def _check_count(self, n: int, start: int) -> None:
        # Every element takes at least one byte: a count larger than what is left is a lie
        # that would otherwise make us allocate before failing.
        if n > len(self.buf) - self.pos:
            raise self.fail(f"item count {n} exceeds remaining input", start)


def decode(data: bytes, *, max_depth: int = DEFAULT_MAX_DEPTH, max_size: int = DEFAULT_MAX_SIZE) -> Any:
    """Decode one strict DAG-CBOR value occupying all of `data`."""
    if not isinstance(data, bytes | bytearray | memoryview):
        raise DagCborError(f"expected bytes, got {type(data).__name__}")
    data = bytes(data)
    if len(data) > max_size:
        raise DagCborError(f"input of {len(data)} bytes exceeds the {max_size}-byte limit")
    if not data:
        raise DagCborError("empty input")
    d = _Decoder(data, max_depth)
    value = d.value(0)
    if d.pos != len(data):
        raise DagCborError(f"at byte {d.pos}: {len(data) - d.pos} trailing bytes after the value")
    return value
