"""Values sealed to the flow owner: the age file format (age-encryption.org/v1) with X25519
recipients, so results a device publishes are readable only with the owner's key, and readable
with `age -d -i owner.key` too (docs/privacy.md, "Private results").

An age file: the header `age-encryption.org/v1`, one stanza per recipient, the MAC line, then a
16-byte nonce and the STREAM payload (`stream`) under HKDF-SHA256(file key, salt = nonce,
info = "payload"). For an X25519 recipient the stanza is `-> X25519 <ephemeral share>` and its
body is the 16-byte file key sealed with ChaCha20-Poly1305 (zero nonce) under HKDF-SHA256(shared
secret, salt = share || recipient, info = "age-encryption.org/v1/X25519"). The MAC is HMAC-SHA256
under HKDF-SHA256(file key, info = "header") over the header up to "---". Parsing is strict
(canonical base64, 64-column body lines, no CR), as age's test vectors require; only X25519
recipients are implemented (other stanzas are skipped, as age skips unknown ones), no armor.

Identities are age's Bech32 `AGE-SECRET-KEY-1...` strings, recipients `age1...`.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
import re
from dataclasses import dataclass

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from cidboot.errors import FormatError, VerificationError
from cidboot.trust.private import stream
from cidboot.trust.rawkey import private_raw, public_raw

INTRO = b"age-encryption.org/v1\n"
X25519_INFO = b"age-encryption.org/v1/X25519"
_ARG = re.compile(rb"[\x21-\x7e]+")


class SealedFormatError(FormatError):
    """Not a well-formed age file (the header does not parse)."""


class NoMatchingIdentity(VerificationError):
    """None of the file's recipient stanzas opens with the identities given."""


class HeaderMacError(VerificationError):
    """The file key opened but the header MAC does not match: the header was altered."""


def _hkdf(ikm: bytes, salt: bytes, info: bytes, n: int = 32) -> bytes:
    return HKDF(hashes.SHA256(), n, salt=salt or None, info=info).derive(ikm)


def _b64(data: bytes) -> bytes:
    return base64.b64encode(data).rstrip(b"=")


def _unb64(s: bytes, what: str) -> bytes:
    if b"=" in s or not re.fullmatch(rb"[A-Za-z0-9+/]*", s):
        raise SealedFormatError(f"{what}: not unpadded base64")
    try:
        out = base64.b64decode(s + b"=" * (-len(s) % 4), validate=True)
    except binascii.Error:
        raise SealedFormatError(f"{what}: not base64") from None
    if _b64(out) != s:
        raise SealedFormatError(f"{what}: base64 not canonical")
    return out


# -- Bech32 (BIP 173) for age keys -------------------------------------------------------------
_CHARSET = "qpzry9x8gf2tvdw0s3jn54khce6mua7l"


def _polymod(values: list[int]) -> int:
    gen = (0x3B6A57B2, 0x26508E6D, 0x1EA119FA, 0x3D4233DD, 0x2A1462B3)
    chk = 1
    for v in values:
        b = chk >> 25
        chk = (chk & 0x1FFFFFF) << 5 ^ v
        for i in range(5):
            chk ^= gen[i] if (b >> i) & 1 else 0
    return chk


def _hrp_expand(hrp: str) -> list[int]:
    return [ord(c) >> 5 for c in hrp] + [0] + [ord(c) & 31 for c in hrp]


def _convert(data: list[int] | bytes, frm: int, to: int, pad: bool) -> list[int]:
    acc, bits, out, maxv = 0, 0, [], (1 << to) - 1
    for v in data:
        acc = (acc << frm) | v
        bits += frm
        while bits >= to:
            bits -= to
            out.append((acc >> bits) & maxv)
    if pad and bits:
        out.append((acc << (to - bits)) & maxv)
    elif not pad and (bits >= frm or (acc << (to - bits)) & maxv):
        raise SealedFormatError("bech32: non-zero padding")
    return out


def bech32_encode(hrp: str, data: bytes) -> str:
    d = _convert(data, 8, 5, True)
    chk = _polymod(_hrp_expand(hrp) + d + [0] * 6) ^ 1
    return hrp + "1" + "".join(_CHARSET[x] for x in d + [(chk >> 5 * (5 - i)) & 31 for i in range(6)])


