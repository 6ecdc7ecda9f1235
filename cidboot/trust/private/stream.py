"""Layer encryption: age's STREAM construction, byte for byte (age-encryption.org/v1, "Payload").

The construction is the STREAM online authenticated encryption of Hoang, Reyhanitabar, Rogaway and
Vizár ("Online Authenticated-Encryption and its Nonce-Reuse Misuse-Resistance", CRYPTO 2015), as
age instantiates it:

- the plaintext is cut into chunks of exactly 64 KiB; the last chunk holds 1..64 KiB, or is the
  one empty chunk of an empty plaintext (a non-final chunk is never short and a final chunk is
  never empty otherwise, so every plaintext has exactly one encoding);
- chunk i is sealed with ChaCha20-Poly1305 (RFC 8439) under the stream key, with the 12-byte nonce
  = i as an 11-byte big-endian counter || 0x01 for the last chunk, 0x00 otherwise; no associated
  data; each sealed chunk is its ciphertext followed by its 16-byte tag;
- the stream is the sealed chunks back to back, nothing else (age puts a 16-byte nonce in front
  to derive the payload key; our layer keys are derived per plaintext, `keys.layer_key`, so the
  stream carries no nonce of its own).

The counter in the nonce makes reordering fail, the last-chunk flag makes truncation at a chunk
boundary and data after the end fail, and a key per stream makes chunks of another layer fail.
Decryption releases a chunk's plaintext only after its tag verified, and holds at most two
sealed chunks in memory. Every failure has its own exception naming the chunk index; when a chunk
fails, `decrypt_chunks` finds out why (a few trial decryptions, on the failure path only).

Tested against C2SP/CCTV's age test vectors (tests/vectors/age-stream/README.md).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

from cidboot.errors import FormatError, VerificationError

NAME = "age STREAM (ChaCha20-Poly1305, 64 KiB chunks)"
KEY_SIZE = 32
CHUNK_SIZE = 64 * 1024
TAG_SIZE = 16
SEALED_CHUNK_SIZE = CHUNK_SIZE + TAG_SIZE
MAX_CHUNKS = 1 << 88  # the 11-byte counter
REORDER_SEARCH = 1024  # chunk positions (64 MiB) tried to name a misplaced chunk (failure path only)


class StreamFormatError(FormatError):
    """The ciphertext does not have the shape of a STREAM (`index`: the chunk where it broke)."""

    def __init__(self, message: str, index: int) -> None:
        super().__init__(message)
        self.index = index


class EmptyStreamError(StreamFormatError):
    """No chunk at all: even an empty plaintext is one sealed (empty) final chunk of 16 bytes."""


class ShortChunkError(StreamFormatError):
    """The last sealed chunk is shorter than a tag: cut inside the tag of a chunk."""


class EmptyFinalChunkError(StreamFormatError):
    """A final chunk that is empty after non-empty chunks: a second encoding of the same plaintext."""


class StreamVerificationError(VerificationError):
    """A chunk did not authenticate where it stands (`index`: that chunk)."""

    def __init__(self, message: str, index: int) -> None:
        super().__init__(message)
        self.index = index


class ChunkTamperedError(StreamVerificationError):
    """The chunk authenticates nowhere: a changed byte (or a chunk of a stream we have no key for)."""


class ChunkReorderedError(StreamVerificationError):
    """The chunk at `index` is chunk `found` of this very stream: chunks were moved."""

    def __init__(self, message: str, index: int, found: int) -> None:
        super().__init__(message, index)
        self.found = found


class ForeignChunkError(StreamVerificationError):
    """The chunk at `index` belongs to another stream (`stream`: which of the `other_keys`)."""

    def __init__(self, message: str, index: int, stream: str, found: int) -> None:
        super().__init__(message, index)
        self.stream, self.found = stream, found


class TruncatedStreamError(StreamVerificationError):
    """The stream ends before chunk `index`: its last chunk is not the final one, chunks were cut off."""


def _trailing(final: int) -> TrailingDataError:
    return TrailingDataError(f"chunk {final} is the final chunk but data follows it: extra chunk {final + 1}", final + 1)


def _truncated(index: int) -> TruncatedStreamError:
    return TruncatedStreamError(f"stream ends before chunk {index}: chunk {index - 1} is not the final chunk", index)


class TrailingDataError(StreamVerificationError):
    """Data follows the final chunk: `index` is the position of the first extra chunk."""


def nonce(index: int, last: bool) -> bytes:
    """The 12-byte nonce of chunk `index`: 11-byte big-endian counter || last-chunk flag."""
    if not 0 <= index < MAX_CHUNKS:
        raise StreamFormatError(f"chunk counter {index} out of range", index)
    return index.to_bytes(11, "big") + (b"\x01" if last else b"\x00")


def chunk_count(plaintext_size: int) -> int:
    """How many chunks a plaintext of this size has (an empty plaintext has one, empty)."""
    if plaintext_size < 0:
        raise ValueError("negative size")
    return max(1, -(-plaintext_size // CHUNK_SIZE))


def ciphertext_size(plaintext_size: int) -> int:
    """The exact size of the stream for a plaintext of `plaintext_size` bytes."""
    return plaintext_size + TAG_SIZE * chunk_count(plaintext_size)


def _aead(key: bytes) -> ChaCha20Poly1305:
    if not isinstance(key, bytes) or len(key) != KEY_SIZE:
        raise ValueError(f"a STREAM key is {KEY_SIZE} bytes")
    return ChaCha20Poly1305(key)


def _rechunk(pieces: Iterable[bytes], size: int) -> Iterator[tuple[bytes, bool]]:
    """(chunk, is_last) over `pieces` cut into `size`-byte chunks: a chunk is given out only once
    more data is known to follow it, so the flag is right; the last one has 0..size bytes. Holds
    at most size + 1 bytes besides the piece being cut (a whole layer given as one piece is
    sliced, not copied)."""
    buf = bytearray()
    for piece in pieces:
        mv = memoryview(piece)
        while len(mv):
            if not buf and len(mv) > size:
                yield bytes(mv[:size]), False
                mv = mv[size:]
                continue
            take = min(len(mv), size + 1 - len(buf))
            buf += mv[:take]
            mv = mv[take:]
            if len(buf) > size:
                yield bytes(buf[:size]), False
                del buf[:size]
    yield bytes(buf), True


def encrypt_chunks(key: bytes, pieces: Iterable[bytes]) -> Iterator[bytes]:
    """The sealed chunks of the plaintext given as `pieces` (any sizes), in order, streaming."""
    aead = _aead(key)
    for i, (chunk, last) in enumerate(_rechunk(pieces, CHUNK_SIZE)):
        yield aead.encrypt(nonce(i, last), chunk, None)


def encrypt(key: bytes, plaintext: bytes) -> bytes:
    return b"".join(encrypt_chunks(key, [plaintext]))


def decrypt_chunks(key: bytes, pieces: Iterable[bytes], *, other_keys: Mapping[str, bytes] | None = None,
                   search: int = REORDER_SEARCH, size: int | None = None) -> Iterator[bytes]:
    """The plaintext chunks of the stream given as `pieces` (any sizes), each released only after
    its tag verified; raises a `StreamFormatError`/`StreamVerificationError` naming the chunk.

    `other_keys` (name -> key of the other layers of the same image, when known): a chunk that
    fails here is tried under them so that a swap between layers is named as such. `search`: how
    many chunk positions are tried to name a misplaced chunk (give the layer's chunk count).
    `size`: the stream's size when known (the manifest's layer size): more data is refused as
    trailing data before it is decrypted, less as a truncation; without it, data glued to a short
    final chunk can only be named as a changed chunk."""
    aead = _aead(key)
    if size is not None:
        pieces = _exactly(pieces, size)
    nonempty = False
    for i, (sealed, last) in enumerate(_rechunk(pieces, SEALED_CHUNK_SIZE)):
        if i == 0 and last and not sealed:  # _rechunk's last piece is empty only for empty input
            raise EmptyStreamError("empty ciphertext: no chunk at all (an empty plaintext is one 16-byte chunk)", 0)
        if len(sealed) < TAG_SIZE:
            raise ShortChunkError(f"chunk {i}: {len(sealed)} bytes, shorter than its {TAG_SIZE}-byte tag", i)
        try:
            plain = aead.decrypt(nonce(i, last), sealed, None)
        except InvalidTag:
            if len(sealed) == SEALED_CHUNK_SIZE:
                # a full chunk may carry the other flag: a whole non-final chunk at the end (cut
                # off after it) or a full final chunk with data after it. It authenticated where
                # it stands, so release it as age does, then report what is wrong after it.
                try:
                    early = aead.decrypt(nonce(i, not last), sealed, None)
                except InvalidTag:
                    pass
                else:
                    yield early
                    raise (_truncated(i + 1) if last else _trailing(i)) from None
            raise _diagnose(aead, sealed, i, last, other_keys or {}, search) from None
        if last and not plain and nonempty:
            raise EmptyFinalChunkError(f"chunk {i}: an empty final chunk after non-empty chunks", i)
        nonempty = nonempty or bool(plain)
        yield plain


def decrypt(key: bytes, ciphertext: bytes, *, other_keys: Mapping[str, bytes] | None = None,
            size: int | None = None) -> bytes:
    n = len(ciphertext) // SEALED_CHUNK_SIZE + 1
    return b"".join(decrypt_chunks(key, [ciphertext], other_keys=other_keys, search=n, size=size))


def _exactly(pieces: Iterable[bytes], size: int) -> Iterator[bytes]:
    seen = 0
    for piece in pieces:
        seen += len(piece)
        if seen > size:
            raise TrailingDataError(f"more than the expected {size} bytes: data after the final chunk "
                                    f"{-(-size // SEALED_CHUNK_SIZE) - 1}", -(-size // SEALED_CHUNK_SIZE))
        yield piece
    if seen < size:
        raise TruncatedStreamError(f"{seen} of the expected {size} bytes: the stream ends inside or before chunk "
                                   f"{seen // SEALED_CHUNK_SIZE}", seen // SEALED_CHUNK_SIZE)


def _opens(aead: ChaCha20Poly1305, sealed: bytes, index: int, last: bool) -> bool:
    try:
        aead.decrypt(nonce(index, last), sealed, None)
        return True
    except InvalidTag:
        return False


def _diagnose(aead: ChaCha20Poly1305, sealed: bytes, i: int, last: bool,
              other_keys: Mapping[str, bytes], search: int) -> StreamVerificationError:
    """Why chunk `i` does not open as (i, last): trial decryptions, most likely cause first."""
    if _opens(aead, sealed, i, not last):
        return _truncated(i + 1) if last else _trailing(i)
    span = range(min(max(i + 2, search), MAX_CHUNKS))
    for j in span:
        if j != i and (_opens(aead, sealed, j, False) or _opens(aead, sealed, j, True)):
            return ChunkReorderedError(f"chunk {i} is chunk {j} of this stream: chunks were reordered", i, j)
    for name, other in other_keys.items():
        foreign = _aead(other)
        for j in span:
            if _opens(foreign, sealed, j, False) or _opens(foreign, sealed, j, True):
                return ForeignChunkError(f"chunk {i} is chunk {j} of {name}: a chunk of another layer", i, name, j)
    return ChunkTamperedError(f"chunk {i} does not authenticate: altered (or not of this layer)", i)
