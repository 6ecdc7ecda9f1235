"""examples/two-device on two in-process agents booted from hand-off directories (agent.device),
with H1's orchestrator: the sensor's `readings` cross to the aggregator only after mutual
attestation with fresh nonces; an unregistered or unmeasured sensor gets nothing accepted and
the refusal is in the aggregator's audit log. Loopback only, no QEMU."""

from __future__ import annotations

import io
import json
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from agent.device import BootedAgent, boot_agent, run_flow
from cidboot.dataflow import provenance
from cidboot.ipld import dagcbor
from cidboot.ipld.car import CarReader
from cidboot.ipld.cid import CID, DAG_CBOR, RAW
from cidboot.netboot.bootconfig import BootConfig
from cidboot.store.blockstore import Blockstore
from cidboot.store.gateway.server import GatewayServer
from cidboot.trust.appraisal import DeviceRoots
from cidboot.trust.dice import encode_handover
from cidboot.trust.manifest import Layer, Manifest, RootOfTrust, SignedManifest, sign_manifest
from cidboot.trust.registry import registry_cid, sign_registry
from tests.support.gateway_fixtures import NetFixture, agents_net
from tests.unit.test_agent_attest import BS, FW, SIGNER, Device, make_device, request

EXAMPLE = Path(__file__).resolve().parents[2] / "examples/two-device"
FLOW_BLOCK = dagcbor.encode(yaml.safe_load((EXAMPLE / "flow.yaml").read_text())["dataflow"])
FLOW_CID = CID.of(FLOW_BLOCK, DAG_CBOR)
MANIFEST = Manifest("two-device", 1, int(time.time()) + 3600, (Layer(CID.of(b"image", RAW), 5, "agent"),),
                    RootOfTrust.from_public_keys([SIGNER.public_key()], 1), {"firmware": FW, "bootstrap": BS},
                    flow=FLOW_CID, placement={"sensor": ["sample"], "aggregator": ["summarise"]})
SIGNED: SignedManifest = sign_manifest(MANIFEST, [SIGNER])
ANCHOR = {"keys": [k.hex() for k in MANIFEST.root.keys], "threshold": 1, "version": 1}
TOTAL = sum((i * 7) % 10 for i in range(5))


@pytest.fixture
def net(tmp_path: Path) -> Iterator[NetFixture]:
    with agents_net(tmp_path / "gw", [(SIGNED.cid, SIGNED.encode()), (FLOW_CID, FLOW_BLOCK)]) as net:
        yield net


def registry(store: Blockstore, *devs: Device) -> CID:
    roots = DeviceRoots()
    for d in devs:
        roots.add(d.ident.root_public_key, d.attester.role or "", d.attester.role)
    block = sign_registry(roots, [SIGNER])
    store.put(registry_cid(block), block)
    return registry_cid(block)


def boot(root: Path, gw: GatewayServer, dev: Device | None, role: str, reg: CID, agents: list[BootedAgent],
         peers: dict[str, tuple[str, ...]] | None = None) -> tuple[BootedAgent, io.StringIO]:
    cfg = BootConfig(SIGNED.cid, (gw.url,), ANCHOR, role, peers=peers or {}, device_registry=reg)
    (root / "run/cidboot").mkdir(parents=True)
    (root / "opt/cidboot/ops").mkdir(parents=True)
    shutil.copy(EXAMPLE / "ops.py", root / "opt/cidboot/ops/ops.py")
    boot_json = {"boot_mode": "measured" if dev else "unmeasured", "bootconfig": cfg.encode().decode(),
                 "manifest": str(SIGNED.cid)}
    (root / "run/cidboot/boot.json").write_text(json.dumps(boot_json))
    if dev is not None:
        (root / "run/cidboot/dice.cbor").write_bytes(encode_handover(dev.ident.cdi_attest, dev.ident.cdi_seal,
                                                                     dev.ident.chain))
    console = io.StringIO()
    agent = boot_agent(root, network=False, host="127.0.0.1", port=0, console=console, peer_patience=5.0)
    agents.append(agent)
    return agent, console


