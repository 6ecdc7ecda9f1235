"""The boot server's fleet state (bootstrap.server.fleet) and the stages' event client
(cidboot.stage.events): signed stage events verify against the device registry, forged ones are
rejected *and recorded*, the SQLite store is bounded and survives a restart, the API answers."""

from __future__ import annotations

import http.client
import json
import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519

from bootstrap.server.fleet import (
    REJECTED,
    UNSIGNED,
    VERIFIED,
    EventFormatError,
    Fleet,
    FleetStore,
    Verdict,
    verify_event,
)
from cidboot.ipld import dagcbor
from cidboot.stage import events
from cidboot.store.blockstore import Blockstore
from cidboot.store.gateway.server import GatewayServer, serve_gateway
from cidboot.trust.appraisal import DeviceRoots
from cidboot.trust.dice.derive import DiceInputs
from cidboot.trust.dice.software import derive_layers
from cidboot.trust.measure import code_hash_of_blobs

LAYERS = [DiceInputs(code_hash=code_hash_of_blobs([b"firmware"])),
          DiceInputs(code_hash=code_hash_of_blobs([b"bootstrap"])),
          DiceInputs(code_hash=code_hash_of_blobs([b"image"]))]
STAGE_N = {"firmware": 1, "bootstrap": 2, "agent": 3}


def stage_identity(uds: bytes, stage: str) -> events.Identity:
    """The key a stage owns on a device with this UDS: from its own CDI, with its chain."""
    d = derive_layers(uds, LAYERS[:STAGE_N[stage]])
    return events.Identity(d.leaf_key, d.chain)


def registered(*udss: bytes) -> DeviceRoots:
    r = DeviceRoots()
    for i, u in enumerate(udss):
        r.add(derive_layers(u, []).root_public_key, f"dev{i}", "worker")
    return r


def event(stage: str = "agent", kind: str = "ready", mac: str = "52:54:00:00:00:01", seq: int = 1,
          boot_mode: str = "measured", **detail: str) -> dict[str, object]:
    return {"v": 1, "stage": stage, "kind": kind, "seq": seq, "t": int(time.time() * 1000), "mac": mac,
            "boot_mode": boot_mode, "arch": "x86_64", "detail": detail}


UDS_A, UDS_B = os.urandom(32), os.urandom(32)


# -- verification ------------------------------------------------------------------------------

def test_signed_stage_event_from_a_registered_device_is_verified() -> None:
    for stage in STAGE_N:
        body = events.encode_event(event(stage, "start"), stage_identity(UDS_A, stage))
        v = verify_event(body, registered(UDS_A))
        assert v.trust == VERIFIED, v.reason
        assert v.device_id is not None


def test_forged_stage_event_signed_with_wrong_key_is_rejected() -> None:
    real = stage_identity(UDS_A, "agent")
    forger = events.Identity(ed25519.Ed25519PrivateKey.generate(), real.chain)  # the device's chain, another key
    v = verify_event(events.encode_event(event(), forger), registered(UDS_A))
    assert v.trust == REJECTED
    assert "forged" in v.reason and "layer-3" in v.reason


def test_stage_event_from_an_unregistered_device_root_is_rejected() -> None:
    v = verify_event(events.encode_event(event(), stage_identity(UDS_B, "agent")), registered(UDS_A))
    assert v.trust == REJECTED and "not in the device registry" in v.reason
    v = verify_event(events.encode_event(event(), stage_identity(UDS_A, "agent")), None)
    assert v.trust == REJECTED and "no device registry" in v.reason


def test_later_stage_key_cannot_sign_for_an_earlier_stage() -> None:
    """The agent's key (layer 3) must not speak for the firmware (layer 1), nor the reverse."""
    body = events.encode_event(event("firmware", "handover"), stage_identity(UDS_A, "agent"))
    v = verify_event(body, registered(UDS_A))
    assert v.trust == REJECTED and "layer 1" in v.reason
    body = events.encode_event(event("agent", "ready"), stage_identity(UDS_A, "firmware"))
    assert verify_event(body, registered(UDS_A)).trust == REJECTED


