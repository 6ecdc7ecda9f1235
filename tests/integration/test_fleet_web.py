"""The fleet web view in a real browser (issue 16 "Prove it"): headless Chromium (Debian's
`chromium`, no browser download) loads `/` of a running boot-server HTTP front (the gateway with
the fleet mounted exactly as `bootstrap serve` mounts it) fed with signed stage events from two
in-process devices (software DICE identities: firmware, bootstrap and agent keys from one UDS
each) whose agents really serve /attestation and their provenance blocks. The test asserts both
devices' rows, their appraisal status (the boot server's own, fresh nonce), one result's
provenance graph, and that a forged event is rejected and shown as such. A screenshot lands in
the test's tmp dir.

This is the in-process version; the two-QEMU-device version (`qemu.harness boot` with the web
view) is a follow-up.
"""

from __future__ import annotations

import html.parser
import http.client
import json
import os
import re
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519

from agent.attestation_api import Attester, serve_api
from bootstrap.server.fleet import Fleet, FleetStore
from cidboot.dataflow.provenance import make_input
from cidboot.ipld.cid import CID, RAW
from cidboot.stage import events
from cidboot.store.blockstore import Blockstore
from cidboot.store.gateway.server import serve_gateway
from cidboot.trust.appraisal import DeviceRoots
from cidboot.trust.cose_key import key_id
from cidboot.trust.dice.derive import DiceInputs
from cidboot.trust.dice.software import derive_layers
from cidboot.trust.manifest import Layer, Manifest, RootOfTrust, sign_manifest
from cidboot.trust.measure import code_hash_of_blobs, image_inputs

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(CHROMIUM is None and os.environ.get("CI") != "true",
                                reason="needs Debian's chromium (.ci/apt-packages.txt)")

SIGNER = ed25519.Ed25519PrivateKey.generate()
FW, BS = code_hash_of_blobs([b"firmware"]), code_hash_of_blobs([b"bootstrap"])
MANIFEST = Manifest("fleet-web", 1, int(time.time()) + 3600, (Layer(CID.of(b"agent layer", RAW), 11, "agent"),),
                    RootOfTrust.from_public_keys([SIGNER.public_key()], 1), {"firmware": FW, "bootstrap": BS})
SIGNED = sign_manifest(MANIFEST, [SIGNER])
LAYERS = [DiceInputs(code_hash=FW), DiceInputs(code_hash=BS),
          image_inputs(SIGNED.cid, SIGNED.manifest, [key_id(SIGNER.public_key())])]
MACS = {"sensor": "52:54:00:fe:00:01", "aggregator": "52:54:00:fe:00:02"}


VOID = {"br", "meta", "link", "img", "input", "hr", "col", "source", "wbr"}


