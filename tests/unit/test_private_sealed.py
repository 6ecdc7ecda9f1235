"""Values sealed to the flow owner (cidboot.trust.private.sealed): the age format with X25519
recipients, checked on C2SP/CCTV's age vectors for X25519, stanzas, header MAC and version."""

from __future__ import annotations

import hashlib
import os
import zlib
from pathlib import Path

import pytest

from cidboot.errors import FormatError, VerificationError
from cidboot.trust.private import sealed, stream
from cidboot.trust.private.sealed import HeaderMacError, Identity, NoMatchingIdentity, SealedFormatError

VECTORS = Path(__file__).parent.parent / "vectors" / "age-x25519"
FILES = sorted(p for p in VECTORS.iterdir() if p.name != "README.md")
EXPECT = {"header failure": SealedFormatError, "no match": NoMatchingIdentity, "HMAC failure": HeaderMacError}


def _load(path: Path) -> tuple[dict[str, list[str]], bytes]:
    head, _, body = path.read_bytes().partition(b"\n\n")
    meta: dict[str, list[str]] = {}
    for line in head.decode().splitlines():
        k, v = line.split(": ", 1)
        meta.setdefault(k, []).append(v)
    if meta.get("compressed") == ["zlib"]:
        body = zlib.decompress(body)
    return meta, body


def test_vectors_present() -> None:
    assert len(FILES) == 38


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.name)
def test_age_vector(path: Path) -> None:
    meta, data = _load(path)
    ids = [Identity.parse(i) for i in meta["identity"]]
    expect = meta["expect"][0]
    if expect == "success":
        plain = sealed.open_sealed(ids, data)
        assert hashlib.sha256(plain).hexdigest() == meta["payload"][0]
    else:
        with pytest.raises(EXPECT[expect]):
            sealed.open_sealed(ids, data)


def test_roundtrip_and_keys() -> None:
    owner, other = Identity.generate(), Identity.generate()
    assert Identity.parse(str(owner)).recipient == owner.recipient
    rcpt = sealed.parse_recipient(owner.recipient)
    value = os.urandom(100_000)
    box = sealed.seal([rcpt], value)
    assert sealed.open_sealed([owner], box) == value
    assert sealed.open_sealed([other, owner], sealed.seal([sealed.parse_recipient(other.recipient), rcpt], b"x")) == b"x"
    with pytest.raises(NoMatchingIdentity):
        sealed.open_sealed([other], box)
    with pytest.raises(stream.TruncatedStreamError):
        sealed.open_sealed([owner], box[:-(len(value) % stream.CHUNK_SIZE + 16)])
    with pytest.raises(SealedFormatError):
        Identity.parse(owner.recipient)
    assert issubclass(SealedFormatError, FormatError) and issubclass(HeaderMacError, VerificationError)
