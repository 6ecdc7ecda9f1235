"""Rollback state on a raw block device (bootstrap.stage.nvram): fresh, round trip, and every kind
of damage refused with a clear error, never silently reset."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from bootstrap.stage.nvram import HEADER, MAGIC, Nvram, NvramError, decode_record, encode_record
from cidboot.trust import keys
from cidboot.trust.manifest import ManifestFormatError, RootOfTrust, TrustState

MIB = 1 << 20


def _anchor(version: int = 1) -> RootOfTrust:
    return RootOfTrust.from_public_keys([keys.generate().public_key()], 1, version)


def _device(tmp_path: Path) -> Path:
    p = tmp_path / "nvram.img"
    p.write_bytes(bytes(MIB))
    return p


def test_trust_state_bytes_round_trip() -> None:
    a = _anchor()
    s = TrustState(a, {"hello": 3, "other": 1})
    back = TrustState.from_bytes(s.to_bytes(), a)
    assert back.root == a and back.highest == {"hello": 3, "other": 1}
    assert s.to_bytes() == back.to_bytes()  # canonical
    newer = RootOfTrust(a.keys, 1, 2)
    assert TrustState.from_bytes(s.to_bytes(), newer).root == newer  # an older stored root yields to the anchor
    with pytest.raises(ManifestFormatError, match="dev0: damaged trust state"):
        TrustState.from_bytes(b'{"root": 1}', a, "dev0")


def test_fresh_device_then_round_trip_keeps_size(tmp_path: Path) -> None:
    dev = _device(tmp_path)
    a = _anchor()
    nv = Nvram(dev)
    s = nv.load_state(a)
    assert s.root == a and s.highest == {}
    s.highest["hello"] = 7
    nv.save_state(s)
    assert dev.stat().st_size == MIB  # written in place, never truncated
    again = Nvram(dev).load_state(a)
    assert again.highest == {"hello": 7} and again.root == a


@pytest.mark.parametrize("damage, message", [
    (lambda raw: raw[:HEADER.size + 5] + bytes([raw[HEADER.size + 5] ^ 1]) + raw[HEADER.size + 6:], "checksum mismatch"),
    (lambda raw: b"GARBAGE!" + raw[8:], "not cidboot rollback state"),
    (lambda raw: raw[:8] + (9).to_bytes(4, "big") + raw[12:], "format 9"),
    (lambda raw: raw[:12] + (10**6).to_bytes(4, "big") + raw[16:], "length 1000000 is out of range"),
])
def test_damaged_state_is_refused_not_reset(tmp_path: Path, damage: Callable[[bytes], bytes], message: str) -> None:
    dev = _device(tmp_path)
    a = _anchor()
    nv = Nvram(dev)
    nv.save_state(TrustState(a, {"hello": 2}))
    dev.write_bytes(damage(dev.read_bytes()))
    with pytest.raises(NvramError, match=message) as e:
        nv.load_state(a)
    assert str(dev) in str(e.value)


def test_valid_record_with_malformed_json_is_refused(tmp_path: Path) -> None:
    dev = _device(tmp_path)
    raw = encode_record(b'{"root": {"keys": ["zz"], "threshold": 1, "version": 1}}')
    dev.write_bytes(raw + bytes(MIB - len(raw)))
    with pytest.raises(NvramError, match="damaged trust state"):
        Nvram(dev).load_state(_anchor())


def test_missing_or_tiny_device_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(NvramError, match="cannot read"):
        Nvram(tmp_path / "absent").load_state(_anchor())
    with pytest.raises(NvramError, match="cannot write"):
        Nvram(tmp_path / "absent").write(b"{}")
    assert not (tmp_path / "absent").exists()  # never created: a device is not a file to make
    with pytest.raises(NvramError, match="smaller than"):
        decode_record(MAGIC, "tiny")
    assert decode_record(bytes(100), "zero") is None
