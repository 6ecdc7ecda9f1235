"""BootConfig: the optional peers, device_registry, events and keys entries, strict decoding, old configs unchanged."""

from __future__ import annotations

import json

import pytest

from cidboot.ipld.cid import CID, DAG_CBOR, RAW
from cidboot.netboot.bootconfig import BootConfig, BootConfigError

M = CID.of(b"manifest", DAG_CBOR)
R = CID.of(b"registry", DAG_CBOR)


def doc(**kw: object) -> bytes:
    d: dict[str, object] = {"version": 1, "manifest": str(M), "gateways": ["http://10.0.0.1:8080"]}
    d.update(kw)
    return json.dumps(d).encode()


def test_old_config_bytes_unchanged() -> None:
    cfg = BootConfig(M, ("http://10.0.0.1:8080",), {}, "worker")
    raw = cfg.encode()
    assert b"peers" not in raw and b"device_registry" not in raw and b"events" not in raw
    assert b"keys" not in raw
    assert BootConfig.decode(raw) == cfg
    assert raw == json.dumps({"gateways": ["http://10.0.0.1:8080"], "manifest": str(M), "on_failure": "poweroff",
                              "role": "worker", "trust_anchor": {}, "version": 1}, separators=(",", ":")).encode()


def test_peers_and_registry_round_trip() -> None:
    cfg = BootConfig(M, ("http://gw",), role="sensor", peers={"aggregator": ("http://10.0.0.3:8000",)}, device_registry=R)
    back = BootConfig.decode(cfg.encode())
    assert back == cfg and back.peers == {"aggregator": ("http://10.0.0.3:8000",)} and back.device_registry == R


@pytest.mark.parametrize("kw,msg", [
    ({"peers": ["http://x"]}, "peers must map roles"),
    ({"peers": {"a": "http://x"}}, r"peers\['a'\] must be a list"),
    ({"peers": {"a": ["ftp://x"]}}, r"peers\['a'\]"),
    ({"peers": {"": ["http://x"]}}, r"peers\[''\]"),
    ({"device_registry": 5}, "device_registry must be a CID string"),
    ({"device_registry": "notacid"}, "device_registry: "),
    ({"peer": {}}, "unknown keys"),
    ({"events": "10.0.0.1:8080/api/events"}, "events must be an http"),
    ({"events": ["http://x"]}, "events must be an http"),
    ({"keys": "https://broker"}, "keys must be the key broker's http:// URL"),
    ({"keys": "10.0.0.1:8090"}, "keys must be"),
    ({"keys": "http://a b"}, "keys must be"),
    ({"keys": 8090}, "keys must be"),
])
def test_strict(kw: dict[str, object], msg: str) -> None:
    with pytest.raises(BootConfigError, match=msg):
        BootConfig.decode(doc(**kw))


def test_registry_any_codec() -> None:
    assert BootConfig.decode(doc(device_registry=str(CID.of(b"r", RAW)))).device_registry == CID.of(b"r", RAW)


def test_events_url_round_trips() -> None:
    cfg = BootConfig(M, ("http://gw",), events="http://10.0.0.1:8080/api/events")
    assert BootConfig.decode(cfg.encode()) == cfg
    assert json.loads(cfg.encode())["events"] == "http://10.0.0.1:8080/api/events"


def test_key_broker_url_round_trips() -> None:
    cfg = BootConfig(M, ("http://gw",), keys="http://10.0.0.1:8080")
    assert BootConfig.decode(cfg.encode()) == cfg
    assert json.loads(cfg.encode())["keys"] == "http://10.0.0.1:8080"
