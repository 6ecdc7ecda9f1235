"""TFTP packets, parsed strictly and encoded: RFC 1350 with options (RFC 2347), blksize (2348),
timeout and tsize (2349) and windowsize (7440).

The one TFTP codec: the boot server (bootstrap/server/tftp_server.py), the guests' client
(cidboot/netboot/tftp_client.py) and the bench client (bench/tftp_client.py) all read and write packets
here, so they cannot disagree on the wire format. Standard library only: it runs inside the
firmware and bootstrap images.

Strict on purpose: every defect is a `TftpFormatError` naming it (truncated header, a string
without its NUL, an option without a value, a repeated option, non-ASCII option, an ACK that is
not 4 bytes, an unknown opcode...), never a guess. Semantics (which option values a side
accepts) stay with the server and the client; the RFC ranges are here for both.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

from cidboot.errors import FormatError

RRQ, WRQ, DATA, ACK, ERROR, OACK = 1, 2, 3, 4, 5, 6
OPCODE_NAMES = {RRQ: "RRQ", WRQ: "WRQ", DATA: "DATA", ACK: "ACK", ERROR: "ERROR", OACK: "OACK"}
MODES = ("octet", "netascii", "mail")  # RFC 1350, compared case-insensitively

# error codes (RFC 1350, 2347)
ERR_UNDEFINED, ERR_NOT_FOUND, ERR_ACCESS, ERR_DISK_FULL, ERR_ILLEGAL_OP = 0, 1, 2, 3, 4
ERR_UNKNOWN_TID, ERR_EXISTS, ERR_NO_USER, ERR_OPTIONS = 5, 6, 7, 8

DEFAULT_BLKSIZE = 512
BLKSIZE_RANGE = (8, 65464)  # RFC 2348
TIMEOUT_RANGE = (1, 255)  # RFC 2349
WINDOW_RANGE = (1, 65535)  # RFC 7440
MAX_REQUEST = 512  # RFC 2347: a request with its options fits in 512 bytes
MAX_ERROR_MESSAGE = 200  # what we put in an ERROR we send


class TftpFormatError(FormatError):
    """A TFTP packet is malformed (the message says which part and why)."""


@dataclass(frozen=True)
class Request:
    """RRQ or WRQ: `options` maps lower-case names to their values, in the order sent."""

    opcode: int
    filename: str
    mode: str = "octet"
    options: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Data:
    """DATA: block number and up to blksize bytes."""

    block: int
    data: bytes


@dataclass(frozen=True)
class Ack:
    """ACK of a block number (0: of the OACK)."""

    block: int


@dataclass(frozen=True)
class Error:
    """ERROR: code and message."""

    code: int
    message: str = ""


@dataclass(frozen=True)
class OAck:
    """OACK: the options the server accepted (RFC 2347)."""

    options: dict[str, str]


Packet = Request | Data | Ack | Error | OAck


def _strings(body: bytes, what: str) -> list[bytes]:
    """NUL-terminated strings; the last one must end the packet."""
    if not body.endswith(b"\0"):
        raise TftpFormatError(f"{what}: not NUL-terminated")
    return body[:-1].split(b"\0")


def _ascii(raw: bytes, what: str) -> str:
    try:
        return raw.decode("ascii")
    except UnicodeDecodeError:
        raise TftpFormatError(f"{what} is not ASCII: {raw[:40]!r}") from None


def _options(parts: list[bytes], what: str) -> dict[str, str]:
    if len(parts) % 2:
        raise TftpFormatError(f"{what}: option {parts[-1][:40]!r} has no value")
    out: dict[str, str] = {}
    for i in range(0, len(parts), 2):
        name = _ascii(parts[i], f"{what}: option name").lower()
        if not name:
            raise TftpFormatError(f"{what}: empty option name")
        if name in out:
            raise TftpFormatError(f"{what}: option {name!r} repeated")
        out[name] = _ascii(parts[i + 1], f"{what}: option {name} value")
    return out


def parse(pkt: bytes) -> Packet:
    """One TFTP datagram -> its packet; TftpFormatError says what is wrong with it."""
    if len(pkt) < 2:
        raise TftpFormatError(f"{len(pkt)}-byte packet: no opcode")
    op = struct.unpack_from(">H", pkt)[0]
    if op in (RRQ, WRQ):
        what = OPCODE_NAMES[op]
        if len(pkt) > MAX_REQUEST:
            raise TftpFormatError(f"{what} of {len(pkt)} bytes: a request fits in {MAX_REQUEST} (RFC 2347)")
        parts = _strings(pkt[2:], what)
        if len(parts) < 2:
            raise TftpFormatError(f"{what}: no transfer mode")
        try:
            filename = parts[0].decode("utf-8")
        except UnicodeDecodeError:
            raise TftpFormatError(f"{what}: file name is not UTF-8: {parts[0][:40]!r}") from None
        if not filename:
            raise TftpFormatError(f"{what}: empty file name")
        mode = _ascii(parts[1], f"{what}: mode").lower()
        if mode not in MODES:
            raise TftpFormatError(f"{what}: unknown mode {mode[:20]!r}")
        return Request(op, filename, mode, _options(parts[2:], what))
    if op == DATA:
        if len(pkt) < 4:
            raise TftpFormatError(f"DATA of {len(pkt)} bytes: no block number")
        return Data(struct.unpack_from(">H", pkt, 2)[0], bytes(pkt[4:]))
    if op == ACK:
        if len(pkt) != 4:
            raise TftpFormatError(f"ACK of {len(pkt)} bytes, not 4")
        return Ack(struct.unpack_from(">H", pkt, 2)[0])
    if op == ERROR:
        if len(pkt) < 5:
            raise TftpFormatError(f"ERROR of {len(pkt)} bytes: no message")
        parts = _strings(pkt[4:], "ERROR message")
        if len(parts) != 1:
            raise TftpFormatError("ERROR: data after the message")
        return Error(struct.unpack_from(">H", pkt, 2)[0], parts[0].decode("utf-8", "replace"))
    if op == OACK:
        if len(pkt) == 2:
            raise TftpFormatError("OACK without options")
        return OAck(_options(_strings(pkt[2:], "OACK"), "OACK"))
    raise TftpFormatError(f"unknown opcode {op}")


def _encode_options(options: dict[str, str]) -> bytes:
    return b"".join(k.encode("ascii") + b"\0" + v.encode("ascii") + b"\0" for k, v in options.items())


def encode(p: Packet) -> bytes:
    """The datagram for a packet (an ERROR message is cut to MAX_ERROR_MESSAGE ASCII bytes)."""
    if isinstance(p, Request):
        return struct.pack(">H", p.opcode) + p.filename.encode("utf-8") + b"\0" + p.mode.encode("ascii") + b"\0" \
            + _encode_options(p.options)
    if isinstance(p, Data):
        return struct.pack(">HH", DATA, p.block % 65536) + p.data
    if isinstance(p, Ack):
        return struct.pack(">HH", ACK, p.block % 65536)
    if isinstance(p, Error):
        return struct.pack(">HH", ERROR, p.code) + p.message.encode("ascii", "replace")[:MAX_ERROR_MESSAGE] + b"\0"
    return struct.pack(">H", OACK) + _encode_options(p.options)


def rrq(filename: str, options: dict[str, str] | None = None, mode: str = "octet") -> bytes:
    return encode(Request(RRQ, filename, mode, dict(options or {})))


def data(block: int, payload: bytes) -> bytes:
    return struct.pack(">HH", DATA, block % 65536) + payload


def ack(block: int) -> bytes:
    return struct.pack(">HH", ACK, block % 65536)


def error(code: int, message: str) -> bytes:
    return encode(Error(code, message))


def oack(options: dict[str, str]) -> bytes:
    return encode(OAck(options))
