"""Raw 32-byte Ed25519/X25519 key bytes through the API every cryptography release since 2.5 has.

`public_bytes_raw()` / `private_bytes_raw()` appeared in cryptography 40; a guest may run Debian's
python3-cryptography (bookworm: 38.0.4, linked against the system libssl3, as
examples/hello/flow-small.yaml does for a smaller L1: docs/images.md, "One OpenSSL"), the host
and the stage flows the pinned wheel. `public_bytes(Encoding.Raw,
PublicFormat.Raw)` gives the same bytes in both, and its enums come from
`cryptography.hazmat.primitives._serialization`, which the ed25519 and x25519 modules import
themselves in 38 and 48: no `serialization` package (and its SSH module) at a stage's start.
"""

from __future__ import annotations

from typing import Protocol

from cryptography.hazmat.primitives import _serialization as _ser


class _RawPublic(Protocol):
    def public_bytes(self, encoding: _ser.Encoding, format: _ser.PublicFormat) -> bytes: ...


class _RawPrivate(Protocol):
    def private_bytes(self, encoding: _ser.Encoding, format: _ser.PrivateFormat,
                      encryption_algorithm: _ser.KeySerializationEncryption) -> bytes: ...


def public_raw(key: _RawPublic) -> bytes:
    """An Ed25519 or X25519 public key's 32 bytes."""
    return key.public_bytes(_ser.Encoding.Raw, _ser.PublicFormat.Raw)


def private_raw(key: _RawPrivate) -> bytes:
    """An Ed25519 or X25519 private key's 32 bytes (unencrypted)."""
    return key.private_bytes(_ser.Encoding.Raw, _ser.PrivateFormat.Raw, _ser.NoEncryption())