def test_unsigned_event_from_an_unmeasured_boot_is_recorded_as_unsigned() -> None:
    v = verify_event(events.encode_event(event(boot_mode="unmeasured"), None), registered(UDS_A))
    assert v.trust == UNSIGNED


def test_unsigned_event_claiming_a_measured_boot_is_rejected() -> None:
    v = verify_event(events.encode_event(event(boot_mode="measured"), None), registered(UDS_A))
    assert v.trust == REJECTED and "measured" in v.reason


def test_unsigned_event_for_the_mac_of_a_signing_device_is_rejected() -> None:
    v = verify_event(events.encode_event(event(boot_mode="unmeasured"), None), registered(UDS_A),
                     bound=lambda mac: "abcd" if mac == "52:54:00:00:00:01" else None)
    assert v.trust == REJECTED and "signs its events" in v.reason


@pytest.mark.parametrize("body", [b"", b"\xff", dagcbor.encode([1]), dagcbor.encode({"event": b"\x01"}),
                                  dagcbor.encode({"sign1": b"x", "chain": b"y"}),
                                  dagcbor.encode({"event": dagcbor.encode({**event(), "stage": "nosuch"})}),
                                  dagcbor.encode({"event": dagcbor.encode({**event(), "mac": "nope"})})],
                         ids=["empty", "not-cbor", "array", "event-not-map", "sign1-chain-only", "bad-stage", "bad-mac"])
def test_malformed_event_body_is_a_format_error(body: bytes) -> None:
    with pytest.raises(EventFormatError):
        verify_event(body, registered(UDS_A))


# -- the SQLite store --------------------------------------------------------------------------

def _verdict(mac: str = "52:54:00:00:00:01", kind: str = "start", seq: int = 1, trust: str = UNSIGNED) -> Verdict:
    ev = {"stage": "bootstrap", "kind": kind, "mac": mac, "seq": seq, "t": 0, "boot_mode": "unmeasured",
          "arch": "", "detail": {"n": str(seq)}}
    return Verdict(trust, "test", ev)


def test_fleet_store_keeps_only_the_last_n_events_per_device() -> None:
    st = FleetStore(":memory:", max_events=5)
    for i in range(12):
        st.record(_verdict(seq=i), "10.0.0.2")
    st.record(_verdict(mac="52:54:00:00:00:02"), "10.0.0.3")
    ev = st.events("52:54:00:00:00:01", limit=100)
    assert [e["seq"] for e in ev] == [7, 8, 9, 10, 11]
    assert len(st.events("52:54:00:00:00:02")) == 1


def test_fleet_store_keeps_at_most_max_devices() -> None:
    st = FleetStore(":memory:", max_devices=3)
    for i in range(5):
        st.record(_verdict(mac=f"52:54:00:00:00:0{i}"), "10.0.0.2", now=1000.0 + i)
    macs = [d["mac"] for d in st.devices()]
    assert macs == ["52:54:00:00:00:02", "52:54:00:00:00:03", "52:54:00:00:00:04"]
    assert st.events("52:54:00:00:00:00") == []


def test_fleet_store_persists_across_restarts(tmp_path: Path) -> None:
    db = tmp_path / "fleet.sqlite"
    st = FleetStore(db)
    st.record(_verdict(kind="start"), "10.0.0.2")
    st.set_appraisal("52:54:00:00:00:01", {"status": "affirming", "checks": []})
    st.close()
    st = FleetStore(db)
    d = st.device("52:54:00:00:00:01")
    assert d is not None and d["appraisal"]["status"] == "affirming" and d["kind"] == "start"
    assert len(st.events()) == 1


