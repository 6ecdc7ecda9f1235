"""Software devices and a key broker for the private-image tests (docs/privacy.md): a DICE device
(firmware -> bootstrap -> image, derived in software as tests/unit/test_agent_attest.py does) that
asks for keys with the agent's own evidence, and a broker holding one signed manifest whose
operations layer is encrypted."""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ed25519
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from cidboot.ipld.cid import CID, RAW
from cidboot.trust.appraisal import DeviceRoots
from cidboot.trust.attester import Attester
from cidboot.trust.cose_key import key_id
from cidboot.trust.dice.derive import DiceInputs, DiceMode
from cidboot.trust.dice.software import DerivedIdentity, derive_layers
from cidboot.trust.manifest import Layer, Manifest, Plaintext, RootOfTrust, SignedManifest, sign_manifest
from cidboot.trust.measure import code_hash_of_blobs, image_inputs
from cidboot.trust.private import keys
from cidboot.trust.private.broker import KeyBroker, KeyRequest, Policy, request_nonce

SIGNER = ed25519.Ed25519PrivateKey.generate()
ROOT = RootOfTrust.from_public_keys([SIGNER.public_key()], 1)
FW, BS = code_hash_of_blobs([b"firmware"]), code_hash_of_blobs([b"bootstrap"])
SECRET = os.urandom(32)
MARKER = b"print('private-marker-5e1f')\n"
OPS = keys.encrypt_layer(SECRET, MARKER, "operations")
OPS_LAYER = Layer(CID.of(OPS.ciphertext, RAW), len(OPS.ciphertext), "operations", Plaintext(OPS.sha256, OPS.size))
KERNEL = Layer(CID.of(b"kernel", RAW), 6, "kernel")
MANIFEST = Manifest("private-hello", 1, int(time.time()) + 3600, (KERNEL, OPS_LAYER), ROOT,
                    {"firmware": FW, "bootstrap": BS})
SIGNED: SignedManifest = sign_manifest(MANIFEST, [SIGNER])
POLICY = {"version": 1, "manifests": {"private-hello": {"roles": ["worker"]}}}


class Device:
    """A software device (as tests/unit/test_agent_attest.py): DICE firmware -> bootstrap -> image."""

    def __init__(self, role: str = "worker", *, debug: bool = False, boot_mode: str = "measured",
                 bootstrap: bytes = BS, signed: SignedManifest = SIGNED) -> None:
        mode = DiceMode.DEBUG if debug else DiceMode.NORMAL
        self.ident: DerivedIdentity = derive_layers(os.urandom(32), [
            DiceInputs(code_hash=FW), DiceInputs(code_hash=bootstrap, mode=mode),
            image_inputs(signed.cid, signed.manifest, [key_id(SIGNER.public_key())])])
        self.attester = Attester.from_derived(self.ident, manifest_cid=signed.cid, boot_mode=boot_mode, role=role)
        self.role = role

    def ask(self, challenge: bytes) -> tuple[KeyRequest, X25519PrivateKey]:
        eph = X25519PrivateKey.generate()
        pub = eph.public_key().public_bytes_raw()
        return KeyRequest(challenge, pub, self.attester.evidence(request_nonce(challenge, pub))), eph


class Log(list[Mapping[str, Any]]):
    def __call__(self, entry: Mapping[str, Any]) -> None:
        self.append(entry)


def broker_for(*devs: Device, policy: Mapping[str, Any] = POLICY, **kw: Any) -> tuple[KeyBroker, Log]:
    roots = DeviceRoots()
    for d in devs:
        roots.add(d.ident.root_public_key, "", d.role)
    log = Log()
    b = KeyBroker(roots, Policy.from_obj(policy), {"private-hello": SECRET}, log=log, **kw)
    b.add_manifest(SIGNED, ROOT)
    return b, log
