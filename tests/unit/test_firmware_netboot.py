"""The firmware's steps on the host: boot.ipxe interpretation, and in a network namespace against
the real boot server DHCP (user class cidboot-firmware -> boot.ipxe) + TFTP of the script, kernel,
initrd and boot config, then measure + derive: the hand-off equals what the software DICE
derivation computes from the same files."""

from __future__ import annotations

from pathlib import Path

import pytest

from bootstrap.server.serve import ipxe_script
from cidboot.stage.handoff import Handoff
from cidboot.trust.dice import DiceInputs, DiceMode, decode_handover, encode_handover
from cidboot.trust.dice.software import derive_layers
from cidboot.trust.measure import code_hash_of_blobs
from firmware import netboot
from firmware.netboot import BootSpec, ScriptError, ipxe_variables, parse_script
from firmware.stage import Refused, measure_and_derive, read_engine_handover, wipe

REPO = Path(__file__).resolve().parents[2]
MAC = "52:54:00:12:34:56"
UDS = bytes(range(32))
FW_INPUTS = DiceInputs(code_hash=code_hash_of_blobs([b"firmware kernel", b"firmware initrd"]), mode=DiceMode.NORMAL)


def engine_handover() -> bytes:
    fw = derive_layers(UDS, [FW_INPUTS])
    return encode_handover(fw.cdi_attest, fw.cdi_seal, fw.chain)


def test_parse_the_servers_script() -> None:
    spec = parse_script(ipxe_script("10.77.0.1"), ipxe_variables(MAC, "10.77.0.100", "10.77.0.1"))
    assert spec == BootSpec("tftp://10.77.0.1/bootstrap/vmlinuz",
                            "cidboot.config=tftp://10.77.0.1/bootconfig/52-54-00-12-34-56.json console=ttyS0",
                            ("tftp://10.77.0.1/bootstrap/initrd.img",))
    assert spec.config_url == "tftp://10.77.0.1/bootconfig/52-54-00-12-34-56.json"
    assert netboot.tftp_url("tftp://h:6969/a/b") == ("h", 6969, "a/b")


@pytest.mark.parametrize(("script", "why"), [
    ("kernel tftp://a/k\n", "no #!ipxe"),
    ("#!ipxe\nkernel tftp://a/k ${unknown}\n", "unknown iPXE setting"),
    ("#!ipxe\nkernel http://a/k\n", "only tftp://"),
    ("#!ipxe\nchain --autofree tftp://a/k\n", "options are not supported"),
    ("#!ipxe\nkernel tftp://a/k\nkernel tftp://a/k2\n", "a second kernel"),
    ("#!ipxe\nset x 1\nkernel tftp://a/k\n", "unsupported iPXE command 'set'"),
    ("#!ipxe\ninitrd tftp://a/i\n", "names no kernel"),
])
def test_scripts_we_would_half_understand_are_refused(script: str, why: str) -> None:
    with pytest.raises(ScriptError, match=why):
        parse_script(script, ipxe_variables(MAC))


def test_measure_and_derive_matches_the_software_derivation() -> None:
    fetched = netboot.Fetched(b"#!ipxe", BootSpec("tftp://a/k", ""), b"kernel", b"initrd", b'{"version":1}')
    engine = bytearray(engine_handover())
    m = measure_and_derive(engine, fetched)
    l1 = DiceInputs(code_hash=code_hash_of_blobs([b"kernel", b"initrd"]), config_value=None,
                    config_descriptor=b'{"version":1}', mode=DiceMode.NORMAL)
    want = derive_layers(UDS, [FW_INPUTS, l1])
    assert m.code_hash == l1.code_hash
    assert m.handoff == Handoff(encode_handover(want.cdi_attest, want.cdi_seal, want.chain),
                                {"boot_mode": "measured", "bootconfig": '{"version":1}'})
    with pytest.raises(Refused, match="DICE handover from the engine"):
        measure_and_derive(bytearray(b"\xa0"), fetched)


def test_engine_handover_absent_and_wipe(tmp_path: Path) -> None:
    assert read_engine_handover(tmp_path / "none") is None
    (tmp_path / "raw").write_bytes(b"abc")
    assert read_engine_handover(tmp_path / "raw") == bytearray(b"abc")
    secret = bytes(decode_handover(engine_handover()).cdi_attest)
    wipe(secret)
    assert secret == bytes(32)


