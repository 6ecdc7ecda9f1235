"""agent.device on the host: a handoff directory as root, the manifest and signed device
registry behind a real gateway on loopback, no network bring-up, no QEMU."""

from __future__ import annotations

import io
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agent.device import AgentBootError, BootedAgent, boot_agent
from cidboot.netboot.bootconfig import BootConfig
from cidboot.stage.handoff import Handoff
from cidboot.store.blockstore import Blockstore
from cidboot.store.gateway.server import GatewayServer, serve_gateway
from cidboot.trust.appraisal import AFFIRMING, CONTRAINDICATED, DeviceRoots, appraise
from cidboot.trust.dice import encode_handover
from cidboot.trust.registry import registry_cid, sign_registry
from tests.unit.test_agent_attest import MANIFEST, SIGNED, SIGNER, Device, make_device, request

ANCHOR = {"keys": [k.hex() for k in MANIFEST.root.keys], "threshold": 1, "version": 1}


@pytest.fixture
def gateway(tmp_path: Path) -> Iterator[tuple[GatewayServer, Blockstore]]:
    store = Blockstore(tmp_path / "gw")
    store.put(SIGNED.cid, SIGNED.encode())
    gw = serve_gateway(store, "127.0.0.1", 0)
    import threading

    threading.Thread(target=gw.serve_forever, daemon=True).start()
    yield gw, store
    gw.shutdown()
    gw.server_close()


@pytest.fixture
def agents() -> Iterator[list[BootedAgent]]:
    out: list[BootedAgent] = []
    yield out
    for a in out:
        a.server.shutdown()
        a.server.server_close()


def handoff_dir(root: Path, dev: Device | None, cfg: BootConfig) -> Path:
    dice = encode_handover(dev.ident.cdi_attest, dev.ident.cdi_seal, dev.ident.chain) if dev else None
    boot = {"boot_mode": "measured" if dev else "unmeasured", "bootconfig": cfg.encode().decode(), "manifest": str(SIGNED.cid)}
    h = Handoff(dice, boot)
    h.validate()
    (root / "run/cidboot").mkdir(parents=True)
    (root / "run/cidboot/boot.json").write_text(json.dumps(boot))
    if dice:
        (root / "run/cidboot/dice.cbor").write_bytes(dice)
    return root


def boot(tmp_path: Path, gw: GatewayServer, dev: Device | None, reg_devs: list[Device], store: Blockstore,
         agents: list[BootedAgent], role: str = "worker") -> tuple[BootedAgent, str]:
    roots = DeviceRoots()
    for d in reg_devs:
        roots.add(d.ident.root_public_key, d.attester.role or "", d.attester.role)
    block = sign_registry(roots, [SIGNER])
    store.put(registry_cid(block), block)
    cfg = BootConfig(SIGNED.cid, (gw.url,), ANCHOR, role, device_registry=registry_cid(block))
    root = handoff_dir(tmp_path / "root", dev, cfg)
    out = io.StringIO()
    agent = boot_agent(root, network=False, host="127.0.0.1", port=0, console=out)
    agents.append(agent)
    return agent, out.getvalue()


def test_measured_boot_affirming(tmp_path: Path, gateway: tuple[GatewayServer, Blockstore], agents: list[BootedAgent]) -> None:
    gw, store = gateway
    dev = make_device("worker")
    agent, console = boot(tmp_path, gw, dev, [dev], store, agents)
    assert console.splitlines() == ["cidboot-stage: agent start", f"cidboot-stage: agent ready url={agent.url}"]
    assert not (tmp_path / "root/run/cidboot/dice.cbor").exists()  # erased on read
    nonce = os.urandom(32)
    status, _, ev = request(agent.url, "GET", f"/attestation?nonce={nonce.hex()}")
    assert status == 200
    res = appraise(ev, expected_nonce=nonce, roots=agent.roots, manifest=MANIFEST, manifest_cid=SIGNED.cid)
    assert res.status == AFFIRMING, res.to_obj()
    assert res.role == "worker" and set(agent.roots.keys) == {res.device_id}
    assert request(agent.url, "GET", f"/ipfs/{SIGNED.cid}?format=raw")[2] == SIGNED.encode()  # fetched blocks are served