def bech32_decode(s: str) -> tuple[str, bytes]:
    if s.lower() != s and s.upper() != s:
        raise SealedFormatError("bech32: mixed case")
    s = s.lower()
    pos = s.rfind("1")
    if pos < 1 or len(s) - pos < 7 or any(c not in _CHARSET for c in s[pos + 1:]):
        raise SealedFormatError("bech32: malformed")
    hrp, data = s[:pos], [_CHARSET.index(c) for c in s[pos + 1:]]
    if _polymod(_hrp_expand(hrp) + data) != 1:
        raise SealedFormatError("bech32: bad checksum")
    return hrp, bytes(_convert(data[:-6], 5, 8, False))


@dataclass(frozen=True)
class Identity:
    """An owner's X25519 private key (age identity)."""

    key: X25519PrivateKey

    @classmethod
    def generate(cls) -> Identity:
        return cls(X25519PrivateKey.generate())

    @classmethod
    def parse(cls, text: str) -> Identity:
        hrp, raw = bech32_decode(text.strip())
        if hrp != "age-secret-key-" or len(raw) != 32:
            raise SealedFormatError("not an age X25519 identity (AGE-SECRET-KEY-1...)")
        return cls(X25519PrivateKey.from_private_bytes(raw))

    def __str__(self) -> str:
        return bech32_encode("age-secret-key-", private_raw(self.key)).upper()

    @property
    def recipient(self) -> str:
        return bech32_encode("age", public_raw(self.key.public_key()))


def parse_recipient(text: str) -> bytes:
    hrp, raw = bech32_decode(text.strip())
    if hrp != "age" or len(raw) != 32:
        raise SealedFormatError("not an age X25519 recipient (age1...)")
    return raw


def _wrap_key(shared: bytes, share: bytes, recipient: bytes) -> bytes:
    return _hkdf(shared, share + recipient, X25519_INFO)


def _mac(file_key: bytes, header: bytes) -> bytes:
    return hmac.new(_hkdf(file_key, b"", b"header"), header, hashlib.sha256).digest()


def seal(recipients: list[bytes], plaintext: bytes) -> bytes:
    """An age file of `plaintext` for the X25519 `recipients` (raw 32-byte public keys)."""
    return seal_keyed(recipients, plaintext)[0]


def seal_keyed(recipients: list[bytes], plaintext: bytes) -> tuple[bytes, bytes]:
    """`seal`, also returning the file's random 16-byte file key: whoever is given it can open
    this one file (`open_with_file_key`, e.g. an attested peer that needs the value as an input)
    and nothing else; the owner's identity is never needed for that."""
    if not recipients:
        raise SealedFormatError("no recipients to seal to")
    file_key = os.urandom(16)
    header = INTRO
    for rcpt in recipients:
        eph = X25519PrivateKey.generate()
        share = public_raw(eph.public_key())
        shared = eph.exchange(X25519PublicKey.from_public_bytes(rcpt))
        body = _b64(ChaCha20Poly1305(_wrap_key(shared, share, rcpt)).encrypt(bytes(12), file_key, None))
        lines = [body[i:i + 64] for i in range(0, len(body), 64)]
        if not lines or len(lines[-1]) == 64:
            lines.append(b"")
        header += b"-> X25519 " + _b64(share) + b"\n" + b"\n".join(lines) + b"\n"
    header += b"---"
    nonce = os.urandom(16)
    return (header + b" " + _b64(_mac(file_key, header)) + b"\n" + nonce
            + stream.encrypt(_hkdf(file_key, nonce, b"payload"), plaintext)), file_key


@dataclass
class _Stanza:
    args: list[bytes]
    body: bytes


