"""The harness as a TPM factory: one manufactured swtpm per device, kept under its state dir
across boots (like the UDS of a DICE device), and enrolment (docs/tpm.md, "Enrolment").

- `Swtpm(dir)`: `swtpm_setup --tpm2 --create-ek-cert` with a local CA of its own (an EK
  certificate, as a TPM vendor's), then `swtpm socket` for a QEMU guest (`qemu=True`: a Unix
  control socket, tpm-tis) or on loopback TCP for the factory's raw commands and tpm2-tools.
- `factory(dir)`: manufacture, and make the primary AK persistent at AK_HANDLE: the device's
  enrolled AK (TpmDevice with its TPM2B_PUBLIC and EK certificate) before it ever boots.
- the firmware baseline of a known-good boot: cidboot.trust.tpm.enrol (`Lab.enrol` calls it).
"""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

from cidboot.trust.appraisal import DeviceRoots, TpmDevice
from cidboot.trust.tpm.appraise import TpmReferences
from cidboot.trust.tpm.device import SocketTransport, Tpm
from cidboot.trust.tpm.enrol import enrol_device
from cidboot.trust.tpm.evidence import device_id

TOOLS = ("swtpm", "swtpm_setup")


def missing() -> str | None:
    """Why a TPM device cannot be made here (None: it can)."""
    absent = [t for t in TOOLS if shutil.which(t) is None]
    return f"needs {', '.join(absent)} (Debian swtpm, swtpm-tools: .ci/apt-packages.txt)" if absent else None


