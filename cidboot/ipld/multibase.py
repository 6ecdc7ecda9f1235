"""Multibase: self-describing base encodings of bytes (the prefix character names the base).

Only the bases IPFS tooling actually produces are supported; unknown prefixes are an error,
never a guess.
"""

from __future__ import annotations

import base64
import binascii

from cidboot.errors import FormatError

B58_ALPHABET = "123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz"
_B58_INDEX = {c: i for i, c in enumerate(B58_ALPHABET)}

PREFIXES = {
    "base16": "f",
    "base16upper": "F",
    "base32": "b",
    "base32upper": "B",
    "base58btc": "z",
    "base64": "m",
    "base64url": "u",
}
_BY_PREFIX = {v: k for k, v in PREFIXES.items()}


class MultibaseError(FormatError):
    """A multibase string has an unknown prefix or characters outside its alphabet."""


def b58encode(data: bytes) -> str:
    n = int.from_bytes(data, "big")
    out = []
    while n:
        n, r = divmod(n, 58)
        out.append(B58_ALPHABET[r])
    pad = len(data) - len(data.lstrip(b"\0"))
    return "1" * pad + "".join(reversed(out))


def b58decode(s: str) -> bytes:
    n = 0
    for i, c in enumerate(s):
        try:
            n = n * 58 + _B58_INDEX[c]
        except KeyError:
            raise MultibaseError(f"invalid base58btc character {c!r} at position {i}") from None
    pad = len(s) - len(s.lstrip("1"))
    body = n.to_bytes((n.bit_length() + 7) // 8, "big") if n else b""
    return b"\0" * pad + body


def _b32decode(s: str) -> bytes:
    s = s.upper()
    try:
        return base64.b32decode(s + "=" * (-len(s) % 8))
    except (binascii.Error, ValueError) as e:
        raise MultibaseError(f"invalid base32: {e}") from None


def _b64decode(s: str, alt: bytes | None) -> bytes:
    try:
        return base64.b64decode(s + "=" * (-len(s) % 4), altchars=alt, validate=True)
    except (binascii.Error, ValueError) as e:
        raise MultibaseError(f"invalid base64: {e}") from None


def encode(data: bytes, base: str = "base32") -> str:
    if base not in PREFIXES:
        raise MultibaseError(f"unsupported multibase {base!r} (supported: {', '.join(PREFIXES)})")
    if base == "base16":
        body = data.hex()
    elif base == "base16upper":
        body = data.hex().upper()
    elif base == "base32":
        body = base64.b32encode(data).decode().rstrip("=").lower()
    elif base == "base32upper":
        body = base64.b32encode(data).decode().rstrip("=")
    elif base == "base58btc":
        body = b58encode(data)
    elif base == "base64":
        body = base64.b64encode(data).decode().rstrip("=")
    else:
        body = base64.urlsafe_b64encode(data).decode().rstrip("=")
    return PREFIXES[base] + body


def decode(s: str) -> bytes:
    return decode_with_base(s)[1]


def decode_with_base(s: str) -> tuple[str, bytes]:
    if not s:
        raise MultibaseError("empty multibase string")
    base = _BY_PREFIX.get(s[0])
    if base is None:
        raise MultibaseError(f"unknown multibase prefix {s[0]!r}")
    body = s[1:]
    if base in ("base16", "base16upper"):
        if (base == "base16" and body != body.lower()) or (base == "base16upper" and body != body.upper()):
            raise MultibaseError(f"mixed case in {base} string")
        try:
            return base, bytes.fromhex(body)
        except ValueError:
            raise MultibaseError("invalid base16") from None
    if base in ("base32", "base32upper"):
        if (base == "base32" and body != body.lower()) or (base == "base32upper" and body != body.upper()):
            raise MultibaseError(f"mixed case in {base} string")
        return base, _b32decode(body)
    if base == "base58btc":
        return base, b58decode(body)
    if base == "base64":
        return base, _b64decode(body, None)
    return base, _b64decode(body, b"-_")
