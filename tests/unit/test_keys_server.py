"""`bootstrap keys`: the key broker over the bounded HTTP server, in process and as the CLI."""

from __future__ import annotations

import http.client
import json
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from bootstrap.server.keys import KeyServer, serve_keys
from cidboot.trust.keys import write_root
from cidboot.trust.private import keys
from cidboot.trust.private.broker import KeyRelease
from tests.support.private_devices import (
    MARKER,
    OPS,
    OPS_LAYER,
    POLICY,
    ROOT,
    SECRET,
    SIGNED,
    Device,
    broker_for,
)


def call(url: str, method: str, path: str, body: Any = None) -> tuple[int, dict[str, Any]]:
    host, port = url.removeprefix("http://").split(":")
    c = http.client.HTTPConnection(host, int(port), timeout=30)
    try:
        data = json.dumps(body).encode() if body is not None and not isinstance(body, bytes) else body
        c.request(method, path, body=data)
        r = c.getresponse()
        return r.status, json.loads(r.read())
    finally:
        c.close()


@pytest.fixture
def worker() -> Device:
    return Device()


@pytest.fixture
def server(worker: Device) -> Iterator[KeyServer]:
    broker, _ = broker_for(worker, Device(debug=True))
    srv = serve_keys(broker, "127.0.0.1", 0)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    yield srv
    srv.shutdown()
    srv.server_close()


def ask(url: str, dev: Device) -> tuple[int, dict[str, Any], X25519PrivateKey, bytes]:
    st, ch = call(url, "POST", "/keys/challenge")
    assert st == 200
    challenge = bytes.fromhex(ch["challenge"])
    req, eph = dev.ask(challenge)
    st, body = call(url, "POST", "/keys/request", req.to_json())
    return st, body, eph, challenge


def test_release_over_http(server: KeyServer, worker: Device) -> None:
    st, body, eph, ch = ask(server.url, worker)
    assert st == 200, body
    got = KeyRelease.from_json(body["release"]).open(eph, ch)
    plain = b"".join(keys.decrypt_layer(got[str(OPS_LAYER.cid)], [OPS.ciphertext], sha256=OPS.sha256, size=OPS.size))
    assert plain == MARKER


def test_refusals_and_bad_requests_keep_the_server_serving(server: KeyServer, worker: Device) -> None:
    st, body, _, _ = ask(server.url, Device())  # not registered
    assert st == 403 and body["refused"] == "device" and body["status"] == "contraindicated"
    st, body = call(server.url, "POST", "/keys/request", b"{not json")
    assert st == 400 and "not a key request" in body["error"]
    st, body = call(server.url, "POST", "/keys/request", {"challenge": "00"})
    assert st == 400
    st, _ = call(server.url, "GET", "/keys/challenge")
    assert st == 405
    st, _ = call(server.url, "POST", "/nothing")
    assert st == 404
    st, body, _, _ = ask(server.url, worker)  # still serving
    assert st == 200


