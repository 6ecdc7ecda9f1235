"""Which QEMU accelerator to use: TCG unless KVM has been seen to actually boot a kernel here.

`/dev/kvm` existing proves little: on this project's build machines nested KVM triple-faulted on
direct kernel boot, and QEMU with `-cpu host` aborts there ("failed to set MSR 0x10a"). So
"auto" boots the given kernel under KVM once, as the guests would run it (`-cpu host`), with no
initrd and a short timeout, and waits for the kernel to reach the point where it looks for a
root file system on the serial console. The verdict is cached per host, QEMU and kernel in
~/.cache/cidboot/kvm-probe.json (with what was seen, so a "no" can be read later).
CIDBOOT_ACCEL=tcg|kvm|auto overrides; auto is the default. A guest of another architecture than
the host's (arm64 on an x86_64 build machine) is always TCG: KVM runs only the host's own.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import subprocess
import time
from dataclasses import asdict, dataclass
from pathlib import Path

CACHE = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "cidboot" / "kvm-probe.json"
REACHED = (b"VFS: Unable to mount root", b"Kernel panic - not syncing", b"Run /init")
KVM_CPU = "host"  # what guests run with under KVM (vm.GuestSpec), so what the probe must try


@dataclass(frozen=True)
class Probe:
    kvm: bool
    detail: str  # what was seen: the marker reached, QEMU's error, or "no output within N s"
    seconds: float


def probe_kvm(kernel: Path, timeout: float = 30) -> Probe:
    """Boot `kernel` under KVM with no root: usable if it got as far as looking for one."""
    t0 = time.monotonic()
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return Probe(False, "/dev/kvm missing or not accessible", 0.0)
    argv = ["qemu-system-x86_64", "-accel", "kvm", "-cpu", KVM_CPU, "-m", "256", "-display", "none",
            "-serial", "stdio", "-monitor", "none", "-no-reboot", "-nic", "none",
            "-kernel", str(kernel), "-append", "console=ttyS0 panic=-1"]
    try:
        out = subprocess.run(argv, capture_output=True, timeout=timeout)
        stdout, stderr = out.stdout, out.stderr
    except subprocess.TimeoutExpired as e:
        stdout, stderr = e.stdout or b"", e.stderr or b""
    except OSError as e:
        return Probe(False, f"cannot run QEMU: {e}", time.monotonic() - t0)
    took = round(time.monotonic() - t0, 2)
    for marker in REACHED:
        if marker in stdout:
            return Probe(True, f"reached {marker.decode()!r}", took)
    err = stderr.decode(errors="replace").strip().splitlines()
    if err:
        return Probe(False, f"QEMU: {err[0][:200]}", took)
    seen = "no console output" if not stdout.strip() else "the kernel printed but never looked for a root"
    return Probe(False, f"{seen} within {timeout:.0f} s", took)


def _cache_key(kernel: Path) -> str:
    qemu = subprocess.run(["qemu-system-x86_64", "--version"], capture_output=True, text=True).stdout.split("\n")[0]
    host = f"{platform.node()} {platform.release()} {qemu}"
    return hashlib.sha256(host.encode() + b"\0" + kernel.read_bytes()).hexdigest()


def cached_probe(kernel: Path) -> Probe:
    """The probe's verdict for this host, QEMU and kernel, from the cache or a fresh boot."""
    key = _cache_key(kernel)
    try:
        cache = json.loads(CACHE.read_text())
    except (OSError, ValueError):
        cache = {}
    hit = cache.get(key)
    if isinstance(hit, dict) and {"kvm", "detail", "seconds"} <= set(hit):
        return Probe(bool(hit["kvm"]), str(hit["detail"]), float(hit["seconds"]))
    result = probe_kvm(kernel)
    cache[key] = {**asdict(result), "host": platform.node(), "kernel": str(kernel),
                  "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    CACHE.parent.mkdir(parents=True, exist_ok=True)
    CACHE.write_text(json.dumps(cache, indent=1) + "\n")
    return result


HOST_ARCH = {"x86_64": "x86_64", "amd64": "x86_64", "aarch64": "arm64", "arm64": "arm64"}


def choose(kernel: Path | None = None, arch: str = "x86_64") -> str:
    """"tcg" or "kvm", from CIDBOOT_ACCEL (default auto: the probe with `kernel`, TCG without one);
    a guest `arch` other than the host's is TCG (and CIDBOOT_ACCEL=kvm for it is an error)."""
    want = os.environ.get("CIDBOOT_ACCEL", "auto")
    if arch != HOST_ARCH.get(platform.machine(), platform.machine()):
        if want == "kvm":
            raise ValueError(f"CIDBOOT_ACCEL=kvm cannot run an {arch} guest on this {platform.machine()} host")
        return "tcg"
    if want in ("tcg", "kvm"):
        return want
    if want != "auto":
        raise ValueError(f"CIDBOOT_ACCEL must be tcg, kvm or auto, not {want!r}")
    if kernel is None:
        return "tcg"
    return "kvm" if cached_probe(kernel).kvm else "tcg"
