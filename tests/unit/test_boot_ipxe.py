"""boot.ipxe passes the bootstrap's own kernel parameters, so BIOS iPXE boots can keep the kernel.

The bootstrap hands over by switch_root (same kernel) only when every kernel parameter the next
stage asks for is already in effect (cidboot.stage.switch_root.decide). boot.ipxe used to pass
`cidboot.config=... console=ttyS0` alone, so every BIOS iPXE boot of the hello flow (`console=ttyS0
quiet no_timer_check`) fell back to kexec. The script is parsed as the firmware parses it
(firmware.netboot.parse_script), and the resulting command line fed to the real decision.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import yaml

from bootstrap import bootfiles
from bootstrap.server.serve import DEFAULT_BOOTSTRAP_CMDLINE, BadCmdline, ipxe_script
from cidboot.stage.switch_root import decide
from firmware.netboot import ipxe_variables, parse_script

REPO = Path(__file__).resolve().parents[2]
MAC = "52:54:00:12:34:56"
KERNEL = b"the bootstrap's kernel"
RUNNING = hashlib.sha512(KERNEL).digest()


def hello_cmdline() -> str:
    return str(yaml.safe_load((REPO / "examples" / "hello" / "flow.yaml").read_text())["image"]["cmdline"])


def script_cmdline(cmdline: str) -> str:
    spec = parse_script(ipxe_script("10.77.0.1", cmdline), ipxe_variables(MAC, "10.77.0.100", "10.77.0.1"))
    assert spec.kernel == "tftp://10.77.0.1/bootstrap/vmlinuz"
    assert spec.config_url == "tftp://10.77.0.1/bootconfig/52-54-00-12-34-56.json"
    assert spec.initrds == ("tftp://10.77.0.1/bootstrap/initrd.img",)
    return spec.cmdline


def test_the_bootstraps_cmdline_is_in_boot_ipxe_and_the_hello_flow_keeps_the_kernel() -> None:
    boot = bootfiles.flow_cmdline()
    assert "quiet" in boot.split() and "no_timer_check" in boot.split()
    running = script_cmdline(boot)
    assert running.split() == ["cidboot.config=tftp://10.77.0.1/bootconfig/52-54-00-12-34-56.json", *boot.split()]
    assert decide(KERNEL, running=RUNNING, cmdline=hello_cmdline(), running_cmdline=running) == "switch_root"


def test_the_old_script_sent_the_hello_flow_to_kexec() -> None:
    """The control: with the parameters boot.ipxe used to pass, the same decision is kexec."""
    running = script_cmdline(DEFAULT_BOOTSTRAP_CMDLINE)
    assert decide(KERNEL, running=RUNNING, cmdline=hello_cmdline(), running_cmdline=running) == "kexec"


def test_the_cmdline_comes_from_the_build_result_else_the_flow(tmp_path: Path) -> None:
    entry = tmp_path / "entry"
    (entry / "uki").mkdir(parents=True)
    for name in ("vmlinuz", "initrd.img", "uki/bootstrap-x86_64.efi"):
        (entry / name).write_bytes(b"x")
    (entry / "built.json").write_text(json.dumps({
        "manifest": "bafkreigh2akiscaildcqabsyg3dfr6chu3fgpregiymsck7e7aqa4s52zy", "kernel": "vmlinuz",
        "initrd": "initrd.img", "uki": {"x86_64": "uki/bootstrap-x86_64.efi"}, "measurements": {},
        "result": {"cmdline": "console=ttyS0 quiet built_here"}}))
    assert bootfiles.bootstrap_cmdline(entry / "vmlinuz") == "console=ttyS0 quiet built_here"
    # a kernel from elsewhere (a --tftp-root, as the harness's copy of the bootstrap it built)
    other = tmp_path / "tftp" / "bootstrap" / "vmlinuz"
    other.parent.mkdir(parents=True)
    other.write_bytes(b"x")
    assert bootfiles.bootstrap_cmdline(other) == bootfiles.flow_cmdline()


@pytest.mark.parametrize(("cmdline", "why"), [
    ("console=ttyS0\nshell", "no line breaks"),
    ("console=ttyS0 ${net0/ip}", "no '\\$'"),
    ("cidboot.config=tftp://evil/x.json quiet", "no cidboot.config="),
])
def test_what_ipxe_would_read_as_more_than_arguments_is_refused(cmdline: str, why: str) -> None:
    with pytest.raises(BadCmdline, match=why):
        ipxe_script("10.77.0.1", cmdline)


def test_the_served_script_hints_the_served_kernel_and_follows_a_changed_file(tmp_path: Path) -> None:
    """boot.ipxe names the SHA-512 of the kernel the server serves now (re-hashed when the file
    changes), so the firmware never skips a download on a stale hint; no kernel, no hint."""
    import os
    from types import SimpleNamespace

    from bootstrap.server.serve import BootServer

    kernel = tmp_path / "vmlinuz"
    kernel.write_bytes(KERNEL)
    cfg = SimpleNamespace(boot_files={bootfiles.KERNEL_NAME: kernel}, server_ip="10.77.0.1",
                          bootstrap_cmdline=hello_cmdline())
    srv = SimpleNamespace(cfg=cfg, _ipxe_script=ipxe_script("10.77.0.1", hello_cmdline()).encode(), _ipxe_hinted=None,
                          _split=None)
    srv.initrd_split = lambda: BootServer.initrd_split(srv)  # type: ignore[arg-type]

    def hint() -> bytes | None:
        return parse_script(BootServer.ipxe_script(srv).decode(), ipxe_variables(MAC)).kernel_sha512  # type: ignore[arg-type]

    assert hint() == RUNNING
    kernel.write_bytes(KERNEL + b" rebuilt")
    os.utime(kernel, ns=(1, 1))  # a new mtime even within the filesystem's timestamp granularity
    assert hint() == hashlib.sha512(KERNEL + b" rebuilt").digest()
    cfg.boot_files = {}
    assert hint() is None


def test_the_served_script_lists_a_built_initrd_as_its_runtime_layer_and_the_rest(tmp_path: Path) -> None:
    """A built bootstrap initrd (its runtime.json names its first layer) is served as two initrds,
    runtime first, with the runtime layer's SHA-512 as a hint; both are generated from initrd.img
    (a harness or --tftp-root gives only that) and follow it when it changes."""
    from types import SimpleNamespace

    from bootstrap.server.serve import REST_NAME, RUNTIME_NAME, BootServer
    from tests.unit.test_firmware_netboot import bootstrap_initrd

    runtime, rest = bootstrap_initrd()
    kernel, initrd = tmp_path / "vmlinuz", tmp_path / "initrd.img"
    kernel.write_bytes(KERNEL)
    initrd.write_bytes(runtime + rest)
    cfg = SimpleNamespace(boot_files={bootfiles.KERNEL_NAME: kernel, bootfiles.INITRD_NAME: initrd},
                          server_ip="10.77.0.1", bootstrap_cmdline=hello_cmdline())
    srv = SimpleNamespace(cfg=cfg, _ipxe_script=b"", _ipxe_hinted=None, _split=None)
    srv.initrd_split = lambda: BootServer.initrd_split(srv)  # type: ignore[arg-type]
    spec = parse_script(BootServer.ipxe_script(srv).decode(), ipxe_variables(MAC))  # type: ignore[arg-type]
    assert spec.initrds == (f"tftp://10.77.0.1/{RUNTIME_NAME}", f"tftp://10.77.0.1/{REST_NAME}")
    assert spec.runtime_sha512 == hashlib.sha512(runtime).digest() and spec.kernel_sha512 == RUNNING
    peer = ("10.77.0.100", 1234)
    assert BootServer.generate(srv, RUNTIME_NAME, peer) == runtime  # type: ignore[arg-type]
    assert BootServer.generate(srv, REST_NAME, peer) == rest  # type: ignore[arg-type]
    initrd.write_bytes(b"a hand-made initrd")  # no runtime layer to split off: one initrd, as before
    spec = parse_script(BootServer.ipxe_script(srv).decode(), ipxe_variables(MAC))  # type: ignore[arg-type]
    assert spec.initrds == ("tftp://10.77.0.1/bootstrap/initrd.img",) and spec.runtime_sha512 is None
    assert BootServer.generate(srv, RUNTIME_NAME, peer) is None  # type: ignore[arg-type]
