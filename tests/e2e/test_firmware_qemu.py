"""The L0 firmware image booted under QEMU (TCG) in a network namespace against the real boot
server: fw_cfg handover from a software DICE engine -> firmware start -> DHCP -> TFTP boot.ipxe,
kernel, initrd, boot config -> measure + derive -> hand-over (switch_root: the same kernel) to the stand-in, whose init finds
the hand-off. The wall time of every step (from the console, timestamped here) is printed.

The firmware flow's signing keys are not in the repository: the fixture copies firmware/image
and generates them (as tests/integration/test_build_repro_integration.py does for the hello flow). The "bootstrap" served
here is a stand-in: the firmware's own kernel and a tiny busybox initrd that reports what it got.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cidboot.ipld.cid import CID
from cidboot.ipld.unixfs.exporter import export_file
from cidboot.stage.cpio import Entry, archive_bytes
from cidboot.store.blockstore import Blockstore
from cidboot.trust import keys
from cidboot.trust.dice import DiceInputs, DiceMode, encode_handover
from cidboot.trust.dice.software import derive_layers
from cidboot.trust.manifest import SignedManifest
from cidboot.trust.measure import code_hash_of_blobs

pytestmark = [pytest.mark.qemu, pytest.mark.netns]
REPO = Path(__file__).resolve().parents[2]
MAC = "52:54:00:12:34:56"
UDS = bytes(range(32))

SECOND_INIT = """#!/bin/busybox sh
/bin/busybox mount -t proc proc /proc
echo "second-stage: up cmdline=$(/bin/busybox cat /proc/cmdline)"
echo "second-stage: boot.json=$(/bin/busybox cat /run/cidboot/boot.json)"
echo "second-stage: dice.cbor bytes=$(/bin/busybox wc -c < /run/cidboot/dice.cbor) mode=$(/bin/busybox stat -c %a /run/cidboot/dice.cbor)"
/bin/busybox poweroff -f
"""


def stand_in_initrd() -> bytes:
    busybox = Path(shutil.which("busybox") or "/bin/busybox").read_bytes()
    return archive_bytes([Entry.file("bin/busybox", busybox, 0o755), Entry.file("init", SECOND_INIT.encode(), 0o755),
                          Entry.directory("proc"), Entry.directory("dev"), Entry.chardev("dev/console", 5, 1)], 0)


@pytest.fixture(scope="module")
def firmware_image(tmp_path_factory: pytest.TempPathFactory) -> tuple[bytes, bytes, float]:
    d = tmp_path_factory.mktemp("fw") / "image"
    shutil.copytree(REPO / "firmware/image", d, ignore=shutil.ignore_patterns("keys", "__pycache__"))
    keys.write_keypair(keys.generate(), d / "keys/signer-1")
    store = d.parent / "store"
    t = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "imagebuilder", "build", str(d / "flow.yaml"), "--json", "--store",
                           str(store)], capture_output=True, text=True, cwd=REPO, timeout=900)
    build_s = time.monotonic() - t
    assert proc.returncode == 0, proc.stderr
    res = json.loads(proc.stdout)
    bs = Blockstore(store)
    m = SignedManifest.decode(bs.get(CID.parse(res["manifest"]))).manifest
    parts = {lyr.role: b"".join(export_file(lyr.cid, bs.get)) for lyr in m.layers}
    from imagebuilder.cpio import flash_initrd

    initrd = flash_initrd([parts[r] for r in ("runtime", "agent", "operations", "config")])  # as on the flash
    assert m.measurements["firmware"] == code_hash_of_blobs([parts["kernel"], initrd])
    return parts["kernel"], initrd, build_s


def _boot(tmp: Path, kernel: bytes, initrd: bytes, handover: bytes | None, *, timeout: float = 300,
          until: str = "reboot: Power down") -> tuple[str, list[tuple[float, str]]]:
    """Boot the firmware on tap0 of a fresh boot network until `until` appears on the console."""
    from tests.support.boot_network import boot_until, running_boot_server

    fw_cfg = {}
    if handover is not None:
        (tmp / "handover.cbor").write_bytes(handover)
        fw_cfg = {"opt/cidboot/dice": tmp / "handover.cbor"}
    with running_boot_server(tmp) as srv:
        (srv.tftp_root / "bootstrap" / "vmlinuz").write_bytes(kernel)
        (srv.tftp_root / "bootstrap" / "initrd.img").write_bytes(stand_in_initrd())
        return boot_until(tmp, srv.net, until=until, timeout=timeout, kernel=kernel, initrd=initrd, fw_cfg=fw_cfg,
                          mac=MAC, memory_mib=768)


def _at(lines: list[tuple[float, str]], pattern: str, after: float = 0.0) -> float | None:
    return next((t for t, line in lines if t >= after and re.search(pattern, line)), None)


def test_firmware_boots_fetches_measures_and_hands_over(firmware_image: tuple[bytes, bytes, float], tmp_path: Path) -> None:
    kernel, initrd, build_s = firmware_image
    fw = derive_layers(UDS, [DiceInputs(code_hash=code_hash_of_blobs([kernel, initrd]), mode=DiceMode.NORMAL)])
    console, lines = _boot(tmp_path, kernel, initrd, encode_handover(fw.cdi_attest, fw.cdi_seal, fw.chain))
    tail = console[-4000:]
    assert "cidboot-stage: firmware start" in console, tail
    m = re.search(r"cidboot-stage: firmware handover code=([0-9a-f]{16})", console)
    assert m, tail
    # what the firmware measured is the stand-in bootstrap it was served
    assert m.group(1) == code_hash_of_blobs([kernel, stand_in_initrd()]).hex()[:16]
    # the stand-in bootstrap pins the firmware's own kernel, so the hand-over is a switch_root in the
    # same kernel (cidboot.stage.switch_root): its init sees the running kernel's command line, and
    # gets the boot config through boot.json, not cidboot.config= (a kexec would pass that instead)
    assert "cidboot-stage: handover switch_root" in console, tail
    assert "cidboot: firmware: unloaded qemu_fw_cfg" in console, tail  # CDI_0 out of reach before exec
    assert re.search(r"second-stage: up cmdline=console=ttyS0\b", console), tail
    assert 'second-stage: boot.json={"boot_mode":"measured","bootconfig":' in console, tail
    assert re.search(r"second-stage: dice.cbor bytes=\d+ mode=600", console), tail
    assert "Kernel panic" not in console, tail
    marks = {
        "kernel 1 up -> firmware start": _at(lines, r"cidboot-stage: firmware start"),
        "firmware handover": _at(lines, r"cidboot-stage: firmware handover"),
        "second stage init": _at(lines, r"second-stage: up"),
        "power down": _at(lines, r"reboot: Power down"),
    }
    detail = next((line for _, line in lines if line.startswith("cidboot: firmware: ip=")), "")
    print(f"\nfirmware image build {build_s:.1f} s; console marks (s since power-on): "
          + ", ".join(f"{k} {v:.2f}" for k, v in marks.items() if v is not None) + f"\n{detail}")


def test_firmware_without_engine_handover_refuses_and_powers_off(firmware_image: tuple[bytes, bytes, float],
                                                                 tmp_path: Path) -> None:
    kernel, initrd, _ = firmware_image
    console, _ = _boot(tmp_path, kernel, initrd, None, timeout=240)
    assert "cidboot: refused: no DICE handover from the engine" in console, console[-3000:]
    assert "cidboot-stage: firmware start" not in console
    assert "reboot: Power down" in console and "Kernel panic" not in console

