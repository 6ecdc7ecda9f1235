"""Encrypted layers in the manifest model: `plaintext` = {sha256, size} beside the ciphertext CID,
strict decode, old manifests unchanged, and the image measurement taken over the plaintext."""

from __future__ import annotations

import hashlib
import time

import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519

from cidboot.ipld import dagcbor
from cidboot.ipld.cid import CID, RAW
from cidboot.trust.appraisal import reference_values
from cidboot.trust.manifest import Layer, Manifest, ManifestFormatError, Plaintext, RootOfTrust
from cidboot.trust.measure import image_code_hash, layer_identity
from cidboot.trust.private import keys

ROOT = RootOfTrust.from_public_keys([ed25519.Ed25519PrivateKey.generate().public_key()], 1)
SECRET = bytes(32)
PLAIN = b"operations: print('marker-7f3a')\n"
ENC = keys.encrypt_layer(SECRET, PLAIN, "operations")
ENC_LAYER = Layer(CID.of(ENC.ciphertext, RAW), len(ENC.ciphertext), "operations", Plaintext(ENC.sha256, ENC.size))
OLD_LAYER = Layer(CID.of(b"kernel", RAW), 6, "kernel")


def manifest(*layers: Layer) -> Manifest:
    return Manifest("private", 1, int(time.time()) + 3600, layers, ROOT)


def test_old_manifests_keep_their_bytes() -> None:
    """No `plaintext` key appears unless a layer is encrypted: same encoding, same CID as before."""
    m = manifest(OLD_LAYER)
    obj = dagcbor.decode(m.encode())
    assert set(obj["layers"][0]) == {"cid", "size", "role"}
    assert Manifest.from_obj(obj) == m and Manifest.from_obj(obj).encode() == m.encode()
    assert image_code_hash(m) == hashlib.sha512(bytes(OLD_LAYER.cid)).digest()  # unchanged measurement


def test_encrypted_layer_roundtrips() -> None:
    m = manifest(OLD_LAYER, ENC_LAYER)
    back = Manifest.from_obj(dagcbor.decode(m.encode()))
    assert back == m and back.layers[1].encrypted and back.layers[1].plaintext == Plaintext(ENC.sha256, ENC.size)


@pytest.mark.parametrize("plain, msg", [
    ("x", "plaintext must be a map"),
    ({"sha256": b"\0" * 32}, "missing 'size'"),
    ({"sha256": b"\0" * 31, "size": 1}, "sha256 must be 32 bytes"),
    ({"sha256": "00" * 32, "size": 1}, "wrong type"),
    ({"sha256": b"\0" * 32, "size": -1}, "non-negative"),
    ({"sha256": b"\0" * 32, "size": True}, "wrong type"),
    ({"sha256": b"\0" * 32, "size": 1, "key": b"k"}, "unknown keys"),
])
def test_strict_decode(plain: object, msg: str) -> None:
    obj = dagcbor.decode(manifest(ENC_LAYER).encode())
    obj["layers"][0]["plaintext"] = plain
    with pytest.raises(ManifestFormatError, match=msg):
        Manifest.from_obj(obj)


def test_ciphertext_size_must_match_the_plaintext_size() -> None:
    with pytest.raises(ManifestFormatError, match="cannot be the encryption"):
        manifest(Layer(ENC_LAYER.cid, ENC_LAYER.size + 1, "operations", ENC_LAYER.plaintext))


def test_measurement_uses_the_plaintext() -> None:
    m = manifest(OLD_LAYER, ENC_LAYER)
    assert layer_identity(ENC_LAYER) == bytes(CID.of(PLAIN, RAW))  # the plaintext's raw CID
    assert image_code_hash(m) == hashlib.sha512(bytes(OLD_LAYER.cid) + bytes(CID.of(PLAIN, RAW))).digest()
    # the same plaintext under another secret: other ciphertext CID, same measurement
    other = keys.encrypt_layer(bytes([1]) * 32, PLAIN, "operations")
    relayer = Layer(CID.of(other.ciphertext, RAW), len(other.ciphertext), "operations", Plaintext(other.sha256, other.size))
    assert relayer.cid != ENC_LAYER.cid
    assert image_code_hash(manifest(OLD_LAYER, relayer)) == image_code_hash(m)
    assert reference_values(m)["image"] == image_code_hash(m)
    # another plaintext: another measurement
    changed = Layer(ENC_LAYER.cid, ENC_LAYER.size, "operations", Plaintext(bytes(32), ENC.size))
    assert image_code_hash(manifest(OLD_LAYER, changed)) != image_code_hash(m)
