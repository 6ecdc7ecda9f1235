"""One test per TUF attack that applies to cidboot's signed workload manifest."""

from __future__ import annotations

import time
from pathlib import Path

import cbor2
import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519
from hypothesis import given, settings
from hypothesis import strategies as st

from cidboot.errors import FormatError
from cidboot.ipld import dagcbor
from cidboot.ipld.cid import CID, RAW
from cidboot.trust.manifest import (
    ExpiredError,
    Layer,
    LayerNotListedError,
    Manifest,
    RollbackError,
    RootMismatchError,
    RootOfTrust,
    RootRotationError,
    SignatureError,
    SignedManifest,
    SizeLimitError,
    ThresholdError,
    TrustState,
    check_layer,
    sign_manifest,
    sign_root,
    verify_manifest,
)
from cidboot.trust.manifest.model import MAX_VERSION, ManifestFormatError

KEYS = [ed25519.Ed25519PrivateKey.generate() for _ in range(5)]
ROOT = RootOfTrust.from_public_keys([k.public_key() for k in KEYS[:3]], threshold=2)
LAYER = Layer(CID.of(b"kernel", RAW), 6, "kernel")
NOW = int(time.time())


def manifest(version: int = 1, root: RootOfTrust = ROOT, expires: int = NOW + 3600, layers: tuple[Layer, ...] = (LAYER,)) -> Manifest:
    return Manifest("hello", version, expires, layers, root, {"image": bytes(64)})


def state(tmp_path: Path, root: RootOfTrust = ROOT) -> TrustState:
    return TrustState.load(tmp_path / "trust.json", root)


def roundtrip(sm: SignedManifest) -> SignedManifest:
    return SignedManifest.decode(sm.encode())


def test_legitimate_manifest_verifies_and_round_trips(tmp_path: Path) -> None:
    sm = roundtrip(sign_manifest(manifest(), KEYS[:2]))
    checks = verify_manifest(sm, state(tmp_path))
    assert [c.name for c in checks] == ["root", "signatures", "expiry", "name", "rollback"]
    assert sm.cid == roundtrip(sm).cid


def test_arbitrary_software_bad_signature(tmp_path: Path) -> None:
    sm = sign_manifest(manifest(), KEYS[:2])
    evil = SignedManifest(manifest(version=2), sm.signatures)  # signatures over other bytes
    with pytest.raises(ThresholdError, match="0 valid"):
        verify_manifest(evil, state(tmp_path))


def test_arbitrary_software_missing_signature(tmp_path: Path) -> None:
    unsigned = SignedManifest(manifest(), cbor2.dumps(cbor2.CBORTag(98, [b"", {}, None, []])))
    with pytest.raises(SignatureError, match="malformed signatures"):
        verify_manifest(unsigned, state(tmp_path))


def test_rollback_refused_and_persisted(tmp_path: Path) -> None:
    verify_manifest(sign_manifest(manifest(version=5), KEYS[:2]), state(tmp_path))
    reloaded = state(tmp_path)  # a new boot: the highest version comes back from disk
    assert reloaded.highest == {"hello": 5}
    with pytest.raises(RollbackError, match="v4 is older than v5"):
        verify_manifest(sign_manifest(manifest(version=4), KEYS[:2]), reloaded)
    verify_manifest(sign_manifest(manifest(version=5), KEYS[:2]), reloaded)  # same version: a reboot


def test_indefinite_freeze_expired(tmp_path: Path) -> None:
    with pytest.raises(ExpiredError, match="expired"):
        verify_manifest(sign_manifest(manifest(expires=NOW - 1), KEYS[:2]), state(tmp_path))


def test_fast_forward_versions_are_bounded() -> None:
    with pytest.raises(ManifestFormatError, match="version"):
        manifest(version=MAX_VERSION + 1)


def test_fast_forward_recovery_after_root_rotation(tmp_path: Path) -> None:
    st = state(tmp_path)
    # keys 0 and 1 were stolen and used to push an absurd version, freezing out real updates
    verify_manifest(sign_manifest(manifest(version=10**9), KEYS[:2]), st)
    with pytest.raises(RollbackError):
        verify_manifest(sign_manifest(manifest(version=2), KEYS[:2]), st)
    # recovery as in TUF: rotate the root away from the stolen keys; the high-water mark resets
    new_root = RootOfTrust.from_public_keys([k.public_key() for k in KEYS[2:5]], threshold=2, version=2)
    rot = sign_root(new_root, KEYS[0:2], KEYS[3:5])
    verify_manifest(sign_manifest(manifest(version=2, root=new_root), KEYS[3:5], (rot,)), st)
    assert st.root == new_root and st.highest == {"hello": 2}


