"""`python -m qemu.harness boot --cluster K --boot-servers S`: the arguments are checked before
any build, and the devices file every site's boot server reads puts each device on its site's
subnet (the full lab runs in tests/e2e/test_cluster_e2e.py)."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from bootstrap.server.devices import Devices
from cidboot.cli import UsageError, build_parser
from qemu.harness import lab
from qemu.harness.commands import boot


def test_scale_out_options_parse() -> None:
    p = build_parser("python -m qemu.harness", "", "qemu.harness.commands")
    a = p.parse_args(["boot", "f.yaml", "--cluster", "3", "--boot-servers", "2", "--replication", "2:3"])
    assert boot.scale_out(a) == (3, 2, "2:3")
    d = p.parse_args(["boot", "f.yaml"])
    assert boot.scale_out(d) == (0, 1, "2:2")  # the single-server lab, as before


@pytest.mark.parametrize(("cluster", "servers", "replication", "why"), [
    (-1, 1, "2:2", "--cluster must be >= 0"),
    (0, 0, "2:2", "--boot-servers >= 1"),
    (3, 1, "two", "--replication: replication must be MIN:MAX"),
    (1, 1, "2:2", "needs at least 2 cluster peers, --cluster is 1"),
])
def test_bad_scale_out_options_fail_before_any_build(tmp_path: Path, cluster: int, servers: int, replication: str,
                                                     why: str) -> None:
    ns = argparse.Namespace(flow=str(tmp_path / "missing.yaml"), store=None, out=tmp_path / "o", cluster=cluster,
                            boot_servers=servers, replication=replication)
    with pytest.raises(UsageError, match=why):
        boot.boot(ns)
    assert not (tmp_path / "o").exists()


def test_devices_file_puts_each_device_on_its_site(tmp_path: Path) -> None:
    lab._devices_yaml(tmp_path / "devices.yaml", ["sensor", "aggregator", "sensor"], [0, 1, 1])
    devs = Devices.load(tmp_path / "devices.yaml")
    assert [devs.lookup(lab.device_mac(i), None).ip for i in range(3)] == ["10.77.0.10", "10.77.1.11", "10.77.1.12"]
    assert devs.lookup(lab.device_mac(1), None).role == "aggregator"


def test_lab_refuses_devices_assigned_to_missing_servers(tmp_path: Path) -> None:
    with pytest.raises(lab.LabError, match=r"sites \[0, 2\] must name one of 2 boot servers"):
        with lab.lab(None, tmp_path, ["a", "b"], boot_servers=2, sites=[0, 2]):  # type: ignore[arg-type]
            pass
    with pytest.raises(lab.LabError, match="at least one boot server"):
        with lab.lab(None, tmp_path, ["a"], boot_servers=0):  # type: ignore[arg-type]
            pass
