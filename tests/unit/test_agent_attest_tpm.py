"""TPM-rooted agents over loopback HTTP: `agent attest` (checks list, --json, --ear), the remote
verifier's sessions, and peers' mutual attestation between a TPM-rooted and a DICE-rooted agent,
all through the same code paths as DICE agents (a software TPM quotes each fresh nonce)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.attestation_api import AgentServer, serve_api
from agent.peers import Block, PeerClient, PeerRefused, PeerService, mount_peers
from agent.verifier import Verifier, serve_verifier
from cidboot.store.blockstore import Blockstore
from cidboot.trust import keys
from cidboot.trust.appraisal import AFFIRMING, CONTRAINDICATED, AppraisalResult, DeviceRoots, TpmDevice
from cidboot.trust.cose_key import key_id
from cidboot.trust.ear import verify_ear
from tests.support.soft_tpm import SoftTpmDevice, small_uki
from tests.unit.test_agent_attest import MANIFEST, SIGNED, SIGNER, make_device, request
from tests.unit.test_agent_peers import BLOCKS

UKI = small_uki()


def tpm_device(role: str = "worker") -> SoftTpmDevice:
    return SoftTpmDevice(SIGNED.cid, MANIFEST, [key_id(SIGNER.public_key())], role=role, uki=UKI)


def roots_with(*tpms: SoftTpmDevice, dice: tuple[object, ...] = ()) -> DeviceRoots:
    roots = DeviceRoots()
    for t in tpms:
        roots.add_tpm(t.device(), t.role or "", t.role)
    for d in dice:
        roots.add(d.ident.root_public_key, d.attester.role or "", d.attester.role)  # type: ignore[attr-defined]
    return roots


@pytest.fixture
def running() -> Iterator[list[AgentServer]]:
    servers: list[AgentServer] = []
    yield servers
    for s in servers:
        s.shutdown()
        s.server_close()


def start(servers: list[AgentServer], srv: AgentServer) -> AgentServer:
    srv.start()
    servers.append(srv)
    return srv


def test_cli_attest_tpm_agent(running: list[AgentServer], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from agent.cli import main

    dev = tpm_device()
    store = Blockstore(tmp_path / "store")
    store.put(SIGNED.cid, SIGNED.encode())
    roots_with(dev).save(tmp_path / "roots.json")
    roots_with(tpm_device()).save(tmp_path / "other.json")
    (tmp_path / "uki.efi").write_bytes(UKI)
    srv = start(running, serve_api(dev.attester(), "127.0.0.1", 0))
    base = [srv.url, "--manifest", str(SIGNED.cid), "--store", str(tmp_path / "store"),
            "--roots", str(tmp_path / "roots.json"), "--uki", str(tmp_path / "uki.efi")]
    assert main(["attest", *base, "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["status"] == AFFIRMING and out["role"] == "worker"
    names = [c["check"] for c in out["checks"]]
    assert {"tpm.ak-enrolled", "tpm.nonce-binding", "tpm.pcr4-uki", "tpm.pcr11-sections", "tpm.pcr15-manifest",
            "dice-chain", "role"} <= set(names)
    assert main(["attest", *base]) == 0
    assert capsys.readouterr().out.rstrip().endswith("status: affirming")
    # without the UKI: PCR 4/11 not compared, so not affirming (exit 1)
    assert main(["attest", *base[:-2], "--json"]) == 1
    assert json.loads(capsys.readouterr().out)["status"] == "warning"
    # an AK that is not enrolled
    assert main(["attest", *base[:5], "--roots", str(tmp_path / "other.json")]) == 1
    assert "✗ tpm.ak-enrolled" in capsys.readouterr().out
    # EAR, signed by the verifier's key
    vkey = keys.generate()
    keys.write_keypair(vkey, tmp_path / "verifier")
    assert main(["attest", *base, "--ear", "--ear-key", str(tmp_path / "verifier.pem")]) == 0
    claims = verify_ear(capsys.readouterr().out.strip(), vkey.public_key())
    assert claims["submods"]["cidboot"]["ear.status"] == AFFIRMING
    assert claims["submods"]["cidboot"]["cidboot.root"] == "tpm"
    assert main(["attest", *base, "--ear"]) == 2  # --ear without a key: usage error
    assert main(["attest", *base, "--ear", "--ear-key", str(tmp_path / "verifier.pem"), "--json"]) == 2


def test_remote_verifier_sessions_accept_tpm_evidence(running: list[AgentServer]) -> None:
    dev = tpm_device()
    vsrv = start(running, serve_verifier(Verifier(roots_with(dev), MANIFEST, SIGNED.cid,
                                                  tpm_references=dev.references())))
    status, _, body = request(vsrv.url, "POST", "/attestation/session", b"")
    sess = json.loads(body)
    ev = dev.attester().evidence(bytes.fromhex(sess["nonce"]))
    status, _, body = request(vsrv.url, "POST", f"/attestation/session/{sess['session']}", ev)
    assert status == 200 and json.loads(body)["status"] == AFFIRMING, body
    status, _, body = request(vsrv.url, "POST", f"/attestation/session/{sess['session']}", ev)
    assert status == 409 and json.loads(body)["status"] == CONTRAINDICATED


class _Receiver:
    def __init__(self, attester: object, verifier: Verifier) -> None:
        self.got: list[tuple[list[Block], AppraisalResult]] = []
        self.server = serve_api(attester, "127.0.0.1", 0)  # type: ignore[arg-type]
        self.service = PeerService(attester, verifier, lambda b, s: self.got.append((b, s)))  # type: ignore[arg-type]
        mount_peers(self.server, self.service)
        self.server.start()


@pytest.mark.parametrize("tpm_side", ["sender", "receiver", "both"])
def test_peers_mutual_attestation_with_tpm_agents(running: list[AgentServer], tpm_side: str) -> None:
    """A TPM-rooted agent and a DICE-rooted one (or two TPM ones) exchange inputs exactly as two
    DICE agents do: the same PeerService / PeerClient, the same Verifier."""
    sensor_tpm, agg_tpm = tpm_device("sensor"), tpm_device("aggregator")
    sensor_dice, agg_dice = make_device("sensor"), make_device("aggregator")
    sensor = sensor_tpm.attester() if tpm_side in ("sender", "both") else sensor_dice.attester
    agg = agg_tpm.attester() if tpm_side in ("receiver", "both") else agg_dice.attester
    roots = roots_with(sensor_tpm, agg_tpm, dice=(sensor_dice, agg_dice))
    verifier = Verifier(roots, MANIFEST, SIGNED.cid, tpm_references=sensor_tpm.references())
    r = _Receiver(agg, verifier)
    running.append(r.server)
    client = PeerClient(sensor, Verifier(roots, MANIFEST, SIGNED.cid, tpm_references=sensor_tpm.references()),
                        {"aggregator": [r.server.url]})
    [res] = client.send("aggregator", BLOCKS)
    assert res.affirming and res.role == "aggregator"
    [(blocks, who)] = r.got
    assert blocks == BLOCKS and who.affirming and who.role == "sensor"


def test_peers_refuse_a_tpm_agent_whose_baseline_differs(running: list[AgentServer]) -> None:
    sensor, agg = tpm_device("sensor"), make_device("aggregator")
    roots = roots_with(sensor, dice=(agg,))
    did = next(iter(roots.tpm))
    roots.tpm[did] = TpmDevice(sensor.tpm.public, {0: bytes(32)})  # enrolled with another firmware
    r = _Receiver(agg.attester, Verifier(roots, MANIFEST, SIGNED.cid, tpm_references=sensor.references()))
    running.append(r.server)
    client = PeerClient(sensor.attester(), Verifier(roots, MANIFEST, SIGNED.cid), {"aggregator": [r.server.url]})
    with pytest.raises(PeerRefused, match="tpm.firmware"):
        client.send("aggregator", BLOCKS)
    assert r.got == []


def test_serve_uki_is_a_verifier_option(tmp_path: Path) -> None:
    from agent.cli import main

    assert main(["serve", "--identity", str(tmp_path / "id"), "--uki", str(tmp_path / "uki.efi")]) == 2


def _registry_verifier(tmp_path: Path, roots: DeviceRoots, references: object) -> Verifier:
    """The peer Verifier a booted agent builds (agent.device.boot_agent): roots and the UKI's
    PCR 4/11 references both from the signed registry named by the boot config."""
    from agent.device import load_registry_references
    from cidboot.netboot.bootconfig import BootConfig
    from cidboot.trust.registry import registry_cid, sign_registry
    from tests.unit.test_agent_device import ANCHOR

    store = Blockstore(tmp_path / "store")
    block = sign_registry(roots, [SIGNER], tpm_references=references)  # type: ignore[arg-type]
    store.put(registry_cid(block), block)
    cfg = BootConfig(SIGNED.cid, ("http://127.0.0.1:9",), ANCHOR, "aggregator", device_registry=registry_cid(block))
    got, refs = load_registry_references(cfg, SIGNED, store, tmp_path)
    return Verifier(got, MANIFEST, SIGNED.cid, tpm_references=refs)


def test_agent_peers_take_tpm_references_from_the_signed_registry(tmp_path: Path) -> None:
    """A TPM peer is affirmed by an agent whose signed registry carries the bootstrap UKI's PCR 4/11
    references; without them it is not (warning), with another UKI's it is refused at PCR 4."""
    from cidboot.trust.appraisal import WARNING
    from cidboot.trust.tpm.appraise import TpmReferences

    sensor = tpm_device("sensor")
    roots = roots_with(sensor)
    nonce = b"\x42" * 32
    evidence = sensor.attester().evidence(nonce)
    res = _registry_verifier(tmp_path / "a", roots, {"x86_64": TpmReferences.for_uki(UKI)}).appraise(evidence, nonce)
    assert res.status == AFFIRMING and res.role == "sensor", res.to_obj()
    res = _registry_verifier(tmp_path / "b", roots, None).appraise(evidence, nonce)
    assert res.status == WARNING and "PCR 4" in json.dumps(res.to_obj()), res.to_obj()
    other = TpmReferences.for_uki(small_uki(b"console=ttyS1"))
    res = _registry_verifier(tmp_path / "c", roots, {"x86_64": other}).appraise(evidence, nonce)
    assert res.status == CONTRAINDICATED and "PCR 4" in json.dumps(res.to_obj()), res.to_obj()
    # a mixed fleet's registry: one set per arch; the device's log picks the set of the UKI it
    # booted, whichever arch it is filed under, and every event must then equal that set's
    both = {"arm64": TpmReferences.for_uki(UKI), "x86_64": other}
    res = _registry_verifier(tmp_path / "d", roots, both).appraise(evidence, nonce)
    assert res.status == AFFIRMING, res.to_obj()
    neither = {"arm64": TpmReferences.for_uki(small_uki(b"console=ttyAMA0")), "x86_64": other}
    res = _registry_verifier(tmp_path / "e", roots, neither).appraise(evidence, nonce)
    assert res.status == CONTRAINDICATED and "PCR 4 application 0" in json.dumps(res.to_obj()), res.to_obj()


