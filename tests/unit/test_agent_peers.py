"""Inputs between agents after mutual attestation, over loopback HTTP: affirming peers exchange
blocks; a non-affirming receiver gets nothing; a non-affirming sender's inputs are refused (403)."""

from __future__ import annotations

import importlib.util
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cbor2
import pytest

from agent.attestation_api import serve_api
from agent.peers import (
    Block,
    PeerClient,
    PeerRefused,
    PeerService,
    encode_exchange,
    mount_peers,
    sign_exchange,
)
from cidboot.ipld import dagcbor
from cidboot.ipld.cid import CID, DAG_CBOR
from cidboot.trust.appraisal import AppraisalResult
from tests.unit.test_agent_attest import Device, make_device, request, verifier_for

BLOCK = b"\xa1avx\x05"  # any DAG-CBOR block: opaque to the transport
BLOCKS: list[Block] = [(CID.of(BLOCK, DAG_CBOR), BLOCK)]


class Receiver:
    def __init__(self, dev: Device, trusted: list[Device]) -> None:
        self.got: list[tuple[list[Block], AppraisalResult]] = []
        self.registered: list[AppraisalResult] = []
        self.refusals: list[tuple[str, AppraisalResult]] = []
        self.server = serve_api(dev.attester, "127.0.0.1", 0)
        self.service = PeerService(dev.attester, verifier_for(*trusted), lambda b, s: self.got.append((b, s)),
                                   self.registered.append, lambda c, r: self.refusals.append((c, r)))
        mount_peers(self.server, self.service)
        self.server.start()


@pytest.fixture
def receivers() -> Iterator[list[Receiver]]:
    out: list[Receiver] = []
    yield out
    for r in out:
        r.server.shutdown()
        r.server.server_close()


def pair(receivers: list[Receiver], *, sender: Device, receiver: Device,
         receiver_trusts: list[Device], sender_trusts: list[Device]) -> tuple[PeerClient, Receiver]:
    r = Receiver(receiver, receiver_trusts)
    receivers.append(r)
    client = PeerClient(sender.attester, verifier_for(*sender_trusts), {"aggregator": [r.server.url]})
    return client, r


def open_session(url: str) -> dict[str, Any]:
    status, _, body = request(url, "POST", "/peer/session", json.dumps({"nonce": os.urandom(16).hex()}).encode())
    assert status == 201, body
    doc: dict[str, Any] = json.loads(body)
    return doc


def exchange(dev: Device, sess: dict[str, Any], blocks: list[Block]) -> bytes:
    """Step 3's body as the sender's PeerClient makes it: evidence on Nr, blocks signed."""
    nonce = bytes.fromhex(sess["nonce"])
    ev = dev.attester.evidence(nonce)
    return encode_exchange(ev, sign_exchange(dev.attester.leaf_key, sess["session"], nonce, ev, blocks), blocks)


def test_mutual_attestation_delivers(receivers: list[Receiver]) -> None:
    s, a = make_device("sensor"), make_device("aggregator")
    client, r = pair(receivers, sender=s, receiver=a, receiver_trusts=[s, a], sender_trusts=[s, a])
    [res] = client.send("aggregator", BLOCKS)
    assert res.affirming and res.role == "aggregator"
    [(blocks, who)] = r.got
    assert blocks == BLOCKS and who.affirming and who.role == "sensor" and r.registered == [who]
    assert who.leaf_public_key is not None


def test_unregistered_receiver_gets_nothing(receivers: list[Receiver]) -> None:
    s, a = make_device("sensor"), make_device("aggregator")
    client, r = pair(receivers, sender=s, receiver=a, receiver_trusts=[s], sender_trusts=[s])  # sender doesn't know a
    with pytest.raises(PeerRefused, match="not affirming, nothing sent: .*unknown device"):
        client.send("aggregator", BLOCKS)
    assert r.got == []


def test_wrong_role_receiver_gets_nothing(receivers: list[Receiver]) -> None:
    s, w = make_device("sensor"), make_device("worker")
    client, r = pair(receivers, sender=s, receiver=w, receiver_trusts=[s, w], sender_trusts=[s, w])
    with pytest.raises(PeerRefused, match="attests role 'worker', not 'aggregator'"):
        client.send("aggregator", BLOCKS)
    assert r.got == []


@pytest.mark.parametrize("kind", ["unregistered", "debug", "unmeasured"])
def test_non_affirming_sender_refused(receivers: list[Receiver], kind: str) -> None:
    s = make_device("sensor", debug=kind == "debug", boot_mode="unmeasured" if kind == "unmeasured" else "measured")
    a = make_device("aggregator")
    trusted = [a] if kind == "unregistered" else [s, a]
    client, r = pair(receivers, sender=s, receiver=a, receiver_trusts=trusted, sender_trusts=[s, a])
    with pytest.raises(PeerRefused, match="refused our inputs") as ei:
        client.send("aggregator", BLOCKS)
    assert ei.value.result["status"] == "contraindicated"
    assert r.got == [] and r.registered == []
    [(client_addr, res)] = r.refusals  # what the audit log records
    assert client_addr == "127.0.0.1" and res.status == "contraindicated"


