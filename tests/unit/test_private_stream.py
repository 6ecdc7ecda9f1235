"""The layer encryption construction (cidboot.trust.private.stream): age's STREAM against the
C2SP/CCTV age vectors, then every way a stream can be damaged, each with its own error."""

from __future__ import annotations

import hashlib
import os
import zlib
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from hypothesis import given, settings
from hypothesis import strategies as st

from cidboot.errors import FormatError, VerificationError
from cidboot.trust.private import stream
from cidboot.trust.private.stream import (
    CHUNK_SIZE,
    SEALED_CHUNK_SIZE,
    ChunkReorderedError,
    ChunkTamperedError,
    EmptyFinalChunkError,
    EmptyStreamError,
    ForeignChunkError,
    ShortChunkError,
    StreamFormatError,
    StreamVerificationError,
    TrailingDataError,
    TruncatedStreamError,
)

VECTORS = Path(__file__).parent.parent / "vectors" / "age-stream"


def _load(path: Path) -> tuple[dict[str, str], bytes | None, bytes]:
    """(header, payload key or None when the file has no full payload nonce, STREAM payload)."""
    raw = path.read_bytes()
    head, _, body = raw.partition(b"\n\n")
    meta = dict(line.split(": ", 1) for line in head.decode().splitlines())
    if meta.get("compressed") == "zlib":
        body = zlib.decompress(body)
    end = body.index(b"\n--- ")
    after = body[body.index(b"\n", end + 1) + 1:]
    nonce, payload = after[:16], after[16:]
    if len(nonce) < 16:
        return meta, None, b""
    key = HKDF(hashes.SHA256(), 32, salt=nonce, info=b"payload").derive(bytes.fromhex(meta["file key"]))
    return meta, key, payload


def _released(key: bytes, payload: bytes, piece: int) -> tuple[bytes, Exception | None]:
    out = bytearray()
    pieces = [payload[i:i + piece] for i in range(0, len(payload), piece)]
    try:
        for chunk in stream.decrypt_chunks(key, pieces, search=4):
            out += chunk
    except (StreamFormatError, StreamVerificationError) as e:
        return bytes(out), e
    return bytes(out), None


VECTOR_FILES = sorted(p for p in VECTORS.glob("stream_*"))


def test_the_vectors_are_there() -> None:
    assert len(VECTOR_FILES) == 28


@pytest.mark.parametrize("path", VECTOR_FILES, ids=lambda p: p.name)
def test_age_vector(path: Path) -> None:
    meta, key, payload = _load(path)
    if meta["expect"] == "header failure":
        assert key is None  # no (full) payload nonce: the file fails before STREAM starts
        return
    assert key is not None
    for piece in (len(payload) or 1, 1000, SEALED_CHUNK_SIZE + 7):  # any cut of the input
        plain, err = _released(key, payload, piece)
        assert hashlib.sha256(plain).hexdigest() == meta["payload"]
        if meta["expect"] == "success":
            assert err is None
            assert stream.encrypt(key, plain) == payload  # one encoding per plaintext
        else:
            assert meta["expect"] == "payload failure"
            assert err is not None


def test_vector_failures_are_named() -> None:
    """What each age failure vector is, in our terms."""
    want = {
        "stream_bad_tag": ChunkTamperedError, "stream_bad_tag_second_chunk": ChunkTamperedError,
        "stream_no_chunks": EmptyStreamError, "stream_missing_tag": ShortChunkError,
        "stream_short_chunk": ShortChunkError, "stream_no_final": TruncatedStreamError,
        "stream_no_final_two_chunks": TruncatedStreamError, "stream_last_chunk_empty": EmptyFinalChunkError,
        "stream_trailing_garbage_short": TrailingDataError, "stream_two_final_chunks": TrailingDataError,
    }
    for name, typ in want.items():
        _, key, payload = _load(VECTORS / name)
        assert key is not None
        _, err = _released(key, payload, len(payload) or 1)
        assert type(err) is typ, (name, err)


KEY, OTHER = bytes(range(32)), bytes(range(1, 33))
DATA = os.urandom(3 * CHUNK_SIZE + 100)  # four chunks
CT = stream.encrypt(KEY, DATA)


def _chunks(ct: bytes) -> list[bytes]:
    return [ct[i:i + SEALED_CHUNK_SIZE] for i in range(0, len(ct), SEALED_CHUNK_SIZE)]


def test_roundtrip_sizes_and_streaming() -> None:
    for n in (0, 1, CHUNK_SIZE - 1, CHUNK_SIZE, CHUNK_SIZE + 1, 2 * CHUNK_SIZE):
        data = os.urandom(n)
        ct = stream.encrypt(KEY, data)
        assert len(ct) == stream.ciphertext_size(n)
        assert stream.decrypt(KEY, ct) == data
    pieces = [DATA[i:i + 777] for i in range(0, len(DATA), 777)]
    assert b"".join(stream.encrypt_chunks(KEY, pieces)) == CT
    released = list(stream.decrypt_chunks(KEY, (CT[i:i + 999] for i in range(0, len(CT), 999))))
    assert [len(c) for c in released] == [CHUNK_SIZE] * 3 + [100]  # one chunk at a time


