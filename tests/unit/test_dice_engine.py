"""The harness's DICE engine derives L0 exactly as the software derivation does, keeps the UDS."""

from __future__ import annotations

import stat
from pathlib import Path

from cidboot.trust.appraisal import DeviceRoots
from cidboot.trust.dice.chain import decode_handover, verify_chain
from cidboot.trust.dice.derive import DiceInputs, DiceMode
from cidboot.trust.dice.software import derive_layers
from cidboot.trust.measure import code_hash_of_blobs
from qemu.harness import dice_engine


def test_engine_matches_software_derivation_and_persists_the_uds(tmp_path: Path) -> None:
    dev = dice_engine.device(tmp_path, "dev0")
    h = decode_handover(dice_engine.provision(dev, b"kernel", b"initrd").read_bytes())
    uds = dev.uds()
    assert stat.S_IMODE(dev.uds_path.stat().st_mode) == 0o600 and dev.nvram.stat().st_size == 1 << 20
    want = derive_layers(uds, [DiceInputs(code_hash=code_hash_of_blobs([b"kernel", b"initrd"]), mode=DiceMode.NORMAL)])
    assert (h.cdi_attest, h.cdi_seal, h.chain) == (want.cdi_attest, want.cdi_seal, want.chain)
    assert verify_chain(h.chain).entries[0].code_hash == code_hash_of_blobs([b"kernel", b"initrd"])
    again = dice_engine.device(tmp_path, "dev0")
    assert again.uds() == uds  # same device, same secret across harness runs
    other = decode_handover(dice_engine.provision(again, b"kernel", b"other initrd").read_bytes())
    assert other.cdi_attest != h.cdi_attest  # different flash, different CDI_0


def test_factory_registers_root_keys(tmp_path: Path) -> None:
    devs = [dice_engine.device(tmp_path, f"dev{i}") for i in range(2)]
    roots = dice_engine.register(devs, tmp_path / "roots.json")
    loaded = DeviceRoots.load(tmp_path / "roots.json")
    assert set(loaded.keys) == set(roots.keys) and len(loaded.keys) == 2
    assert sorted(loaded.names.values()) == ["dev0", "dev1"]
