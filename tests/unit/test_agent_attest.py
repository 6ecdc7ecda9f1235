"""The attestation API and the verifier over loopback HTTP: fresh nonces, replay, unknown and
unmeasured devices, malformed requests (400 with the reason; the server keeps serving)."""

from __future__ import annotations

import http.client
import json
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519

from agent.attestation_api import AgentServer, Attester, Result, serve_api
from agent.verifier import Challenges, Verifier, serve_verifier
from cidboot.ipld.cid import CID, RAW
from cidboot.store.blockstore import Blockstore
from cidboot.trust.appraisal import AFFIRMING, CONTRAINDICATED, DeviceRoots, appraise
from cidboot.trust.cose_key import key_id
from cidboot.trust.dice.derive import DiceInputs, DiceMode
from cidboot.trust.dice.software import DerivedIdentity, derive_layers
from cidboot.trust.manifest import Layer, Manifest, RootOfTrust, SignedManifest, sign_manifest
from cidboot.trust.measure import code_hash_of_blobs, image_inputs

SIGNER = ed25519.Ed25519PrivateKey.generate()
FW, BS = code_hash_of_blobs([b"firmware"]), code_hash_of_blobs([b"bootstrap"])
MANIFEST = Manifest("agent-test", 1, int(time.time()) + 3600, (Layer(CID.of(b"agent layer", RAW), 11, "agent"),),
                    RootOfTrust.from_public_keys([SIGNER.public_key()], 1), {"firmware": FW, "bootstrap": BS})
SIGNED: SignedManifest = sign_manifest(MANIFEST, [SIGNER])


@dataclass
class Device:
    ident: DerivedIdentity
    attester: Attester


def make_device(role: str = "worker", *, debug: bool = False, boot_mode: str = "measured",
                signed: SignedManifest = SIGNED) -> Device:
    """A software device: DICE layers firmware -> bootstrap -> image from a fresh UDS."""
    mode = DiceMode.DEBUG if debug else DiceMode.NORMAL
    ident = derive_layers(os.urandom(32), [DiceInputs(code_hash=FW), DiceInputs(code_hash=BS, mode=mode),
                                           image_inputs(signed.cid, signed.manifest, [key_id(SIGNER.public_key())])])
    return Device(ident, Attester.from_derived(ident, manifest_cid=signed.cid, boot_mode=boot_mode, role=role))


def roots_of(*devs: Device) -> DeviceRoots:
    r = DeviceRoots()
    for d in devs:
        r.add(d.ident.root_public_key, d.attester.role or "", d.attester.role)
    return r


def verifier_for(*devs: Device, **kw: object) -> Verifier:
    return Verifier(roots_of(*devs), MANIFEST, SIGNED.cid, **kw)  # type: ignore[arg-type]


def request(url: str, method: str, path: str, body: bytes | None = None,
            headers: dict[str, str] | None = None) -> tuple[int, str, bytes]:
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=10)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        r = conn.getresponse()
        return r.status, r.getheader("Content-Type") or "", r.read()
    finally:
        conn.close()


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


def test_fresh_nonce_affirming(running: list[AgentServer], tmp_path: Path) -> None:
    dev = make_device()
    srv = start(running, serve_api(dev.attester, "127.0.0.1", 0, store=Blockstore(tmp_path)))
    nonce = os.urandom(32)
    status, ctype, ev = request(srv.url, "GET", f"/attestation?nonce={nonce.hex()}")
    assert status == 200 and ctype == "application/eat+cwt"
    res = appraise(ev, expected_nonce=nonce, roots=roots_of(dev), manifest=MANIFEST, manifest_cid=SIGNED.cid)
    assert res.status == AFFIRMING, res.to_obj()
    assert res.role == "worker" and set(res.measurements) == {"firmware", "bootstrap", "image"}


