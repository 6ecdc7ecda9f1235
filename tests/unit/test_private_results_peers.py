"""Private results between two devices (agent.device + agent.peers over loopback HTTP, as
tests/unit/test_agent_peers_flow.py): a manifest whose owner seals `all`. The sensor's readings
cross to the aggregator as a sealed block plus an opening inside the mutually attested, signed
exchange; the aggregator computes the total; nothing either agent stores, serves or prints holds
a value in clear; the owner opens the total fetched from the aggregator's /ipfs/."""

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

from agent.device import BootedAgent, boot_agent, run_flow
from cidboot.dataflow import provenance
from cidboot.dataflow.sealing import open_value
from cidboot.ipld import dagcbor
from cidboot.ipld.car import CarReader
from cidboot.ipld.cid import CID, RAW
from cidboot.netboot.bootconfig import BootConfig
from cidboot.store.blockstore import Blockstore
from cidboot.store.gateway.server import GatewayServer
from cidboot.trust.manifest import Layer, Manifest, RootOfTrust, SignedManifest, sign_manifest
from cidboot.trust.private.owner import Owner
from cidboot.trust.private.sealed import Identity
from tests.support.gateway_fixtures import NetFixture, agents_net
from tests.unit.test_agent_attest import BS, FW, SIGNER, make_device, request
from tests.unit.test_agent_peers_flow import EXAMPLE, FLOW_BLOCK, FLOW_CID, TOTAL, registry

OWNER = Identity.generate()
MANIFEST = Manifest("two-device", 1, int(time.time()) + 3600, (Layer(CID.of(b"image", RAW), 5, "agent"),),
                    RootOfTrust.from_public_keys([SIGNER.public_key()], 1), {"firmware": FW, "bootstrap": BS},
                    flow=FLOW_CID, placement={"sensor": ["sample"], "aggregator": ["summarise"]},
                    owner=Owner((OWNER.recipient,), "all").to_obj())
SIGNED: SignedManifest = sign_manifest(MANIFEST, [SIGNER])
ANCHOR = {"keys": [k.hex() for k in MANIFEST.root.keys], "threshold": 1, "version": 1}
READINGS = [0, 7, 4, 1, 8]


@pytest.fixture
def net(tmp_path: Path) -> Iterator[NetFixture]:
    with agents_net(tmp_path / "gw", [(SIGNED.cid, SIGNED.encode()), (FLOW_CID, FLOW_BLOCK)]) as net:
        yield net


def _boot(root: Path, gw: GatewayServer, dev: Any, role: str, reg: CID, agents: list[BootedAgent],
          peers: dict[str, tuple[str, ...]] | None = None) -> tuple[BootedAgent, io.StringIO]:
    from cidboot.trust.dice import encode_handover

    cfg = BootConfig(SIGNED.cid, (gw.url,), ANCHOR, role, peers=peers or {}, device_registry=reg)
    (root / "run/cidboot").mkdir(parents=True)
    (root / "opt/cidboot/ops").mkdir(parents=True)
    shutil.copy(EXAMPLE / "ops.py", root / "opt/cidboot/ops/ops.py")
    (root / "run/cidboot/boot.json").write_text(json.dumps({"boot_mode": "measured", "bootconfig": cfg.encode().decode(),
                                                            "manifest": str(SIGNED.cid)}))
    (root / "run/cidboot/dice.cbor").write_bytes(encode_handover(dev.ident.cdi_attest, dev.ident.cdi_seal,
                                                                 dev.ident.chain))
    console = io.StringIO()
    agent = boot_agent(root, network=False, host="127.0.0.1", port=0, console=console, peer_patience=5.0)
    agents.append(agent)
    return agent, console


def _grep_store(agent: BootedAgent, needle: bytes) -> list[Path]:
    return [p for p in agent.store.path.rglob("*") if p.is_file() and needle in p.read_bytes()]


def test_two_devices_seal_all_over_attested_peers(tmp_path: Path,
                                                  net: tuple[GatewayServer, Blockstore, list[BootedAgent]]) -> None:
    gw, store, agents = net
    s, a = make_device("sensor", signed=SIGNED), make_device("aggregator", signed=SIGNED)
    reg = registry(store, s, a)
    agg, agg_out = _boot(tmp_path / "a", gw, a, "aggregator", reg, agents)
    sen, sen_out = _boot(tmp_path / "s", gw, s, "sensor", reg, agents, {"aggregator": (agg.url,)})
    results: list[Any] = []
    t = threading.Thread(target=lambda: results.extend(run_flow(agg, remote_wait=30)), daemon=True)
    t.start()
    run_flow(sen)
    t.join(40)
    assert not t.is_alive()
    assert [(r.definition, r.value) for r in results] == [("total", TOTAL)]  # computed on the opened readings
    assert agg.audit.find("refused") == [] and len(agg.audit.find("accepted")) == 1
    # consoles, /results: sealed CIDs, no values
    assert "cidboot: result total={\"sealed\": " in agg_out.getvalue() and f"={TOTAL}" not in agg_out.getvalue()
    assert "cidboot: result readings={\"sealed\": " in sen_out.getvalue() and "[0, 7, 4, 1, 8]" not in sen_out.getvalue()
    doc = json.loads(request(agg.url, "GET", "/results")[2])
    [res] = doc["results"]
    assert set(res["value"]) == {"sealed"}
    # the whole provenance DAG from the aggregator's /ipfs/ (as publishing sends it): sealed values only
    status, _ctype, car = request(agg.url, "GET", f"/ipfs/{res['provenance']}?format=car")
    assert status == 200
    blocks = dict(CarReader(io.BytesIO(car)))
    nodes = [provenance.decode(b, c) for c, b in blocks.items()
             if c != FLOW_CID and set(dagcbor.decode(b)) == {"input", "sig"}]
    assert sorted(n.definition for n in nodes) == ["count", "readings", "total"]
    assert all(n.sealed is not None and n.sealed in blocks for n in nodes)
    total = next(n for n in nodes if n.definition == "total")
    assert total.sealed is not None and open_value(blocks[total.sealed], [OWNER], total.sealed) == TOTAL
    readings = next(n for n in nodes if n.definition == "readings")
    assert readings.sealed is not None and open_value(blocks[readings.sealed], [OWNER]) == READINGS
    # no opening was stored by either agent (they hold the file keys; the store must not)
    for agent in (agg, sen):
        assert _grep_store(agent, b"file_key") == []
        assert _grep_store(agent, dagcbor.encode(READINGS)) == []  # the readings' DAG-CBOR nowhere in clear
        assert _grep_store(agent, dagcbor.encode(SIGNED.manifest.root.keys[0]))  # control: the grep reads the store
