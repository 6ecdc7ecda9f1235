"""The harness's `tpm` option: a tpm-tis TPM 2.0 backed by an swtpm control socket, and nothing
TPM-related without it."""

from __future__ import annotations

from pathlib import Path

from qemu.harness.vm import GuestSpec


def test_tpm_option_adds_an_emulator_tpm_tis(tmp_path: Path) -> None:
    sock = tmp_path / "swtpm.sock"
    argv = GuestSpec("g", firmware="uefi", uefi_vars=tmp_path / "VARS.fd", tpm=sock).argv(tmp_path / "qmp.sock")
    i = argv.index("-tpmdev")
    assert argv[i - 2:i + 4] == ["-chardev", f"socket,id=chrtpm,path={sock}", "-tpmdev", "emulator,id=tpm0,chardev=chrtpm",
                                 "-device", "tpm-tis,tpmdev=tpm0"]


def test_no_tpm_without_the_option(tmp_path: Path) -> None:
    argv = GuestSpec("g", firmware="uefi", uefi_vars=tmp_path / "VARS.fd").argv(tmp_path / "qmp.sock")
    assert "-tpmdev" not in argv and not any("tpm-tis" in a or "chrtpm" in a for a in argv)


def test_arm64_tpm_is_the_mmio_tis_device_of_virt(tmp_path: Path) -> None:
    """arm64 `virt` has no ISA bus: its TIS TPM is `tpm-tis-device` (MMIO, in ACPI as MSFT0101)."""
    sock = tmp_path / "swtpm.sock"
    argv = GuestSpec("g", firmware="uefi", uefi_vars=tmp_path / "VARS.fd", tpm=sock, arch="arm64",
                     network_boot=True).argv(tmp_path / "qmp.sock")
    assert argv[0] == "qemu-system-aarch64" and "virt" in argv
    i = argv.index("-tpmdev")
    assert argv[i - 2:i + 4] == ["-chardev", f"socket,id=chrtpm,path={sock}", "-tpmdev", "emulator,id=tpm0,chardev=chrtpm",
                                 "-device", "tpm-tis-device,tpmdev=tpm0"]