def test_appraisal_per_manifest_values_follow_the_manifest_given() -> None:
    """Appraisal keeps what it derives from a manifest (the image code hash, the CID's text) by the
    manifest's identity: appraising against another manifest, even an equal-looking one built
    with other layers, uses that manifest's values, and the first manifest's again afterwards."""
    from dataclasses import replace

    dev = make_device()
    nonce = os.urandom(32)
    ev = dev.attester.evidence(nonce)

    def status(m: Manifest, mcid: CID) -> tuple[str, dict[str, str]]:
        res = appraise(ev, expected_nonce=nonce, roots=roots_of(dev), manifest=m, manifest_cid=mcid)
        return res.status, {c.name: c.status for c in res.checks}

    assert status(MANIFEST, SIGNED.cid)[0] == AFFIRMING
    other = replace(MANIFEST, layers=(Layer(CID.of(b"another layer", RAW), 13, "agent"),))
    st, checks = status(other, SIGNED.cid)
    assert st == CONTRAINDICATED and checks["measurements"] == CONTRAINDICATED
    other_cid = sign_manifest(other, [SIGNER]).cid
    st, checks = status(MANIFEST, other_cid)
    assert checks["manifest"] == CONTRAINDICATED and checks["measurements"] == CONTRAINDICATED
    res = appraise(ev, expected_nonce=nonce, roots=roots_of(dev), manifest=MANIFEST, manifest_cid=SIGNED.cid)
    assert res.affirming and res.manifest_cid == str(SIGNED.cid)
    assert f"booted manifest {SIGNED.cid}" in [c.reason for c in res.checks if c.name == "manifest"]


def test_device_not_in_roots(running: list[AgentServer]) -> None:
    dev, other = make_device(), make_device()
    srv = start(running, serve_api(dev.attester, "127.0.0.1", 0))
    nonce = os.urandom(16)
    _, _, ev = request(srv.url, "GET", f"/attestation?nonce={nonce.hex()}")
    res = verifier_for(other).appraise(ev, nonce)
    assert res.status == CONTRAINDICATED and "unknown device" in {c.name: c.reason for c in res.checks}["device"]


@pytest.mark.parametrize("kw,check", [({"debug": True}, "debug-mode"), ({"boot_mode": "unmeasured"}, "measured-boot")])
def test_debug_or_unmeasured_not_affirming(running: list[AgentServer], kw: dict[str, object], check: str) -> None:
    dev = make_device(**kw)  # type: ignore[arg-type]
    srv = start(running, serve_api(dev.attester, "127.0.0.1", 0))
    nonce = os.urandom(16)
    _, _, ev = request(srv.url, "GET", f"/attestation?nonce={nonce.hex()}")
    res = verifier_for(dev).appraise(ev, nonce)
    assert res.status == CONTRAINDICATED and {c.name: c.status for c in res.checks}[check] == CONTRAINDICATED


@pytest.mark.parametrize("query,msg", [
    ("", "nonce missing"), ("?nonce=", "nonce missing"), ("?nonce=zz", "nonce is not hex"),
    ("?nonce=" + "ab" * 7, "nonce must be 8 to 64 bytes, got 7"), ("?nonce=" + "ab" * 65, "got 65"),
    ("?nonce=abababababababab&nonce=abababababababab", "more than once"),
])
def test_bad_nonce_400_and_keeps_serving(running: list[AgentServer], query: str, msg: str) -> None:
    dev = make_device()
    srv = start(running, serve_api(dev.attester, "127.0.0.1", 0))
    status, _, body = request(srv.url, "GET", "/attestation" + query)
    assert status == 400 and msg in body.decode()
    status, _, _ = request(srv.url, "GET", "/attestation?nonce=" + "00" * 8)
    assert status == 200


