"""The signed device registry: round trip, threshold, tampering and malformed blocks."""

from __future__ import annotations

import os

import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519

from cidboot.ipld import dagcbor
from cidboot.trust.appraisal import DeviceRoots
from cidboot.trust.dice.derive import key_from_cdi
from cidboot.trust.manifest import RootOfTrust
from cidboot.trust.registry import (
    RegistryFormatError,
    RegistryVerificationError,
    registry_cid,
    sign_registry,
    verify_registry,
)

K = [ed25519.Ed25519PrivateKey.generate() for _ in range(3)]
ROOT = RootOfTrust.from_public_keys([k.public_key() for k in K], 2)


def roots(n: int = 2) -> DeviceRoots:
    r = DeviceRoots()
    for i in range(n):
        r.add(key_from_cdi(os.urandom(32)).public_key(), f"dev{i}")
    return r


def test_round_trip_and_determinism() -> None:
    r = roots()
    block = sign_registry(r, K[:2])
    got = verify_registry(block, ROOT)
    assert set(got.keys) == set(r.keys) and got.names == r.names
    assert registry_cid(block) == registry_cid(block) and registry_cid(block).codec == 0x71


def test_below_threshold() -> None:
    with pytest.raises(RegistryVerificationError, match="1 valid signature.*threshold is 2"):
        verify_registry(sign_registry(roots(), K[:1]), ROOT)


def test_untrusted_keys_do_not_count() -> None:
    others = [ed25519.Ed25519PrivateKey.generate() for _ in range(2)]
    with pytest.raises(RegistryVerificationError, match="0 valid"):
        verify_registry(sign_registry(roots(), others), ROOT)


def test_added_device_breaks_signatures() -> None:
    env = dagcbor.decode(sign_registry(roots(), K[:2]))
    extra = roots(1)
    env["registry"]["devices"].append({"id": next(iter(extra.keys)), "name": "rogue",
                                       "key": dagcbor.decode(sign_registry(extra, K[:1]))["registry"]["devices"][0]["key"]})
    env["registry"]["devices"].sort(key=lambda d: d["id"])
    with pytest.raises(RegistryVerificationError):
        verify_registry(dagcbor.encode(env), ROOT)


def test_id_must_match_key() -> None:
    env = dagcbor.decode(sign_registry(roots(), K[:2]))
    env["registry"]["devices"][0]["id"] = "00" * 20
    with pytest.raises(RegistryFormatError, match="entry 0: id .* is not the DICE ID"):
        verify_registry(dagcbor.encode(env), ROOT)


@pytest.mark.parametrize("block,msg", [
    (b"\xff", "not DAG-CBOR"),
    (dagcbor.encode({"registry": {}}), "must be {registry, signatures}"),
    (dagcbor.encode({"registry": {"devices": 1}, "signatures": b""}), "must be {devices"),
    (dagcbor.encode({"registry": {"devices": [{"id": "x"}]}, "signatures": b""}), "entry 0: must be"),
    (dagcbor.encode({"registry": {"devices": [{"id": "x", "name": "n", "key": b"zz"}]}, "signatures": b""}), "entry 0: key"),
])
def test_malformed(block: bytes, msg: str) -> None:
    with pytest.raises(RegistryFormatError, match=msg):
        verify_registry(block, ROOT)


def test_malformed_signatures() -> None:
    env = dagcbor.decode(sign_registry(roots(), K[:2]))
    env["signatures"] = b"\x00"
    with pytest.raises(RegistryVerificationError, match="malformed signatures"):
        verify_registry(dagcbor.encode(env), ROOT)