def test_registry_tpm_references_round_trip_and_refuse_malformed() -> None:
    from cidboot.ipld import dagcbor
    from cidboot.trust.manifest import RootOfTrust
    from cidboot.trust.manifest.signed import KIND_REGISTRY, sign_kind
    from cidboot.trust.registry import RegistryFormatError, sign_registry, verify_signed_registry
    from cidboot.trust.tpm.appraise import TpmReferences

    def same(a: TpmReferences, b: TpmReferences) -> bool:
        return list(a.applications) == list(b.applications) and \
            [(e.pcr, e.event_type, e.digest, e.data) for e in a.stub_events] == \
            [(e.pcr, e.event_type, e.digest, e.data) for e in b.stub_events]

    root = RootOfTrust.from_public_keys([SIGNER.public_key()], 1)
    refs = TpmReferences.for_uki(UKI)
    arm = TpmReferences.for_uki(small_uki(b"console=ttyAMA0"))
    reg = verify_signed_registry(sign_registry(DeviceRoots(), [SIGNER], tpm_references={"x86_64": refs, "arm64": arm}),
                                 root)
    assert reg.tpm_references is not None and set(reg.tpm_references) == {"x86_64", "arm64"}
    assert same(reg.tpm_references["x86_64"], refs) and same(reg.tpm_references["arm64"], arm)
    assert verify_signed_registry(sign_registry(DeviceRoots(), [SIGNER]), root).tpm_references is None
    good = dagcbor.decode(sign_registry(DeviceRoots(), [SIGNER], tpm_references={"x86_64": refs}))
    # a registry signed before references were per arch (one set) still decodes: as x86_64's
    old = {**good["registry"], "tpm_references": good["registry"]["tpm_references"]["x86_64"]}
    old_block = dagcbor.encode({"registry": old, "signatures": sign_kind(dagcbor.encode(old), [SIGNER], KIND_REGISTRY)})
    got = verify_signed_registry(old_block, root).tpm_references
    assert got is not None and set(got) == {"x86_64"} and same(got["x86_64"], refs)
    bad: object
    one = good["registry"]["tpm_references"]["x86_64"]
    for bad in ({"pcr4": []}, {"pcr4": [], "pcr11": []}, {"pcr4": [b"short"], "pcr11": []},
                {"pcr4": [bytes(32)], "pcr11": [[13, b"x", b""]]}, {"pcr4": [bytes(32)], "pcr11": [[-1, bytes(32), b""]]},
                {"pcr4": [bytes(32)] * 65, "pcr11": []}, [bytes(32)],
                {}, {"ARM64": one}, {"arm 64": one}, {"": one}, {"a" * 17: one}, {"pcr4": one},
                {f"arch{i}": one for i in range(9)}, {"arm64": {"pcr4": []}}, {"arm64": {"pcr4": [b"short"], "pcr11": []}},
                {"arm64": one, "x86_64": [bytes(32)]}):
        env = {**good, "registry": {**good["registry"], "tpm_references": bad}}
        with pytest.raises(RegistryFormatError, match="tpm_references"):
            verify_signed_registry(dagcbor.encode(env), root)
