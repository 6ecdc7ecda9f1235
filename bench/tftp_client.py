"""A small TFTP read client with blksize and RFC 7440 windowsize, used as the one client for
every server in the TFTP benches (so server figures compare like with like).

It falls back to what the server accepted in its OACK (a server without windowsize gets a
window of 1), acknowledges every `windowsize` blocks or on a gap/timeout, and returns the bytes.
Packets are read and written by cidboot.netboot.tftp, the codec the server and the guests' client use.
"""

from __future__ import annotations

import socket

from cidboot.netboot import tftp


class TftpClientError(Exception):
    """The transfer failed (server error packet, timeout, or a protocol violation)."""


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
        req = tftp.rrq(name, opts)
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
            try:
                p = tftp.parse(data)
            except tftp.TftpFormatError as e:
                raise TftpClientError(f"{name}: {e}") from None
            if isinstance(p, tftp.Error):
                raise TftpClientError(f"{name}: server error {p.code}: {p.message}")
            if isinstance(p, tftp.OAck):
                bs, win = int(p.options.get("blksize", 512)), int(p.options.get("windowsize", 1))
                last_ack = tftp.ack(0)
                s.sendto(last_ack, peer)
                continue
            if not isinstance(p, tftp.Data):
                raise TftpClientError(f"{name}: unexpected {type(p).__name__.upper()}")
            tries = 0
            if p.block != expect % 65536:
                # a gap (lost packet) or a duplicate: ack what we have so the server resends from there
                if since_ack:
                    last_ack = tftp.ack(expect - 1)
                    s.sendto(last_ack, peer)
                    since_ack = 0
                continue
            payload = p.data
            out.append(payload)
            since_ack += 1
            final = len(payload) < bs
            if final or since_ack >= win:
                last_ack = tftp.ack(expect)
                s.sendto(last_ack, peer)
                since_ack = 0
            if final:
                return b"".join(out)
            expect += 1
    finally:
        s.close()
