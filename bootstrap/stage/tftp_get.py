"""A minimal TFTP read client (RFC 1350, octet mode) for the unmeasured path.

Booted by a plain iPXE ROM, the bootstrap has no hand-off and must fetch its boot config itself
from the `cidboot.config=tftp://SERVER/PATH` its command line names. The image carries no tftpy
(the firmware's client), and a boot config is a few hundred bytes, so 512-byte lock-step blocks
are plenty: no options are negotiated.

The client drives recovery, as the RFC has it: after `timeout` seconds without the next DATA it
re-sends its last packet (the RRQ or the last ACK), up to `retries` times in a row.
"""

from __future__ import annotations

import socket
import struct
from urllib.parse import urlsplit

from cidboot.errors import CidbootError

RRQ, DATA, ACK, ERROR = 1, 3, 4, 5
BLOCK = 512
MAX_FILE = 1 << 20  # a boot config; anything bigger is not what we asked for


class TftpError(CidbootError):
    """The transfer failed: the server's ERROR packet, no answer after every retry, or too big."""


def parse_url(url: str) -> tuple[str, int, str]:
    """(host, port, path) of tftp://HOST[:PORT]/PATH; anything else is refused."""
    u = urlsplit(url)
    if u.scheme != "tftp" or not u.hostname or not u.path.strip("/"):
        raise TftpError(f"only tftp://HOST/PATH URLs are supported, got {url!r}")
    return u.hostname, u.port or 69, u.path.lstrip("/")


def tftp_get(host: str, path: str, *, port: int = 69, timeout: float = 1.0, retries: int = 8,
             max_size: int = MAX_FILE) -> bytes:
    """Read one file into memory. Raises TftpError."""
    rrq = struct.pack(">H", RRQ) + path.encode() + b"\0octet\0"
    out = bytearray()
    expect = 1
    server: tuple[str, int] | None = None  # the server's transfer ID (its new port), fixed by the first DATA
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(timeout)
        dest = (socket.gethostbyname(host), port)
        last = rrq
        s.sendto(last, dest)
        misses = 0
        while True:
            try:
                pkt, addr = s.recvfrom(4 + BLOCK + 64)
            except TimeoutError:
                misses += 1
                if misses > retries:
                    raise TftpError(f"tftp://{host}/{path}: no answer after {retries} retries "
                                    f"(block {expect})") from None
                s.sendto(last, server or dest)
                continue
            if addr[0] != dest[0] or (server is not None and addr != server) or len(pkt) < 4:
                continue  # another host, an old transfer, or garbage: RFC 1350 says ignore (or ERROR 5)
            op, num = struct.unpack(">HH", pkt[:4])
            if op == ERROR:
                msg = pkt[4:].split(b"\0", 1)[0].decode(errors="replace")
                raise TftpError(f"tftp://{host}/{path}: server error {num}: {msg}")
            if op != DATA:
                continue
            server = server or addr
            if num != expect % 65536:
                if num == (expect - 1) % 65536:
                    s.sendto(last, server)  # our ACK was lost: the server re-sent the previous block
                continue
            misses = 0
            data = pkt[4:]
            out += data
            if len(out) > max_size:
                raise TftpError(f"tftp://{host}/{path}: more than {max_size} bytes")
            last = struct.pack(">HH", ACK, num)
            s.sendto(last, server)
            if len(data) < BLOCK:
                return bytes(out)
            expect += 1


def tftp_get_url(url: str, *, timeout: float = 1.0, retries: int = 8, max_size: int = MAX_FILE) -> bytes:
    """`tftp_get` for a tftp://HOST[:PORT]/PATH URL (the `cidboot.config=` form)."""
    host, port, path = parse_url(url)
    return tftp_get(host, path, port=port, timeout=timeout, retries=retries, max_size=max_size)
