"""The manifest model: round trips, one canonical encoding, precise errors for malformed input.

The attack tests live in test_manifest_attacks.py; these check the format itself.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import cbor2
import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519

from cidboot.errors import FormatError
from cidboot.ipld import dagcbor
from cidboot.ipld.cid import CID, DAG_CBOR, RAW
from cidboot.trust.manifest import (
    Layer,
    Manifest,
    ManifestFormatError,
    RootOfTrust,
    SignedManifest,
    TrustState,
    sign_manifest,
    sign_root,
    verify_manifest,
)

SEEDS = [bytes([i]) * 32 for i in range(1, 4)]
KEYS = [ed25519.Ed25519PrivateKey.from_private_bytes(s) for s in SEEDS]
ROOT = RootOfTrust.from_public_keys([k.public_key() for k in KEYS], threshold=2)
NOW = 1_800_000_000


def full_manifest(version: int = 7) -> Manifest:
    return Manifest(
        name="hello",
        version=version,
        expires=NOW + 3600,
        layers=(Layer(CID.of(b"kernel", RAW), 6, "kernel"), Layer(CID.of(b"agent", RAW), 5, "agent")),
        root=ROOT,
        measurements={"firmware": b"\x01" * 64, "bootstrap": b"\x02" * 64, "image": b"\x03" * 64},
        flow=CID.of(b"flow", RAW),
        operations={"greet": CID.of(b"op-greet", RAW), "count": CID.of(b"op-count", RAW)},
        placement={"edge": ["greet"], "core": ["count", "greet"]},
        policies=[{"allow": "greet"}],
        cmdline="console=ttyS0",
    )


def test_manifest_round_trip_keeps_every_field() -> None:
    m = full_manifest()
    assert Manifest.from_obj(dagcbor.decode(m.encode())) == m


def test_signed_manifest_round_trip_and_cid_is_dag_cbor_of_the_block() -> None:
    sm = sign_manifest(full_manifest(), KEYS[:2])
    block = sm.encode()
    again = SignedManifest.decode(block)
    assert again == sm
    assert again.encode() == block
    assert sm.cid == CID.of(block, DAG_CBOR)
    assert sm.cid.codec == DAG_CBOR
    sm.cid.verify(block)


def test_layer_flow_and_operation_cids_are_ipld_links() -> None:
    """Tag 42 in the block, so pinning and CAR export follow the manifest into the image."""
    m = full_manifest()
    raw = cbor2.loads(sign_manifest(m, KEYS[:2]).encode())
    layer_cid = raw["manifest"]["layers"][0]["cid"]
    assert isinstance(layer_cid, cbor2.CBORTag) and layer_cid.tag == 42
    assert raw["manifest"]["flow"].tag == 42
    assert raw["manifest"]["operations"]["greet"].tag == 42


def test_encoding_is_canonical_whatever_the_construction_order() -> None:
    a = full_manifest()
    b = Manifest(
        name="hello", version=7, expires=NOW + 3600, layers=a.layers, root=ROOT,
        measurements=dict(reversed(list(a.measurements.items()))), flow=a.flow,
        operations=dict(reversed(list(a.operations.items()))),
        placement=dict(reversed(list(a.placement.items()))), policies=a.policies, cmdline=a.cmdline,
    )
    assert a.encode() == b.encode()
    # DAG-CBOR map order: shorter keys first, then bytewise.
    keys = list(cbor2.loads(a.encode()))
    assert keys == sorted(keys, key=lambda k: (len(k.encode()), k.encode()))


def test_signing_is_deterministic() -> None:
    """Ed25519 is deterministic, so the same manifest and keys give the same manifest CID."""
    assert sign_manifest(full_manifest(), KEYS[:2]).cid == sign_manifest(full_manifest(), KEYS[:2]).cid
    assert sign_manifest(full_manifest(), KEYS[:2]).cid != sign_manifest(full_manifest(8), KEYS[:2]).cid


def test_non_canonical_block_is_refused() -> None:
    block = sign_manifest(full_manifest(), KEYS[:2]).encode()
    obj = cbor2.loads(block)
    # Same content, keys in insertion (non-canonical) order, and an integer in a longer form.
    reordered = cbor2.dumps({"signatures": obj["signatures"], "rotations": obj["rotations"], "manifest": obj["manifest"]})
    with pytest.raises(FormatError):
        SignedManifest.decode(reordered)
    with pytest.raises(FormatError):
        SignedManifest.decode(block + b"\x00")


def test_rotation_round_trips_in_the_envelope() -> None:
    new_keys = [ed25519.Ed25519PrivateKey.from_private_bytes(bytes([9]) * 32)]
    r2 = RootOfTrust.from_public_keys([k.public_key() for k in new_keys], threshold=1, version=2)
    rot = sign_root(r2, KEYS[:2], new_keys)
    m = Manifest("hello", 1, NOW + 60, (), r2)
    sm = sign_manifest(m, new_keys, (rot,))
    assert SignedManifest.decode(sm.encode()) == sm


def test_root_key_listed_twice_is_one_key() -> None:
    k = KEYS[0].public_key()
    with pytest.raises(ManifestFormatError, match="threshold 2 must be 1..1"):
        RootOfTrust.from_public_keys([k, k], threshold=2)
    assert len(RootOfTrust.from_public_keys([k, k], threshold=1).public_keys()) == 1


def _with(path: list[Any], value: Any) -> dict[str, Any]:
    obj: dict[str, Any] = full_manifest().to_obj()
    target: Any = obj
    for p in path[:-1]:
        target = target[p]
    if value is KeyError:
        del target[path[-1]]
    else:
        target[path[-1]] = value
    return obj


@pytest.mark.parametrize(
    "path, value, message",
    [
        (["name"], KeyError, "missing 'name'"),
        (["name"], "", "empty name"),
        (["version"], "7", "'version' has the wrong type"),
        (["version"], True, "'version' has the wrong type"),
        (["version"], -1, "version must be"),
        (["version"], 2**53 + 1, "version must be"),
        (["expires"], 1.5, "'expires' has the wrong type"),
        (["extra"], 1, "unknown keys \\['extra'\\]"),
        (["layers", 0, "cid"], b"not a cid", "layer 0: 'cid' has the wrong type"),
        (["layers", 0, "size"], -1, "bad size or role"),
        (["layers", 0, "role"], "rootkit", "bad size or role"),
        (["layers", 0, "junk"], 0, "layer 0: unknown keys"),
        (["measurements", "image"], b"\x00" * 32, "64-byte SHA-512"),
        (["measurements", "bios"], b"\x00" * 64, "64-byte SHA-512"),
        (["operations", "greet"], "bafy", "operations must map names to CIDs"),
        (["placement", "edge"], [1], "placement must map roles"),
        (["policies"], [1], "policies must be a list of maps"),
        (["flow"], b"x", "flow must be a CID"),
        (["cmdline"], 3, "cmdline must be a string"),
        (["root", "threshold"], 0, "threshold 0 must be"),
        (["root", "threshold"], 4, "threshold 4 must be"),
        (["root", "keys"], [], "no keys"),
        (["root", "keys"], ["a"], "keys must be encoded COSE_Keys"),
        (["root", "version"], 0, "version must be >= 1"),
    ],
)
def test_malformed_manifest_fields_are_named(path: list[Any], value: Any, message: str) -> None:
    with pytest.raises(ManifestFormatError, match=message):
        Manifest.from_obj(dagcbor.decode(dagcbor.encode(_with(path, value))))


def test_root_key_that_is_not_a_cose_key() -> None:
    with pytest.raises(FormatError):
        Manifest.from_obj(_with(["root", "keys"], [b"\xa0", b"\xa0"]))


def test_trust_state_round_trips(tmp_path: Path) -> None:
    st = TrustState.load(tmp_path / "state.json", ROOT)
    verify_manifest(sign_manifest(full_manifest(), KEYS[:2]), st, now=NOW)
    again = TrustState.load(tmp_path / "state.json", ROOT)
    assert again.root == ROOT
    assert again.highest == {"hello": 7}


@pytest.mark.parametrize(
    "content",
    ["{", "[]", "{}", '{"root": {"keys": ["zz"], "threshold": 1, "version": 1}}',
     '{"root": {"keys": [], "threshold": "1", "version": 1}}', '{"root": 5}'],
)
def test_damaged_trust_state_is_a_format_error(tmp_path: Path, content: str) -> None:
    p = tmp_path / "state.json"
    p.write_text(content)
    with pytest.raises(ManifestFormatError, match="damaged trust state|no keys"):
        TrustState.load(p, ROOT)


def test_trust_state_highest_values_must_be_numbers(tmp_path: Path) -> None:
    p = tmp_path / "state.json"
    doc = {"root": {"keys": [k.hex() for k in ROOT.keys], "threshold": 2, "version": 1}, "highest": {"hello": "x"}}
    p.write_text(json.dumps(doc))
    with pytest.raises(ManifestFormatError, match="damaged trust state"):
        TrustState.load(p, ROOT)