def test_flipped_byte() -> None:
    for at in (5, SEALED_CHUNK_SIZE + 9, len(CT) - 1):
        bad = bytearray(CT)
        bad[at] ^= 1
        with pytest.raises(ChunkTamperedError) as e:
            stream.decrypt(KEY, bytes(bad))
        assert e.value.index == at // SEALED_CHUNK_SIZE
        assert isinstance(e.value, VerificationError)


def test_reordered_chunks() -> None:
    c = _chunks(CT)
    with pytest.raises(ChunkReorderedError) as e:
        stream.decrypt(KEY, c[0] + c[2] + c[1] + c[3])
    assert (e.value.index, e.value.found) == (1, 2)


def test_chunk_swapped_in_from_another_layer() -> None:
    other = _chunks(stream.encrypt(OTHER, os.urandom(3 * CHUNK_SIZE)))
    c = _chunks(CT)
    spliced = c[0] + other[1] + c[2] + c[3]
    with pytest.raises(ForeignChunkError) as e:
        stream.decrypt(KEY, spliced, other_keys={"layer 2 (runtime)": OTHER})
    assert (e.value.index, e.value.stream, e.value.found) == (1, "layer 2 (runtime)", 1)
    with pytest.raises(ChunkTamperedError):  # without the other key it cannot be told from a change
        stream.decrypt(KEY, spliced)


def test_truncated() -> None:
    c = _chunks(CT)
    with pytest.raises(TruncatedStreamError) as e:
        stream.decrypt(KEY, c[0] + c[1])
    assert e.value.index == 2  # the first missing chunk
    released = []
    with pytest.raises(TruncatedStreamError):
        for chunk in stream.decrypt_chunks(KEY, [c[0] + c[1]]):
            released.append(chunk)
    assert b"".join(released) == DATA[:2 * CHUNK_SIZE]  # both authenticated where they stand
    with pytest.raises(ChunkTamperedError) as t:  # cut inside a chunk: its tag is gone
        stream.decrypt(KEY, CT[:-5])
    assert t.value.index == 3
    with pytest.raises(ShortChunkError) as s:  # cut inside the tag of the first byte of a chunk
        stream.decrypt(KEY, CT[:SEALED_CHUNK_SIZE + 3])
    assert s.value.index == 1


def test_empty_layer() -> None:
    with pytest.raises(EmptyStreamError) as e:
        stream.decrypt(KEY, b"")
    assert e.value.index == 0 and isinstance(e.value, FormatError)
    assert stream.decrypt(KEY, stream.encrypt(KEY, b"")) == b""  # an empty plaintext is one chunk


def test_extra_chunk_after_the_last() -> None:
    full = stream.encrypt(KEY, DATA[:2 * CHUNK_SIZE])  # the final chunk is full: a chunk boundary follows it
    extra = stream.encrypt(KEY, b"x")  # a valid final chunk 0 of the same key
    with pytest.raises(TrailingDataError) as e:
        stream.decrypt(KEY, full + extra)
    assert e.value.index == 2
    # after a short final chunk the extra bytes fall inside its window: with the expected size
    # (the manifest's) they are refused as trailing data, before anything is decrypted
    with pytest.raises(TrailingDataError) as e:
        stream.decrypt(KEY, CT + extra, size=len(CT))
    assert e.value.index == 4
    with pytest.raises(ChunkTamperedError):  # without it, all that can be said
        stream.decrypt(KEY, CT + b"\0")
    with pytest.raises(TruncatedStreamError) as t:
        stream.decrypt(KEY, CT[:-5], size=len(CT))
    assert t.value.index == 3


def test_wrong_key_sizes_are_refused() -> None:
    with pytest.raises(ValueError):
        stream.encrypt(b"short", b"")


def test_memory_is_bounded_whatever_the_pieces() -> None:
    """Decrypting 8 MiB given as one piece or as 1000-byte pieces holds a few chunks, not the layer."""
    import tracemalloc
    big = stream.encrypt(KEY, os.urandom(8 << 20))
    for pieces in ([big], (big[i:i + 1000] for i in range(0, len(big), 1000))):
        tracemalloc.start()
        try:
            for _ in stream.decrypt_chunks(KEY, pieces):
                pass
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert peak < 6 * SEALED_CHUNK_SIZE, peak


@given(pos=st.integers(0, len(CT) - 1), xor=st.integers(1, 255), cut=st.integers(0, 200))
@settings(max_examples=60, deadline=None)
def test_fuzz_damaged_streams_fail_with_a_stream_error(pos: int, xor: int, cut: int) -> None:
    bad = bytearray(CT)
    bad[pos] ^= xor
    damaged = bytes(bad[:len(bad) - cut])
    with pytest.raises((StreamFormatError, StreamVerificationError)):
        stream.decrypt(KEY, damaged)