def test_boot_server_gives_the_firmware_user_class_the_script() -> None:
    from types import SimpleNamespace

    from bootstrap.server.dhcp_server import DhcpConfig, DhcpServer
    from cidboot.netboot import dhcp

    fake = SimpleNamespace(cfg=DhcpConfig("br0", "10.77.0.1"))

    def file_for(user_class: bytes | None) -> str | None:
        req = dhcp.parse(dhcp.encode_request(MAC, dhcp.DISCOVER, xid=1, arch=dhcp.ARCH_X86_64_UEFI_BC,
                                             user_class=user_class))
        return DhcpServer.boot_file(fake, req)  # type: ignore[arg-type]

    assert file_for(netboot.USER_CLASS) == "boot.ipxe"
    assert file_for(b"iPXE") == "boot.ipxe"
    assert file_for(None) == "bootstrap-x86_64.efi"  # a plain UEFI PXE ROM loads the bootstrap UKI, no iPXE
    assert file_for(b"cidboot-firmware-x") == "bootstrap-x86_64.efi"


# -- the kernel hint: not downloading the kernel the firmware is already running ----------------

KERNEL = b"MZ the kernel the firmware runs " * 64
OTHER = b"MZ a different kernel " * 64
INITRD = b"the bootstrap's initrd"
CMDLINE = "console=ttyS0 quiet no_timer_check"
SERVER_FILES = {"boot.ipxe": b"", "bootstrap/vmlinuz": KERNEL, "bootstrap/initrd.img": INITRD,
                "bootconfig/52-54-00-12-34-56.json": b'{"version":1}'}


def sha512(b: bytes) -> bytes:
    import hashlib

    return hashlib.sha512(b).digest()


def serve_files(monkeypatch: pytest.MonkeyPatch, files: dict[str, bytes], hint: bytes | None) -> list[str]:
    """netboot.tftp_get answered from `files`, boot.ipxe the server's own script with `hint`."""
    fetched: list[str] = []
    script = ipxe_script("10.77.0.1", CMDLINE, hint).encode()

    def get(host: str, path: str, **_kw: object) -> bytes:
        fetched.append(path)
        return script if path == "boot.ipxe" else files[path]

    monkeypatch.setattr(netboot, "tftp_get", get)
    return fetched


def network() -> netboot.Network:
    from cidboot.netboot.dhcp_client import Lease

    lease = Lease("10.77.0.100", 24, "255.255.255.0", "10.77.0.1", "10.77.0.1", "boot.ipxe")
    return netboot.Network("eth0", MAC, lease)


def test_the_servers_script_carries_the_kernel_hint_iPXE_skips() -> None:
    text = ipxe_script("10.77.0.1", CMDLINE, sha512(KERNEL))
    assert text.splitlines()[0] == "#!ipxe" and text.splitlines()[1].startswith("#")  # a comment to iPXE
    spec = parse_script(text, ipxe_variables(MAC, "10.77.0.100", "10.77.0.1"))
    assert spec.kernel_sha512 == sha512(KERNEL)
    assert spec == BootSpec("tftp://10.77.0.1/bootstrap/vmlinuz", spec.cmdline,
                            ("tftp://10.77.0.1/bootstrap/initrd.img",), sha512(KERNEL))
    for bad in ("#cidboot kernel-sha512=zz", "#cidboot kernel-sha512=" + "ab" * 32, "# kernel-sha512=" + "ab" * 64):
        assert netboot.parse_hint(bad) is None  # malformed or short: no hint, the kernel is downloaded


def test_the_running_kernel_is_reused_only_when_the_hint_parameters_and_knob_allow() -> None:
    spec = parse_script(ipxe_script("10.77.0.1", CMDLINE, sha512(KERNEL)), ipxe_variables(MAC))
    running, cmdline = sha512(KERNEL), f"{CMDLINE} panic=-1"
    assert netboot.reuses_running_kernel(spec, running, cmdline)
    assert not netboot.reuses_running_kernel(spec, sha512(OTHER), cmdline)  # the hint names another kernel
    assert not netboot.reuses_running_kernel(spec, None, cmdline)  # this image does not know its kernel
    assert not netboot.reuses_running_kernel(spec, running, "console=ttyS0")  # parameters not in effect
    assert not netboot.reuses_running_kernel(spec, running, cmdline, forced=True)
    unhinted = parse_script(ipxe_script("10.77.0.1", CMDLINE), ipxe_variables(MAC))
    assert not netboot.reuses_running_kernel(unhinted, running, cmdline)


