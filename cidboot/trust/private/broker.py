"""The key broker's core: layer keys only to devices that attest, as policy allows (docs/privacy.md).

The exchange (the HTTP front, `bootstrap keys --listen`, is the next step; this is what it calls):

1. the broker gives a challenge: 16 random bytes || expiry (ms, 8 bytes) || HMAC tag (16 bytes),
   stateless like the attestation verifier's sessions (agent.verifier): issuing stores nothing,
   using one spends it, a replay is refused;
2. the device makes an ephemeral X25519 key pair and EAT evidence (DICE- or TPM-rooted) whose
   nonce is `request_nonce(challenge, ephemeral public key)` = SHA-256("cidboot key request v1"
   || 0x00 || challenge || ephemeral public key): the evidence vouches for this one key, so
   whoever swaps the key in transit breaks the nonce;
3. the broker spends the challenge, looks up the manifest the evidence names among the signed
   manifests it was given, appraises through the one entry point (`cidboot.trust.appraisal.
   appraise`: DICE or TPM, never `allow_unmeasured`), applies the policy (data: per manifest
   name, which registered roles or devices, and the minimum appraisal status), derives the keys
   of the manifest's encrypted layers from the flow secret (`keys.layer_key`) and returns them
   wrapped to the ephemeral key (`KeyRelease`);
4. every release and every refusal goes to the log with the appraisal's checks (never a key).

Wrapping (`KeyRelease`): the broker makes its own ephemeral X25519 key pair per release;
shared = X25519(broker ephemeral, device ephemeral); wrap key = HKDF-SHA256(IKM = shared,
salt = broker public || device public, info = "cidboot key wrap v1", L = 32); sealed =
ChaCha20-Poly1305(wrap key, nonce = 12 zero bytes, plaintext = DAG-CBOR {layer CID string: 32-byte
key}, associated data = "cidboot key wrap v1" || challenge || manifest CID bytes). The zero nonce
is safe because each wrap key is used once (a fresh broker key per release); the associated data
ties the keys to this exchange and this manifest. Only the holder of the device's ephemeral
private key (which never leaves the device's RAM) can open it.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import struct
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from cidboot.errors import FormatError, VerificationError
from cidboot.ipld import dagcbor
from cidboot.ipld.cid import CID
from cidboot.trust.appraisal import (
    AFFIRMING,
    WARNING,
    AppraisalResult,
    DeviceRoots,
    appraise,
    root_cause_first,
)
from cidboot.trust.eat import parse_evidence
from cidboot.trust.manifest.model import Manifest, RootOfTrust
from cidboot.trust.manifest.signed import KIND_MANIFEST, SignedManifest
from cidboot.trust.manifest.verify import rotated_root, verify_threshold
from cidboot.trust.private.keys import layer_key
from cidboot.trust.rawkey import public_raw
from cidboot.trust.tpm.appraise import References

REQUEST_DOMAIN = b"cidboot key request v1\x00"
WRAP_INFO = b"cidboot key wrap v1"
CHALLENGE_NONCE = 16
TAG_BYTES = 16
CHALLENGE_BYTES = CHALLENGE_NONCE + 8 + TAG_BYTES
_CHALLENGE_DOMAIN = b"cidboot key broker challenge\x00"
TTL = 60.0
MAX_SPENT = 65536
MAX_EVIDENCE = 1 << 20  # TPM evidence carries the firmware's event log
STATUSES = (AFFIRMING, WARNING)  # what a policy may ask for; nothing worse ever gets a key
_RANK = {AFFIRMING: 0, WARNING: 1}


class PolicyFormatError(FormatError):
    """A key policy file or object does not have the documented shape."""


class KeyRequestFormatError(FormatError):
    """A key request or release is malformed (wrong sizes, not hex, not JSON)."""


class UnwrapError(VerificationError):
    """A key release does not open with this ephemeral key and challenge: it is for another key,
    another exchange or another manifest, or it was altered."""


class ManifestNotTrusted(VerificationError):
    """A manifest given to the broker is not signed by the threshold of the trusted root."""


def request_nonce(challenge: bytes, ephemeral_public: bytes) -> bytes:
    """The EAT nonce of a key request: binds the broker's challenge and the device's ephemeral key."""
    return hashlib.sha256(REQUEST_DOMAIN + challenge + ephemeral_public).digest()


# -- policy (data) ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Rule:
    """Who gets the keys of the manifests named `manifest`: a device whose *registered* role is in
    `roles` or whose id is in `devices`, appraised at least `min_status` (affirming, or warning
    for a lab board whose firmware is not pinned; never worse, and never an unmeasured boot)."""

    manifest: str
    roles: frozenset[str] = frozenset()
    devices: frozenset[str] = frozenset()
    min_status: str = AFFIRMING

    def __post_init__(self) -> None:
        if not self.roles and not self.devices:
            raise PolicyFormatError(f"policy for {self.manifest!r}: no roles and no devices: it would allow nobody")
        if self.min_status not in STATUSES:
            raise PolicyFormatError(f"policy for {self.manifest!r}: min_status must be one of {STATUSES}")


@dataclass(frozen=True)
class Policy:
    """Per manifest name, one `Rule`. A manifest with no rule gets no keys (fail closed).

    JSON: {"version": 1, "manifests": {NAME: {"roles": [...], "devices": [...], "min_status": "affirming"}}}"""

    rules: Mapping[str, Rule] = field(default_factory=dict)

    @classmethod
    def from_obj(cls, obj: Any) -> Policy:
        if not isinstance(obj, dict) or obj.get("version") != 1 or set(obj) != {"version", "manifests"}:
            raise PolicyFormatError('key policy must be {"version": 1, "manifests": {...}}')
        if not isinstance(obj["manifests"], dict):
            raise PolicyFormatError("key policy: manifests must map manifest names to rules")
        rules = {}
        for name, r in obj["manifests"].items():
            if not isinstance(r, dict) or set(r) - {"roles", "devices", "min_status"}:
                raise PolicyFormatError(f"key policy for {name!r}: a rule is {{roles?, devices?, min_status?}}")
            roles, devices = r.get("roles", []), r.get("devices", [])
            if not all(isinstance(x, list) and all(isinstance(s, str) and s for s in x) for x in (roles, devices)):
                raise PolicyFormatError(f"key policy for {name!r}: roles and devices are lists of names")
            status = r.get("min_status", AFFIRMING)
            if not isinstance(status, str):
                raise PolicyFormatError(f"key policy for {name!r}: min_status must be text")
            rules[name] = Rule(name, frozenset(roles), frozenset(devices), status)
        return cls(rules)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Policy:
        try:
            return cls.from_obj(json.loads(Path(path).read_text()))
        except (OSError, ValueError) as e:
            if isinstance(e, PolicyFormatError):
                raise
            raise PolicyFormatError(f"{path}: not a key policy: {e}") from None

    def to_obj(self) -> dict[str, Any]:
        return {"version": 1, "manifests": {n: {"roles": sorted(r.roles), "devices": sorted(r.devices),
                                                "min_status": r.min_status} for n, r in sorted(self.rules.items())}}


# -- wire objects ----------------------------------------------------------------------------


def _hex(obj: Mapping[str, Any], key: str, size: int | None = None) -> bytes:
    v = obj.get(key)
    if not isinstance(v, str):
        raise KeyRequestFormatError(f"{key}: missing or not text")
    try:
        b = bytes.fromhex(v)
    except ValueError:
        raise KeyRequestFormatError(f"{key}: not hex") from None
    if size is not None and len(b) != size:
        raise KeyRequestFormatError(f"{key}: {len(b)} bytes, expected {size}")
    return b


@dataclass(frozen=True)
class KeyRequest:
    challenge: bytes
    ephemeral_public: bytes  # X25519, 32 bytes
    evidence: bytes  # EAT whose nonce is request_nonce(challenge, ephemeral_public)

    def to_json(self) -> dict[str, str]:
        return {"challenge": self.challenge.hex(), "ephemeral": self.ephemeral_public.hex(),
                "evidence": self.evidence.hex()}

    @classmethod
    def from_json(cls, obj: Any) -> KeyRequest:
        if not isinstance(obj, dict) or set(obj) != {"challenge", "ephemeral", "evidence"}:
            raise KeyRequestFormatError("a key request is {challenge, ephemeral, evidence}")
        ev = _hex(obj, "evidence")
        if len(ev) > MAX_EVIDENCE:
            raise KeyRequestFormatError(f"evidence: {len(ev)} bytes exceeds {MAX_EVIDENCE}")
        return cls(_hex(obj, "challenge", CHALLENGE_BYTES), _hex(obj, "ephemeral", 32), ev)


def _wrap_key(shared: bytes, broker_public: bytes, device_public: bytes) -> bytes:
    return HKDF(hashes.SHA256(), 32, salt=broker_public + device_public, info=WRAP_INFO).derive(shared)


def _aad(challenge: bytes, manifest_cid: CID) -> bytes:
    return WRAP_INFO + challenge + bytes(manifest_cid)


@dataclass(frozen=True)
class KeyRelease:
    """Layer keys sealed to one device's ephemeral key (module docstring, "Wrapping")."""

    manifest_cid: CID
    broker_public: bytes
    sealed: bytes

    @classmethod
    def seal(cls, keys: Mapping[str, bytes], device_public: bytes, challenge: bytes, manifest_cid: CID) -> KeyRelease:
        eph = X25519PrivateKey.generate()
        bpub = public_raw(eph.public_key())
        try:
            shared = eph.exchange(X25519PublicKey.from_public_bytes(device_public))
        except ValueError as e:  # a low-order point: the shared secret would be all zeros
            raise KeyRequestFormatError(f"ephemeral key: not a usable X25519 public key: {e}") from None
        box = ChaCha20Poly1305(_wrap_key(shared, bpub, device_public))
        return cls(manifest_cid, bpub, box.encrypt(bytes(12), dagcbor.encode(dict(keys)), _aad(challenge, manifest_cid)))

    def open(self, device_private: X25519PrivateKey, challenge: bytes) -> dict[str, bytes]:
        """The layer keys (CID string -> key), or UnwrapError."""
        dpub = public_raw(device_private.public_key())
        try:
            shared = device_private.exchange(X25519PublicKey.from_public_bytes(self.broker_public))
            plain = ChaCha20Poly1305(_wrap_key(shared, self.broker_public, dpub)).decrypt(
                bytes(12), self.sealed, _aad(challenge, self.manifest_cid))
        except (InvalidTag, ValueError):
            raise UnwrapError(f"the key release for {self.manifest_cid} does not open with this ephemeral key and "
                              f"challenge: made for another device or exchange, or altered") from None
        keys = dagcbor.decode(plain)
        if not isinstance(keys, dict) or not all(isinstance(k, str) and isinstance(v, bytes) and len(v) == 32
                                                 for k, v in keys.items()):
            raise UnwrapError("the key release's contents are not a map of layer CIDs to 32-byte keys")
        return keys

    def to_json(self) -> dict[str, str]:
        return {"manifest": str(self.manifest_cid), "broker": self.broker_public.hex(), "sealed": self.sealed.hex()}

    @classmethod
    def from_json(cls, obj: Any) -> KeyRelease:
        if not isinstance(obj, dict) or set(obj) != {"manifest", "broker", "sealed"}:
            raise KeyRequestFormatError("a key release is {manifest, broker, sealed}")
        try:
            cid = CID.parse(obj["manifest"])
        except (FormatError, TypeError) as e:
            raise KeyRequestFormatError(f"manifest: {e}") from None
        return cls(cid, _hex(obj, "broker", 32), _hex(obj, "sealed"))


