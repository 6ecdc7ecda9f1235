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


class _Guest:
    """A guest whose console is the real harness Console, fed by the test."""

    def __init__(self, tmp: Path, name: str) -> None:
        from qemu.harness.vm import Console

        self.console = Console(tmp / f"{name}.log", tmp / f"{name}.raw")
        self.running = True
        self.spec = argparse.Namespace(name=name)

    def wait_for_console(self, pattern: str, timeout: float) -> Any:
        from qemu.harness.vm import Guest

        return Guest.wait_for_console(self, pattern, timeout)  # type: ignore[arg-type]


def test_wait_flow_waits_for_flow_done_after_agent_ready(tmp_path: Path) -> None:
    """`agent ready` comes before the flow runs: a report taken then said `results: []` and no
    vetoes while the console printed the result seconds later."""
    import threading

    from qemu.harness.lab import Device, Lab

    guests = [_Guest(tmp_path, n) for n in ("a", "b", "c")]
    devs = [Device(i, n, "device", None, g, outcome=o)  # type: ignore[arg-type]
            for i, (n, g, o) in enumerate(zip("abc", guests, ("ready", "ready", "refused"), strict=True))]
    for g in guests[:2]:
        g.console.feed(b"cidboot-stage: agent ready url=http://10.77.0.10:8000\n")
    lb = Lab(None, None, tmp_path, None, [], devs)  # type: ignore[arg-type]
    done = threading.Event()

    def later() -> None:
        guests[0].console.feed(b"cidboot: result greeting=\"hello\"\ncidboot: agent: flow done: 1 result(s), audit x\n")
        guests[1].console.feed(b"cidboot: fatal: orchestrator: boom\n")
        done.set()
    threading.Timer(0.5, later).start()
    lb.wait_flow(30)
    assert done.is_set()  # it waited for the lines, not returned at `agent ready`
    assert devs[0].reason == "" and devs[1].reason == "fatal: orchestrator: boom" and devs[2].outcome == "refused"
    lb.wait_flow(0.1)  # already done: returns at once, whatever the timeout
    devs[0].outcome, devs[0].reason = "ready", ""
    guests[2].console.feed(b"")
    devs[2].outcome = "ready"
    lb.wait_flow(1.0)
    assert devs[2].reason.startswith("flow not done: c: no console line")


def test_private_flow_gets_a_flow_secret_a_key_policy_and_its_decisions_in_the_report(tmp_path: Path) -> None:
    """`encrypt: true`: the work-dir copy gets a flow secret where `imagebuilder build` looks
    for it (made once, mode 0600); a clear flow gets none. The lab's key policy allows the flow's
    roles at affirming; the broker's decisions are read back in time order, and the summary
    lists them with the refusal's reason."""
    import json
    import shutil
    import stat

    import yaml

    from cidboot.trust import keys
    from cidboot.trust.private.broker import Policy
    from qemu.harness.deploy import flow_secret_for

    shutil.copytree(Path(__file__).parents[2] / "examples/hello", tmp_path / "hello",
                    ignore=shutil.ignore_patterns("keys", "__pycache__"))
    flow = tmp_path / "hello" / "flow.yaml"
    doc = {**yaml.safe_load(flow.read_text()), "encrypt": True}
    flow.write_text(yaml.safe_dump(doc))
    keys.write_keypair(keys.generate(), tmp_path / "hello" / "keys" / "signer-1")  # as the harness's copy has
    secret = flow_secret_for(flow, doc)
    assert secret == tmp_path / "hello" / "keys" / "hello.flow.secret"
    assert stat.S_IMODE(secret.stat().st_mode) == 0o600
    before = secret.read_bytes()
    assert flow_secret_for(flow, doc) == secret and secret.read_bytes() == before  # never overwritten
    assert flow_secret_for(flow, {**doc, "encrypt": False}) is None

    pol = Policy.from_obj(lab.key_policy("hello", ["sensor", "aggregator", "sensor"]))
    assert pol.rules["hello"].roles == {"sensor", "aggregator"} and pol.rules["hello"].min_status == "affirming"

    (tmp_path / "keys.log").write_text(json.dumps({"time": 2, "decision": "refuse", "check": "device",
                                                   "reason": "appraisal contraindicated: measured-boot: unmeasured boot",
                                                   "device_id": "bb" * 20}) + "\n")
    (tmp_path / "keys-1.log").write_text(json.dumps({"time": 1, "decision": "release", "check": "released",
                                                     "reason": "3 layer key(s)", "device_id": "aa" * 20}) + "\n")
    decisions = lab.key_decisions(tmp_path)
    assert [d["decision"] for d in decisions] == ["release", "refuse"]
    text = boot.summary({**REPORT, "key_broker": decisions})
    assert "key broker: release device aaaaaaaaaaaaaaaa: released" in text
    assert "key broker: refuse device bbbbbbbbbbbbbbbb: device: appraisal contraindicated: measured-boot" in text


def test_demo_resets_earlier_demos_rollback_state_and_keeps_the_device_identity(tmp_path: Path) -> None:
    """A second `make demo` after a change of image CIDs at the same flow version must not be
    refused by the first demo's NVRAM (it was: "one version, one content")."""
    from qemu.harness.commands.demo import reset_boot_state

    dev = tmp_path / "lab" / "devices" / "device"
    dev.mkdir(parents=True)
    (dev / "nvram.img").write_bytes(b"\0" * 16)
    (dev / "uds").write_bytes(b"u" * 32)
    assert reset_boot_state(tmp_path) == [dev / "nvram.img"]
    assert not (dev / "nvram.img").exists() and (dev / "uds").read_bytes() == b"u" * 32
    assert reset_boot_state(tmp_path) == []  # nothing to reset: a first demo
