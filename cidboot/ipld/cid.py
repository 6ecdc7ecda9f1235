"""Content identifiers (CIDv0 and CIDv1): parse, format, and verify blocks against them.

A CID is the only thing a device trusts about a block it fetched: `CID.verify(data)` is where
that trust is checked. CIDv0 is the bare base58btc sha2-256 multihash that Kubo's default
`ipfs add` prints (always dag-pb); CIDv1 adds version and codec and prints as base32.
"""

from __future__ import annotations

from dataclasses import dataclass

from cidboot.errors import FormatError, VerificationError
from cidboot.ipld import multibase, varint
from cidboot.ipld.multihash import IDENTITY, SHA2_256, Multihash

DAG_PB = 0x70
RAW = 0x55
DAG_CBOR = 0x71
DAG_JSON = 0x0129
LIBP2P_KEY = 0x72

CODEC_NAMES = {DAG_PB: "dag-pb", RAW: "raw", DAG_CBOR: "dag-cbor", DAG_JSON: "dag-json", LIBP2P_KEY: "libp2p-key"}
CODECS_BY_NAME = {v: k for k, v in CODEC_NAMES.items()}


class CIDError(FormatError):
    """A CID string or binary CID is malformed or unsupported."""


class CIDMismatch(VerificationError):
    """A block's bytes do not hash to the CID it was fetched or stored under."""


@dataclass(frozen=True, slots=True)
class CID:
    """A content identifier: version, codec and multihash; `str()` is its canonical multibase form."""

    version: int
    codec: int
    multihash: Multihash

    def __post_init__(self) -> None:
        if self.version not in (0, 1):
            raise CIDError(f"unsupported CID version {self.version}")
        if self.version == 0 and (self.codec != DAG_PB or self.multihash.code != SHA2_256):
            raise CIDError("CIDv0 must be dag-pb with a sha2-256 multihash")
        if self.codec not in CODEC_NAMES:
            raise CIDError(f"unsupported codec 0x{self.codec:x}")

    # -- construction ------------------------------------------------------------------
    @classmethod
    def of(cls, data: bytes, codec: int = RAW, version: int = 1, hash_code: int = SHA2_256) -> CID:
        """The CID of a block: hash `data` and tag it with `codec`."""
        return cls(version, codec, Multihash.of(data, hash_code))

    @classmethod
    def parse(cls, value: str | bytes | CID) -> CID:
        """Parse a CID from its string form (any supported multibase) or binary form."""
        if isinstance(value, CID):
            return value
        if isinstance(value, bytes | bytearray | memoryview):
            return cls.decode(bytes(value))
        s = value.strip()
        if not s:
            raise CIDError("empty CID")
        if len(s) == 46 and s.startswith("Qm"):
            try:
                raw = multibase.b58decode(s)
            except FormatError as e:
                raise CIDError(f"invalid CIDv0 {s!r}: {e}") from None
            try:
                return cls(0, DAG_PB, Multihash.decode(raw))
            except FormatError as e:
                raise CIDError(f"invalid CIDv0 {s!r}: {e}") from None
        try:
            raw = multibase.decode(s)
        except FormatError as e:
            raise CIDError(f"invalid CID {s!r}: {e}") from None
        if raw[:1] == b"\x12":
            raise CIDError(f"invalid CID {s!r}: a CIDv0 must be written in base58btc")
        try:
            return cls.decode(raw)
        except CIDError as e:
            raise CIDError(f"invalid CID {s!r}: {e}") from None

    @classmethod
    def read(cls, buf: bytes | memoryview, offset: int = 0) -> tuple[CID, int]:
        """Read a binary CID starting at `offset`; return it and the offset after it."""
        try:
            if len(buf) - offset >= 34 and buf[offset] == 0x12 and buf[offset + 1] == 0x20:
                mh, end = Multihash.read(buf, offset)
                return cls(0, DAG_PB, mh), end
            version, off = varint.decode(buf, offset)
            if version != 1:
                raise CIDError(f"unsupported CID version {version}")
            codec, off = varint.decode(buf, off)
            mh, end = Multihash.read(buf, off)
            return cls(1, codec, mh), end
        except CIDError:
            raise
        except FormatError as e:
            raise CIDError(str(e)) from None

    @classmethod
    def decode(cls, raw: bytes) -> CID:
        if not raw:
            raise CIDError("empty binary CID")
        cid, end = cls.read(raw)
        if end != len(raw):
            raise CIDError(f"{len(raw) - end} trailing bytes after binary CID")
        return cid

    # -- output ------------------------------------------------------------------------
    def __bytes__(self) -> bytes:
        if self.version == 0:
            return self.multihash.encode()
        return varint.encode(1) + varint.encode(self.codec) + self.multihash.encode()

    @property
    def buffer(self) -> bytes:
        return bytes(self)

    def encode(self, base: str | None = None) -> str:
        if self.version == 0:
            if base not in (None, "base58btc"):
                raise CIDError("CIDv0 can only be written in base58btc")
            return multibase.b58encode(bytes(self))
        return multibase.encode(bytes(self), base or "base32")

    def __str__(self) -> str:
        return self.encode()

    def __repr__(self) -> str:
        return f"CID({self.encode()})"

    @property
    def codec_name(self) -> str:
        return CODEC_NAMES[self.codec]

    def to_v1(self) -> CID:
        return self if self.version == 1 else CID(1, self.codec, self.multihash)

    @property
    def is_identity(self) -> bool:
        return self.multihash.code == IDENTITY

    # -- verification --------------------------------------------------------------------
    def verify(self, data: bytes | bytearray | memoryview) -> None:
        """Raise CIDMismatch unless `data` (any buffer: the fetch client hashes views of its
        receive buffer) hashes to this CID's multihash."""
        if not self.multihash.matches(data):
            raise CIDMismatch(f"block does not match CID {self}")