def run_pair(tmp_path: Path, net: tuple[GatewayServer, Blockstore, list[BootedAgent]], *, sensor_registered: bool = True,
             sensor_measured: bool = True, wait: float = 30.0) -> tuple[BootedAgent, str, list[Any], BootedAgent, str]:
    gw, store, agents = net
    s = make_device("sensor", signed=SIGNED, boot_mode="measured" if sensor_measured else "unmeasured")
    a = make_device("aggregator", signed=SIGNED)
    agg, agg_out = boot(tmp_path / "a", gw, a, "aggregator", registry(store, *([s, a] if sensor_registered else [a])),
                        agents)
    sen, sen_out = boot(tmp_path / "s", gw, s if sensor_measured else None, "sensor", registry(store, s, a), agents,
                        {"aggregator": (agg.url,)})
    agg_results: list[Any] = []
    t = threading.Thread(target=lambda: agg_results.extend(run_flow(agg, remote_wait=wait)), daemon=True)
    t.start()
    run_flow(sen)
    t.join(wait + 10)
    assert not t.is_alive()
    return agg, agg_out.getvalue(), agg_results, sen, sen_out.getvalue()


def test_two_device_flow_mutually_attested(tmp_path: Path, net: tuple[GatewayServer, Blockstore, list[BootedAgent]]) -> None:
    agg, agg_out, results, sen, sen_out = run_pair(tmp_path, net)
    assert [(r.definition, r.value) for r in results] == [("total", TOTAL)]
    assert f"cidboot: result total={TOTAL}\n" in agg_out
    assert "cidboot: result readings=[0, 7, 4, 1, 8]\n" in sen_out and "refused" not in sen_out
    [sent] = sen.audit.find("accepted")
    assert sent.reason.startswith("aggregator device ") and "accepted 2 block(s) from us" in sent.reason  # readings + its seed
    # the sensor was attested affirming and registered as a producer in its role
    [entry] = [e for k, e in agg.attested.by_key.items() if e.appraisal is not None]
    assert entry.role == "sensor" and entry.appraisal is not None and entry.appraisal.affirming
    assert [e.reason for e in agg.audit.find("accepted")] == [f"input readings from sensor {entry.appraisal.device_id}"]
    assert agg.audit.find("refused") == []
    # results, their provenance and the audit log are served by the agent
    doc = json.loads(request(agg.url, "GET", "/results")[2])
    [res] = doc["results"]
    assert res["definition"] == "total" and res["value"] == TOTAL and doc["audit"] == str(agg.audit.head)
    status, ctype, block = request(agg.url, "GET", f"/ipfs/{res['provenance']}?format=raw")
    assert status == 200
    CID.parse(res["provenance"]).verify(block)  # raises on a mismatch
    assert request(agg.url, "GET", f"/ipfs/{doc['audit']}?format=raw")[0] == 200
    # the whole provenance DAG in one CAR (every block verified by the reader): total <- readings <- seed
    status, ctype, car = request(agg.url, "GET", f"/ipfs/{res['provenance']}?format=car")
    assert status == 200
    nodes = [provenance.decode(b, c) for c, b in CarReader(io.BytesIO(car)) if c != FLOW_CID]
    assert sorted(n.definition for n in nodes) == ["count", "readings", "total"]


@pytest.mark.parametrize("case", ["unregistered", "unmeasured"])
def test_unattested_sensor_gets_nothing_accepted(tmp_path: Path, net: tuple[GatewayServer, Blockstore, list[BootedAgent]],
                                                 case: str) -> None:
    agg, agg_out, results, sen, sen_out = run_pair(tmp_path, net, sensor_registered=case != "unregistered",
                                                   sensor_measured=case != "unmeasured", wait=2.0)
    assert results == [] and "cidboot: result total" not in agg_out
    assert "cidboot: audit: refused: inputs from peer 127.0.0.1 (claims sensor" in agg_out  # unregistered: no role
    assert "cidboot: refused: peer: " in sen_out and "refused our inputs" in sen_out
    [refusal] = agg.audit.find("refused")
    assert ("unknown device" if case == "unregistered" else "unmeasured boot") in refusal.reason
    assert all(e.appraisal is None for e in agg.attested.by_key.values())  # only itself
    assert agg.audit.find("accepted") == []
    [not_sent] = sen.audit.find("refused")
    assert not_sent.reason.startswith("not sent to aggregator")