def test_other_malformed_requests(running: list[AgentServer], tmp_path: Path) -> None:
    store = Blockstore(tmp_path)
    cid = store.put_block(b"hello block")
    srv = start(running, serve_api(make_device().attester, "127.0.0.1", 0, store=store))
    assert request(srv.url, "GET", "/nope")[0] == 404
    assert request(srv.url, "POST", "/attestation", b"")[0] == 405
    assert request(srv.url, "GET", "/ipfs/notacid?format=raw")[0] == 400
    assert request(srv.url, "GET", f"/ipfs/{CID.of(b'absent', RAW)}?format=raw")[0] == 404
    assert request(srv.url, "GET", f"/ipfs/{cid}?format=tar")[0] in (400, 406)
    assert request(srv.url, "GET", f"/ipfs/{cid}?format=raw") == (200, "application/vnd.ipld.raw", b"hello block")
    status, ctype, car = request(srv.url, "GET", f"/ipfs/{cid}?format=car")  # the gateway's own handler
    assert status == 200 and ctype.startswith("application/vnd.ipld.car") and b"hello block" in car
    assert request(srv.url, "GET", "/attestation?nonce=" + "00" * 8)[0] == 200  # still serving


def test_results_with_provenance(running: list[AgentServer]) -> None:
    srv = start(running, serve_api(make_device().attester, "127.0.0.1", 0))
    prov = CID.of(b"input node", 0x71)
    srv.results.add(Result("total", 20, prov))
    status, ctype, body = request(srv.url, "GET", "/results")
    assert status == 200 and ctype == "application/json"
    assert json.loads(body) == {"results": [{"definition": "total", "value": 20, "provenance": str(prov)}], "audit": None}


def test_verifier_session_affirming_then_replay(running: list[AgentServer]) -> None:
    dev = make_device()
    vsrv = start(running, serve_verifier(verifier_for(dev)))
    status, _, body = request(vsrv.url, "POST", "/attestation/session", b"")
    sess = json.loads(body)
    assert status == 201 and len(bytes.fromhex(sess["nonce"])) == 32 and sess["expires"] > time.time()
    ev = dev.attester.evidence(bytes.fromhex(sess["nonce"]))
    status, _, body = request(vsrv.url, "POST", f"/attestation/session/{sess['session']}", ev)
    assert status == 200 and json.loads(body)["status"] == AFFIRMING
    status, _, body = request(vsrv.url, "POST", f"/attestation/session/{sess['session']}", ev)
    assert status == 409 and json.loads(body)["status"] == CONTRAINDICATED and "replayed" in json.loads(body)["error"]


def test_verifier_evidence_for_other_nonce(running: list[AgentServer]) -> None:
    dev = make_device()
    vsrv = start(running, serve_verifier(verifier_for(dev)))
    sess = json.loads(request(vsrv.url, "POST", "/attestation/session", b"")[2])
    old = dev.attester.evidence(os.urandom(32))  # captured earlier, for another challenge
    status, _, body = request(vsrv.url, "POST", f"/attestation/session/{sess['session']}", old)
    obj = json.loads(body)
    assert status == 200 and obj["status"] == CONTRAINDICATED
    assert {c["check"]: c["status"] for c in obj["checks"]}["nonce"] == CONTRAINDICATED


def test_verifier_bad_requests(running: list[AgentServer]) -> None:
    vsrv = start(running, serve_verifier(verifier_for(make_device())))
    assert request(vsrv.url, "POST", "/attestation/session/nosuch", b"x")[0] == 404
    sess = json.loads(request(vsrv.url, "POST", "/attestation/session", b"")[2])
    status, _, body = request(vsrv.url, "POST", f"/attestation/session/{sess['session']}", b"")
    assert status == 400 and b"empty body" in body
    status, _, body = request(vsrv.url, "POST", f"/attestation/session/{sess['session']}", b"garbage")
    assert status == 200 and json.loads(body)["checks"][0]["check"] == "format"
    assert request(vsrv.url, "POST", "/attestation/session", b"")[0] == 201  # still serving


