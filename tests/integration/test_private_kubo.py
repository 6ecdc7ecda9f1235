"""Private layers through a real Kubo node (first part of issue 18's proof, before the image
builder encrypts): the ciphertext is what Kubo stores, the marker of the plaintext is nowhere in
its repo on disk nor in the device's block store, and a device that attests gets the key from the
`bootstrap keys` server, fetches the ciphertext by CID through Kubo's gateway with the verifying
client, decrypts and checks it. A control marker published in clear is found by the same grep,
so the grep would see a leak."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest

from bootstrap.server.keys import serve_keys
from cidboot.ipld.unixfs import ImportOptions, export_file, import_bytes
from cidboot.store.blockstore import Blockstore
from cidboot.store.gateway.client import fetch
from cidboot.store.kubo import KuboClient
from cidboot.trust.appraisal import DeviceRoots
from cidboot.trust.manifest import Layer, Manifest, Plaintext, sign_manifest
from cidboot.trust.private import keys
from cidboot.trust.private.broker import KeyBroker, Policy
from cidboot.trust.private.client import decrypt_layers, request_keys
from tests.support.kubo_node import KuboNode
from tests.support.private_devices import BS, FW, POLICY, ROOT, SIGNER, Device, Log

pytestmark = pytest.mark.kubo


def _grep(root: Path, needle: bytes) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file() and needle in p.read_bytes()]


def test_marker_never_stored_and_the_attesting_device_reads_it(kubo: KuboNode, tmp_path: Path) -> None:
    marker = b"cidboot-private-marker-" + os.urandom(8).hex().encode()
    control = b"cidboot-control-marker-" + os.urandom(8).hex().encode()
    plain = b"".join(os.urandom(50_000) + b"\n# " + marker + b"\n" for _ in range(6))  # several STREAM chunks
    secret = keys.generate_secret()
    enc = keys.encrypt_layer(secret, plain, "operations")
    client = KuboClient(kubo.api_url)
    (tmp_path / "ops.enc").write_bytes(enc.ciphertext)
    cid = client.add_file(tmp_path / "ops.enc", cid_version=1).cid  # Kubo's own chunker and repo
    assert cid == import_bytes(enc.ciphertext, None, ImportOptions(cid_version=1)).cid
    (tmp_path / "control").write_bytes(control)
    client.add_file(tmp_path / "control", cid_version=1)

    layer = Layer(cid, len(enc.ciphertext), "operations", Plaintext(enc.sha256, enc.size))
    manifest = Manifest("private-hello", 3, int(time.time()) + 3600, (layer,), ROOT, {"firmware": FW, "bootstrap": BS})
    signed = sign_manifest(manifest, [SIGNER])
    dev = Device(signed=signed)
    roots = DeviceRoots()
    roots.add(dev.ident.root_public_key, "", "worker")
    broker = KeyBroker(roots, Policy.from_obj(POLICY), {"private-hello": secret}, log=Log())
    broker.add_manifest(signed, ROOT)
    srv = serve_keys(broker, "127.0.0.1", 0)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        store = Blockstore(tmp_path / "device-store")
        fetch(cid, [kubo.gateway_url], store)  # every block verified by CID
        blob = b"".join(export_file(cid, store.get))
        got = request_keys(srv.url, dev.attester.evidence, signed.cid)
        out = decrypt_layers(manifest, {str(cid): blob}, got)
    finally:
        srv.shutdown()
        srv.server_close()
    assert out[str(cid)] == plain and marker in out[str(cid)]
    assert _grep(kubo.repo, control), "the grep finds content stored in clear (control)"
    assert _grep(kubo.repo, marker) == []
    assert _grep(tmp_path / "device-store", marker) == []