def test_rejected_event_is_recorded_but_does_not_move_the_device() -> None:
    st = FleetStore(":memory:")
    st.record(_verdict(kind="start"), "10.0.0.2")
    st.record(_verdict(kind="handover", trust=REJECTED), "10.0.0.2")
    d = st.device("52:54:00:00:00:01")
    assert d is not None and d["kind"] == "start"
    assert [e["trust"] for e in st.events("52:54:00:00:00:01")] == [UNSIGNED, REJECTED]


# -- over HTTP: the stage client posting to the boot server's gateway ----------------------------

@contextmanager
def fleet_server(tmp_path: Path, roots: DeviceRoots) -> Iterator[tuple[Fleet, GatewayServer]]:
    fleet = Fleet(FleetStore(tmp_path / "fleet.sqlite"), Blockstore(tmp_path / "blocks"), lambda: roots)
    gw = serve_gateway(Blockstore(tmp_path / "store"), "127.0.0.1", 0, app=fleet)
    t = threading.Thread(target=gw.serve_forever, daemon=True)
    t.start()
    try:
        yield fleet, gw
    finally:
        fleet.stop()
        gw.shutdown()
        gw.server_close()


def _get(url: str, path: str, method: str = "GET") -> tuple[int, Any]:
    host, port = url.removeprefix("http://").split(":")
    c = http.client.HTTPConnection(host, int(port), timeout=10)
    try:
        c.request(method, path)
        r = c.getresponse()
        return r.status, json.loads(r.read())
    finally:
        c.close()


def test_forged_stage_event_posted_to_the_boot_server_is_rejected_and_recorded(tmp_path: Path) -> None:
    with fleet_server(tmp_path, registered(UDS_A)) as (fleet, gw):
        good = stage_identity(UDS_A, "bootstrap")
        assert events.post(gw.url, events.encode_event(event("bootstrap", "start"), good))
        forged = events.Identity(ed25519.Ed25519PrivateKey.generate(), good.chain)
        body = events.encode_event(event("bootstrap", "handover", seq=2, manifest="bafyforged"), forged)
        status, obj = fleet.post_event(body, "127.0.0.1")
        assert status == 403 and obj["trust"] == REJECTED
        _, dev = _get(gw.url, "/api/devices/52:54:00:00:00:01")
        assert dev["kind"] == "start" and dev["trust"] == VERIFIED  # the forgery moved nothing
        assert [e["trust"] for e in dev["events"]] == [VERIFIED, REJECTED]
        assert "forged" in dev["rejected"][0]["reason"]
        _, rej = _get(gw.url, "/api/events?trust=rejected")
        assert len(rej["events"]) == 1


def test_reporter_posts_signed_stage_events_in_order(tmp_path: Path) -> None:
    with fleet_server(tmp_path, registered(UDS_A)) as (_fleet, gw):
        r = events.Reporter()
        r.configure(server=gw.url, identity=stage_identity(UDS_A, "firmware"), mac="52:54:00:00:00:09")
        r.emit("firmware", "start", {})
        r.emit("firmware", "handover", {"code": "ab"})
        assert r.flush(5.0)
        _, dev = _get(gw.url, "/api/devices/52:54:00:00:00:09")
        assert [(e["kind"], e["trust"]) for e in dev["events"]] == [("start", VERIFIED), ("handover", VERIFIED)]
        assert dev["firmware"] == "cidboot (measured)" and dev["arch"]


def test_unreachable_boot_server_never_blocks_a_stage() -> None:
    r = events.Reporter()
    r.configure(server="http://127.0.0.1:9")  # discard port: connection refused
    t = time.monotonic()
    r.emit("bootstrap", "start", {})
    assert time.monotonic() - t < 0.5  # emit only queues
    t = time.monotonic()
    assert not r.flush(0.3)
    assert time.monotonic() - t < 1.0


def test_events_emit_never_raises_on_garbage() -> None:
    events.emit("bootstrap", "start", dice=b"not a handover", bootconfig=b"{not json")