# -- challenges ------------------------------------------------------------------------------


@dataclass
class Challenges:
    """Single-use expiring challenges, stateless until used (the design of agent.verifier's
    sessions: a spent-set that refuses when full rather than forgets, so a replay never passes)."""

    ttl: float = TTL
    clock: Callable[[], float] = time.time
    max_spent: int = MAX_SPENT
    _key: bytes = field(default_factory=lambda: os.urandom(32), repr=False)
    _spent: OrderedDict[bytes, float] = field(default_factory=OrderedDict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def _tag(self, nonce: bytes, exp: bytes) -> bytes:
        return hmac.new(self._key, _CHALLENGE_DOMAIN + nonce + exp, hashlib.sha256).digest()[:TAG_BYTES]

    def new(self) -> bytes:
        nonce, exp = os.urandom(CHALLENGE_NONCE), struct.pack(">Q", int((self.clock() + self.ttl) * 1000))
        return nonce + exp + self._tag(nonce, exp)

    def take(self, challenge: bytes) -> str | None:
        """Spend `challenge`: None when good, else why not (unknown, expired, replayed, busy)."""
        if len(challenge) != CHALLENGE_BYTES:
            return "not a challenge of this broker"
        nonce, exp, tag = challenge[:CHALLENGE_NONCE], challenge[CHALLENGE_NONCE:-TAG_BYTES], challenge[-TAG_BYTES:]
        if not hmac.compare_digest(tag, self._tag(nonce, exp)):
            return "not a challenge of this broker (or the broker restarted)"
        now, expires = self.clock(), struct.unpack(">Q", exp)[0] / 1000
        with self._lock:
            while self._spent and next(iter(self._spent.values())) <= now:
                self._spent.popitem(last=False)
            if tag in self._spent:
                return "challenge already used: replayed request"
            if expires <= now:
                return f"challenge expired {now - expires:.0f} s ago"
            if len(self._spent) >= self.max_spent:
                return f"more than {self.max_spent} requests within {self.ttl:.0f} s: retry"
            self._spent[tag] = expires
        return None


# -- the broker ------------------------------------------------------------------------------


@dataclass
class Decision:
    """One answer: a release, or a refusal naming the check that failed and why."""

    released: bool
    check: str
    reason: str
    manifest_cid: str | None = None
    manifest_name: str | None = None
    appraisal: AppraisalResult | None = None
    release: KeyRelease | None = None
    layers: tuple[str, ...] = ()  # CIDs whose keys were released
    time: float = field(default_factory=time.time)

    def to_log(self) -> dict[str, Any]:
        """What the log keeps: the decision and the whole appraisal, never a key."""
        a = self.appraisal
        return {"time": round(self.time, 3), "decision": "release" if self.released else "refuse",
                "check": self.check, "reason": self.reason, "manifest": self.manifest_cid,
                "name": self.manifest_name, "device_id": a.device_id if a else None, "role": a.role if a else None,
                "status": a.status if a else None, "layers": list(self.layers),
                "checks": [c.to_obj() for c in a.checks] if a else [],
                # TPM evidence: the quoted PCR values the appraisal replayed (PCR 15: this manifest's events)
                **({"pcrs": {str(i): v.hex() for i, v in sorted(a.tpm_pcrs.items())}} if a and a.tpm_pcrs else {})}


class JsonLinesLog:
    """Append each decision as one JSON line (flushed, fsynced: a refusal is evidence too)."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()

    def __call__(self, entry: Mapping[str, Any]) -> None:
        line = json.dumps(entry, sort_keys=True) + "\n"
        with self._lock, self.path.open("a") as f:
            f.write(line)
            f.flush()
            os.fsync(f.fileno())


@dataclass(frozen=True)
class _Known:
    manifest: Manifest
    secret: bytes


class KeyBroker:
    """Releases layer keys per `policy` to devices in `roots` that attest (module docstring).

    `secrets`: manifest name -> that flow's secret (keys.load_secret). Manifests are added with
    `add_manifest`, which verifies their signatures: the broker derives keys only for manifests
    the flow's owner signed, so nobody can obtain the key of a plaintext hash of their choosing."""

    def __init__(self, roots: DeviceRoots, policy: Policy, secrets: Mapping[str, bytes], *,
                 log: Callable[[Mapping[str, Any]], None], tpm_references: References | None = None,
                 challenges: Challenges | None = None, clock: Callable[[], float] = time.time) -> None:
        self.roots, self.policy, self.secrets, self.log = roots, policy, dict(secrets), log
        self.tpm_references = tpm_references
        self.challenges = challenges or Challenges(clock=clock)
        self.clock = clock
        self._manifests: dict[tuple[int, bytes], tuple[CID, _Known]] = {}  # multihash -> (cid, manifest)

    def add_manifest(self, signed: SignedManifest, root: RootOfTrust, cid: CID | None = None) -> CID:
        """Serve keys for `signed` (signed by the threshold of `root`, after any rotation it carries)."""
        try:
            now_root, _ = rotated_root(signed, root)
            if signed.manifest.root != now_root:
                raise ManifestNotTrusted(f"manifest {signed.manifest.name} is not under the trusted root")
            verify_threshold(signed.signatures, signed.payload(), now_root, "manifest", kind=KIND_MANIFEST)
        except VerificationError as e:
            raise ManifestNotTrusted(f"manifest {signed.manifest.name}: {e}") from None
        cid = signed.cid if cid is None else cid
        secret = self.secrets.get(signed.manifest.name)
        if secret is None:
            raise ManifestNotTrusted(f"no flow secret for manifest {signed.manifest.name!r}: its keys cannot be derived")
        self._manifests[(cid.multihash.code, cid.multihash.digest)] = (cid, _Known(signed.manifest, secret))
        return cid

    def challenge(self) -> bytes:
        return self.challenges.new()

    def request(self, req: KeyRequest) -> Decision:
        """Decide one request and log it; the release is in `Decision.release`."""
        d = self._decide(req)
        self.log(d.to_log())
        return d

    def _decide(self, req: KeyRequest) -> Decision:
        why = self.challenges.take(req.challenge)
        if why is not None:
            return Decision(False, "challenge", why)
        try:
            ev = parse_evidence(req.evidence)
        except FormatError as e:
            return Decision(False, "format", f"evidence: {e}")
        if ev.manifest_cid is None:
            return Decision(False, "manifest", "the evidence names no booted manifest")
        found = self._manifests.get((ev.manifest_cid.multihash.code, ev.manifest_cid.multihash.digest))
        if found is None:
            return Decision(False, "manifest", f"manifest {ev.manifest_cid} is not one this broker holds keys for",
                            str(ev.manifest_cid))
        cid, known = found
        m = known.manifest
        if m.expires <= self.clock():
            return Decision(False, "manifest", f"manifest {m.name} v{m.version} has expired", str(cid), m.name)
        res = appraise(req.evidence, expected_nonce=request_nonce(req.challenge, req.ephemeral_public),
                       roots=self.roots, manifest=m, manifest_cid=cid, allow_unmeasured=False,
                       tpm_references=self.tpm_references)
        rule = self.policy.rules.get(m.name)
        if rule is None:
            return Decision(False, "policy", f"the key policy has no rule for manifest {m.name!r}", str(cid), m.name, res)
        status = res.status
        if status not in _RANK or _RANK[status] > _RANK[rule.min_status]:
            # the most fundamental failing check names the refusal (appraisal.ROOT_CAUSE_ORDER): an
            # unmeasured boot is refused for `measured-boot`, not for its effect `device`
            bad = root_cause_first([c for c in res.checks
                                    if c.status not in _RANK or _RANK[c.status] > _RANK[rule.min_status]])
            first = bad[0] if bad else None
            return Decision(False, first.name if first else "appraisal",
                            f"appraisal {status} (policy needs {rule.min_status}): "
                            + ("; ".join(f"{c.name}: {c.reason}" for c in bad) or "no checks"), str(cid), m.name, res)
        if res.device_id not in rule.devices and (res.role is None or res.role not in rule.roles):
            return Decision(False, "policy", f"device {res.device_id} (registered role {res.role!r}) is not allowed "
                                             f"the keys of {m.name!r}", str(cid), m.name, res)
        keys = {str(lyr.cid): layer_key(known.secret, lyr.plaintext.sha256, lyr.role)
                for lyr in m.layers if lyr.plaintext is not None}
        try:
            release = KeyRelease.seal(keys, req.ephemeral_public, req.challenge, cid)
        except KeyRequestFormatError as e:
            return Decision(False, "ephemeral-key", str(e), str(cid), m.name, res)
        return Decision(True, "released", f"{len(keys)} layer key(s) of {m.name} v{m.version} to device "
                                          f"{res.device_id} ({status})", str(cid), m.name, res, release, tuple(keys))


__all__ = ["Challenges", "Decision", "JsonLinesLog", "KeyBroker", "KeyRelease", "KeyRequest",
           "Policy", "Rule", "UnwrapError", "request_nonce"]
