"""Key files: PEM private keys (mode 0600) beside `.pub` COSE_Key files, and root-of-trust
files (JSON: version, threshold, hex COSE_Keys) that bootstraps and verifiers trust."""

from __future__ import annotations

import json
import os
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric import ec, ed25519

from cidboot.errors import FormatError
from cidboot.trust.cose import PrivateKey, PublicKey
from cidboot.trust.cose_key import decode_public_key, encode_public_key_bytes
from cidboot.trust.manifest.model import RootOfTrust

ALGS = ("ed25519", "es256", "es384")


class KeyFileError(FormatError):
    """A key or root file cannot be read or has the wrong content."""


def generate(alg: str = "ed25519") -> PrivateKey:
    if alg == "ed25519":
        return ed25519.Ed25519PrivateKey.generate()
    if alg == "es256":
        return ec.generate_private_key(ec.SECP256R1())
    if alg == "es384":
        return ec.generate_private_key(ec.SECP384R1())
    raise KeyFileError(f"unknown key algorithm {alg!r} (one of {', '.join(ALGS)})")


def write_keypair(key: PrivateKey, stem: str | os.PathLike[str]) -> tuple[Path, Path]:
    priv, pub = Path(f"{stem}.pem"), Path(f"{stem}.pub")
    if priv.exists():
        raise KeyFileError(f"{priv} exists; refusing to overwrite a private key")
    priv.parent.mkdir(parents=True, exist_ok=True)
    from cryptography.hazmat.primitives import serialization

    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    fd = os.open(priv, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
    pub.write_bytes(encode_public_key_bytes(key.public_key()))
    return priv, pub


def load_private_key(path: str | os.PathLike[str]) -> PrivateKey:
    # imported here, not at the top: the package pulls its SSH module and with it ciphers, RSA and
    # DSA (ten modules); the bootstrap imports this module for load_root on every boot
    from cryptography.hazmat.primitives import serialization

    try:
        key = serialization.load_pem_private_key(Path(path).read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as e:
        raise KeyFileError(f"{path}: cannot load private key: {e}") from None
    if not isinstance(key, ed25519.Ed25519PrivateKey | ec.EllipticCurvePrivateKey):
        raise KeyFileError(f"{path}: unsupported key type {type(key).__name__}")
    return key


def load_public_key(path: str | os.PathLike[str]) -> PublicKey:
    try:
        return decode_public_key(Path(path).read_bytes())
    except OSError as e:
        raise KeyFileError(f"{path}: {e.strerror}") from None


def write_root(root: RootOfTrust, path: str | os.PathLike[str]) -> None:
    doc = {"version": root.version, "threshold": root.threshold, "keys": [k.hex() for k in root.keys]}
    Path(path).write_text(json.dumps(doc, indent=1) + "\n")


def load_root(path: str | os.PathLike[str]) -> RootOfTrust:
    try:
        doc = json.loads(Path(path).read_text())
        return RootOfTrust(tuple(bytes.fromhex(k) for k in doc["keys"]), int(doc["threshold"]), int(doc["version"]))
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise KeyFileError(f"{path}: not a root-of-trust file: {e}") from None