def _parse_header(data: bytes) -> tuple[list[_Stanza], bytes, bytes, bytes]:
    """(stanzas, header bytes covered by the MAC, MAC, rest of the file)."""
    if not data.startswith(INTRO):
        raise SealedFormatError("not an age v1 file (unsupported version or no intro line)")
    pos = len(INTRO)
    stanzas: list[_Stanza] = []
    while True:
        end = data.find(b"\n", pos)
        if end < 0:
            raise SealedFormatError("header ends without a MAC line")
        line = data[pos:end]
        if line.startswith(b"--- "):
            mac = _unb64(line[4:], "header MAC")
            if len(mac) != 32:
                raise SealedFormatError("header MAC is not 32 bytes")
            return stanzas, data[:pos + 3], mac, data[end + 1:]
        if not line.startswith(b"-> "):
            raise SealedFormatError("a stanza must start with '-> '")
        args = line[3:].split(b" ")
        if not args or not all(_ARG.fullmatch(a) for a in args):
            raise SealedFormatError("stanza: empty or invalid argument")
        pos, body = end + 1, b""
        while True:
            end = data.find(b"\n", pos)
            if end < 0:
                raise SealedFormatError("stanza body ends without a short final line")
            bl = data[pos:end]
            if len(bl) > 64:
                raise SealedFormatError("stanza body line longer than 64 columns")
            body += bl
            pos = end + 1
            if len(bl) < 64:
                break
        stanzas.append(_Stanza(args, _unb64(body, "stanza body")))


def open_sealed(identities: list[Identity], data: bytes) -> bytes:
    """The plaintext of an age file for one of `identities`; a damaged payload raises the
    stream's errors (a truncated file is refused, never returned short)."""
    stanzas, header, mac, rest = _parse_header(data)
    file_key = None
    for st in stanzas:
        if st.args[0] != b"X25519":
            continue  # other recipient types (and grease) are not ours
        if len(st.args) != 2:
            raise SealedFormatError("X25519 stanza: exactly one argument (the share)")
        share = _unb64(st.args[1], "X25519 share")
        if len(share) != 32:
            raise SealedFormatError("X25519 share is not 32 bytes")
        if len(st.body) != 32:
            raise SealedFormatError("X25519 stanza body is not a sealed 16-byte file key")
        for ident in identities:
            try:
                shared = ident.key.exchange(X25519PublicKey.from_public_bytes(share))
            except ValueError:
                raise SealedFormatError("X25519 share is a low-order point (all-zero shared secret)") from None
            if shared == bytes(32):
                raise SealedFormatError("X25519 share is a low-order point (all-zero shared secret)")
            rcpt = public_raw(ident.key.public_key())
            try:
                file_key = ChaCha20Poly1305(_wrap_key(shared, share, rcpt)).decrypt(bytes(12), st.body, None)
                break
            except InvalidTag:
                continue
        if file_key is not None:
            break
    if file_key is None:
        raise NoMatchingIdentity("no X25519 stanza of this file opens with the given identities")
    if not hmac.compare_digest(_mac(file_key, header), mac):
        raise HeaderMacError("the header MAC does not match: the header was altered")
    if len(rest) < 16:
        raise SealedFormatError("no payload nonce")
    return stream.decrypt(_hkdf(file_key, rest[:16], b"payload"), rest[16:])


def recipient_count(data: bytes) -> int:
    """How many X25519 recipient stanzas an age file has (parses the header; no key needed)."""
    stanzas, _header, _mac_, _rest = _parse_header(data)
    return sum(1 for st in stanzas if st.args[0] == b"X25519")


def open_with_file_key(file_key: bytes, data: bytes) -> bytes:
    """The plaintext of an age file given its file key (from `seal_keyed`): the header MAC
    proves the key is this file's (`HeaderMacError` otherwise), the STREAM tags the payload."""
    if len(file_key) != 16:
        raise SealedFormatError("a file key is 16 bytes")
    _stanzas, header, mac, rest = _parse_header(data)
    if not hmac.compare_digest(_mac(file_key, header), mac):
        raise HeaderMacError("the file key does not open this file (header MAC mismatch)")
    if len(rest) < 16:
        raise SealedFormatError("no payload nonce")
    return stream.decrypt(_hkdf(file_key, rest[:16], b"payload"), rest[16:])


def load_identities(text: str) -> list[Identity]:
    """An age identity file: one `AGE-SECRET-KEY-1...` per line, `#` comments and blank lines
    ignored (what `age-keygen` and `imagebuilder keygen --owner` write)."""
    out = [Identity.parse(line) for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    if not out:
        raise SealedFormatError("no age identity (AGE-SECRET-KEY-1...) in the identity file")
    return out