def _free_port_pair() -> int:
    """A port P with P and P+1 free on loopback (the swtpm TCTI talks to P, its control channel to P+1)."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        if port >= 65535:
            continue
        with contextlib.suppress(OSError), socket.socket() as s2:
            s2.bind(("127.0.0.1", port + 1))
            return port
    raise RuntimeError("no free loopback port pair for swtpm")


class Swtpm:
    """A manufactured swtpm in socket mode; `with Swtpm(dir) as tpm:` starts and stops it."""

    def __init__(self, base: Path, *, qemu: bool = False) -> None:
        """`qemu=True`: a TPM for a QEMU guest (GuestSpec.tpm = `ctrl_socket`): a Unix control socket
        only, QEMU passes the data channel and the firmware sends TPM2_Startup; else a TPM on
        loopback TCP for tpm2-tools, started (TPM2_Startup(CLEAR)) by swtpm itself."""
        self.base = base.resolve()
        self.state = self.base / "state"
        self.qemu = qemu
        self.ctrl_socket = self.base / "swtpm.sock"
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None

    # -- manufacture and life cycle ------------------------------------------------------------
    def manufacture(self) -> None:
        """swtpm_setup with an EK certificate signed by a local CA kept under the base dir."""
        ca = self.base / "localca"
        ca.mkdir(parents=True, exist_ok=True)
        self.state.mkdir(parents=True, exist_ok=True)
        (self.base / "swtpm-localca.conf").write_text(
            f"statedir = {ca}\nsigningkey = {ca}/signkey.pem\nissuercert = {ca}/issuercert.pem\n"
            f"certserial = {ca}/certserial\n")
        (self.base / "swtpm-localca.options").write_text(
            "--platform-manufacturer cidboot\n--platform-version 2.1\n--platform-model QEMU\n")
        (self.base / "swtpm_setup.conf").write_text(
            f"create_certs_tool = /usr/bin/swtpm_localca\ncreate_certs_tool_config = {self.base}/swtpm-localca.conf\n"
            f"create_certs_tool_options = {self.base}/swtpm-localca.options\nactive_pcr_banks = sha256\n")
        subprocess.run(["swtpm_setup", "--tpm2", "--tpmstate", str(self.state), "--create-ek-cert",
                        "--config", str(self.base / "swtpm_setup.conf"), "--pcr-banks", "sha256",
                        "--overwrite", "--logfile", str(self.base / "swtpm_setup.log")],
                       check=True, capture_output=True, timeout=120)

    def start(self) -> Swtpm:
        if not (self.state / "tpm2-00.permall").exists():
            self.manufacture()
        argv = ["swtpm", "socket", "--tpm2", "--tpmstate", f"dir={self.state}", "--log", f"file={self.base / 'swtpm.log'}"]
        if self.qemu:
            self.ctrl_socket.unlink(missing_ok=True)
            argv += ["--ctrl", f"type=unixio,path={self.ctrl_socket}"]
        else:
            self.port = _free_port_pair()
            argv += ["--server", f"type=tcp,port={self.port},bindaddr=127.0.0.1",
                     "--ctrl", f"type=tcp,port={self.port + 1},bindaddr=127.0.0.1", "--flags", "not-need-init,startup-clear"]
        self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=open(self.base / "swtpm.stderr", "wb"))
        deadline = time.monotonic() + 20
        while not self._listening():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"swtpm did not start: {(self.base / 'swtpm.stderr').read_text(errors='replace')}")
            time.sleep(0.05)
        return self

    def _listening(self) -> bool:
        if self.qemu:
            return self.ctrl_socket.exists()
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.port), 0.5):
            return True
        return False

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def __enter__(self) -> Swtpm:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _tpm(sw: Swtpm) -> Tpm:
    return Tpm(SocketTransport("127.0.0.1", sw.port))


def factory(base: Path) -> TpmDevice:
    """Manufacture the device's TPM (once; the state is kept) and enrol it: the AK made
    persistent at AK_HANDLE, the EK certificate read from its NV index and checked against the
    local CA that signed it, and make/activate credential with that EK and the AK's name. No
    firmware baseline yet (`firmware_baseline` after a known-good boot)."""
    from cryptography import x509

    from cidboot.trust.tpm import commands as c

    with Swtpm(base) as sw, _tpm(sw) as tpm:  # start() manufactures it first, so the local CA exists
        # A lab TPM is powered off hard (QEMU killed, swtpm stopped): each TPM2_Startup after a
        # non-orderly shutdown in which the DA-protected AK was used counts a dictionary-attack
        # failure, and swtpm's default of 3 locks the AK out (TPM_RC_LOCKOUT, rc 0x921) after a few
        # boots. The factory owns the lockout hierarchy (empty password): it clears the counter and
        # makes the lab's limit generous, then shuts down orderly itself.
        c.ok(tpm.run(c.dictionary_attack_lock_reset(), "TPM2_DictionaryAttackLockReset"), "TPM2_DictionaryAttackLockReset")
        c.ok(tpm.run(c.dictionary_attack_parameters(1000, 1, 1), "TPM2_DictionaryAttackParameters"),
             "TPM2_DictionaryAttackParameters")
        ca = x509.load_pem_x509_certificate((base / "localca" / "issuercert.pem").read_bytes())
        dev = enrol_device(tpm, ek_ca=ca)  # EK cert issued by the local CA, make/activate credential
        c.ok(tpm.run(c.shutdown(), "TPM2_Shutdown"), "TPM2_Shutdown")
    return dev


def register(bases: list[Path], names: list[str], roots_file: Path, roles: list[str]) -> DeviceRoots:
    """The factory for TPM devices (dice_engine.register's counterpart): each device's enrolled AK
    and EK certificate into the verifiers' roots file, under its name and role."""
    roots = DeviceRoots.load(roots_file) if roots_file.exists() else DeviceRoots()
    for base, name, role in zip(bases, names, roles, strict=True):
        dev = factory(base)
        did = device_id(dev.ak_name)
        if did in roots.tpm:  # enrolled before (a kept device dir): keep its firmware baseline
            dev = TpmDevice(dev.ak_public, roots.tpm[did].firmware_pcrs, dev.ek_cert)
        roots.add_tpm(dev, name, role)
    roots.save(roots_file)
    return roots


def uki_references(dep: Any) -> dict[str, TpmReferences]:
    """The PCR 4/11 references of each bootstrap UKI as the deployment built it (`dep`: a
    qemu.harness.deploy.Deployment), by UEFI arch ("x86_64", "arm64"), for the signed registry the
    agents appraise TPM peers with. The registry is signed at each lab start (lab._factory), so a
    device's firmware baseline recorded by `Lab.enrol` (the factory boot) is in the registry the
    next boot is served."""
    return {arch: TpmReferences.for_uki(uki.read_bytes()) for arch, uki in sorted(dep.bootstrap.uki.items())}


def base(device_dir: Path) -> Path:
    """Where a device's TPM state lives: beside its NVRAM (and UDS, for a DICE device)."""
    return device_dir / "tpm"
