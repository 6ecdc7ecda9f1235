"""The real bootstrap stage (bootstrap.stage.main, PID-1 actions recorded) reports to the boot
server: a tampered layer is refused, and the refusal shows up in /api/devices with the reason and
the layer's CID, signed with the bootstrap's own DICE key, with no serial console involved; it
goes to the boot config's `events` URL, not to its gateway."""

from __future__ import annotations

import http.client
import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from bootstrap.server.fleet import Fleet, FleetStore
from bootstrap.stage import main as stage_main
from cidboot.netboot.bootconfig import BootConfig
from cidboot.store.blockstore import Blockstore
from cidboot.store.gateway.server import GatewayServer, serve_gateway
from cidboot.trust.appraisal import DeviceRoots
from cidboot.trust.dice import decode_handover
from cidboot.trust.dice.chain import verify_chain
from tests.support.gateway_fixtures import proxy_gateway, running_gateway
from tests.unit.test_bootstrap_stage import _firmware, _main_env, _publish, _store, _url


@pytest.fixture
def boot_server(tmp_path: Path) -> Iterator[tuple[Fleet, GatewayServer, DeviceRoots]]:
    roots = DeviceRoots()
    fleet = Fleet(FleetStore(tmp_path / "fleet.sqlite"), Blockstore(tmp_path / "fleet-blocks"), lambda: roots)
    gw = serve_gateway(Blockstore(tmp_path / "boot-store"), "127.0.0.1", 0, app=fleet)
    threading.Thread(target=gw.serve_forever, daemon=True).start()
    try:
        yield fleet, gw, roots
    finally:
        gw.shutdown()
        gw.server_close()


def _devices(url: str) -> list[dict[str, Any]]:
    host, port = url.removeprefix("http://").split(":")
    c = http.client.HTTPConnection(host, int(port), timeout=10)
    c.request("GET", "/api/devices")
    out = json.loads(c.getresponse().read())["devices"]
    c.close()
    return list(out)


def test_tampered_layer_refusal_reaches_the_boot_server_with_reason_and_cid(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, boot_server: tuple[Fleet, GatewayServer, DeviceRoots]) -> None:
    _fleet, server, roots = boot_server
    store, layers = _store(tmp_path)
    signed = _publish(store, layers)
    bad = layers[1].cid

    def mangle(path: str, body: bytes) -> bytes:
        return body[:-1] + bytes([body[-1] ^ 0xFF]) if str(bad) in path else body

    monkeypatch.setattr(stage_main.events, "_reporter", stage_main.events.Reporter())  # this stage's own
    monkeypatch.delenv("CIDBOOT_EVENTS", raising=False)
    with running_gateway(store) as gw, proxy_gateway(_url(gw), mangle) as lying:
        # the boot config's events URL names the boot server (the gateway is another server)
        raw = BootConfig(signed.cid, (lying,), events=f"{server.url}/api/events").encode()
        _, dice = _firmware(raw)
        roots.add(verify_chain(decode_handover(dice).chain).root_public_key, "dev", "default")
        kw, calls = _main_env(tmp_path, monkeypatch, raw)
        stage_main.main(**kw)  # type: ignore[arg-type]
    assert calls == [("power_off", "")]
    deadline = time.monotonic() + 30  # a loaded machine: the stage posts in the background
    while True:
        devs = _devices(server.url)
        if (devs and devs[0]["problems"]) or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    (d,) = devs
    assert d["trust"] == "verified" and d["stage"] == "bootstrap" and d["kind"] == "refused"
    (p,) = d["problems"]
    assert p["kind"] == "refused" and p["cid"] == str(bad) and f"layer {bad}: hash mismatch" in p["reason"]