def test_an_honest_hint_skips_the_download_and_measures_the_same(monkeypatch: pytest.MonkeyPatch) -> None:
    """The hinted boot measures exactly what the downloading one did: the bootstrap's reference
    value (code_hash_of_blobs([kernel, initrd])) is the same either way."""
    fetched_paths = serve_files(monkeypatch, SERVER_FILES, sha512(KERNEL))
    hinted = netboot.fetch_boot(network(), running=sha512(KERNEL), running_cmdline=CMDLINE)
    assert hinted.kernel is None and "bootstrap/vmlinuz" not in fetched_paths
    full = netboot.fetch_boot(network(), running=sha512(OTHER), running_cmdline=CMDLINE)  # not ours: downloaded
    assert full.kernel == KERNEL and fetched_paths.count("bootstrap/vmlinuz") == 1
    reference = code_hash_of_blobs([KERNEL, INITRD])
    assert measure_and_derive(bytearray(engine_handover()), hinted).code_hash == reference
    assert measure_and_derive(bytearray(engine_handover()), full).code_hash == reference


def test_a_lying_hint_measures_the_kernel_that_runs_so_appraisal_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    """The server serves OTHER but hints the firmware's own kernel: the firmware runs its own kernel
    and measures exactly that, which is not the served bootstrap's reference value."""
    serve_files(monkeypatch, {**SERVER_FILES, "bootstrap/vmlinuz": OTHER}, sha512(KERNEL))
    f = netboot.fetch_boot(network(), running=sha512(KERNEL), running_cmdline=CMDLINE)
    assert f.kernel is None
    m = measure_and_derive(bytearray(engine_handover()), f)
    assert m.code_hash == code_hash_of_blobs([KERNEL, INITRD])  # what runs: the running kernel + the initrd
    assert m.code_hash != code_hash_of_blobs([OTHER, INITRD])  # the served bootstrap's reference: no match
    # if it must kexec after all (an initramfs it cannot unpack), the served kernel is refused
    from firmware.stage import fetch_measured_kernel

    with pytest.raises(Refused, match="not the kernel the boot script's hint named"):
        fetch_measured_kernel(f)
    serve_files(monkeypatch, SERVER_FILES, sha512(KERNEL))
    assert fetch_measured_kernel(f) == KERNEL


# -- the runtime hint: not downloading the runtime layer the firmware is running --------------------


def bootstrap_initrd() -> tuple[bytes, bytes]:
    """(runtime layer, the other layers) of a bootstrap-like initrd: the rest carries the
    runtime.json naming the runtime layer, as imagebuilder writes it."""
    import gzip
    import json

    from cidboot.stage.cpio import Entry, archive_bytes

    runtime = gzip.compress(archive_bytes([Entry.file("usr/bin/python3.11", b"\x7fELF", 0o755)], 0), mtime=0)
    doc = {"cid": "bafkreiruntime", "size": len(runtime), "sha256": __import__("hashlib").sha256(runtime).hexdigest(),
           "sha512": sha512(runtime).hex(), "paths": ["usr", "usr/bin", "usr/bin/python3.11"]}
    rest = gzip.compress(archive_bytes([Entry.file("init", b"#!/usr/bin/python3.11\n", 0o755),
                                        Entry.file("etc/cidboot/runtime.json", json.dumps(doc).encode())], 0), mtime=0)
    return runtime, rest


def split_files(runtime: bytes, rest: bytes) -> dict[str, bytes]:
    from bootstrap.server.serve import REST_NAME, RUNTIME_NAME

    return {**SERVER_FILES, RUNTIME_NAME: runtime, REST_NAME: rest}


def serve_split(monkeypatch: pytest.MonkeyPatch, files: dict[str, bytes], runtime_hint: bytes) -> list[str]:
    fetched: list[str] = []
    script = ipxe_script("10.77.0.1", CMDLINE, sha512(KERNEL), runtime_hint).encode()

    def get(host: str, path: str, **_kw: object) -> bytes:
        fetched.append(path)
        return script if path == "boot.ipxe" else files[path]

    monkeypatch.setattr(netboot, "tftp_get", get)
    return fetched


