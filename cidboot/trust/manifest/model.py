"""The workload manifest and the root of trust, as typed objects with one canonical encoding.

The manifest is what a device boots: layer CIDs and sizes, reference measurements, the flow
and operation implementations, placement and policies, under a version (no rollback) and an
expiry (no freeze). It is DAG-CBOR, so its layer, flow and operation CIDs are real IPLD links:
pinning, CAR export and the gateway's `dag-scope=all` carry the whole image with it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from cidboot.errors import FormatError
from cidboot.ipld import dagcbor
from cidboot.ipld.cid import CID
from cidboot.trust.cose import PublicKey
from cidboot.trust.cose_key import decode_public_key, encode_public_key_bytes, key_id

MAX_VERSION = 2**53  # JSON-safe; a larger version would freeze out every later manifest
LAYER_ROLES = ("kernel", "runtime", "agent", "operations", "config", "initrd", "other")
MEASURED_LAYERS = ("firmware", "bootstrap", "image")


class ManifestFormatError(FormatError):
    """A manifest, root or envelope does not have the required shape (the message names the field)."""


def _req(d: dict[str, Any], key: str, typ: type | tuple[type, ...], where: str) -> Any:
    if key not in d:
        raise ManifestFormatError(f"{where}: missing {key!r}")
    v = d[key]
    if not isinstance(v, typ) or (typ is int and isinstance(v, bool)):
        raise ManifestFormatError(f"{where}: {key!r} has the wrong type ({type(v).__name__})")
    return v


def _only(d: dict[str, Any], allowed: set[str], where: str) -> None:
    extra = sorted(set(d) - allowed)
    if extra:
        raise ManifestFormatError(f"{where}: unknown keys {extra}")


class _Value:
    """Field equality, hash and repr from `__slots__` for the model's small frozen records, which
    are written out rather than frozen dataclasses: generating a frozen dataclass's methods costs
    ~3 M guest instructions at import per class, in the bootstrap and the agent. The records are
    never changed once made (their constructors validate)."""

    __slots__: tuple[str, ...] = ()

    def _key(self) -> tuple[Any, ...]:
        return tuple(getattr(self, n) for n in self.__slots__)

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and self._key() == other._key()

    def __hash__(self) -> int:
        return hash(self._key())

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(f'{n}={getattr(self, n)!r}' for n in self.__slots__)})"


class RootOfTrust(_Value):
    """Keys and how many of them must sign; `version` increases by one with each rotation."""

    __slots__ = ("keys", "threshold", "version")

    def __init__(self, keys: tuple[bytes, ...], threshold: int, version: int = 1) -> None:
        self.keys = keys  # encoded COSE_Keys
        self.threshold = threshold
        self.version = version
        self.__post_init__()

    def __post_init__(self) -> None:
        if not self.keys:
            raise ManifestFormatError("root of trust: no keys")
        if not 1 <= self.threshold <= len(set(self.keys)):
            raise ManifestFormatError(f"root of trust: threshold {self.threshold} must be 1..{len(set(self.keys))}")
        if self.version < 1:
            raise ManifestFormatError("root of trust: version must be >= 1")
        for k in self.keys:
            decode_public_key(k)

    @classmethod
    def from_public_keys(cls, keys: list[PublicKey], threshold: int, version: int = 1) -> RootOfTrust:
        return cls(tuple(encode_public_key_bytes(k) for k in keys), threshold, version)

    def public_keys(self) -> dict[bytes, PublicKey]:
        """key id -> key (a key listed twice is one key)."""
        out = {}
        for raw in self.keys:
            pub = decode_public_key(raw)
            out[key_id(pub)] = pub
        return out

    def to_obj(self) -> dict[str, Any]:
        return {"keys": list(self.keys), "threshold": self.threshold, "version": self.version}

    @classmethod
    def from_obj(cls, d: Any, where: str = "root") -> RootOfTrust:
        if not isinstance(d, dict):
            raise ManifestFormatError(f"{where}: must be a map")
        _only(d, {"keys", "threshold", "version"}, where)
        keys = _req(d, "keys", list, where)
        if not all(isinstance(k, bytes) for k in keys):
            raise ManifestFormatError(f"{where}: keys must be encoded COSE_Keys")
        return cls(tuple(keys), _req(d, "threshold", int, where), _req(d, "version", int, where))


class Plaintext(_Value):
    """What an encrypted layer decrypts to (docs/privacy.md): its SHA-256 and size. The layer's
    `cid` and `size` are then those of the ciphertext (what storage holds), and the measurement
    uses this (cidboot.trust.measure.layer_identity), so it does not depend on the flow secret."""

    __slots__ = ("sha256", "size")

    def __init__(self, sha256: bytes, size: int) -> None:
        self.sha256 = sha256
        self.size = size
        self.__post_init__()

    def __post_init__(self) -> None:
        if not isinstance(self.sha256, bytes) or len(self.sha256) != 32:
            raise ManifestFormatError("layer plaintext: sha256 must be 32 bytes")
        if type(self.size) is not int or self.size < 0:
            raise ManifestFormatError("layer plaintext: size must be a non-negative integer")

    def to_obj(self) -> dict[str, Any]:
        return {"sha256": self.sha256, "size": self.size}

    @classmethod
    def from_obj(cls, d: Any, where: str) -> Plaintext:
        if not isinstance(d, dict):
            raise ManifestFormatError(f"{where}: plaintext must be a map")
        _only(d, {"sha256", "size"}, f"{where} plaintext")
        return cls(_req(d, "sha256", bytes, f"{where} plaintext"), _req(d, "size", int, f"{where} plaintext"))


class Layer(_Value):
    """One image layer: `cid`/`size` of the bytes storage holds; `plaintext` set when those bytes
    are the layer encrypted (cidboot.trust.private: age STREAM under a key derived from the flow
    secret). A layer without `plaintext` encodes exactly as before, so old manifests keep their
    bytes and CIDs."""

    __slots__ = ("cid", "size", "role", "plaintext")

    def __init__(self, cid: CID, size: int, role: str, plaintext: Plaintext | None = None) -> None:
        self.cid = cid
        self.size = size
        self.role = role
        self.plaintext = plaintext

    def to_obj(self) -> dict[str, Any]:
        obj: dict[str, Any] = {"cid": self.cid, "size": self.size, "role": self.role}
        if self.plaintext is not None:
            obj["plaintext"] = self.plaintext.to_obj()
        return obj

    @property
    def encrypted(self) -> bool:
        return self.plaintext is not None


@dataclass(frozen=True)
class Manifest:
    """What a device boots: the layers, reference measurements, flow and operations, placement and
    policies, under a version (no rollback) and an expiry (no freeze); `encode` is its one DAG-CBOR form."""

    name: str
    version: int
    expires: int  # unix seconds
    layers: tuple[Layer, ...]
    root: RootOfTrust
    measurements: dict[str, bytes] = field(default_factory=dict)  # firmware/bootstrap/image -> SHA-512
    flow: CID | None = None
    operations: dict[str, CID] = field(default_factory=dict)
    placement: dict[str, list[str]] = field(default_factory=dict)
    policies: list[dict[str, Any]] = field(default_factory=list)
    cmdline: str = ""
    # the flow owner (cidboot.trust.private.owner.Owner.to_obj): values are sealed to it; signed
    # with the rest, so a boot server cannot swap the recipients. Absent: encodes as before.
    owner: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        if not self.name:
            raise ManifestFormatError("manifest: empty name")
        if not 0 <= self.version <= MAX_VERSION:
            raise ManifestFormatError(f"manifest: version must be 0..{MAX_VERSION}")
        for layer in self.layers:
            if layer.size < 0 or layer.role not in LAYER_ROLES:
                raise ManifestFormatError(f"manifest: layer {layer.cid}: bad size or role {layer.role!r}")
            if layer.plaintext is None:
                continue
            # a private image's layer: only then the AEAD's module
            from cidboot.trust.private.stream import ciphertext_size

            if layer.size != ciphertext_size(layer.plaintext.size):
                raise ManifestFormatError(f"manifest: layer {layer.cid}: {layer.size} bytes cannot be the encryption "
                                          f"of {layer.plaintext.size} bytes ({ciphertext_size(layer.plaintext.size)})")
        if self.owner is not None:
            from cidboot.trust.private.owner import Owner

            try:
                Owner.from_obj(self.owner, "manifest owner")
            except FormatError as e:
                raise ManifestFormatError(str(e)) from None
        for k, v in self.measurements.items():
            if k not in MEASURED_LAYERS or len(v) != 64:
                raise ManifestFormatError(f"manifest: measurement {k!r} must be a 64-byte SHA-512 of a known layer")

    def to_obj(self) -> dict[str, Any]:
        obj = {
            "name": self.name, "version": self.version, "expires": self.expires,
            "layers": [lyr.to_obj() for lyr in self.layers], "root": self.root.to_obj(),
            "measurements": dict(self.measurements), "flow": self.flow, "operations": dict(self.operations),
            "placement": {k: list(v) for k, v in self.placement.items()}, "policies": list(self.policies),
            "cmdline": self.cmdline,
        }
        if self.owner is not None:
            obj["owner"] = dict(self.owner)
        return obj

    @property
    def sealing_owner(self) -> Any:
        """The owner as a cidboot.trust.private.owner.Owner, or None."""
        if self.owner is None:
            return None
        from cidboot.trust.private.owner import Owner

        return Owner.from_obj(self.owner, "manifest owner")

    def encode(self) -> bytes:
        return dagcbor.encode(self.to_obj())

    @classmethod
    def from_obj(cls, d: Any) -> Manifest:
        w = "manifest"
        if not isinstance(d, dict):
            raise ManifestFormatError("manifest: must be a map")
        _only(d, {"name", "version", "expires", "layers", "root", "measurements", "flow", "operations",
                  "placement", "policies", "cmdline", "owner"}, w)
        layers = []
        for i, lyr in enumerate(_req(d, "layers", list, w)):
            lw = f"manifest layer {i}"
            if not isinstance(lyr, dict):
                raise ManifestFormatError(f"{lw}: must be a map")
            _only(lyr, {"cid", "size", "role", "plaintext"}, lw)
            plain = Plaintext.from_obj(lyr["plaintext"], lw) if "plaintext" in lyr else None
            layers.append(Layer(_req(lyr, "cid", CID, lw), _req(lyr, "size", int, lw), _req(lyr, "role", str, lw), plain))
        ops = d.get("operations", {})
        if not isinstance(ops, dict) or not all(isinstance(k, str) and isinstance(v, CID) for k, v in ops.items()):
            raise ManifestFormatError("manifest: operations must map names to CIDs")
        flow = d.get("flow")
        if flow is not None and not isinstance(flow, CID):
            raise ManifestFormatError("manifest: flow must be a CID")
        meas = d.get("measurements", {})
        if not isinstance(meas, dict) or not all(isinstance(v, bytes) for v in meas.values()):
            raise ManifestFormatError("manifest: measurements must map layer names to bytes")
        placement = d.get("placement", {})
        if not isinstance(placement, dict) or not all(
            isinstance(v, list) and all(isinstance(op, str) for op in v) for v in placement.values()
        ):
            raise ManifestFormatError("manifest: placement must map roles to operation lists")
        policies = d.get("policies", [])
        if not isinstance(policies, list) or not all(isinstance(p, dict) for p in policies):
            raise ManifestFormatError("manifest: policies must be a list of maps")
        cmdline = d.get("cmdline", "")
        if not isinstance(cmdline, str):
            raise ManifestFormatError("manifest: cmdline must be a string")
        return cls(
            name=_req(d, "name", str, w), version=_req(d, "version", int, w), expires=_req(d, "expires", int, w),
            layers=tuple(layers), root=RootOfTrust.from_obj(_req(d, "root", dict, w), "manifest root"),
            measurements=meas, flow=flow, operations=ops, placement=placement, policies=policies,
            cmdline=cmdline, owner=d.get("owner"),
        )

    def layer(self, cid: CID) -> Layer | None:
        for lyr in self.layers:
            if lyr.cid.multihash == cid.multihash:
                return lyr
        return None
