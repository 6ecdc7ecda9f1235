"""arm64 flows: one flow file (and one lock, one signed manifest) per architecture.

The arm64 flow files must stay the same appliance as their amd64 twins (same dataflow, placement,
policies, trust), their locks must pin arm64 (or arch-independent) artifacts only, and the
builder must refuse a lock whose pins are for another architecture than the flow's.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from imagebuilder import build as buildmod
from imagebuilder import flowfile, lock, uki
from imagebuilder.lock import DebPin, Lock

REPO = Path(__file__).resolve().parents[2]
PAIRS = [(REPO / "examples/hello/flow.yaml", REPO / "examples/hello/flow-arm64.yaml"),
         (REPO / "examples/two-device/flow.yaml", REPO / "examples/two-device/flow-arm64.yaml"),
         (REPO / "bootstrap/image/flow.yaml", REPO / "bootstrap/image/flow-arm64.yaml")]


@pytest.mark.parametrize(("amd64", "arm64"), PAIRS, ids=["hello", "two-device", "bootstrap"])
def test_arm64_flow_is_the_same_appliance_as_its_amd64_twin(amd64: Path, arm64: Path) -> None:
    a = flowfile.parse(amd64.read_text(), amd64).data
    b = flowfile.parse(arm64.read_text(), arm64).data
    assert a.get("arch", "amd64") == "amd64" and b["arch"] == "arm64"
    for k in ("name", "version", "target", "dataflow", "placement", "policies", "trust"):
        assert a.get(k) == b.get(k), k
    assert b["image"]["kernel"]["package"] == a["image"]["kernel"]["package"].replace("amd64", "arm64")
    assert "console=ttyAMA0" in b["image"]["cmdline"]
    assert a["image"]["python"] == b["image"]["python"]


@pytest.mark.parametrize("flow", [p for _, p in PAIRS], ids=["hello", "two-device", "bootstrap"])
def test_arm64_locks_pin_arm64_debs_and_aarch64_wheels(flow: Path) -> None:
    doc = json.loads(flow.with_suffix(".lock").read_text())
    pins = [*doc["debs"].values(), *doc.get("meta", {}).values()]
    assert pins and all(p["arch"] in ("arm64", "all") and p["filename"].endswith(("_arm64.deb", "_all.deb"))
                        for p in pins)
    assert doc["wheels"] and all(lock.wheel_fits(w["filename"], "arm64") for w in doc["wheels"].values())
    assert not any(lock.wheel_fits(w["filename"], "amd64") and not w["filename"].endswith("-any.whl")
                   for w in doc["wheels"].values())


def test_wheel_platform_tags_select_the_machine() -> None:
    assert lock.wheel_fits("cffi-2.0.0-cp311-cp311-manylinux2014_aarch64.manylinux_2_17_aarch64.whl", "arm64")
    assert not lock.wheel_fits("cffi-2.0.0-cp311-cp311-manylinux2014_x86_64.manylinux_2_17_x86_64.whl", "arm64")
    assert lock.wheel_fits("pyelftools-0.33-py2.py3-none-any.whl", "arm64")
    assert "manylinux2014_aarch64" in lock.py_target("arm64") and "manylinux2014_x86_64" not in lock.py_target("arm64")


def test_foreign_arch_uses_a_private_apt_state(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(lock, "host_arch", lambda: "amd64")
    assert lock.apt_options("amd64") == []
    opts = lock.apt_options("arm64")
    assert "APT::Architecture=arm64" in opts and f"Dir::State::Lists={tmp_path}/cidboot/apt/arm64/lists" in opts
    with pytest.raises(lock.LockError, match="unknown architecture 'riscv64'"):
        lock.apt_options("riscv64")


def test_build_refuses_a_pin_for_another_architecture() -> None:
    pin = DebPin("libc6", "2.36", "amd64", "0" * 64, 1, "libc6_2.36_amd64.deb")
    with pytest.raises(buildmod.BuildError, match="libc6 is pinned for amd64, the flow is arch arm64"):
        buildmod._check_arch(Lock({"libc6": pin}, {}), ["libc6"], "arm64", Path("flow.lock"))
    buildmod._check_arch(Lock({"libc6": pin}, {}), ["libc6"], "amd64", Path("flow.lock"))


def test_arm64_stub_header_padding_of_nops_takes_section_headers() -> None:
    nops = uki._AARCH64_NOP * 8 + bytes(16)
    assert uki._aarch64_nops(nops, 0xAA64)
    assert not uki._aarch64_nops(nops, 0x8664)  # only arm64 stubs pad with instructions
    assert not uki._aarch64_nops(uki._AARCH64_NOP * 2 + b"\x01\x00\x00\x00", 0xAA64)


def test_private_apt_lists_are_fetched_when_missing_or_a_day_old(monkeypatch: pytest.MonkeyPatch,
                                                                 tmp_path: Path) -> None:
    import os
    import subprocess
    import time

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(lock, "host_arch", lambda: "amd64")
    calls: list[list[str]] = []
    lists = tmp_path / "cidboot/apt/arm64/lists"

    def fake(cmd: list[str], cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
        calls.append(cmd)
        (lists / "deb.debian.org_debian_dists_bookworm_main_binary-arm64_Packages").write_text("")
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(lock, "_run", fake)
    lock.apt_update("amd64")  # the host's own: its lists are the host's business
    assert calls == []
    lock.apt_update("arm64")
    assert len(calls) == 1 and calls[0][0] == "apt-get" and calls[0][-1] == "update"
    lock.apt_update("arm64")  # fresh: not again
    assert len(calls) == 1
    old = time.time() - lock.APT_LISTS_MAX_AGE - 60
    for p in lists.iterdir():
        os.utime(p, (old, old))
    lock.apt_update("arm64")
    assert len(calls) == 2
    lock.apt_update("arm64", force=True)
    assert len(calls) == 3
