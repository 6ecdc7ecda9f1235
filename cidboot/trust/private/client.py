"""The device side of private images: ask the key broker, decrypt the layers (docs/privacy.md).

What the bootstrap's decrypt step calls (bootstrap.stage.verify.unlock), between "every layer
verified by CID, CDI_2 derived" and the hand-over:

    keys = request_keys(broker_url, evidence_for_nonce, manifest_cid)   # KeyBrokerRefused says why
    plain = decrypt_layers(manifest, ciphertexts, keys)                  # each failure names the CID

Stdlib (`http.client`) + `cryptography` only: guest code. The ephemeral X25519 private key lives
only in this function's frame; the keys and plaintext stay in RAM (the caller writes nothing to
persistent storage).
"""

from __future__ import annotations

import http.client
import json
from collections.abc import Callable, Collection, Mapping
from typing import Any
from urllib.parse import urlsplit

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from cidboot.errors import CidbootError, VerificationError
from cidboot.ipld.cid import CID
from cidboot.trust.manifest.model import Manifest
from cidboot.trust.private import keys as layer_keys
from cidboot.trust.private import stream
from cidboot.trust.private.broker import KeyRelease, KeyRequest, KeyRequestFormatError, request_nonce
from cidboot.trust.rawkey import public_raw

MAX_RESPONSE = 1 << 20


class KeyBrokerRefused(VerificationError):
    """The broker refused the keys: `check` is the check that decided, `reason` its words."""

    def __init__(self, check: str, reason: str) -> None:
        super().__init__(f"key broker refused the layer keys: {check}: {reason}")
        self.check, self.reason = check, reason


class KeyBrokerUnavailable(CidbootError):
    """The broker could not be asked (network, HTTP status, malformed answer)."""


class MissingLayerKey(VerificationError):
    """An encrypted layer of the manifest has no key in the release."""


class WrongManifestRelease(VerificationError):
    """The release is for another manifest than the one this device verified."""


def _post(url: str, path: str, body: Any, timeout: float) -> tuple[int, dict[str, Any]]:
    u = urlsplit(url)
    if u.scheme != "http" or not u.hostname:
        raise KeyBrokerUnavailable(f"key broker URL must be http://HOST[:PORT], got {url!r}")
    conn = http.client.HTTPConnection(u.hostname, u.port or 80, timeout=timeout)
    try:
        conn.request("POST", (u.path.rstrip("/") + path), body=json.dumps(body).encode(),
                     headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        data = resp.read(MAX_RESPONSE + 1)
    except (OSError, http.client.HTTPException) as e:
        raise KeyBrokerUnavailable(f"key broker {url}: {e}") from None
    finally:
        conn.close()
    if len(data) > MAX_RESPONSE:
        raise KeyBrokerUnavailable(f"key broker {url}{path}: answer larger than {MAX_RESPONSE} bytes")
    try:
        obj = json.loads(data)
    except ValueError:
        raise KeyBrokerUnavailable(f"key broker {url}{path}: HTTP {resp.status}, not JSON") from None
    if not isinstance(obj, dict):
        raise KeyBrokerUnavailable(f"key broker {url}{path}: HTTP {resp.status}, not a JSON object")
    return resp.status, obj


def request_keys(url: str, evidence: Callable[[bytes], bytes], manifest_cid: CID, *,
                 timeout: float = 30.0) -> dict[str, bytes]:
    """Ask the broker at `url` for the layer keys of `manifest_cid`: get a challenge, make an
    ephemeral X25519 key, sign evidence (`evidence(nonce)`) over the nonce binding both, open the
    release. Returns layer CID string -> key."""
    st, obj = _post(url, "/keys/challenge", {}, timeout)
    if st != 200 or not isinstance(obj.get("challenge"), str):
        raise KeyBrokerUnavailable(f"key broker {url}: no challenge (HTTP {st}: {obj.get('error')})")
    try:
        challenge = bytes.fromhex(obj["challenge"])
    except ValueError:
        raise KeyBrokerUnavailable(f"key broker {url}: challenge is not hex") from None
    eph = X25519PrivateKey.generate()
    pub = public_raw(eph.public_key())
    req = KeyRequest(challenge, pub, evidence(request_nonce(challenge, pub)))
    st, obj = _post(url, "/keys/request", req.to_json(), timeout)
    if st == 403:
        raise KeyBrokerRefused(str(obj.get("refused")), str(obj.get("reason")))
    if st != 200:
        raise KeyBrokerUnavailable(f"key broker {url}: HTTP {st}: {obj.get('error')}")
    try:
        release = KeyRelease.from_json(obj.get("release"))
    except KeyRequestFormatError as e:
        raise KeyBrokerUnavailable(f"key broker {url}: malformed release: {e}") from None
    if release.manifest_cid.multihash != manifest_cid.multihash:
        raise WrongManifestRelease(f"the broker released keys for {release.manifest_cid}, this device booted {manifest_cid}")
    return release.open(eph, challenge)


def decrypt_layers(manifest: Manifest, blobs: Mapping[str, bytes], keys: Mapping[str, bytes], *,
                   skip: Collection[str] = ()) -> dict[str, bytes]:
    """Layer CID string -> plaintext for every layer of `manifest` but those in `skip` (the
    running kernel's, left unfetched) (`blobs`: CID string -> the bytes fetched and verified by
    CID). Encrypted layers are decrypted and checked against the
    manifest's plaintext hash and size; the others pass through. A failure keeps its type
    (stream.*, keys.PlaintextMismatchError, MissingLayerKey) and names the layer's CID and role;
    the other layers' keys are given so that a chunk swapped between layers is named."""
    names = {str(lyr.cid): f"layer {i} ({lyr.role}) {lyr.cid}" for i, lyr in enumerate(manifest.layers)}
    out: dict[str, bytes] = {}
    for lyr in manifest.layers:
        cid = str(lyr.cid)
        if cid in skip:
            continue
        if lyr.plaintext is None:
            out[cid] = blobs[cid]
            continue
        key = keys.get(cid)
        if key is None:
            raise MissingLayerKey(f"no key for encrypted {names[cid]} in the broker's release")
        others = {names[c]: k for c, k in keys.items() if c != cid and c in names}
        try:
            out[cid] = b"".join(layer_keys.decrypt_layer(key, [blobs[cid]], sha256=lyr.plaintext.sha256,
                                                         size=lyr.plaintext.size, other_keys=others))
        except (stream.StreamFormatError, stream.StreamVerificationError, layer_keys.PlaintextMismatchError) as e:
            e.args = (f"{names[cid]}: {e}",)
            raise
    return out