def test_cli(tmp_path: Path, worker: Device) -> None:
    from cidboot.trust.appraisal import DeviceRoots
    roots = DeviceRoots()
    roots.add(worker.ident.root_public_key, "w", "worker")
    roots.save(tmp_path / "roots.json")
    write_root(ROOT, tmp_path / "root.json")
    (tmp_path / "policy.json").write_text(json.dumps(POLICY))
    (tmp_path / "manifest.cbor").write_bytes(SIGNED.encode())
    keys.write_secret(tmp_path / "flow.secret", SECRET)
    cmd = [sys.executable, "-m", "bootstrap", "keys", "--listen", "127.0.0.1:0", "--trust-anchor", str(tmp_path / "root.json"),
           "--manifest", str(tmp_path / "manifest.cbor"), "--roots", str(tmp_path / "roots.json"),
           "--policy", str(tmp_path / "policy.json"), "--secret", f"private-hello={tmp_path / 'flow.secret'}",
           "--log", str(tmp_path / "keys.log")]
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert p.stdout is not None
        line = p.stdout.readline()
        assert "key broker listening on" in line, p.stderr.read() if p.poll() is not None and p.stderr else line
        url = line.split()[-1]
        st, body, eph, ch = ask(url, worker)
        assert st == 200 and str(OPS_LAYER.cid) in KeyRelease.from_json(body["release"]).open(eph, ch)
        st, body, _, _ = ask(url, Device(debug=True))
        assert st == 403 and body["refused"] == "debug-mode"  # unregistered too: the debug boot is the root cause
    finally:
        p.terminate()
        p.wait(timeout=30)
    entries = [json.loads(x) for x in (tmp_path / "keys.log").read_text().splitlines()]
    assert [e["decision"] for e in entries] == ["release", "refuse"]
    bad_cmd = [("nonsense" if a.startswith("private-hello=") else a) for a in cmd]
    bad = subprocess.run(bad_cmd, capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "NAME=PATH" in bad.stderr


def test_mounted_on_the_boot_servers_port_beside_the_fleet_view(tmp_path: Path, worker: Device) -> None:
    """`bootstrap serve --key-policy`: /keys/* on the gateway's port, the fleet view still answers,
    and the boot configs it generates name this server as the key broker (or `--keys` when given)."""
    import argparse

    from bootstrap.commands.serve import key_broker
    from bootstrap.server.devices import Devices
    from bootstrap.server.keys import KeyService
    from bootstrap.server.serve import BootServer, ServeConfig, mount
    from cidboot.errors import CidbootError
    from cidboot.ipld.cid import DAG_CBOR
    from cidboot.netboot.bootconfig import BootConfig
    from cidboot.store.blockstore import Blockstore
    from cidboot.store.gateway.server import serve_gateway
    from cidboot.trust.appraisal import DeviceRoots
    from cidboot.trust.registry import sign_registry
    from tests.support.private_devices import SIGNER

    store = Blockstore(tmp_path / "store")
    store.put(SIGNED.cid, SIGNED.encode())
    roots = DeviceRoots()
    roots.add(worker.ident.root_public_key, "w", "worker")
    registry = store.put_block(sign_registry(roots, [SIGNER], manifests={"worker": "private-hello"}), DAG_CBOR)
    (tmp_path / "policy.json").write_text(json.dumps(POLICY))
    keys.write_secret(tmp_path / "flow.secret", SECRET)
    args = argparse.Namespace(keys_url=None, key_policy=tmp_path / "policy.json", flow_secret=[str(tmp_path / "flow.secret")],
                              device_registry=str(registry), key_log=None, state_dir=tmp_path, upstream=[],
                              store=tmp_path / "store", trust_anchor=None, manifest=str(SIGNED.cid), devices=None)
    broker = key_broker(args, store)
    assert broker is not None

    def other_app(h: Any) -> bool:  # stands for the fleet view: answers its own paths only
        if h.path.startswith("/api/"):
            h.send_response(204)
            h.end_headers()
            return True
        return False

    gw = serve_gateway(store, "127.0.0.1", 0, app=mount(other_app, KeyService(broker)))  # type: ignore[arg-type]
    t = threading.Thread(target=gw.serve_forever, daemon=True)
    t.start()
    try:
        url = f"http://127.0.0.1:{gw.server_address[1]}"
        st, body, eph, ch = ask(url, worker)
        assert st == 200 and str(OPS_LAYER.cid) in KeyRelease.from_json(body["release"]).open(eph, ch)
        c = http.client.HTTPConnection("127.0.0.1", gw.server_address[1], timeout=10)
        c.request("GET", "/api/devices")
        assert c.getresponse().status == 204
        c.close()
    finally:
        gw.shutdown()
        gw.server_close()
    assert json.loads((tmp_path / "keys.log").read_text())["decision"] == "release"

    srv = BootServer.__new__(BootServer)  # the boot-config generator only
    srv.cfg = ServeConfig("eth0", "10.77.0.1", tmp_path, SIGNED.cid, None, key_broker=broker)
    srv.devices = Devices.empty()

    class Gw:
        server_address = ("0.0.0.0", 8080)

    srv.gateway = Gw()  # type: ignore[assignment]
    raw = srv.generate("bootconfig/52-54-00-00-00-01.json", ("10.77.0.9", 1000))
    assert isinstance(raw, bytes) and BootConfig.decode(raw).keys == "http://10.77.0.1:8080"
    srv.cfg = ServeConfig("eth0", "10.77.0.1", tmp_path, SIGNED.cid, None, keys_url="http://10.77.0.5:8090")
    raw = srv.generate("bootconfig/52-54-00-00-00-01.json", ("10.77.0.9", 1000))
    assert isinstance(raw, bytes) and BootConfig.decode(raw).keys == "http://10.77.0.5:8090"
    srv.cfg = ServeConfig("eth0", "10.77.0.1", tmp_path, SIGNED.cid, None)
    raw = srv.generate("bootconfig/52-54-00-00-00-01.json", ("10.77.0.9", 1000))
    assert isinstance(raw, bytes) and b'"keys"' not in raw  # no broker: old configs' bytes
    for bad, msg in ((dict(device_registry=None), "--device-registry"), (dict(flow_secret=[]), "--flow-secret"),
                     (dict(key_policy=None), "give --key-policy too"), (dict(keys_url="https://x"), "--keys")):
        with pytest.raises(CidbootError, match=msg):
            key_broker(argparse.Namespace(**{**vars(args), **bad}), store)
