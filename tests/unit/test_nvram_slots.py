"""Fail-closed #13 (NVRAM part): the rollback state survives a torn write.

Two alternating records (A/B), each with a sequence number and a SHA-256: a write cut short or
garbled at any byte of the slot being written leaves the previous state readable; both slots
damaged is still refused, with a message saying what to do; the old single-record format is read.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from bootstrap.stage.nvram import (
    HEADER,
    LEGACY_HEADER,
    MAGIC,
    SLOT_SIZE,
    Nvram,
    NvramError,
    decode_slot,
    encode_record,
)
from cidboot.trust import keys
from cidboot.trust.manifest import RootOfTrust, TrustState

MIB = 1 << 20
ANCHOR = RootOfTrust.from_public_keys([keys.generate().public_key()], 1)


def _device(tmp_path: Path) -> Path:
    p = tmp_path / "nvram.img"
    p.write_bytes(bytes(MIB))
    return p


def _state(version: int) -> TrustState:
    return TrustState(ANCHOR, {"hello": version}, booted={"hello": "bafyreigh2akiscaildc4ubnkrxqlmfrdh7b3jumt7zxbmmvhc6gfxjzkvi"},
                      name="hello")


def _written(tmp_path: Path, versions: list[int]) -> tuple[Path, bytes]:
    """A device after saving the states `versions` in turn, and its bytes."""
    dev = _device(tmp_path)
    nv = Nvram(dev)
    for v in versions:
        nv.save_state(_state(v))
    return dev, dev.read_bytes()


def _next_write(tmp_path: Path, before: bytes, version: int) -> tuple[bytes, int, int]:
    """The device bytes once state `version` is fully written, the written slot's offset and the record length."""
    scratch = tmp_path / "scratch.img"
    scratch.write_bytes(before)
    Nvram(scratch).save_state(_state(version))
    after = scratch.read_bytes()
    changed = [i for i in range(len(before)) if before[i] != after[i]]
    start = (changed[0] // SLOT_SIZE) * SLOT_SIZE
    length = HEADER.size + len(_state(version).to_bytes())
    assert all(start <= i < start + length for i in changed)  # only the slot being written changes
    return after, start, length


@pytest.mark.parametrize("history", [[1], [1, 2], [1, 2, 3]], ids=["into-B", "into-A", "into-B-again"])
def test_torn_nvram_write_at_every_byte_keeps_the_previous_state(tmp_path: Path, history: list[int]) -> None:
    """The write of the next state is cut after k bytes, for every k: the state before that write
    is read (on main a single record is overwritten in place and the device is refused)."""
    dev, before = _written(tmp_path, history)
    after, start, length = _next_write(tmp_path, before, history[-1] + 1)
    for k in range(length):
        torn = after[:start + k] + before[start + k:]
        dev.write_bytes(torn)
        # once the bytes still to write equal what is there, the write is in fact complete
        want = history[-1] + 1 if torn == after else history[-1]
        assert Nvram(dev).load_state(ANCHOR).highest == {"hello": want}, f"torn after {k} bytes"
    dev.write_bytes(after)
    assert Nvram(dev).load_state(ANCHOR).highest == {"hello": history[-1] + 1}


def test_garbled_nvram_write_at_every_byte_keeps_the_previous_state(tmp_path: Path) -> None:
    """One byte of the slot being written garbled, at every offset: the previous state is read, the
    damage is noted for the log, and the next write repairs that slot."""
    dev, before = _written(tmp_path, [1, 2])
    after, start, length = _next_write(tmp_path, before, 3)
    for i in range(length):
        garbled = bytearray(after)
        garbled[start + i] ^= 0x5A
        dev.write_bytes(bytes(garbled))
        nv = Nvram(dev)
        assert nv.load_state(ANCHOR).highest == {"hello": 2}, f"garbled at byte {i}"
        assert nv.notes and "using slot" in nv.notes[0], nv.notes
    nv.save_state(_state(3))  # the damaged slot is the one written next
    again = Nvram(dev)
    assert again.load_state(ANCHOR).highest == {"hello": 3} and again.notes == []


def test_both_nvram_slots_damaged_is_refused_with_what_to_do(tmp_path: Path) -> None:
    dev, raw = _written(tmp_path, [1, 2])
    damaged = bytearray(raw)
    damaged[HEADER.size + 3] ^= 1
    damaged[SLOT_SIZE + HEADER.size + 3] ^= 1
    dev.write_bytes(bytes(damaged))
    with pytest.raises(NvramError) as e:
        Nvram(dev).load_state(ANCHOR)
    msg = str(e.value)
    assert str(dev) in msg and "slot A" in msg and "slot B" in msg and "checksum mismatch" in msg
    assert "refusing to reset" in msg and "restore this NVRAM from a backup, or re-provision the device" in msg
    assert dev.read_bytes() == bytes(damaged)  # left as found


def test_old_single_record_format_is_read_then_migrated(tmp_path: Path) -> None:
    """A device written by the single-record bootstrap (format 1) keeps its rollback state; the
    next write goes to slot B, so the old record stays until a newer one exists beside it."""
    dev = _device(tmp_path)
    payload = TrustState(ANCHOR, {"hello": 4}).to_bytes()
    legacy = LEGACY_HEADER.pack(MAGIC, 1, len(payload), hashlib.sha256(payload).digest()) + payload
    dev.write_bytes(legacy + bytes(MIB - len(legacy)))
    nv = Nvram(dev)
    assert nv.load_state(ANCHOR).highest == {"hello": 4}
    nv.save_state(_state(5))
    raw = dev.read_bytes()
    assert raw[:len(legacy)] == legacy and decode_slot(raw[SLOT_SIZE:2 * SLOT_SIZE], "B").seq == 1
    assert Nvram(dev).load_state(ANCHOR).highest == {"hello": 5}
    nv.save_state(_state(6))  # now over the old record, in format 2
    assert decode_slot(dev.read_bytes()[:SLOT_SIZE], "A").seq == 2
    assert Nvram(dev).load_state(ANCHOR).highest == {"hello": 6}


def test_slots_alternate_with_increasing_sequence(tmp_path: Path) -> None:
    dev, _ = _written(tmp_path, [1, 2, 3])
    raw = dev.read_bytes()
    a, b = decode_slot(raw[:SLOT_SIZE], "A"), decode_slot(raw[SLOT_SIZE:2 * SLOT_SIZE], "B")
    assert (a.seq, b.seq) == (3, 2)
    assert len(raw) == MIB


def test_two_slots_with_one_sequence_are_refused(tmp_path: Path) -> None:
    dev = _device(tmp_path)
    rec_a, rec_b = encode_record(_state(1).to_bytes(), 7), encode_record(_state(2).to_bytes(), 7)
    raw = bytearray(MIB)
    raw[:len(rec_a)] = rec_a
    raw[SLOT_SIZE:SLOT_SIZE + len(rec_b)] = rec_b
    dev.write_bytes(bytes(raw))
    with pytest.raises(NvramError, match="both rollback state slots claim sequence 7"):
        Nvram(dev).load_state(ANCHOR)


def test_device_too_small_for_two_slots_is_an_error_not_an_extension(tmp_path: Path) -> None:
    dev = tmp_path / "small.img"
    dev.write_bytes(bytes(SLOT_SIZE))
    nv = Nvram(dev)
    nv.save_state(_state(1))  # slot A fits
    with pytest.raises(NvramError, match="cannot hold slot B"):
        nv.save_state(_state(2))
    assert dev.stat().st_size == SLOT_SIZE
