"""The agent's boot blocks (its manifest, flow and device registry) with one plain GET each.

cidboot.store.gateway.client is the fetcher (rounds, backoff, liars dropped, HTTPS): it imports
`http.client`, and with it `ssl` and the `email` parser, ~50 M guest instructions under TCG
(~0.2 s of every agent's start) for three small blocks from the boot server that answered the
bootstrap a second ago. `fetch_block` first asks the first plain-HTTP gateway once, over a
socket of its own (HTTP/1.1, `Connection: close`, a Content-Length response only), and keeps
the bytes only if they hash to the CID (the store checks again as it writes them). Anything
else, an error, a timeout, another framing, a non-200, bytes that do not match, an HTTPS gateway,
falls back to the full client, imported then, which asks every gateway again with its own
rules: the quick path can only save time, never accept a block the client would refuse.
"""

from __future__ import annotations

import logging
import socket
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from cidboot.errors import CidbootError

if TYPE_CHECKING:
    from cidboot.ipld.cid import CID
    from cidboot.store.blockstore import Blockstore

log = logging.getLogger("agent.blockfetch")


class QuickFetchFailed(CidbootError):
    """The one plain GET did not give a verified block (the full client is asked next)."""


def quick_get(cid: CID, gateway: str, *, timeout: float, max_size: int, user_agent: str) -> bytes:
    """`GET {gateway}/ipfs/{cid}?format=raw` once; the body only if it hashes to `cid`."""
    u = urlsplit(gateway)
    if u.scheme != "http" or not u.hostname:
        raise QuickFetchFailed(f"{gateway}: not a plain http:// gateway")
    host = u.hostname
    port = u.port or 80
    base = u.path.rstrip("/")
    deadline = time.monotonic() + timeout
    hostport = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    req = (f"GET {base}/ipfs/{cid}?format=raw HTTP/1.1\r\nHost: {hostport}\r\n"
           f"Accept: application/vnd.ipld.raw\r\nUser-Agent: {user_agent}\r\nConnection: close\r\n\r\n").encode("ascii")
    try:
        # the host as bytes: a str makes getaddrinfo load the idna codec (and unicodedata)
        with socket.create_connection((host.encode("ascii"), port), timeout=timeout) as s:  # type: ignore[arg-type]
            s.sendall(req)
            buf = b""
            while b"\r\n\r\n" not in buf:
                buf += _recv(s, deadline)
                if len(buf) > 65536:
                    raise QuickFetchFailed(f"{gateway}: response headers too large")
            head, _, body = buf.partition(b"\r\n\r\n")
            lines = head.decode("iso-8859-1").split("\r\n")
            status = lines[0].split(" ", 2)
            if len(status) < 2 or status[1] != "200":
                raise QuickFetchFailed(f"{gateway}: {lines[0][:80]!r}")
            headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
            length = headers.get("content-length", "")
            if "transfer-encoding" in headers or not length.isdigit() or int(length) > max_size:
                raise QuickFetchFailed(f"{gateway}: not a Content-Length response within {max_size} bytes")
            n = int(length)
            while len(body) < n:
                body += _recv(s, deadline)
    except (OSError, UnicodeError, ValueError) as e:
        raise QuickFetchFailed(f"{gateway}: {type(e).__name__}: {e}") from None
    if len(body) != n or not cid.multihash.matches(body):
        raise QuickFetchFailed(f"{gateway}: the bytes do not match {cid}")
    return body


def _recv(s: socket.socket, deadline: float) -> bytes:
    left = deadline - time.monotonic()
    if left <= 0:
        raise TimeoutError("no complete response in time")
    s.settimeout(left)
    data = s.recv(65536)
    if not data:
        raise ConnectionError("closed before the response was complete")
    return data


def fetch_block(cid: CID, gateways: Sequence[str], store: Blockstore, *, timeout: float, max_size: int,
                user_agent: str) -> bytes:
    """A verified block, stored: one plain GET from the first gateway, else the full gateway
    client (cidboot.store.gateway.client.fetch_block, whose BlockUnavailable the caller handles)."""
    if gateways and not store.has(cid):
        try:
            data = quick_get(cid, gateways[0], timeout=timeout, max_size=max_size, user_agent=user_agent)
            store.put(cid, data)  # verifies again as it writes
            return data
        except CidbootError as e:
            log.info("%s: asking every gateway with the full client: %s", cid, e)
    from cidboot.store.gateway import client

    return client.fetch_block(cid, tuple(gateways), store, timeout=timeout, max_size=max_size, user_agent=user_agent)
