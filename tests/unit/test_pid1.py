"""PID-1 duties that can be checked on a host: refusing to act unless PID 1, the syscall table;
and the image builder's module reader rejecting what is not a kernel module."""

from __future__ import annotations

import pytest

from cidboot.stage import pid1, syscalls
from imagebuilder import kmod


def test_not_a_module() -> None:
    with pytest.raises(kmod.NotAModule, match="not a kernel module"):
        kmod.modinfo(b"hello")


def test_refuses_to_act_outside_pid1() -> None:
    """Called on a host (not as /init), nothing is mounted and nothing powers off."""
    with pytest.raises(pid1.Pid1Error, match="not PID 1"):
        pid1.power_off("test")
    with pytest.raises(pid1.Pid1Error, match="must run as PID 1"):
        pid1.run_stage("agent")


def test_syscall_numbers_are_known_for_both_machines_and_refused_elsewhere(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    for name in ("reboot", "finit_module", "kexec_file_load"):
        assert set(syscalls.SYSCALLS[name]) == {"x86_64", "aarch64"}
    real = os.uname()
    riscv = os.uname_result((real.sysname, real.nodename, real.release, real.version, "riscv64"))
    monkeypatch.setattr(os, "uname", lambda: riscv)
    with pytest.raises(syscalls.SyscallError, match="finit_module: unsupported machine riscv64"):
        syscalls.number("finit_module")


def test_modules_already_loaded_are_read_from_proc_modules(tmp_path: object) -> None:
    """run_stage skips finit_module for these (after a same-kernel hand-over the NIC's are loaded)."""
    from pathlib import Path

    p = Path(str(tmp_path)) / "modules"
    p.write_text("virtio_net 61440 0 - Live 0x0000000000000000\nnet_failover 20480 1 virtio_net, Live 0x0\n\n")
    assert pid1.loaded_modules(str(p)) == {"virtio_net", "net_failover"}
    assert pid1.loaded_modules(str(p.with_name("absent"))) == set()
