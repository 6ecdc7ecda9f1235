"""cidboot.stage.handoff: the archive the kernel unpacks (checked with GNU cpio), load() erasing the
CDIs at once, and precise errors for every malformed hand-off."""

from __future__ import annotations

import stat
import subprocess
from pathlib import Path

import pytest

from cidboot.stage import handoff
from cidboot.stage.cpio import iter_newc
from cidboot.stage.handoff import Handoff, HandoffError, HandoffNotFound
from cidboot.trust.dice import encode_chain, encode_handover, uds_keypair

DICE = encode_handover(b"\x01" * 32, b"\x02" * 32, encode_chain(uds_keypair(b"\x00" * 32).public_key(), []))
BOOT = {"boot_mode": "measured", "bootconfig": '{"version":1}', "manifest": None}


def _unpack(archive: bytes, root: Path) -> None:
    root.mkdir(exist_ok=True)
    subprocess.run(["cpio", "-idm", "--quiet"], input=archive, cwd=root, check=True)


def test_archive_members_modes_and_canonical_json() -> None:
    a = Handoff(DICE, BOOT).to_cpio()
    members = {m.path: (m, data) for m, data in iter_newc(a)}
    assert list(members) == ["run", "run/cidboot", "run/cidboot/boot.json", "run/cidboot/dice.cbor"]
    assert stat.S_IMODE(members["run/cidboot/dice.cbor"][0].mode) == 0o600
    assert members["run/cidboot/dice.cbor"][1] == DICE
    assert members["run/cidboot/boot.json"][1] == b'{"boot_mode":"measured","bootconfig":"{\\"version\\":1}","manifest":null}'
    assert Handoff(DICE, BOOT).to_cpio() == a  # reproducible


def test_roundtrip_through_gnu_cpio_and_dice_is_erased(tmp_path: Path) -> None:
    initrd = b"\x1f\x8b" + b"x" * 5  # any length: append_to pads to the 4-byte boundary the kernel needs
    whole = Handoff(DICE, BOOT).append_to(initrd)
    tail = whole[len(initrd):]
    assert len(initrd) + len(tail) == len(whole) and whole.index(b"070701") % 4 == 0
    _unpack(tail.lstrip(b"\0"), tmp_path)
    got = handoff.load(tmp_path)
    assert got == Handoff(DICE, BOOT)
    assert not (tmp_path / "run/cidboot/dice.cbor").exists()
    assert (tmp_path / "run/cidboot/boot.json").exists()
    # a second load finds an unmeasured-looking hand-off that still says measured: refused
    with pytest.raises(HandoffError, match="dice.cbor is missing"):
        handoff.load(tmp_path)


def test_unmeasured_and_absent(tmp_path: Path) -> None:
    _unpack(Handoff(None, {"boot_mode": "unmeasured"}).to_cpio(), tmp_path / "u")
    assert handoff.load(tmp_path / "u") == Handoff(None, {"boot_mode": "unmeasured"})
    with pytest.raises(HandoffNotFound):
        handoff.load(tmp_path / "nothing")


@pytest.mark.parametrize(("dice", "boot", "why"), [
    (None, {"boot_mode": "measured"}, "dice.cbor is missing"),
    (DICE, {"boot_mode": "unmeasured"}, "dice.cbor is present"),
    (DICE, {"boot_mode": "sideways"}, "boot_mode must be one of"),
    (DICE, {}, "boot_mode must be one of"),
    (b"\xa1\x01\x02", BOOT, "dice.cbor: DICE handover must be the map"),
    (b"", BOOT, "dice.cbor: empty"),
])
def test_malformed_is_refused_when_written_and_when_read(tmp_path: Path, dice: bytes | None, boot: dict[str, object],
                                                        why: str) -> None:
    with pytest.raises(HandoffError, match=why):
        Handoff(dice, boot).to_cpio()
    d = tmp_path / "run/cidboot"
    d.mkdir(parents=True)
    (d / "boot.json").write_text(handoff.canonical_json(boot).decode())
    if dice is not None:
        (d / "dice.cbor").write_bytes(dice)
    with pytest.raises(HandoffError, match=why):
        handoff.load(tmp_path)
    assert not (d / "dice.cbor").exists()  # erased even when refused


@pytest.mark.parametrize(("raw", "why"), [(b"[1]", "must be a JSON object"), (b"{nope", "not JSON"),
                                          (b"\xff\xfe", "not JSON")])
def test_bad_boot_json(tmp_path: Path, raw: bytes, why: str) -> None:
    d = tmp_path / "run/cidboot"
    d.mkdir(parents=True)
    (d / "boot.json").write_bytes(raw)
    with pytest.raises(HandoffError, match=why):
        handoff.load(tmp_path)


def test_dice_without_boot_json_is_refused_and_erased(tmp_path: Path) -> None:
    d = tmp_path / "run/cidboot"
    d.mkdir(parents=True)
    (d / "dice.cbor").write_bytes(DICE)
    with pytest.raises(HandoffError, match="boot.json: missing"):
        handoff.load(tmp_path)
    assert not (d / "dice.cbor").exists()
