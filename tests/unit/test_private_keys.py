"""Layer keys from the per-flow secret (cidboot.trust.private.keys): reproducible, per plaintext
and role, derived exactly as documented; the secret file is guarded."""

from __future__ import annotations

import hashlib
import hmac
import os
from pathlib import Path

import pytest

from cidboot.trust.private import keys, stream
from cidboot.trust.private.keys import FlowSecretError, FlowSecretExposedError, PlaintextMismatchError

SECRET = bytes(range(32))


def test_derivation_is_the_documented_hkdf() -> None:
    """RFC 5869 by hand (extract with the salt, one expand block): the docs' formula, not a re-call."""
    pt = b"operations layer"
    salt = hashlib.sha256(pt).digest()
    prk = hmac.new(salt, SECRET, hashlib.sha256).digest()
    okm = hmac.new(prk, b"cidboot layer key v1\x00operations" + b"\x01", hashlib.sha256).digest()
    assert keys.layer_key(SECRET, salt, "operations") == okm


def test_same_flow_same_ciphertext_changed_layer_new_key() -> None:
    a = keys.encrypt_layer(SECRET, b"hello world", "operations")
    assert a == keys.encrypt_layer(SECRET, b"hello world", "operations")  # reproducible: same CIDs
    assert keys.encrypt_layer(SECRET, b"hello world!", "operations").key != a.key
    assert keys.encrypt_layer(SECRET, b"hello world", "config").key != a.key
    assert keys.encrypt_layer(os.urandom(32), b"hello world", "operations").ciphertext != a.ciphertext
    assert len(a.ciphertext) == stream.ciphertext_size(a.size)


def test_decrypt_layer_checks_the_plaintext() -> None:
    data = os.urandom(100_000)
    e = keys.encrypt_layer(SECRET, data, "runtime")
    assert b"".join(keys.decrypt_layer(e.key, [e.ciphertext], sha256=e.sha256, size=e.size)) == data
    with pytest.raises(PlaintextMismatchError):  # a manifest whose plaintext hash is not this layer's
        list(keys.decrypt_layer(e.key, [e.ciphertext], sha256=bytes(32), size=e.size))
    with pytest.raises(stream.TrailingDataError):  # the size comes from the manifest too
        list(keys.decrypt_layer(e.key, [e.ciphertext + b"x"], sha256=e.sha256, size=e.size))


def test_secret_file(tmp_path: Path) -> None:
    p = tmp_path / "keys" / "flow.secret"
    s = keys.write_secret(p)
    assert keys.load_secret(p) == s and (p.stat().st_mode & 0o777) == 0o600
    with pytest.raises(FlowSecretError):
        keys.write_secret(p)  # never overwritten
    p.chmod(0o640)
    with pytest.raises(FlowSecretExposedError):
        keys.load_secret(p)
    p.chmod(0o600)
    p.write_text("cidboot-flow-secret-v1:abcd\n")
    with pytest.raises(FlowSecretError):
        keys.load_secret(p)
    with pytest.raises(FlowSecretError):
        keys.load_secret(tmp_path / "missing")
