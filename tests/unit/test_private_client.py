"""The device side (cidboot.trust.private.client) against the real `bootstrap keys` HTTP server:
keys requested with evidence binding an ephemeral key, layers decrypted and checked, each failure
naming the layer's CID."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator

import pytest

from bootstrap.server.keys import KeyServer, serve_keys
from cidboot.ipld.cid import CID, RAW
from cidboot.trust.appraisal import DeviceRoots
from cidboot.trust.manifest import Layer, Manifest, Plaintext, sign_manifest
from cidboot.trust.private import keys, stream
from cidboot.trust.private.broker import KeyBroker, Policy
from cidboot.trust.private.client import (
    KeyBrokerRefused,
    KeyBrokerUnavailable,
    MissingLayerKey,
    WrongManifestRelease,
    decrypt_layers,
    request_keys,
)
from tests.support.private_devices import BS, FW, POLICY, ROOT, SECRET, SIGNER, Device, Log

RUNTIME = os.urandom(3 * stream.CHUNK_SIZE + 5)
OPS_PLAIN = os.urandom(2 * stream.CHUNK_SIZE) + b"marker-private-ops"
ENC = {role: keys.encrypt_layer(SECRET, data, role) for role, data in (("runtime", RUNTIME), ("operations", OPS_PLAIN))}


def _layer(role: str) -> Layer:
    e = ENC[role]
    return Layer(CID.of(e.ciphertext, RAW), len(e.ciphertext), role, Plaintext(e.sha256, e.size))


KERNEL = Layer(CID.of(b"kernel", RAW), 6, "kernel")
MANIFEST = Manifest("private-hello", 2, int(time.time()) + 3600, (KERNEL, _layer("runtime"), _layer("operations")), ROOT,
                    {"firmware": FW, "bootstrap": BS})
SIGNED = sign_manifest(MANIFEST, [SIGNER])
BLOBS = {str(KERNEL.cid): b"kernel", **{str(_layer(r).cid): ENC[r].ciphertext for r in ENC}}


@pytest.fixture
def worker() -> Device:
    return Device(signed=SIGNED)


@pytest.fixture
def server(worker: Device) -> Iterator[KeyServer]:
    roots = DeviceRoots()
    debug = Device(debug=True, signed=SIGNED)
    for d in (worker, debug):
        roots.add(d.ident.root_public_key, "", "worker")
    broker = KeyBroker(roots, Policy.from_obj(POLICY), {"private-hello": SECRET}, log=Log())
    broker.add_manifest(SIGNED, ROOT)
    srv = serve_keys(broker, "127.0.0.1", 0)
    srv.debug_device = debug  # type: ignore[attr-defined]
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield srv
    srv.shutdown()
    srv.server_close()


def test_keys_then_plaintext(server: KeyServer, worker: Device) -> None:
    got = request_keys(server.url, worker.attester.evidence, SIGNED.cid)
    plain = decrypt_layers(MANIFEST, BLOBS, got)
    assert plain[str(MANIFEST.layers[1].cid)] == RUNTIME and plain[str(MANIFEST.layers[2].cid)] == OPS_PLAIN
    assert plain[str(KERNEL.cid)] == b"kernel"


def test_refused_device_is_told_why(server: KeyServer) -> None:
    dev = server.debug_device  # type: ignore[attr-defined]
    with pytest.raises(KeyBrokerRefused) as e:
        request_keys(server.url, dev.attester.evidence, SIGNED.cid)
    assert e.value.check == "debug-mode" and "debug-mode" in str(e.value)


def test_release_for_another_manifest_and_no_broker(server: KeyServer, worker: Device) -> None:
    with pytest.raises(WrongManifestRelease):
        request_keys(server.url, worker.attester.evidence, CID.of(b"the manifest I verified", RAW))
    with pytest.raises(KeyBrokerUnavailable):
        request_keys("http://127.0.0.1:1", worker.attester.evidence, SIGNED.cid, timeout=5)


def test_damaged_layers_name_their_cid(server: KeyServer, worker: Device) -> None:
    got = request_keys(server.url, worker.attester.evidence, SIGNED.cid)
    rt, ops = (str(lyr.cid) for lyr in MANIFEST.layers[1:])
    with pytest.raises(MissingLayerKey, match=ops):
        decrypt_layers(MANIFEST, BLOBS, {rt: got[rt]})
    c = stream.SEALED_CHUNK_SIZE
    swapped = {**BLOBS, ops: BLOBS[ops][:c] + BLOBS[rt][c:2 * c] + BLOBS[ops][2 * c:]}
    with pytest.raises(stream.ForeignChunkError, match=f"layer 2 \\(operations\\) {ops}") as e:
        decrypt_layers(MANIFEST, swapped, got)
    assert e.value.index == 1 and e.value.stream.startswith("layer 1 (runtime)")
    flipped = bytearray(BLOBS[rt])
    flipped[c + 3] ^= 0x40
    with pytest.raises(stream.ChunkTamperedError, match=rt):
        decrypt_layers(MANIFEST, {**BLOBS, rt: bytes(flipped)}, got)
    with pytest.raises(stream.TruncatedStreamError, match=rt):
        decrypt_layers(MANIFEST, {**BLOBS, rt: BLOBS[rt][:2 * c]}, got)
    with pytest.raises(stream.ChunkReorderedError, match=ops):
        decrypt_layers(MANIFEST, {**BLOBS, ops: BLOBS[ops][c:2 * c] + BLOBS[ops][:c] + BLOBS[ops][2 * c:]}, got)
