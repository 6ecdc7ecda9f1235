"""Which QEMU accelerator to use: TCG unless KVM has been seen to actually boot a kernel here.

`/dev/kvm` existing proves little: on this project's build machines nested KVM triple-faulted on
direct kernel boot. So "auto" boots the given kernel under KVM once with no initrd and waits
for it to reach the point where it looks for a root file system; the answer is cached per
(kernel, QEMU) in ~/.cache/cidboot/kvm-probe.json. CIDBOOT_ACCEL=tcg|kvm|auto overrides.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
from pathlib import Path

CACHE = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "cidboot" / "kvm-probe.json"
REACHED = (b"VFS: Unable to mount root", b"Kernel panic - not syncing", b"Run /init")


def probe_kvm(kernel: Path, timeout: float = 30) -> bool:
    """Boot `kernel` under KVM with no root: True if it got as far as looking for one."""
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return False
    try:
        out = subprocess.run(["qemu-system-x86_64", "-accel", "kvm", "-cpu", "host", "-m", "256", "-display", "none",
                              "-serial", "stdio", "-monitor", "none", "-no-reboot", "-nic", "none",
                              "-kernel", str(kernel), "-append", "console=ttyS0 panic=-1"],
                             capture_output=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return any(marker in out.stdout for marker in REACHED)


def choose(kernel: Path | None = None) -> str:
    want = os.environ.get("CIDBOOT_ACCEL", "auto")
    if want in ("tcg", "kvm"):
        return want
    if want != "auto":
        raise ValueError(f"CIDBOOT_ACCEL must be tcg, kvm or auto, not {want!r}")
    if kernel is None:
        return "tcg"
    qemu = subprocess.run(["qemu-system-x86_64", "--version"], capture_output=True, text=True).stdout.split("\n")[0]
    key = hashlib.sha256(kernel.read_bytes() + qemu.encode()).hexdigest()
    try:
        cache = json.loads(CACHE.read_text())
    except (OSError, ValueError):
        cache = {}
    if key not in cache:
        cache[key] = probe_kvm(kernel)
        CACHE.parent.mkdir(parents=True, exist_ok=True)
        CACHE.write_text(json.dumps(cache, indent=1) + "\n")
    return "kvm" if cache[key] else "tcg"
