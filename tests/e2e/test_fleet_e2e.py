"""The fleet view from power-on (issue 16 "Prove it"): two QEMU devices boot the two-device flow;
every stage posts signed events to `bootstrap serve`, which appraises each agent itself; the
test reads /api/devices (no serial console involved) and loads the web view in headless Chromium
inside the boot network: both rows, their appraisal, one result's provenance graph. The
screenshot lands in the test's tmp dir."""

from __future__ import annotations

import html.parser
import json
import shutil
import time
from pathlib import Path
from typing import Any

import pytest

from qemu.harness.deploy import prepare
from qemu.harness.lab import Lab, lab

pytestmark = [pytest.mark.qemu, pytest.mark.netns]
REPO = Path(__file__).resolve().parents[2]
BOOT_TIMEOUT = 900
SERVER = "http://10.77.0.1:8080"
CHROMIUM = shutil.which("chromium")


def api(lb: Lab, path: str, method: str = "GET") -> Any:
    proc = lb.net.run(["curl", "-sf", "--max-time", "30", "-X", method, f"{SERVER}{path}"], capture_output=True,
                      text=True, timeout=60)
    assert proc.returncode == 0, f"{path}: curl {proc.returncode}"
    return json.loads(proc.stdout)


class _Attrs(html.parser.HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.found: list[tuple[str, dict[str, str]]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.found.append((tag, {k: v or "" for k, v in attrs}))


def test_two_devices_report_to_the_boot_server_and_show_in_the_web_view(
        tmp_path_factory: pytest.TempPathFactory, tmp_path: Path) -> None:
    dep = prepare(REPO / "examples/two-device/flow.yaml", tmp_path_factory.mktemp("fleet-deploy"))
    with lab(dep, tmp_path / "lab", ["sensor", "aggregator"]) as lb:
        devs = [lb.add_device("sensor"), lb.add_device("aggregator")]
        lb.power_on()
        lb.wait_ready(BOOT_TIMEOUT)
        for dev in devs:
            assert dev.outcome == "ready", f"{dev.name}: {dev.outcome}: {dev.reason}\n{dev.guest.console.text()[-3000:]}"
        devs[1].guest.wait_for_console(r"cidboot: result total=", 600)
        deadline = time.monotonic() + 120
        while True:  # the server appraises each agent when it reports ready
            rows = {d["mac"]: d for d in api(lb, "/api/devices")["devices"]}
            agg = rows.get(devs[1].guest.spec.mac) or {}
            if all((rows.get(d.guest.spec.mac) or {}).get("appraisal") for d in devs) and \
                    any(r["definition"] == "total" for r in agg.get("results", [])) or time.monotonic() > deadline:
                break
            time.sleep(2)
        (tmp_path / "devices.json").write_text(json.dumps(rows, indent=1))
        for dev in devs:
            row = rows[dev.guest.spec.mac]
            assert row["role"] == dev.role
            assert row["appraisal"]["status"] == "affirming", row["appraisal"]
            timeline = api(lb, f"/api/devices/{dev.guest.spec.mac}")["events"]
            stages = {(e["stage"], e["kind"]) for e in timeline}
            assert {("firmware", "handover"), ("bootstrap", "handover"), ("agent", "ready")} <= stages, stages
            assert all(e["trust"] == "verified" for e in timeline), [e for e in timeline if e["trust"] != "verified"]
        result = next(r for r in rows[devs[1].guest.spec.mac]["results"] if r["definition"] == "total")
        graph = api(lb, f"/api/provenance/{result['cid']}")
        assert len(graph["nodes"]) >= 3 and graph["edges"], graph
        if CHROMIUM is None:
            pytest.skip("no chromium for the web view part")
        profile = tmp_path / "chromium-profile"
        base = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                f"--user-data-dir={profile}", "--virtual-time-budget=20000"]
        page = f"{SERVER}/?static#prov={result['cid']}"
        dom = lb.net.run([*base, "--dump-dom", page], capture_output=True, text=True, timeout=180)
        assert dom.returncode == 0, dom.stderr[-2000:]
        shot = tmp_path / "fleet.png"
        lb.net.run([*base, f"--screenshot={shot}", "--window-size=1600,1200", page], capture_output=True, timeout=180)
    p = _Attrs()
    p.feed(dom.stdout)
    for dev in devs:
        assert ("tr", dev.guest.spec.mac) in [(t, a.get("data-mac")) for t, a in p.found]
    assert sum(1 for t, a in p.found if t == "span" and a.get("data-status") == "affirming") == 2
    assert any(t == "svg" and a.get("data-root") == result["cid"] for t, a in p.found)
    assert sum(1 for t, a in p.found if t == "g" and a.get("data-cid")) >= 3
    assert shot.stat().st_size > 10_000
    print(f"screenshot: {shot}")