def test_the_server_splits_a_built_initrd_after_its_runtime_layer_and_hints_it() -> None:
    from bootstrap.server.serve import REST_NAME, RUNTIME_NAME, split_initrd

    runtime, rest = bootstrap_initrd()
    split = split_initrd(runtime + rest)
    assert split is not None and (split.runtime, split.rest) == (runtime, rest)
    assert split.runtime_sha512 == sha512(runtime)
    assert split_initrd(rest) is None  # runtime.json names bytes this initrd does not begin with
    assert split_initrd(INITRD) is None  # a hand-made initrd: served whole, as before
    text = ipxe_script("10.77.0.1", CMDLINE, sha512(KERNEL), split.runtime_sha512)
    spec = parse_script(text, ipxe_variables(MAC, "10.77.0.100", "10.77.0.1"))
    assert spec.initrds == (f"tftp://10.77.0.1/{RUNTIME_NAME}", f"tftp://10.77.0.1/{REST_NAME}")
    assert spec.runtime_sha512 == sha512(runtime) and spec.kernel_sha512 == sha512(KERNEL)
    assert netboot.parse_hint("#cidboot runtime-sha512=" + "ab" * 64) is None  # not the kernel's hint


def test_an_honest_runtime_hint_skips_its_download_and_measures_the_same(monkeypatch: pytest.MonkeyPatch) -> None:
    """The runtime layer is not fetched when its hint is this image's runtime.json sha512 and the
    kernel is the running one; L1 measures boot_code_hash(kernel, [runtime, rest]) either way,
    the bootstrap's reference value (imagebuilder: served_initrds)."""
    from cidboot.trust.measure import boot_code_hash, served_initrds

    runtime, rest = bootstrap_initrd()
    fetched_paths = serve_split(monkeypatch, split_files(runtime, rest), sha512(runtime))
    hinted = netboot.fetch_boot(network(), running=sha512(KERNEL), running_cmdline=CMDLINE,
                                running_runtime=sha512(runtime))
    assert hinted.runtime_skipped and hinted.initrd == rest and "bootstrap/runtime.img" not in fetched_paths
    other_kernel = netboot.fetch_boot(network(), running=sha512(OTHER), running_cmdline=CMDLINE,
                                      running_runtime=sha512(runtime))  # a kexec needs every byte
    other_runtime = netboot.fetch_boot(network(), running=sha512(KERNEL), running_cmdline=CMDLINE,
                                       running_runtime=sha512(b"another runtime"))
    assert not other_kernel.runtime_skipped and other_kernel.initrd == runtime + rest
    assert not other_runtime.runtime_skipped and other_runtime.initrd == runtime + rest
    reference = boot_code_hash(KERNEL, served_initrds([runtime, rest]))
    for f in (hinted, other_kernel, other_runtime):
        assert measure_and_derive(bytearray(engine_handover()), f).code_hash == reference
    assert reference != code_hash_of_blobs([KERNEL, runtime + rest])  # each initrd on its own


def test_a_lying_runtime_hint_measures_the_running_runtime_and_its_late_fetch_is_refused(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from cidboot.trust.measure import boot_code_hash
    from firmware.stage import fetch_measured_runtime

    runtime, rest = bootstrap_initrd()
    served = b"\x1f\x8b another runtime layer"
    serve_split(monkeypatch, split_files(served, rest), sha512(runtime))  # hints ours, serves another
    f = netboot.fetch_boot(network(), running=sha512(KERNEL), running_cmdline=CMDLINE, running_runtime=sha512(runtime))
    assert f.runtime_skipped
    m = measure_and_derive(bytearray(engine_handover()), f)
    assert m.code_hash == boot_code_hash(KERNEL, [runtime, rest])  # what runs: the running runtime
    assert m.code_hash != boot_code_hash(KERNEL, [served, rest])  # the served bootstrap's reference: no match
    with pytest.raises(Refused, match="not the runtime layer the boot script's hint named"):
        fetch_measured_runtime(f)
    serve_split(monkeypatch, split_files(runtime, rest), sha512(runtime))
    assert fetch_measured_runtime(f) == runtime