def test_signature_bound_to_the_blocks(receivers: list[Receiver]) -> None:
    """A signature made for one set of blocks cannot carry another (a relay swapping the inputs)."""
    s, a = make_device("sensor"), make_device("aggregator")
    _, r = pair(receivers, sender=s, receiver=a, receiver_trusts=[s, a], sender_trusts=[s, a])
    sess = open_session(r.server.url)
    other = dagcbor.encode({"definition": "readings", "value": [9, 9, 9]})
    body = cbor2.loads(exchange(s, sess, BLOCKS))
    body["blocks"] = [[bytes(CID.of(other, DAG_CBOR)), other]]
    status, _, resp = request(r.server.url, "POST", f"/peer/inputs/{sess['session']}", cbor2.dumps(body))
    assert status == 403 and "sender-signature" in json.loads(resp)["error"]
    assert r.got == [] and len(r.refusals) == 1


def test_replayed_exchange_refused(receivers: list[Receiver]) -> None:
    s, a = make_device("sensor"), make_device("aggregator")
    _, r = pair(receivers, sender=s, receiver=a, receiver_trusts=[s, a], sender_trusts=[s, a])
    url = r.server.url
    sess = open_session(url)
    body = exchange(s, sess, BLOCKS)
    status, _, ok = request(url, "POST", f"/peer/inputs/{sess['session']}", body)
    assert status == 200 and json.loads(ok) == {"received": 1, "admitted": None, "status": "affirming"}
    status, _, resp = request(url, "POST", f"/peer/inputs/{sess['session']}", body)
    assert status == 409 and json.loads(resp)["status"] == "contraindicated"
    assert len(r.got) == 1
    # evidence and signature made for another session: not affirming
    sess2 = open_session(url)
    status, _, resp = request(url, "POST", f"/peer/inputs/{sess2['session']}", body)
    assert status == 403 and "nonce" in json.loads(resp)["error"] and len(r.got) == 1


@pytest.mark.parametrize("path,body,msg", [
    ("/peer/session", b"", "body must be"),
    ("/peer/session", b"{", "not JSON"),
    ("/peer/session", b'{"nonce": "ab"}', "8 to 64 bytes"),
    ("/peer/inputs/x", b"\xff\xff", "not CBOR"),
    ("/peer/inputs/x", cbor2.dumps({"evidence": b"", "blocks": []}), "{evidence, signature, blocks}"),
    ("/peer/inputs/x", cbor2.dumps({"evidence": b"", "signature": b"", "blocks": [[b"x", b"y"]]}), "block 0"),
    ("/peer/inputs/x", cbor2.dumps({"evidence": b"", "signature": b"",
                                    "blocks": [[bytes(BLOCKS[0][0]), b"other"]]}), "does not match"),
])
def test_malformed_peer_requests(receivers: list[Receiver], path: str, body: bytes, msg: str) -> None:
    a = make_device("aggregator")
    r = Receiver(a, [a])
    receivers.append(r)
    status, _, resp = request(r.server.url, "POST", path, body)
    assert status == 400 and msg in resp.decode(), resp
    assert request(r.server.url, "GET", "/attestation?nonce=" + "11" * 8)[0] == 200


def load_ops(path: Path) -> Any:
    spec = importlib.util.spec_from_file_location("two_device_ops", path)
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_two_device_ops_over_attested_transport(receivers: list[Receiver]) -> None:
    """examples/two-device's operations across two in-process agents; the readings travel as a
    DAG-CBOR block {definition, value} (the orchestrator's signed provenance nodes ride the same way)."""
    ops = load_ops(Path(__file__).resolve().parents[2] / "examples/two-device/ops.py")
    s, a = make_device("sensor"), make_device("aggregator")
    client, r = pair(receivers, sender=s, receiver=a, receiver_trusts=[s, a], sender_trusts=[s, a])
    readings = ops.sample(5)["readings"]
    block = dagcbor.encode({"definition": "readings", "value": readings})
    client.send("aggregator", [(CID.of(block, DAG_CBOR), block)])
    [(blocks, sender)] = r.got
    node = dagcbor.decode(blocks[0][1])
    assert sender.role == "sensor" and node["definition"] == "readings"
    assert ops.summarise(node["value"])["total"] == sum((i * 7) % 10 for i in range(5))


def test_not_ready_receiver_is_retried_with_fresh_sessions(receivers: list[Receiver]) -> None:
    """A receiver whose flow has not started answers 503; the sender retries (new nonces, new
    session) within its patience, and a refusal is never retried."""
    from agent.attestation_api import HttpError
    from agent.peers import PeerUnavailable

    s, a = make_device("sensor"), make_device("aggregator")
    client, r = pair(receivers, sender=s, receiver=a, receiver_trusts=[s, a], sender_trusts=[s, a])
    calls: list[int] = []

    def accept(blocks: list[Block], sender: AppraisalResult) -> list[CID]:
        calls.append(1)
        if len(calls) < 3:
            raise HttpError(503, "this agent's flow has not started yet: retry")
        return [c for c, _ in blocks]

    r.service.accept = accept
    client.patience = 10.0
    [res] = client.send("aggregator", BLOCKS)
    assert res.affirming and len(calls) == 3
    calls.clear()
    client.patience = 0.0
    with pytest.raises(PeerUnavailable, match="not ready"):
        client.send("aggregator", BLOCKS)
    assert len(calls) == 1
    client.peers = {"aggregator": ["http://127.0.0.1:1"]}
    with pytest.raises(PeerUnavailable, match="127.0.0.1:1"):
        client.send("aggregator", BLOCKS)