class _Dom(html.parser.HTMLParser):
    """The dumped DOM: every element's tag, attributes and text (its own and its children's),
    for attribute queries (`find`) and the text of what they match (`texts`)."""

    def __init__(self) -> None:
        super().__init__()
        self.elements: list[tuple[str, dict[str, str], list[str]]] = []
        self.text: list[str] = []
        self._open: list[tuple[str, list[str]]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        buf: list[str] = []
        self.elements.append((tag, {k: v or "" for k, v in attrs}, buf))
        if tag not in VOID:
            self._open.append((tag, buf))

    def handle_endtag(self, tag: str) -> None:
        while self._open:
            if self._open.pop()[0] == tag:
                break

    def handle_data(self, data: str) -> None:
        self.text.append(data)
        for _, buf in self._open:
            buf.append(data)

    def _match(self, tag: str, want: dict[str, str]) -> list[tuple[dict[str, str], list[str]]]:
        return [(a, b) for t, a, b in self.elements
                if t == tag and all(a.get(k.replace("_", "-")) == v for k, v in want.items())]

    def find(self, tag: str, **want: str) -> list[dict[str, str]]:
        return [a for a, _ in self._match(tag, want)]

    def texts(self, tag: str, **want: str) -> list[str]:
        return ["".join(b) for _, b in self._match(tag, want)]

    def row(self, mac: str) -> dict[str, str]:
        """The fleet table's cells of one device, by column (data-col), as text."""
        out, inside = {}, False
        for t, a, b in self.elements:
            if t == "tr":
                inside = a.get("data-mac") == mac
            elif inside and t == "td" and "data-col" in a:
                out[a["data-col"]] = "".join(b)
        return out


def _chromium(*args: str, tmp: Path, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    assert CHROMIUM is not None
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
           "--no-first-run", f"--user-data-dir={tmp / 'chromium-profile'}", "--virtual-time-budget=15000", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)


def _http(url: str, method: str, path: str) -> tuple[int, Any]:
    host, port = url.removeprefix("http://").split(":")
    c = http.client.HTTPConnection(host, int(port), timeout=30)
    try:
        c.request(method, path)
        r = c.getresponse()
        return r.status, json.loads(r.read())
    finally:
        c.close()


@pytest.fixture
def fleet_site(tmp_path: Path) -> Iterator[dict[str, Any]]:
    """Two devices (sensor, aggregator) with agents, a boot server front, and their events."""
    servers: list[Any] = []
    roots = DeviceRoots()
    devices: dict[str, dict[str, Any]] = {}
    for role in MACS:
        uds = os.urandom(32)
        roots.add(derive_layers(uds, []).root_public_key, role, role)
        agent_id = derive_layers(uds, LAYERS)
        store = Blockstore(tmp_path / f"agent-{role}")
        api = serve_api(Attester.from_derived(agent_id, manifest_cid=SIGNED.cid, role=role), "127.0.0.1", 0,
                        store=store)
        api.start()
        servers.append(api)
        devices[role] = {"uds": uds, "agent": api, "store": store, "leaf": agent_id.leaf_key}
    # the sensor's result, with a two-level provenance DAG: seed (flow authority) -> sample -> mean
    flow = CID.of(b"fleet-web flow", RAW)
    sensor = devices["sensor"]
    seed, b0 = make_input(value=5, definition="count", flow=flow, parents=[flow], key=SIGNER)
    mid, b1 = make_input(value=[3, 4, 5], definition="readings", flow=flow, parents=[seed], key=sensor["leaf"],
                         operation="sample", output="readings")
    res, b2 = make_input(value=4.0, definition="mean", flow=flow, parents=[mid, seed], key=sensor["leaf"],
                         operation="average", output="mean")
    for c, b in ((seed, b0), (mid, b1), (res, b2)):
        sensor["store"].put(c, b)

    boot_store = Blockstore(tmp_path / "boot-store")
    boot_store.put(SIGNED.cid, SIGNED.encode())
    fleet = Fleet(FleetStore(tmp_path / "fleet.sqlite"), Blockstore(tmp_path / "fleet-blocks"), lambda: roots,
                  lambda mac: (MANIFEST, SIGNED.cid), lambda mac: next((r for r, m in MACS.items() if m == mac), None),
                  appraise_every=3600)
    gw = serve_gateway(boot_store, "127.0.0.1", 0, app=fleet)  # as bootstrap.server.serve.BootServer mounts it
    threading.Thread(target=gw.serve_forever, daemon=True).start()
    fleet.start()

    sessions: dict[tuple[str, str], str] = {}

    def post(who: str, stage: str, kind: str, seq: int, **detail: Any) -> None:
        n = {"firmware": 1, "bootstrap": 2, "agent": 3}[stage]
        d = derive_layers(devices[who]["uds"], LAYERS[:n])
        boot = sessions.get((who, stage)) or events.new_session(gw.url) or ""  # one per stage, as a Reporter does
        sessions[(who, stage)] = boot
        ev = {"v": 1, "stage": stage, "kind": kind, "seq": seq, "t": int(time.time() * 1000), "mac": MACS[who],
              "boot_mode": "measured", "arch": "x86_64", "boot": boot, "detail": {k: str(v) for k, v in detail.items()}}
        assert events.post_status(gw.url, events.encode_event(ev, events.Identity(d.leaf_key, d.chain))) == 201

    for role in MACS:
        port = devices[role]["agent"].server_address[1]
        post(role, "firmware", "start", 1)
        post(role, "firmware", "handover", 2, code=FW.hex()[:16])
        post(role, "bootstrap", "start", 1, mode="measured")
        post(role, "bootstrap", "handover", 2, manifest=SIGNED.cid)
        post(role, "agent", "start", 1)
        post(role, "agent", "ready", 2, url=f"http://127.0.0.1:{port}", port=port, manifest=SIGNED.cid, role=role)
    post("sensor", "agent", "result", 3, definition="mean", value="4.0", cid=res)
    post("aggregator", "agent", "veto", 3, reason="policy never-negate vetoes negate", operation="negate", cid=seed)
    # a forgery: the sensor's chain, another key
    real = derive_layers(devices["sensor"]["uds"], LAYERS)
    forged = {"v": 1, "stage": "agent", "kind": "ready", "seq": 9, "t": 0, "mac": MACS["sensor"],
              "boot_mode": "measured", "arch": "x86_64", "detail": {"port": "1"}}
    status, verdict = fleet.post_event(events.encode_event(forged, events.Identity(
        ed25519.Ed25519PrivateKey.generate(), real.chain)), "127.0.0.1")
    assert status == 403 and verdict["trust"] == "rejected"
    for mac in MACS.values():  # on demand; the schedule would do the same a moment later
        assert _http(gw.url, "POST", f"/api/devices/{mac}/appraise")[0] == 200
    try:
        yield {"url": gw.url, "fleet": fleet, "result": res, "seed": seed, "mid": mid}
    finally:
        fleet.stop()
        gw.shutdown()
        gw.server_close()
        for s in servers:
            s.shutdown()
            s.server_close()


def test_fleet_web_view_in_headless_chromium(fleet_site: dict[str, Any], tmp_path: Path) -> None:
    url = fleet_site["url"]
    # the JSON API behind the page
    _, api = _http(url, "GET", "/api/devices")
    by_mac = {d["mac"]: d for d in api["devices"]}
    assert set(by_mac) == set(MACS.values())
    for role, mac in MACS.items():
        d = by_mac[mac]
        assert d["appraisal"]["status"] == "affirming", d["appraisal"]
        assert d["trust"] == "verified" and d["role"] == role and d["stage"] == "agent"
    assert by_mac[MACS["aggregator"]]["problems"][0]["kind"] == "veto"
    assert "forged" in by_mac[MACS["sensor"]]["rejected"][0]["reason"]

    proc = _chromium("--dump-dom", f"{url}/?static", tmp=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    dom = _Dom()
    dom.feed(proc.stdout)
    (tmp_path / "fleet.html").write_text(proc.stdout)
    text = " ".join(dom.text)
    # both devices' rows, their appraisal status with every check's reason
    for mac in MACS.values():
        assert dom.find("tr", data_mac=mac), f"no row for {mac}"
    assert len(dom.find("span", data_status="affirming")) == 2
    assert len(dom.find("li", data_check="nonce")) == 2 and "matches this challenge" in text
    # vetoes and the rejected forgery are shown
    assert dom.find("li", data_kind="veto") and "policy never-negate vetoes negate" in text
    assert dom.find("li", data_kind="rejected-event") and "forged" in text
    # one result's provenance graph: the result, its parent, the seed (nodes) and the parent edges
    res, mid, seed = (str(fleet_site[k]) for k in ("result", "mid", "seed"))
    assert dom.find("svg", data_root=res)
    for cid, definition in ((res, "mean"), (mid, "readings"), (seed, "count")):
        assert dom.find("g", data_cid=cid, data_definition=definition), f"no graph node for {definition}"
    assert dom.find("path", data_from=mid, data_to=res) and dom.find("path", data_from=seed, data_to=mid)
    assert "by average" in text and "producer sensor" in text.replace("producer 52:54:00:fe:00:01", "producer sensor")
    assert "producer flow signer" in text  # the seed: signed by the flow authority, not by a device
    # every column the issue names, per device
    for role, mac in MACS.items():
        row = dom.row(mac)
        assert set(row) == {"device", "mac", "role", "arch", "firmware", "stage", "last-event", "events", "appraisal",
                            "results", "problems"}, row
        assert row["mac"] == mac and row["role"] == role and row["arch"] == "x86_64"
        assert row["firmware"] == "cidboot (measured)" and row["device"].endswith("…") and row["events"].startswith("verified")
        assert re.search(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", row["last-event"]), row  # ISO 8601, not a bare local time
    sensor, aggregator = dom.row(MACS["sensor"]), dom.row(MACS["aggregator"])
    # the stage column says where the boot is (the agent is ready), the last event what it did last
    assert sensor["stage"] == aggregator["stage"] == "agent ready" and sensor["last-event"].startswith("agent result")
    assert aggregator["last-event"].startswith("agent veto") and "mean = 4.0" in sensor["results"]
    assert "agent veto: policy never-negate vetoes negate" in aggregator["problems"]
    assert "affirming" in sensor["appraisal"] and "nonce: affirming: matches this challenge" in sensor["appraisal"]

    # deep links: a device's boot timeline, and a graph node's signed block (what a click shows)
    link = f"{url}/?static&device={MACS['sensor']}#prov={res}&node={mid}"
    proc = _chromium("--dump-dom", link, tmp=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    dom = _Dom()
    dom.feed(proc.stdout)
    (tmp_path / "fleet-timeline.html").write_text(proc.stdout)
    steps = [(a["data-stage"], a["data-kind"], a["data-trust"]) for a in dom.find("li") if "data-stage" in a]
    assert steps == [("firmware", "start", "verified"), ("firmware", "handover", "verified"),
                     ("bootstrap", "start", "verified"), ("bootstrap", "handover", "verified"),
                     ("agent", "start", "verified"), ("agent", "ready", "verified"), ("agent", "result", "verified"),
                     ("agent", "ready", "rejected")], steps
    assert any("forged" in t for t in dom.texts("li", data_trust="rejected"))
    (detail,) = dom.find("pre", id="node-detail")
    assert detail["data-cid"] == mid and detail["data-signature"] == "verified", detail
    assert dom.find("a", href=f"/ipfs/{mid}?format=raw")
    assert "readings = [3,4,5]  by sample  signature verified: signed by its producer" in dom.texts("pre", id="node-detail")[0]

    shot = tmp_path / "fleet.png"
    proc = _chromium(f"--screenshot={shot}", "--window-size=1600,1200", f"{url}/?static", tmp=tmp_path)
    assert proc.returncode == 0 and shot.stat().st_size > 10_000, proc.stderr[-2000:]
    print(f"screenshot: {shot}")