def test_a_uefi_started_bootstrap_posts_its_start_event_once_it_has_its_boot_config(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, boot_server: tuple[Fleet, GatewayServer, DeviceRoots]) -> None:
    """UEFI starts the bootstrap UKI with no hand-off: its `start` event is emitted before it has a
    boot config (it fetches it over the network afterwards), so it knows no boot server yet. Once
    the boot config is in, the queued start event and the hand-over reach the config's events URL."""
    from bootstrap.stage import tpm

    _fleet, server, _roots = boot_server
    store, layers = _store(tmp_path)
    signed = _publish(store, layers)
    monkeypatch.setattr(stage_main.events, "_reporter", stage_main.events.Reporter())  # this stage's own
    monkeypatch.delenv("CIDBOOT_EVENTS", raising=False)
    monkeypatch.setattr(tpm, "available", lambda: False)  # a UEFI machine without a TPM: unmeasured
    with running_gateway(store) as gw:
        raw = BootConfig(signed.cid, (_url(gw),), events=f"{server.url}/api/events").encode()
        kw, calls = _main_env(tmp_path, monkeypatch, raw)
        kw["root"] = tmp_path / "uefi-root"  # no /run/cidboot: no hand-off, as after UEFI HTTP Boot
        fetched: list[str | None] = []

        def fetch(cmdline_path: object, dhcp_url: str | None) -> bytes:  # the TFTP fetch from the DHCP reply's server
            fetched.append(dhcp_url)
            return raw

        monkeypatch.setattr(stage_main, "network_up", lambda start: ("10.0.0.2", "tftp://10.0.0.1/bootconfig/x.json"))
        monkeypatch.setattr(stage_main, "fetch_bootconfig", fetch)
        stage_main.main(**kw)  # type: ignore[arg-type]
    assert fetched == ["tftp://10.0.0.1/bootconfig/x.json"] and calls[0][0] == "kexec", calls
    deadline = time.monotonic() + 30  # a loaded machine: the stage posts in the background
    kinds: list[str] = []
    while time.monotonic() < deadline:
        devs = _devices(server.url)
        if devs:
            host, port = server.url.removeprefix("http://").split(":")
            c = http.client.HTTPConnection(host, int(port), timeout=10)
            c.request("GET", f"/api/devices/{devs[0]['mac']}")
            kinds = [f"{e['stage']} {e['kind']}" for e in json.loads(c.getresponse().read())["events"]]
            c.close()
            if "bootstrap handover" in kinds:
                break
        time.sleep(0.2)
    assert kinds[:2] == ["bootstrap start", "bootstrap handover"], kinds


def _one_answer(answer: bytes, keep_open: bool) -> tuple[str, list[bytes]]:
    """A TCP server answering one request with `answer` (and then holding the connection open)."""
    import socket
    import threading

    srv = socket.create_server(("127.0.0.1", 0))
    got: list[bytes] = []

    def serve() -> None:
        conn, _ = srv.accept()
        with conn:
            data = b""
            while b"\r\n\r\n" not in data:
                data += conn.recv(4096)
            got.append(data)
            conn.sendall(answer)
            if keep_open:
                conn.recv(1)  # until the client closes
        srv.close()

    threading.Thread(target=serve, daemon=True).start()
    return f"http://127.0.0.1:{srv.getsockname()[1]}/api/events", got


def test_plain_http_posts_read_the_answer_by_its_length_without_http_client() -> None:
    """The guests post events over a socket of their own (no http.client: email + ssl at start-up)."""
    from cidboot.stage import events

    url, got = _one_answer(b"HTTP/1.1 201 Created\r\nContent-Length: 5\r\n\r\nhello", keep_open=True)
    t0 = time.monotonic()
    assert events._request(url, b"body", timeout=5) == (201, b"hello")
    assert time.monotonic() - t0 < 4  # by Content-Length, not by waiting for the close
    assert got[0].startswith(b"POST /api/events HTTP/1.1\r\n") and b"Content-Length: 4\r\n" in got[0]
    url, _ = _one_answer(b"garbage\r\n\r\n", keep_open=False)
    assert events._request(url, b"", timeout=5) is None  # no status line: retried later
    url, _ = _one_answer(b"HTTP/1.0 409 Conflict\r\n\r\nsession unknown", keep_open=False)
    assert events._request(url, b"", timeout=5) == (409, b"session unknown")  # no length: read to close


def test_the_events_module_does_not_import_http_client_at_start() -> None:
    import subprocess
    import sys

    code = "import sys, cidboot.stage.events, firmware.stage; print(sorted(m for m in ('http.client', 'email', 'ssl') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[2])
    assert out.stdout.strip() == "[]"