def test_mix_and_match_layer_not_listed() -> None:
    m = manifest()
    assert check_layer(m, LAYER.cid, 6) == LAYER
    with pytest.raises(LayerNotListedError, match="not listed"):
        check_layer(m, CID.of(b"other kernel", RAW), 12)


def test_endless_data() -> None:
    with pytest.raises(SizeLimitError, match="allows 6"):
        check_layer(manifest(), LAYER.cid, 7)
    with pytest.raises(ManifestFormatError, match="exceeds"):
        SignedManifest.decode(b"\x00" * (1024 * 1024 + 1))


def test_threshold_one_key_counts_once(tmp_path: Path) -> None:
    sm = sign_manifest(manifest(), [KEYS[0], KEYS[0], KEYS[0]])
    with pytest.raises(ThresholdError, match="1 valid"):
        verify_manifest(sm, state(tmp_path))


def test_threshold_unknown_keys_ignored(tmp_path: Path) -> None:
    sm = sign_manifest(manifest(), [KEYS[0], KEYS[3], KEYS[4]])  # 3 and 4 are not in the root
    with pytest.raises(ThresholdError, match="1 valid"):
        verify_manifest(sm, state(tmp_path))
    verify_manifest(sign_manifest(manifest(), [KEYS[3], KEYS[0], KEYS[1]]), state(tmp_path))


def test_compromise_of_fewer_keys_than_threshold(tmp_path: Path) -> None:
    thief = KEYS[2]  # one stolen key cannot sign alone, whatever it claims
    with pytest.raises(ThresholdError):
        verify_manifest(sign_manifest(manifest(version=99), [thief]), state(tmp_path))
    # nor can it rotate the root to keys it controls
    evil_root = RootOfTrust.from_public_keys([thief.public_key(), KEYS[4].public_key()], threshold=1, version=2)
    with pytest.raises(RootRotationError):
        verify_manifest(sign_manifest(manifest(root=evil_root), [thief], (sign_root(evil_root, [thief], [thief]),)), state(tmp_path))


def test_keys_revoked_by_rotation(tmp_path: Path) -> None:
    st = state(tmp_path)
    new_root = RootOfTrust.from_public_keys([k.public_key() for k in KEYS[2:5]], threshold=2, version=2)
    rot = sign_root(new_root, KEYS[0:2], KEYS[2:4])
    verify_manifest(sign_manifest(manifest(version=1, root=new_root), KEYS[2:4], (rot,)), st)
    # keys 0 and 1 are revoked: a manifest signed by them under the old root is refused
    with pytest.raises(RootMismatchError, match="revoked"):
        verify_manifest(sign_manifest(manifest(version=3), KEYS[0:2]), state(tmp_path))
    # and the persisted root survives a reboot
    assert state(tmp_path).root == new_root


def test_rotation_must_not_skip_versions(tmp_path: Path) -> None:
    r3 = RootOfTrust.from_public_keys([k.public_key() for k in KEYS[2:5]], threshold=2, version=3)
    with pytest.raises(RootRotationError, match="skips"):
        verify_manifest(sign_manifest(manifest(root=r3), KEYS[2:4], (sign_root(r3, KEYS[0:2], KEYS[2:4]),)), state(tmp_path))


def test_tampered_envelope_block(tmp_path: Path) -> None:
    sm = sign_manifest(manifest(), KEYS[:2])
    obj = dagcbor.decode(sm.encode())
    obj["manifest"]["layers"][0]["size"] = 10**6
    tampered = SignedManifest.decode(dagcbor.encode(obj))
    with pytest.raises(ThresholdError):
        verify_manifest(tampered, state(tmp_path))


@pytest.mark.parametrize("block, why", [(b"\xa0", "must be {manifest"), (b"\x01", "must be {manifest")])
def test_malformed_envelopes(block: bytes, why: str) -> None:
    with pytest.raises(ManifestFormatError, match=why):
        SignedManifest.decode(block)


GOOD_ENVELOPE = sign_manifest(manifest(), KEYS[:2]).encode()


@given(st.data())
@settings(max_examples=400, deadline=None)
def test_decoder_fuzz_only_documented_errors(data: st.DataObject) -> None:
    buf = bytearray(GOOD_ENVELOPE)
    for _ in range(data.draw(st.integers(1, 3))):
        buf[data.draw(st.integers(0, len(buf) - 1))] = data.draw(st.integers(0, 255))
    try:
        SignedManifest.decode(bytes(buf[: data.draw(st.integers(1, len(buf)))]))
    except FormatError:
        pass
