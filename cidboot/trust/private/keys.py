"""The per-flow secret and the layer keys derived from it (docs/privacy.md, "Keys").

    layer key = HKDF-SHA256(IKM  = the flow secret (32 bytes),
                            salt = SHA-256 of the layer's plaintext (32 bytes),
                            info = b"cidboot layer key v1" || 0x00 || the layer's role in ASCII,
                            L    = 32)

and the layer's ciphertext is `stream.encrypt(layer key, plaintext)` (age's STREAM, whose nonces
are the chunk counter). So the same flow, secret and layer give the same ciphertext and the same
CID (builds stay reproducible and unchanged layers are not stored twice), while a layer whose
bytes change gets an unrelated key. A key is only ever used for one plaintext, which is why the
fixed nonces are safe; what this reveals (that two versions share a layer) is in docs/privacy.md.

The secret is a file beside the signing keys (mode 0600, refused when others can read it); it
never enters an image. Whoever holds it can derive every layer key of the flow: the image
builder and the key broker.
"""

from __future__ import annotations

import hashlib
import os
import stat
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from cidboot.errors import FormatError, VerificationError
from cidboot.trust.private import stream

SECRET_SIZE = 32
KEY_INFO = b"cidboot layer key v1"
SECRET_HEADER = "cidboot-flow-secret-v1:"


class FlowSecretError(FormatError):
    """A flow secret file cannot be read or does not hold a 32-byte secret."""


class FlowSecretExposedError(VerificationError):
    """A flow secret file others may read: refused rather than trusted (the keys are as secret as it)."""


class PlaintextMismatchError(VerificationError):
    """A layer decrypted to bytes whose SHA-256 or size is not the manifest's plaintext value."""


def layer_key(secret: bytes, plaintext_sha256: bytes, role: str) -> bytes:
    """The key of the layer whose plaintext has this SHA-256, in this role (module docstring)."""
    if len(secret) != SECRET_SIZE:
        raise FlowSecretError(f"a flow secret is {SECRET_SIZE} bytes, got {len(secret)}")
    if len(plaintext_sha256) != 32:
        raise FormatError("a plaintext SHA-256 is 32 bytes")
    if not role.isascii() or not role:
        raise FormatError(f"layer role {role!r} must be non-empty ASCII")
    return HKDF(hashes.SHA256(), 32, salt=plaintext_sha256, info=KEY_INFO + b"\0" + role.encode()).derive(secret)


@dataclass(frozen=True)
class EncryptedLayer:
    ciphertext: bytes
    sha256: bytes  # of the plaintext
    size: int  # of the plaintext
    key: bytes


def encrypt_layer(secret: bytes, plaintext: bytes, role: str) -> EncryptedLayer:
    digest = hashlib.sha256(plaintext).digest()
    key = layer_key(secret, digest, role)
    return EncryptedLayer(stream.encrypt(key, plaintext), digest, len(plaintext), key)


def decrypt_layer(key: bytes, pieces: Iterable[bytes], *, sha256: bytes, size: int,
                  other_keys: dict[str, bytes] | None = None) -> Iterator[bytes]:
    """The plaintext chunks of an encrypted layer, streaming; after the last chunk the plaintext
    must have exactly `size` bytes and SHA-256 `sha256` (the signed manifest's), else
    `PlaintextMismatchError`. A caller uses the chunks only once the iterator has finished."""
    h, n = hashlib.sha256(), 0
    for chunk in stream.decrypt_chunks(key, pieces, other_keys=other_keys, search=stream.chunk_count(size) + 1,
                                       size=stream.ciphertext_size(size)):
        h.update(chunk)
        n += len(chunk)
        yield chunk
    if n != size or h.digest() != sha256:
        raise PlaintextMismatchError(f"layer decrypted to {n} bytes with SHA-256 {h.hexdigest()[:16]}..., "
                                     f"the manifest says {size} bytes, {sha256.hex()[:16]}...")


def generate_secret() -> bytes:
    return os.urandom(SECRET_SIZE)


def write_secret(path: str | os.PathLike[str], secret: bytes | None = None) -> bytes:
    """Create a flow secret file (never overwrites: losing the secret loses every layer key)."""
    secret = generate_secret() if secret is None else secret
    if len(secret) != SECRET_SIZE:
        raise FlowSecretError(f"a flow secret is {SECRET_SIZE} bytes")
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise FlowSecretError(f"{p} exists; refusing to overwrite a flow secret") from None
    with os.fdopen(fd, "w") as f:
        f.write(f"{SECRET_HEADER}{secret.hex()}\n")
    return secret


def load_secret(path: str | os.PathLike[str]) -> bytes:
    p = Path(path)
    try:
        st = p.stat()
        text = p.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise FlowSecretError(f"{p}: cannot read the flow secret: {e}") from None
    if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise FlowSecretExposedError(f"{p}: mode {stat.S_IMODE(st.st_mode):04o} lets others read the flow secret "
                                     f"(chmod 600 it, and consider it leaked)")
    line = text.strip()
    if not line.startswith(SECRET_HEADER):
        raise FlowSecretError(f"{p}: not a flow secret file (no {SECRET_HEADER!r} line)")
    try:
        secret = bytes.fromhex(line[len(SECRET_HEADER):])
    except ValueError:
        raise FlowSecretError(f"{p}: the flow secret is not hex") from None
    if len(secret) != SECRET_SIZE:
        raise FlowSecretError(f"{p}: a flow secret is {SECRET_SIZE} bytes, got {len(secret)}")
    return secret