def test_server_url_comes_from_the_boot_configs_first_gateway() -> None:
    raw = json.dumps({"version": 1, "gateways": ["http://10.0.0.1:8080/", "http://x"]}).encode()
    assert events.server_from_bootconfig(raw) == "http://10.0.0.1:8080"
    assert events.server_from_bootconfig(b"{}") is None


def test_identity_from_dice_handover_signs_as_the_stage() -> None:
    from cidboot.trust.dice import encode_handover

    d = derive_layers(UDS_A, LAYERS[:2])
    ident = events.identity_from_dice(bytearray(encode_handover(d.cdi_attest, d.cdi_seal, d.chain)))
    assert ident is not None
    assert verify_event(events.encode_event(event("bootstrap", "start"), ident), registered(UDS_A)).trust == VERIFIED


def test_fleet_api_unknown_device_and_bad_cid(tmp_path: Path) -> None:
    with fleet_server(tmp_path, registered(UDS_A)) as (_fleet, gw):
        assert _get(gw.url, "/api/devices/nosuch")[0] == 404
        assert _get(gw.url, "/api/provenance/notacid")[0] == 400
        assert _get(gw.url, "/api/nosuch")[0] == 404
        assert _get(gw.url, "/api/devices/nosuch/appraise", "POST")[0] == 404


def test_live_stream_sends_an_update_when_an_event_arrives(tmp_path: Path) -> None:
    with fleet_server(tmp_path, registered(UDS_A)) as (_fleet, gw):
        host, port = gw.url.removeprefix("http://").split(":")
        c = http.client.HTTPConnection(host, int(port), timeout=10)
        c.request("GET", "/api/stream")
        r = c.getresponse()
        assert r.status == 200 and r.getheader("Content-Type") == "text/event-stream"
        assert r.readline() == b"retry: 2000\n"
        r.readline()
        assert events.post(gw.url, events.encode_event(event("bootstrap", "start"), stage_identity(UDS_A, "bootstrap")))
        line = r.readline()
        assert line.startswith(b"data: ")
        msg = json.loads(line[6:])
        assert msg["type"] == "event" and msg["mac"] == "52:54:00:00:00:01" and msg["trust"] == VERIFIED
        c.close()


def test_ready_device_without_agent_is_appraised_contraindicated_not_skipped(tmp_path: Path) -> None:
    """The appraisal is the server's own: an agent that announced itself ready and does not
    answer the challenge is not affirming (fail closed), and the reason says why."""
    with fleet_server(tmp_path, registered(UDS_A)) as (fleet, gw):
        body = events.encode_event(event("agent", "ready", port="9"), stage_identity(UDS_A, "agent"))
        assert events.post(gw.url, body)
        status, a = _get(gw.url, "/api/devices/52:54:00:00:00:01/appraise", "POST")
        assert status == 200 and a["status"] == "contraindicated"
        assert "no evidence" in a["checks"][0]["reason"]


def test_a_flood_of_unsigned_macs_does_not_evict_verified_devices() -> None:
    st = FleetStore(":memory:", max_devices=3)
    st.record(Verdict(VERIFIED, "ok", {**_verdict().event, "mac": "52:54:00:00:00:aa"}, "did"), "10.0.0.2", now=1.0)
    for i in range(10):
        st.record(_verdict(mac=f"52:54:00:00:01:{i:02x}"), "10.6.6.6", now=100.0 + i)
    macs = [d["mac"] for d in st.devices()]
    assert "52:54:00:00:00:aa" in macs and len(macs) == 3


