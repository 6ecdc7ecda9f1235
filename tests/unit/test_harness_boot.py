"""`python -m qemu.harness boot`: argument handling, the devices file it gives the boot server,
the exit code and summary from a report (the full run is tests/e2e/test_e2e_boot.py)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import pytest

from bootstrap.server.devices import Devices
from cidboot.cli import build_parser
from cidboot.errors import CidbootError
from qemu.harness import lab
from qemu.harness.commands import boot

REPORT: dict[str, Any] = {
    "manifest_cid": "bafyreiexample", "flow": "hello", "accel": "tcg",
    "devices": [{"name": "device-0", "role": "device", "boot": "measured", "outcome": "ready", "reason": "",
                 "appraisal": {"status": "affirming", "reasons": ["affirming: chain: verified to a registered root"]},
                 "flow_results": {"results": {"greeting": "hello, world"}},
                 "boot_timeline": {"stage_seconds": {"firmware": 9.9, "bootstrap": 11.5, "image": 5.1}}}],
}


def test_command_line() -> None:
    p = build_parser("python -m qemu.harness", "", "qemu.harness.commands")
    a = p.parse_args(["boot", "examples/hello/flow.yaml", "--devices", "2", "--keep", "--out", "o", "--json", "-v"])
    assert (a.flow, a.devices, a.keep, a.out, a.json, a.verbose) == ("examples/hello/flow.yaml", 2, True, Path("o"),
                                                                     True, 1)
    assert p.parse_args(["demo"]).func.__module__ == "qemu.harness.commands.demo"


def test_target_must_be_a_flow_or_a_cid_with_its_store(tmp_path: Path) -> None:
    ns = argparse.Namespace(flow=str(tmp_path / "missing.yaml"), store=None, out=tmp_path / "o")
    with pytest.raises(CidbootError, match="neither a flow file nor a manifest CID"):
        boot.boot(ns)
    ns.flow = "bafkreigh2akiscaildcqabsyg3dfr6chu3fgpregiymsck7e7aqa4s52zy"
    with pytest.raises(CidbootError, match="needs --store"):
        boot.boot(ns)


def test_exit_code_and_summary(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(boot, "boot", lambda args: REPORT)
    ns = argparse.Namespace(json=False, out=Path("o"))
    assert boot.run(ns) == 0
    out = capsys.readouterr().out
    assert "device-0 [device, measured] ready: appraisal affirming  firmware 9.9s  bootstrap 11.5s  image 5.1s" in out
    assert '"greeting": "hello, world"' in out
    bad = {**REPORT, "devices": [{**REPORT["devices"][0], "outcome": "refused", "reason": "rollback: version 1 < 2",
                                  "appraisal": {"status": "none", "reasons": ["device not ready"]},
                                  "flow_results": None, "boot_timeline": {"stage_seconds": {"firmware": 9.9}}}]}
    monkeypatch.setattr(boot, "boot", lambda args: bad)
    assert boot.run(ns) == 1
    assert "rollback: version 1 < 2" in capsys.readouterr().out


def test_devices_file_is_what_the_boot_server_reads(tmp_path: Path) -> None:
    lab._devices_yaml(tmp_path / "devices.yaml", ["sensor", "aggregator"])
    devs = Devices.load(tmp_path / "devices.yaml")
    assert devs.lookup(lab.device_mac(1), None).role == "aggregator"
    assert devs.lookup(lab.device_mac(0), None).ip == lab.device_ip(0)
    assert not devs.lookup("52:54:00:ff:ff:ff", None).allow  # deny_unknown