def test_unmeasured_boot_not_affirming(tmp_path: Path, gateway: tuple[GatewayServer, Blockstore],
                                       agents: list[BootedAgent]) -> None:
    gw, store = gateway
    agent, _ = boot(tmp_path, gw, None, [], store, agents)
    nonce = os.urandom(16)
    ev = request(agent.url, "GET", f"/attestation?nonce={nonce.hex()}")[2]
    res = appraise(ev, expected_nonce=nonce, roots=agent.roots, manifest=MANIFEST, manifest_cid=SIGNED.cid)
    checks = {c.name: c.status for c in res.checks}
    assert res.status == CONTRAINDICATED and checks["measured-boot"] == CONTRAINDICATED


def test_no_handoff_is_fatal(tmp_path: Path) -> None:
    with pytest.raises(AgentBootError, match="handoff: no hand-off"):
        boot_agent(tmp_path, network=False, host="127.0.0.1", port=0, console=io.StringIO())


def test_registry_below_threshold_refused(tmp_path: Path, gateway: tuple[GatewayServer, Blockstore]) -> None:
    from cryptography.hazmat.primitives.asymmetric import ed25519

    gw, store = gateway
    dev = make_device()
    roots = DeviceRoots()
    roots.add(dev.ident.root_public_key)
    block = sign_registry(roots, [ed25519.Ed25519PrivateKey.generate()])
    store.put(registry_cid(block), block)
    cfg = BootConfig(SIGNED.cid, (gw.url,), ANCHOR, "worker", device_registry=registry_cid(block))
    root = handoff_dir(tmp_path / "root", dev, cfg)
    with pytest.raises(Exception, match="device registry: 0 valid signature"):
        boot_agent(root, network=False, host="127.0.0.1", port=0, console=io.StringIO())


def test_manifest_missing_from_gateways(tmp_path: Path, gateway: tuple[GatewayServer, Blockstore]) -> None:
    gw, store = gateway
    store.delete(SIGNED.cid)
    dev = make_device()
    root = handoff_dir(tmp_path / "root", dev, BootConfig(SIGNED.cid, (gw.url,), ANCHOR))
    with pytest.raises(AgentBootError, match=f"could not fetch {SIGNED.cid}: .*HTTP 404"):
        boot_agent(root, network=False, host="127.0.0.1", port=0, console=io.StringIO())


def test_record_prints_and_publishes(tmp_path: Path, gateway: tuple[GatewayServer, Blockstore],
                                     agents: list[BootedAgent], monkeypatch: pytest.MonkeyPatch) -> None:
    from agent.attestation_api import Result
    from agent.publish import PublishTarget
    from cidboot.ipld import dagcbor
    from cidboot.ipld.cid import DAG_CBOR

    gw, store = gateway
    dev = make_device("aggregator")
    agent, _ = boot(tmp_path, gw, dev, [dev], store, agents)
    parent = agent.store.put_block(dagcbor.encode({"v": 1}), DAG_CBOR)
    node = agent.store.put_block(dagcbor.encode({"parents": [parent], "v": 20}), DAG_CBOR)
    sent: list[object] = []
    monkeypatch.setattr("agent.publish.publish", lambda st, roots, t: sent.append((list(roots), t)))
    agent.publish_to = PublishTarget.parse("kubo=http://127.0.0.1:5001")
    out = io.StringIO()
    agent.console = out
    agent.record(Result("total", 20, node))
    assert out.getvalue() == "cidboot: result total=20\n"
    assert sent == [([node], agent.publish_to)]
    assert json.loads(request(agent.url, "GET", "/results")[2])["results"][0]["provenance"] == str(node)


def test_publish_walks_the_provenance_dag(tmp_path: Path) -> None:
    from agent.publish import PublishTarget, publish
    from cidboot.ipld import dagcbor
    from cidboot.ipld.cid import DAG_CBOR

    store = Blockstore(tmp_path)
    parent = store.put_block(dagcbor.encode({"v": 1}), DAG_CBOR)
    node = store.put_block(dagcbor.encode({"parents": [parent]}), DAG_CBOR)

    class Fake:
        def __init__(self) -> None:
            self.blocks: dict[str, bytes] = {}
            self.pins: list[str] = []

        def put(self, cid: object, data: bytes) -> None:
            self.blocks[str(cid)] = data

        def pin(self, cid: object) -> None:
            self.pins.append(str(cid))

    fake = Fake()
    assert publish(store, [node], PublishTarget.parse("kubo=http://x:5001"), client=fake) == 2
    assert set(fake.blocks) == {str(node), str(parent)} and fake.pins == [str(node)]
    with pytest.raises(ValueError, match="kubo=http"):
        PublishTarget.parse("ipfs=x")


