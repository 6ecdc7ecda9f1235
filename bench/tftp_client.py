"""A small TFTP read client with blksize and RFC 7440 windowsize, used as the one client for
every server in the TFTP benches (so server figures compare like with like).

It falls back to what the server accepted in its OACK (a server without windowsize gets a
window of 1), acknowledges every `windowsize` blocks or on a gap/timeout, and returns the bytes.
"""

from __future__ import annotations

import socket
import struct

RRQ, DATA, ACK, ERROR, OACK = 1, 3, 4, 5, 6


class TftpClientError(Exception):
    """The transfer failed (server error packet, timeout, or a protocol violation)."""


def _oack_options(data: bytes) -> dict[str, str]:
    parts = data[2:].split(b"\0")
    return {parts[i].decode().lower(): parts[i + 1].decode() for i in range(0, len(parts) - 1, 2)}


def get(host: str, port: int, name: str, *, blksize: int = 512, windowsize: int = 1, timeout: float = 2.0,
        retries: int = 5, bind: str = "") -> bytes:
    """Download `name`; raise TftpClientError on failure."""
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind((bind, 0))
    s.settimeout(timeout)
    try:
        opts = {"tsize": "0"}
        if blksize != 512:
            opts["blksize"] = str(blksize)
        if windowsize != 1:
            opts["windowsize"] = str(windowsize)
        req = struct.pack(">H", RRQ) + name.encode() + b"\0octet\0" + b"".join(
            k.encode() + b"\0" + v.encode() + b"\0" for k, v in opts.items())
        s.sendto(req, (host, port))
        bs, win = 512, 1
        out: list[bytes] = []
        expect, since_ack, peer, tries = 1, 0, None, 0
        last_ack = req  # what to resend on timeout
        while True:
            try:
                data, src = s.recvfrom(65536 + 4)
            except TimeoutError:
                tries += 1
                if tries > retries:
                    raise TftpClientError(f"{name}: timed out at block {expect}") from None
                s.sendto(last_ack, peer or (host, port))
                since_ack = 0
                continue
            if peer is None:
                peer = src
            elif src != peer:
                continue
            op = struct.unpack(">H", data[:2])[0]
            if op == ERROR:
                raise TftpClientError(f"{name}: server error {struct.unpack('>H', data[2:4])[0]}: "
                                      f"{data[4:].rstrip(bytes(1)).decode(errors='replace')}")
            if op == OACK:
                o = _oack_options(data)
                bs, win = int(o.get("blksize", 512)), int(o.get("windowsize", 1))
                last_ack = struct.pack(">HH", ACK, 0)
                s.sendto(last_ack, peer)
                continue
            if op != DATA:
                raise TftpClientError(f"{name}: unexpected opcode {op}")
            tries = 0
            block = struct.unpack(">H", data[2:4])[0]
            if block != expect % 65536:
                # a gap (lost packet) or a duplicate: ack what we have so the server resends from there
                if since_ack:
                    last_ack = struct.pack(">HH", ACK, (expect - 1) % 65536)
                    s.sendto(last_ack, peer)
                    since_ack = 0
                continue
            payload = data[4:]
            out.append(payload)
            since_ack += 1
            final = len(payload) < bs
            if final or since_ack >= win:
                last_ack = struct.pack(">HH", ACK, expect % 65536)
                s.sendto(last_ack, peer)
                since_ack = 0
            if final:
                return b"".join(out)
            expect += 1
    finally:
        s.close()
