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