def test_bootstrap_image_analysis_leaves_out_the_fleet_servers_sqlite3() -> None:
    """The bootstrap image ships bootstrap/ whole (the CLI beside the stage); its runtime has no
    libsqlite3, so the build failed ("libsqlite3.so.0 ... not found") until sqlite3 was host-only."""
    import sysconfig

    from imagebuilder import pyimports

    repo = Path(__file__).resolve().parents[2]
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    g = pyimports.analyse(["bootstrap.server.fleet"], [repo, stdlib, stdlib / "lib-dynload"])
    assert "bootstrap.server.fleet" in g.modules
    assert not any(m.split(".")[0] in ("sqlite3", "_sqlite3") for m in g.modules)
    assert "sqlite3" in g.excluded


# -- TPM devices: the AK of the registry's TPM entries vouches for the chain's L1 key ----------------
def _tpm_identity(tpm: Any, cdi1: bytes, stage: str, *, bind_to: Any = None) -> events.Identity:
    """A TPM device's stage identity: chain from L1 (bootstrap: [L1], agent: [L1, L2 cert]), and the
    key binding: a quote by the device's AK over qualifying_data(EVENTS_NONCE, L1 key)."""
    from cidboot.trust.tpm.evidence import EVENTS_NONCE, KeyBinding, qualifying_data

    d = derive_layers(cdi1, LAYERS[2:3] if stage == "agent" else [])
    attest, sig = tpm.quote(qualifying_data(EVENTS_NONCE, bind_to or d.root_public_key), [0])
    return events.Identity(d.leaf_key, d.chain, KeyBinding(attest, sig, tpm.public).encode())


def test_signed_stage_events_of_a_registered_tpm_device_are_verified_and_others_rejected() -> None:
    from cidboot.trust.appraisal import TpmDevice
    from cidboot.trust.tpm.evidence import device_id
    from tests.support.soft_tpm import SoftTpm

    tpm, other = SoftTpm("ecdsa"), SoftTpm("ecdsa")
    roots = DeviceRoots()
    roots.add_tpm(TpmDevice(tpm.public, {}), "tpm-node", "worker")
    did = device_id(tpm.name)
    cdi1 = os.urandom(32)
    for stage in ("bootstrap", "agent"):
        v = verify_event(events.encode_event(event(stage), _tpm_identity(tpm, cdi1, stage)), roots)
        assert (v.trust, v.device_id) == (VERIFIED, did), v.reason
        assert "tpm-node" in v.reason
    # an AK that is not in the registry (another TPM), even for a correctly bound chain
    v = verify_event(events.encode_event(event(), _tpm_identity(other, cdi1, "agent")), roots)
    assert v.trust == REJECTED and "not in the device registry" in v.reason
    # the registered AK's binding of another L1 key, moved under this chain
    v = verify_event(events.encode_event(event(), _tpm_identity(tpm, cdi1, "agent",
                                                                bind_to=derive_layers(os.urandom(32), []).root_public_key)),
                     roots)
    assert v.trust == REJECTED and "does not bind" in v.reason
    # the right binding, the event signed by another key
    good = _tpm_identity(tpm, cdi1, "agent")
    forged = events.Identity(derive_layers(cdi1, []).leaf_key, good.chain, good.tpm)
    v = verify_event(events.encode_event(event(), forged), roots)
    assert v.trust == REJECTED and "not signed by" in v.reason
    # an agent-stage chain used for a bootstrap event (one certificate too many), and a firmware event
    for stage in ("bootstrap", "firmware"):
        v = verify_event(events.encode_event(event(stage), good), roots)
        assert v.trust == REJECTED and "TPM device must be signed at DICE layer" in v.reason
    # a DICE-only registry, a garbled binding
    assert verify_event(events.encode_event(event(), good), registered(UDS_A)).trust == REJECTED
    v = verify_event(events.encode_event(event(), events.Identity(good.key, good.chain, b"\xa0")), roots)
    assert v.trust == REJECTED and "malformed TPM key binding" in v.reason
    # without the binding the same chain is a DICE chain whose root (L1) is no registered device root
    v = verify_event(events.encode_event(event(), events.Identity(good.key, good.chain)), roots)
    assert v.trust == REJECTED