def test_session_expiry() -> None:
    now = [1000.0]
    ch = Challenges(ttl=60, clock=lambda: now[0])
    c = ch.new()
    now[0] += 61
    with pytest.raises(Exception, match="expired"):
        ch.take(c.session)
    with pytest.raises(Exception, match="expired"):  # stateless: an expired session stays expired
        ch.take(c.session)


def test_cli_attest(running: list[AgentServer], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from agent.cli import main

    dev, store = make_device(), Blockstore(tmp_path / "store")
    store.put(SIGNED.cid, SIGNED.encode())
    roots_of(dev).save(tmp_path / "roots.json")
    roots_of(make_device()).save(tmp_path / "other.json")
    srv = start(running, serve_api(dev.attester, "127.0.0.1", 0))
    base = [srv.url, "--manifest", str(SIGNED.cid), "--store", str(tmp_path / "store")]
    assert main(["attest", *base, "--roots", str(tmp_path / "roots.json"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["status"] == AFFIRMING
    assert main(["attest", *base, "--roots", str(tmp_path / "other.json")]) == 1
    out = capsys.readouterr().out
    assert "✗ device: unknown device" in out and out.rstrip().endswith("status: contraindicated")
    assert main(["attest", "http://127.0.0.1:1", "--timeout", "2"]) == 1
    assert "agent: error: http://127.0.0.1:1" in capsys.readouterr().err
    (tmp_path / "m.cbor").write_bytes(SIGNED.encode())
    assert main(["attest", srv.url, "--manifest-file", str(tmp_path / "m.cbor"), "--roots", str(tmp_path / "roots.json")]) == 0
    assert capsys.readouterr().out.rstrip().endswith("status: affirming")
    assert main(["attest", *base, "--manifest-file", str(tmp_path / "m.cbor")]) == 2  # --manifest and --manifest-file: a usage error
    assert "not both" in capsys.readouterr().err


def test_cli_serve_then_attest(tmp_path: Path) -> None:
    import subprocess
    import sys

    store = Blockstore(tmp_path / "store")
    store.put(SIGNED.cid, SIGNED.encode())
    serve = subprocess.Popen([sys.executable, "-m", "agent", "serve", "--identity", str(tmp_path / "id"), "--role", "sensor",
                              "--manifest", str(SIGNED.cid), "--store", str(tmp_path / "store"), "--port", "0",
                              "--register", str(tmp_path / "roots.json"), "--verifier", "--roots", str(tmp_path / "roots.json")],
                             stdout=subprocess.PIPE, text=True)
    try:
        assert serve.stdout is not None
        assert serve.stdout.readline().startswith("registered device ")
        url = serve.stdout.readline().split()[-1]
        att = subprocess.run([sys.executable, "-m", "agent", "attest", url, "--roots", str(tmp_path / "roots.json"),
                              "--manifest", str(SIGNED.cid), "--store", str(tmp_path / "store")],
                             capture_output=True, text=True, timeout=60)
        assert att.returncode == 0, att.stdout + att.stderr
        assert "✓ measurements" in att.stdout
        assert request(url, "POST", "/attestation/session", b"")[0] == 201
    finally:
        serve.terminate()
        serve.wait(10)


def test_cli_attest_via_remote_verifier(running: list[AgentServer], capsys: pytest.CaptureFixture[str]) -> None:
    """The verifier issues the nonce and appraises; the CLI only carries nonce and evidence."""
    from agent.cli import main

    dev = make_device()
    srv = start(running, serve_api(dev.attester, "127.0.0.1", 0))
    good = start(running, serve_verifier(verifier_for(dev)))
    bad = start(running, serve_verifier(verifier_for(make_device())))
    assert main(["attest", srv.url, "--verifier", good.url, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["status"] == AFFIRMING
    assert main(["attest", srv.url, "--verifier", bad.url]) == 1
    assert "✗ device: unknown device" in capsys.readouterr().out
    assert main(["attest", srv.url, "--verifier", good.url, "--roots", "x.json"]) == 2  # --roots with --verifier: a usage error
    assert "verifier's own roots" in capsys.readouterr().err
