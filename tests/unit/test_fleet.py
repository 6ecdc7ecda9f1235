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
          boot_mode: str = "measured", boot: str = "", **detail: str) -> dict[str, object]:
    return {"v": 1, "stage": stage, "kind": kind, "seq": seq, "t": int(time.time() * 1000), "mac": mac,
            "boot_mode": boot_mode, "arch": "x86_64", "boot": boot, "detail": detail}


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
        boot = events.new_session(gw.url)
        assert boot
        assert events.post_status(gw.url, events.encode_event(event("bootstrap", "start", boot=boot), good)) == 201
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


def test_events_emit_never_raises_on_garbage(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(events, "_reporter", events.Reporter())
    events.emit("bootstrap", "start", dice=b"not a handover", bootconfig=b"{not json")


def test_server_url_is_the_boot_configs_events_url_never_a_gateway() -> None:
    from cidboot.ipld.cid import CID, DAG_CBOR
    from cidboot.netboot.bootconfig import BootConfig

    raw = json.dumps({"version": 1, "gateways": ["http://10.0.0.1:8080/", "http://x"]}).encode()
    assert events.server_from_bootconfig(raw) is None  # a gateway is where blocks come from, not the boot server
    raw = json.dumps({"version": 1, "gateways": ["http://gw"], "events": "http://10.0.0.1:8080/api/events"}).encode()
    assert events.server_from_bootconfig(raw) == "http://10.0.0.1:8080/api/events"
    cfg = BootConfig(CID.of(b"m", DAG_CBOR), ("http://gw",), events="http://10.0.0.2:8080/api/events")
    assert events.server_from_bootconfig(cfg) == "http://10.0.0.2:8080/api/events"
    assert events.server_from_bootconfig(b"{}") is None
    assert events.endpoint("http://10.0.0.1:8080/") == "http://10.0.0.1:8080/api/events"  # CIDBOOT_EVENTS: a base URL


def test_without_an_events_url_a_stage_posts_nothing_and_says_so_once(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    from cidboot.ipld.cid import CID, DAG_CBOR
    from cidboot.netboot.bootconfig import BootConfig

    r = events.Reporter()
    monkeypatch.setattr(events, "_reporter", r)
    monkeypatch.delenv("CIDBOOT_EVENTS", raising=False)
    monkeypatch.setattr(events, "_cmdline_url", lambda path="/proc/cmdline": None)
    raw = BootConfig(CID.of(b"m", DAG_CBOR), ("http://10.0.0.1:8080",)).encode()
    events.emit("bootstrap", "start")  # the boot config is not known yet: queued
    events.emit("bootstrap", "refused", bootconfig=raw, reason="x")
    events.emit("bootstrap", "fatal", bootconfig=raw, reason="y")
    out = capsys.readouterr().out
    assert out.count("cidboot: events: not posted: the boot config names no events URL") == 1, out
    assert r.server is None and not r._queue and r._thread is not None  # the queued one is dropped too
    assert r.flush(0.1)


def test_bootstrap_serve_puts_its_own_events_url_in_every_boot_config(tmp_path: Path) -> None:
    from bootstrap.server.devices import Devices
    from bootstrap.server.serve import BootServer, ServeConfig
    from cidboot.ipld.cid import CID, DAG_CBOR
    from cidboot.netboot.bootconfig import BootConfig

    server = BootServer.__new__(BootServer)  # only the boot-config generator, no sockets
    server.cfg = ServeConfig("eth0", "10.77.0.1", tmp_path, CID.of(b"m", DAG_CBOR), None,
                             gateways=("http://mirror:8080",))
    server.devices = Devices.empty()

    class Gw:
        server_address = ("0.0.0.0", 8080)
    server.gateway = Gw()  # type: ignore[assignment]
    raw = server.generate("bootconfig/52-54-00-00-00-01.json", ("10.77.0.9", 1000))
    assert isinstance(raw, bytes)
    cfg = BootConfig.decode(raw)
    assert cfg.gateways == ("http://mirror:8080",) and cfg.events == "http://10.77.0.1:8080/api/events"


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
        body = events.encode_event(event("bootstrap", "start", boot=events.new_session(gw.url) or ""),
                                   stage_identity(UDS_A, "bootstrap"))
        assert events.post_status(gw.url, body) == 201
        line = r.readline()
        assert line.startswith(b"data: ")
        msg = json.loads(line[6:])
        assert msg["type"] == "event" and msg["mac"] == "52:54:00:00:00:01" and msg["trust"] == VERIFIED
        c.close()


def test_ready_device_without_agent_is_appraised_contraindicated_not_skipped(tmp_path: Path) -> None:
    """The appraisal is the server's own: an agent that announced itself ready and does not
    answer the challenge is not affirming (fail closed), and the reason says why."""
    with fleet_server(tmp_path, registered(UDS_A)) as (fleet, gw):
        body = events.encode_event(event("agent", "ready", port="9", boot=events.new_session(gw.url) or ""),
                                   stage_identity(UDS_A, "agent"))
        assert events.post_status(gw.url, body) == 201
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


# -- replays ------------------------------------------------------------------------------------

@contextmanager
def _captured(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[bytes]]:
    """The bodies a Reporter really posts (signed on the wire), as an eavesdropper sees them."""
    seen: list[bytes] = []
    real = events.post_status

    def tap(server: str, body: bytes, timeout: float = events.TIMEOUT) -> int | None:
        seen.append(body)
        return real(server, body, timeout)
    monkeypatch.setattr(events, "post_status", tap)
    yield seen


def test_a_captured_signed_event_posted_again_is_rejected_recorded_and_moves_nothing(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The old server accepted a replay as verified: replaying the agent's `start` from another
    address took the device out of `ready` (no appraisal), replaying `ready` pointed the appraisal
    at the replayer's address (contraindicated: "no evidence")."""
    mac = "52:54:00:00:00:07"
    with fleet_server(tmp_path, registered(UDS_A)) as (fleet, gw), _captured(monkeypatch) as wire:
        r = events.Reporter()
        r.configure(server=gw.url, identity=stage_identity(UDS_A, "agent"), mac=mac)
        r.emit("agent", "start", {})
        r.emit("agent", "ready", {"port": "8000"})
        assert r.flush(10.0)
        assert len(wire) == 2
        fleet.store.set_appraisal(mac, {"status": "affirming", "checks": []}, now=1.0)
        before = fleet.store.device(mac)
        assert before is not None and before["kind"] == "ready" and before["trust"] == VERIFIED
        for body in wire:  # each captured event, posted again from the attacker's address
            status, obj = fleet.post_event(body, "10.6.6.6")
            assert status == 403 and obj["trust"] == REJECTED and "replay" in obj["reason"], obj
        assert fleet.store.device(mac) == before  # stage, kind, source (the appraisal's target), appraisal
        evs = fleet.store.events(mac)
        assert [(e["kind"], e["trust"]) for e in evs] == [("start", VERIFIED), ("ready", VERIFIED),
                                                          ("start", REJECTED), ("ready", REJECTED)]
        assert evs[-1]["source"] == "10.6.6.6" and "seq 2" in evs[-1]["trust_reason"]
        fleet.store.close()
    # and after a restart of the server (the sessions are in the same SQLite file)
    with fleet_server(tmp_path, registered(UDS_A)) as (fleet, _gw):
        status, obj = fleet.post_event(wire[1], "10.6.6.6")
        assert status == 403 and obj["trust"] == REJECTED
        assert fleet.store.device(mac) == before


def test_an_event_with_a_session_the_server_never_issued_or_forgot_is_rejected(tmp_path: Path) -> None:
    ident = stage_identity(UDS_A, "bootstrap")
    with fleet_server(tmp_path, registered(UDS_A)) as (fleet, gw):
        for boot in ("", "00" * 16):
            status, obj = fleet.post_event(events.encode_event(event("bootstrap", "start", boot=boot), ident), "x")
            assert obj["trust"] == REJECTED and status == (403 if not boot else 409), obj
        # another key cannot use a session a key owns
        s = events.new_session(gw.url) or ""
        assert fleet.post_event(events.encode_event(event("bootstrap", "start", boot=s), ident), "x")[0] == 201
        other = stage_identity(UDS_A, "firmware")
        status, obj = fleet.post_event(events.encode_event(event("firmware", "start", seq=5, boot=s), other), "x")
        assert status == 403 and "another key" in obj["reason"]
        assert fleet.store.device("52:54:00:00:00:01")["stage"] == "bootstrap"  # type: ignore[index]


def test_sessions_are_bounded_and_unused_ones_go_first() -> None:
    st = FleetStore(":memory:", max_sessions=3)
    used = st.issue_session(now=1.0)
    assert st.use_session(used, "k", 1) is None
    fresh = [st.issue_session(now=10.0 + i) for i in range(5)]
    assert st.use_session(used, "k", 2) is None  # still there: the unused ones went first
    assert st.use_session(fresh[0], "k2", 1) is not None and st.use_session(fresh[-1], "k2", 1) is None


def test_a_reporter_whose_session_was_forgotten_gets_a_new_one(tmp_path: Path) -> None:
    with fleet_server(tmp_path, registered(UDS_A)) as (fleet, gw):
        r = events.Reporter()
        r.configure(server=gw.url, identity=stage_identity(UDS_A, "bootstrap"), mac="52:54:00:00:00:08")
        r.emit("bootstrap", "start", {})
        assert r.flush(10.0)
        first = r.session
        with fleet.store._tx() as db:  # the server forgets every session (bounded, or a new state dir)
            db.execute("DELETE FROM sessions")
        r.emit("bootstrap", "handover", {})
        assert r.flush(10.0)
        assert r.session and r.session != first
        evs = fleet.store.events("52:54:00:00:00:08")
        assert [(e["kind"], e["trust"]) for e in evs] == [("start", VERIFIED), ("handover", REJECTED),
                                                          ("handover", VERIFIED)]


def test_firmware_kind_of_an_unmeasured_boot_is_what_the_bootstrap_saw() -> None:
    """The column said "iPXE ROM" for OVMF's own PXE and HTTP Boot too."""
    st = FleetStore(":memory:")
    for mac, fw, want in (("52:54:00:00:00:0a", "uefi", "UEFI PXE/HTTP Boot (unmeasured)"),
                          ("52:54:00:00:00:0b", "bios", "PXE ROM (unmeasured)")):
        v = _verdict(mac=mac)
        v.event["detail"] = {"mode": "unmeasured", "firmware": fw}
        st.record(v, "10.0.0.2")
        assert st.device(mac)["firmware"] == want  # type: ignore[index]


def test_bootstrap_start_event_names_the_firmware_it_was_booted_by(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    from bootstrap.stage import main as stage_main

    seen: list[dict[str, Any]] = []
    monkeypatch.setattr(stage_main.events, "emit", lambda stage, kind, **kw: seen.append({"kind": kind, **kw}))
    monkeypatch.setattr(stage_main, "read_start", lambda root: stage_main.Start("unmeasured", None, None))
    monkeypatch.setattr(stage_main, "attempt", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("stop")))
    monkeypatch.setattr(stage_main.pid1, "power_off", lambda *a: None)
    (tmp_path / "sys" / "firmware" / "efi").mkdir(parents=True)
    stage_main.main(root=tmp_path)
    assert seen[0]["kind"] == "start" and seen[0]["firmware"] == "uefi"


def test_ready_devices_are_appraised_on_a_schedule_each_time_with_a_fresh_nonce(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No one asks: the server challenges a ready agent when it reports ready and again every
    appraise_every seconds, never reusing a nonce."""
    import bootstrap.server.fleet as fleet_mod
    from cidboot.errors import CidbootError

    nonces: list[bytes] = []

    def evidence(url: str, nonce: bytes, timeout: float) -> bytes:
        nonces.append(nonce)
        raise CidbootError("no agent here")
    monkeypatch.setattr(fleet_mod, "get_evidence", evidence)
    st = FleetStore(":memory:")
    st.record(Verdict(VERIFIED, "ok", {**_verdict(kind="ready").event, "stage": "agent", "detail": {"port": "8000"}},
                      "did"), "10.0.0.2")
    f = Fleet(st, Blockstore(tmp_path / "b"), appraise_every=0.5)
    f.start()
    try:
        deadline = time.monotonic() + 30
        while len(nonces) < 3 and time.monotonic() < deadline:
            time.sleep(0.1)
    finally:
        f.stop()
    assert len(nonces) >= 3 and len(set(nonces)) == len(nonces) and all(len(n) == 32 for n in nonces)
    d = st.device("52:54:00:00:00:01")
    assert d is not None and d["appraisal"]["status"] == "contraindicated" and "no evidence" in str(d["appraisal"])


def test_api_node_is_404_when_no_one_has_the_block_and_422_for_a_block_that_is_no_node(tmp_path: Path) -> None:
    from cidboot.ipld.cid import CID, DAG_CBOR

    with fleet_server(tmp_path, registered(UDS_A)) as (fleet, gw):
        missing = CID.of(dagcbor.encode({"x": 1}), DAG_CBOR)
        status, obj = _get(gw.url, f"/api/node/{missing}")
        assert status == 404 and "no agent is ready" in obj["error"]
        block = dagcbor.encode({"not": "a provenance node"})
        fleet.blocks.put(CID.of(block, DAG_CBOR), block)
        status, obj = _get(gw.url, f"/api/node/{CID.of(block, DAG_CBOR)}")
        assert status == 422, obj

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