def test_device_path_imports_only_the_minimal_image() -> None:
    import subprocess
    import sys

    code = ("import sys\nimport agent.device, agent.peers, agent.verifier, agent.attestation_api, cidboot.trust.registry\n"
            "bad = sorted(m for m in ('yaml', 'scapy', 'ipfshttpclient', 'pyroute2', 'tftpy', 'jsonschema') if m in sys.modules)\n"
            "print(' '.join(bad))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60)
    assert out.stdout.strip() == ""


def test_peer_endpoints_load_on_first_request(tmp_path: Path, gateway: tuple[GatewayServer, Blockstore],
                                              agents: list[BootedAgent]) -> None:
    """The peer endpoints are mounted at start and built by their first request: a session is
    issued with this agent's evidence; until then the peer side is not built."""
    gw, store = gateway
    dev = make_device("worker")
    agent, _ = boot(tmp_path, gw, dev, [dev], store, agents)
    assert "service" not in agent._built and "verifier" not in agent._built
    nonce = os.urandom(32)
    status, _, body = request(agent.url, "POST", "/peer/session", json.dumps({"nonce": nonce.hex()}).encode(),
                              {"Content-Type": "application/json"})
    assert status == 201, body
    doc = json.loads(body)
    res = appraise(bytes.fromhex(doc["evidence"]), expected_nonce=nonce, roots=agent.roots, manifest=MANIFEST,
                   manifest_cid=SIGNED.cid)
    assert res.status == AFFIRMING
    assert {"service", "verifier", "audit", "attested"} <= set(agent._built)


def test_deferred_route_that_cannot_load_fails_the_request_loudly(caplog: pytest.LogCaptureFixture) -> None:
    """A deferred part that fails to load (a broken image) is a 500 naming the error, logged and
    counted, for that request only; the server keeps serving, and the next request tries again."""
    from agent.attestation_api import deferred_route, serve_api
    calls = []

    def load() -> list[Any]:
        calls.append(1)
        raise ImportError("No module named 'agent.peers'")

    srv = serve_api(None, "127.0.0.1", 0)
    srv.mount(deferred_route("POST", "/peer/session", load))
    srv.start()
    try:
        for _ in range(2):
            status, _, body = request(srv.url, "POST", "/peer/session", b"{}")
            assert status == 500 and b"ImportError" in body
        assert len(calls) == 2
        assert request(srv.url, "GET", "/results")[0] == 200
        assert "internal error on POST /peer/session" in caplog.text
        assert b'cidboot_agent_internal_errors_total 2' in request(srv.url, "GET", "/metrics")[2]
    finally:
        srv.shutdown()
        srv.server_close()


# -- examples/two-device across two in-process agents ------------------------------------------------

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "examples/two-device"
EXPECTED_TOTAL = sum((i * 7) % 10 for i in range(5))


def two_device_manifest(store: Blockstore) -> Any:
    import time

    import yaml

    from cidboot.ipld import dagcbor
    from cidboot.ipld.cid import CID, DAG_CBOR
    from cidboot.trust.manifest import Manifest, sign_manifest
    from tests.unit.test_agent_attest import BS, FW

    doc = yaml.safe_load((EXAMPLE / "flow.yaml").read_text())
    flow_block = dagcbor.encode(doc["dataflow"])
    flow_cid = CID.of(flow_block, DAG_CBOR)
    store.put(flow_cid, flow_block)
    m = Manifest("two-device", 1, int(time.time()) + 3600, MANIFEST.layers, MANIFEST.root,
                 {"firmware": FW, "bootstrap": BS}, flow=flow_cid, placement=doc["placement"])
    signed = sign_manifest(m, [SIGNER])
    store.put(signed.cid, signed.encode())
    return signed


def device_root(root: Path, dev: Device, cfg: BootConfig, signed: Any) -> Path:
    dice = encode_handover(dev.ident.cdi_attest, dev.ident.cdi_seal, dev.ident.chain)
    boot = {"boot_mode": "measured", "bootconfig": cfg.encode().decode(), "manifest": str(signed.cid)}
    (root / "run/cidboot").mkdir(parents=True)
    (root / "run/cidboot/boot.json").write_text(json.dumps(boot))
    (root / "run/cidboot/dice.cbor").write_bytes(dice)
    (root / "opt/cidboot/ops").mkdir(parents=True)
    (root / "opt/cidboot/ops/ops.py").write_bytes((EXAMPLE / "ops.py").read_bytes())
    return root


def run_two_devices(tmp_path: Path, gw: GatewayServer, store: Blockstore, agents: list[BootedAgent], *,
                    register_sensor: bool) -> tuple[BootedAgent, BootedAgent, str, str]:
    import threading

    from agent.device import run_flow

    signed = two_device_manifest(store)
    sensor, aggregator = make_device("sensor", signed=signed), make_device("aggregator", signed=signed)
    roots = DeviceRoots()
    for d in ([sensor, aggregator] if register_sensor else [aggregator]):
        roots.add(d.ident.root_public_key, d.attester.role or "", d.attester.role)
    block = sign_registry(roots, [SIGNER])
    store.put(registry_cid(block), block)
    reg = registry_cid(block)
    out_a, out_s = io.StringIO(), io.StringIO()
    cfg_a = BootConfig(signed.cid, (gw.url,), ANCHOR, "aggregator", device_registry=reg)
    agg = boot_agent(device_root(tmp_path / "aggregator", aggregator, cfg_a, signed), network=False, host="127.0.0.1",
                     port=0, console=out_a)
    agents.append(agg)
    cfg_s = BootConfig(signed.cid, (gw.url,), ANCHOR, "sensor", peers={"aggregator": (agg.url,)}, device_registry=reg)
    sen = boot_agent(device_root(tmp_path / "sensor", sensor, cfg_s, signed), network=False, host="127.0.0.1",
                     port=0, console=out_s, peer_patience=10)
    agents.append(sen)
    t = threading.Thread(target=run_flow, args=(agg,), kwargs={"remote_wait": 10 if register_sensor else 3}, daemon=True)
    t.start()
    run_flow(sen, remote_wait=5)
    t.join(30)
    assert not t.is_alive()
    return sen, agg, out_s.getvalue(), out_a.getvalue()


def test_two_device_flow_with_mutual_attestation(tmp_path: Path, gateway: tuple[GatewayServer, Blockstore],
                                                  agents: list[BootedAgent]) -> None:
    gw, store = gateway
    sen, agg, out_s, out_a = run_two_devices(tmp_path, gw, store, agents, register_sensor=True)
    assert "cidboot: result readings=[0, 7, 4, 1, 8]" in out_s.splitlines()
    assert f"cidboot: result total={EXPECTED_TOTAL}" in out_a.splitlines()
    results = json.loads(request(agg.url, "GET", "/results")[2])["results"]
    [total] = [r for r in results if r["definition"] == "total"]
    assert total["value"] == EXPECTED_TOTAL and total["provenance"]
    # the aggregator registered the sensor from an affirming appraisal, and vice versa nothing else
    roles = {a.role for a in agg.attested.by_key.values()}
    assert roles == {"aggregator", "sensor"}


def test_two_device_unregistered_sensor_gets_nothing_through(tmp_path: Path, gateway: tuple[GatewayServer, Blockstore],
                                                             agents: list[BootedAgent]) -> None:
    gw, store = gateway
    sen, agg, out_s, out_a = run_two_devices(tmp_path, gw, store, agents, register_sensor=False)
    assert any(line.startswith("cidboot: refused: peer:") and "unknown device" in line for line in out_s.splitlines())
    assert not any(line.startswith("cidboot: result total=") for line in out_a.splitlines())
    assert {a.role for a in agg.attested.by_key.values()} == {"aggregator"}  # itself only


def test_main_fatal_line_and_pid1_dispatch(tmp_path: Path) -> None:
    from agent.device import is_device_boot, main

    out = io.StringIO()
    with pytest.raises(AgentBootError):
        main(tmp_path, network=False, host="127.0.0.1", port=0, serve=False, console=out)
    assert out.getvalue().splitlines() == ["cidboot-stage: agent start",
                                           f"cidboot: fatal: handoff: no hand-off: {tmp_path}/run/cidboot/boot.json "
                                           "does not exist: the agent must be started by the bootstrap"]
    assert is_device_boot(1, ["/usr/lib/agent/__main__.py"]) and not is_device_boot(1, ["agent", "attest"])
    assert not is_device_boot(1234, ["agent"])
