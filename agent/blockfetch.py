"""The agent's boot blocks (its manifest, flow and device registry) with one plain GET each.

cidboot.store.gateway.client is the fetcher (rounds, backoff, liars dropped, HTTPS, whole DAGs
as CARs); the agent needs three small blocks from the boot server that answered the bootstrap
a second ago, before `agent ready`, where every module and round costs under TCG.
`fetch_block` first asks the first plain-HTTP gateway once, with the client's own HTTP/1.1
exchange (cidboot.store.gateway.wire; a Content-Length response only), and keeps the bytes
only if they hash to the CID (the store checks again as it writes them). Anything
else, an error, a timeout, another framing, a non-200, bytes that do not match, an HTTPS gateway,
falls back to the full client, imported then, which asks every gateway again with its own
rules: the quick path can only save time, never accept a block the client would refuse.
"""

from __future__ import annotations

import logging
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
    """`GET {gateway}/ipfs/{cid}?format=raw` once (the client's own HTTP/1.1 exchange,
    cidboot.store.gateway.wire); the body only if it hashes to `cid`."""
    from cidboot.store.gateway.wire import Connection, ResponseError

    u = urlsplit(gateway)
    if u.scheme != "http" or not u.hostname:
        raise QuickFetchFailed(f"{gateway}: not a plain http:// gateway")
    conn = Connection(u.hostname, u.port, tls=False, timeout=timeout)
    try:
        conn.request(f"{u.path.rstrip('/')}/ipfs/{cid}?format=raw",
                     {"Accept": "application/vnd.ipld.raw", "User-Agent": user_agent})
        resp = conn.getresponse()
        if resp.status != 200:
            raise QuickFetchFailed(f"{gateway}: {resp.status} {resp.reason[:80]}")
        length = resp.getheader("content-length") or ""
        if resp.chunked or not length.isdigit() or int(length) > max_size:
            raise QuickFetchFailed(f"{gateway}: not a Content-Length response within {max_size} bytes")
        body = resp.read(int(length))
    except (OSError, ResponseError) as e:
        raise QuickFetchFailed(f"{gateway}: {type(e).__name__}: {e}") from None
    finally:
        conn.close()
    if len(body) != int(length):
        raise QuickFetchFailed(f"{gateway}: the body was cut at {len(body)} of its {length} bytes")
    if not cid.multihash.matches(body):
        raise QuickFetchFailed(f"{gateway}: the bytes do not match {cid}")
    return body


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
