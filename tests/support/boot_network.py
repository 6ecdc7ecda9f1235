"""A running boot server inside a throwaway network namespace, for the PXE tests."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from cidboot.ipld.cid import RAW
from cidboot.store.blockstore import Blockstore
from qemu.harness.netns import BootNetwork, boot_network


@dataclass
class RunningServer:
    net: BootNetwork
    proc: subprocess.Popen[str]
    log: Path
    tftp_root: Path

    def metrics(self) -> dict[str, float]:
        out = self.net.run(["curl", "-sf", f"http://{self.net.server_ip}:8080/metrics"], capture_output=True, text=True, timeout=10)
        vals = {}
        for line in out.stdout.splitlines():
            name, _, v = line.rpartition(" ")
            vals[name] = float(v)
        return vals

    def events(self) -> list[dict[str, object]]:
        out = []
        for line in self.log.read_text().splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:
                pass
        return out


@contextmanager
def running_boot_server(tmp: Path, taps: int = 1, extra: list[str] | None = None) -> Iterator[RunningServer]:
    store = Blockstore(tmp / "store")
    manifest = store.put_block(b"placeholder manifest for DHCP/TFTP tests", RAW)
    root = tmp / "tftp"
    (root / "bootstrap").mkdir(parents=True)
    (root / "bootstrap" / "big.bin").write_bytes(bytes(range(256)) * 4096)
    # the placeholder manifest has no root to build a bootstrap for: every boot file the server
    # offers comes from this root (bootstrap.bootfiles: a --tftp-root file overrides the built one)
    for name in ("undionly.kpxe", "bootstrap-x86_64.efi", "bootstrap-arm64.efi", "bootstrap/vmlinuz",
                 "bootstrap/initrd.img"):
        if not (root / name).exists():
            (root / name).write_bytes(f"placeholder {name}\n".encode())
    with boot_network(taps=taps) as net:
        log = tmp / "server.log"
        with open(log, "w") as logf:
            proc = net.popen([sys.executable, "-m", "bootstrap", "--log-json", "-vv", "serve", "--interface", "br0",
                              *(extra or ["--dhcp-range", "10.77.0.100-10.77.0.119"]), "--store", str(store.path),
                              "--manifest", str(manifest), "--tftp-root", str(root), "--state-dir", str(tmp / "state")],
                             stdout=subprocess.PIPE, stderr=logf, text=True)
        try:
            assert proc.stdout is not None
            line = proc.stdout.readline()
            assert "serving on br0" in line, log.read_text()
            srv = RunningServer(net, proc, log, root)
            deadline = time.monotonic() + 20
            while not srv.metrics() and time.monotonic() < deadline:
                time.sleep(0.2)
            yield srv
        finally:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()


def boot_until(tmp: Path, net: BootNetwork | None, *, until: str, timeout: float, kernel: bytes | None = None,
               initrd: bytes | None = None, append: str = "console=ttyS0 quiet panic=-1 no_timer_check",
               fw_cfg: dict[str, Path] | None = None, disk: Path | None = None, mac: str = "52:54:00:12:34:56",
               memory_mib: int = 1024, boot_from_network: bool = False) -> tuple[str, list[tuple[float, str]]]:
    """Boot one guest on tap0 of `net` (no NIC without one; qemu.harness.vm) and stop it as soon as a console line
    matches `until` (or it powers off): a test never waits for its own timeout on success.
    Returns the console text and (seconds since power-on, line) pairs; `tmp/guest/console.log` keeps it."""
    from qemu.harness.vm import Guest, GuestError

    files = {}
    for name, blob in (("vmlinuz", kernel), ("initrd", initrd)):
        if blob is not None:
            (tmp / name).write_bytes(blob)
            files[name] = tmp / name
    guest = Guest.create("dut", tmp / "guest", kernel=files.get("vmlinuz"), initrd=files.get("initrd"), append=append,
                         fw_cfg=fw_cfg, nic=("tap0", mac) if net else None, disk=disk, memory_mib=memory_mib,
                         boot_from_network=boot_from_network, net=net)
    with guest:
        try:
            guest.wait_for_console(until, timeout)
        except GuestError as e:
            if guest.running:  # not a power-off before the marker: the test fails with the console tail
                raise
            del e
    lines = [(ln.t, ln.text) for ln in guest.console.lines]
    return "\n".join(text for _, text in lines), lines
