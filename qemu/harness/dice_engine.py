"""The harness as DICE hardware and factory.

On a board a ROM or secure element keeps the Unique Device Secret, measures the first mutable
code (L0) and hands it CDI_0; a factory records each device's root public key so verifiers
can recognise it. Under QEMU the harness plays both parts: each device has a state dir with a
persistent random UDS (0600) and a 1 MiB NVRAM disk; `provision` measures the firmware it is
about to load as "flash", runs the Open Profile for DICE main flow for L0 exactly as
`cidboot.trust.dice.software.derive_layers` does, and writes the handover for `-fw_cfg`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from cidboot.trust.appraisal import DeviceRoots
from cidboot.trust.dice import main_flow
from cidboot.trust.dice.chain import encode_chain, encode_handover
from cidboot.trust.dice.derive import DiceInputs, DiceMode, root_public_key_from_uds
from cidboot.trust.measure import code_hash_of_blobs

FW_CFG_NAME = "opt/cidboot/dice"
UDS_SIZE = 32
NVRAM_SIZE = 1 << 20


@dataclass(frozen=True)
class DeviceState:
    name: str
    dir: Path

    @property
    def uds_path(self) -> Path:
        return self.dir / "uds"

    @property
    def nvram(self) -> Path:
        return self.dir / "nvram.img"

    @property
    def handover(self) -> Path:
        return self.dir / "fw_cfg-dice.cbor"

    def uds(self) -> bytes:
        """The device's UDS, created once (random) and kept: the device's identity across boots."""
        if not self.uds_path.exists():
            self.dir.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.uds_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(os.urandom(UDS_SIZE))
        data = self.uds_path.read_bytes()
        if len(data) != UDS_SIZE:
            raise ValueError(f"{self.uds_path}: a UDS is {UDS_SIZE} bytes, found {len(data)}")
        return data


def device(state_root: Path, name: str) -> DeviceState:
    d = DeviceState(name, state_root / name)
    d.dir.mkdir(parents=True, exist_ok=True)
    if not d.nvram.exists():
        with open(d.nvram, "wb") as f:
            f.truncate(NVRAM_SIZE)
    return d


def measure_flash(kernel: bytes, initrd: bytes) -> bytes:
    """The engine's measurement of the firmware in "flash": the L0 code hash (docs/boot-chain.md)."""
    return code_hash_of_blobs([kernel, initrd])


def firmware_inputs(kernel: bytes, initrd: bytes) -> DiceInputs:
    return DiceInputs(code_hash=measure_flash(kernel, initrd), mode=DiceMode.NORMAL)


def provision(dev: DeviceState, kernel: bytes, initrd: bytes) -> Path:
    """Measure the firmware "flash" and write the L0 handover (CDI_0 + chain) for fw_cfg."""
    uds = dev.uds()
    attest, seal, cert = main_flow(uds, uds, firmware_inputs(kernel, initrd))
    chain = encode_chain(root_public_key_from_uds(uds), [cert])
    fd = os.open(dev.handover, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(encode_handover(attest, seal, chain))
    return dev.handover


def register(devices: list[DeviceState], roots_file: Path, roles: list[str] | None = None) -> DeviceRoots:
    """The factory: every device's root public key (and its role, roles[i]: appraisal compares
    the role a device claims with it) into a roots file for verifiers."""
    roots = DeviceRoots.load(roots_file) if roots_file.exists() else DeviceRoots()
    for i, dev in enumerate(devices):
        roots.add(root_public_key_from_uds(dev.uds()), dev.name, roles[i] if roles and i < len(roles) else None)
    roots.save(roots_file)
    return roots
