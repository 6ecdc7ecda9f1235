"""The firmware's steps on the host: boot.ipxe interpretation, and in a network namespace against
the real boot server DHCP (user class cidboot-firmware -> boot.ipxe) + TFTP of the script, kernel,
initrd and boot config, then measure + derive: the hand-off equals what the software DICE
derivation computes from the same files."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from cidboot.trust.dice import DiceInputs, DiceMode, encode_handover
from cidboot.trust.dice.software import derive_layers
from cidboot.trust.measure import code_hash_of_blobs

REPO = Path(__file__).resolve().parents[2]
MAC = "52:54:00:12:34:56"
UDS = bytes(range(32))
FW_INPUTS = DiceInputs(code_hash=code_hash_of_blobs([b"firmware kernel", b"firmware initrd"]), mode=DiceMode.NORMAL)


def engine_handover() -> bytes:
    fw = derive_layers(UDS, [FW_INPUTS])
    return encode_handover(fw.cdi_attest, fw.cdi_seal, fw.chain)


CLIENT = r'''
import json, sys, time
from firmware import netboot
from firmware.stage import measure_and_derive
t0 = time.monotonic()
net = netboot.network_up()
t1 = time.monotonic()
f = netboot.fetch_boot(net)
t2 = time.monotonic()
m = measure_and_derive(bytearray(bytes.fromhex(sys.argv[1])), f)
print(json.dumps({"ip": net.lease.ip, "boot_file": net.lease.boot_file, "cmdline": f.spec.cmdline,
                  "kernel": f.kernel.hex(), "initrd": f.initrd.hex(), "bootconfig": f.bootconfig.decode(),
                  "dice": m.handoff.dice.hex(), "boot": m.handoff.boot, "dhcp_s": t1 - t0, "tftp_s": t2 - t1,
                  "timings": f.timings}))
'''


@pytest.mark.netns
@pytest.mark.parametrize("loss", [0, 20])
def test_dhcp_and_tftp_fetch_against_the_boot_server_then_measure(tmp_path: Path, loss: int) -> None:
    from qemu.harness.netloss import add_loss
    from tests.support.boot_network import running_boot_server

    with running_boot_server(tmp_path, taps=0) as srv:
        size = 3 * 1024 * 1024  # RFC 7440 windows + gap ACKs (cidboot.netboot.tftp_client): seconds even under 20 % loss
        kernel, initrd = os.urandom(size + 17), os.urandom(size // 3 + 3)
        (srv.tftp_root / "bootstrap" / "vmlinuz").write_bytes(kernel)
        (srv.tftp_root / "bootstrap" / "initrd.img").write_bytes(initrd)
        host = srv.net.add_host()
        if loss:
            add_loss(srv.net.host_cmd(host, []), "eth0", loss)
            add_loss(srv.net.cmd([]), "h0p", loss)
        run = subprocess.run(srv.net.host_cmd(host, [sys.executable, "-c", CLIENT, engine_handover().hex()]),
                             capture_output=True, text=True, timeout=300, cwd=REPO)
        assert run.returncode == 0, run.stderr
        out = json.loads(run.stdout)
        print(f"loss {loss}%: DHCP {out['dhcp_s']:.2f} s, TFTP {out['tftp_s']:.2f} s for "
              f"{len(kernel) + len(initrd)} bytes {out['timings']}")
        assert out["boot_file"] == "boot.ipxe"
        assert bytes.fromhex(out["kernel"]) == kernel and bytes.fromhex(out["initrd"]) == initrd
        mac = json.loads(out["bootconfig"])  # the server's generated per-MAC boot config
        assert mac["gateways"] == ["http://10.77.0.1:8080"]
        assert out["cmdline"].startswith("cidboot.config=tftp://10.77.0.1/bootconfig/") and "${" not in out["cmdline"]
        l1 = DiceInputs(code_hash=code_hash_of_blobs([kernel, initrd]), config_value=None,
                        config_descriptor=out["bootconfig"].encode(), mode=DiceMode.NORMAL)
        want = derive_layers(UDS, [FW_INPUTS, l1])
        assert bytes.fromhex(out["dice"]) == encode_handover(want.cdi_attest, want.cdi_seal, want.chain)
        assert out["boot"] == {"boot_mode": "measured", "bootconfig": out["bootconfig"]}


