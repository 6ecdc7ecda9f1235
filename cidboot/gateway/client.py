"""Verifying fetch client: get a whole DAG by CID from untrusted trustless gateways.

Trust comes only from the CID: every block is hashed and checked before it is stored, and
only blocks reachable from the root being fetched are accepted. Gateways are tried in order;
one that sends a wrong or unrequested block is dropped for the rest of the fetch, one that
stalls (no bytes for `timeout` seconds) or fails is skipped until the next round. Blocks land
in a local `Blockstore`, so an interrupted fetch resumes where it stopped.
"""

from __future__ import annotations

import http.client
import logging
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from cidboot import dag
from cidboot.blockstore import Blockstore
from cidboot.car import CarReader
from cidboot.cid import CID, RAW
from cidboot.errors import CidbootError, FormatError, VerificationError
from cidboot.unixfs.exporter import export_file

log = logging.getLogger("cidboot.gateway.client")


class GatewayError(CidbootError):
    """One gateway failed one request (HTTP error, timeout, cut stream)."""


class BadGateway(VerificationError):
    """A gateway sent bytes that do not verify or that were not asked for."""


class AllGatewaysFailed(CidbootError):
    """No gateway could deliver the DAG; the message lists each gateway and why."""


@dataclass
class FetchResult:
    root: CID
    blocks_fetched: int = 0
    bytes_fetched: int = 0
    blocks_present: int = 0  # already in the local store when the fetch started (resumed)
    dropped: dict[str, str] = field(default_factory=dict)  # gateway -> why it was dropped
    errors: list[str] = field(default_factory=list)


def _connect(base: str, timeout: float) -> tuple[http.client.HTTPConnection, str]:
    u = urlsplit(base)
    if u.scheme not in ("http", "https") or not u.hostname:
        raise GatewayError(f"gateway URL must be http(s)://host[:port][/prefix], got {base!r}")
    cls = http.client.HTTPSConnection if u.scheme == "https" else http.client.HTTPConnection
    return cls(u.hostname, u.port, timeout=timeout), u.path.rstrip("/")


class _Session:
    """One fetch of one root: the wanted set, the dropped gateways, the counters."""

    def __init__(self, root: CID, gateways: list[str], store: Blockstore, timeout: float) -> None:
        self.root, self.gateways, self.store, self.timeout = root, gateways, store, timeout
        self.result = FetchResult(root)
        self.last_present = 0

    def missing(self) -> list[CID]:
        """Walk what is local; return the frontier of CIDs not yet present (in DAG order)."""
        out: list[CID] = []
        seen: set[bytes] = set()
        stack = [self.root]
        present = 0
        while stack:
            cid = stack.pop()
            key = cid.multihash.encode()
            if key in seen:
                continue
            seen.add(key)
            if not self.store.has(cid):
                out.append(cid)
                continue
            present += 1
            if cid.codec != RAW:  # raw blocks link nowhere: no need to read them back
                stack.extend(reversed(dag.links(cid, self.store.get(cid))))
        self.last_present = present
        return out

    def _request(self, gw: str, target: str, accept: str) -> http.client.HTTPResponse:
        conn, prefix = _connect(gw, self.timeout)
        try:
            conn.request("GET", prefix + target, headers={"Accept": accept, "User-Agent": "cidboot"})
            resp = conn.getresponse()
        except OSError as e:
            conn.close()
            raise GatewayError(f"{gw}: {type(e).__name__}: {e}") from None
        if resp.status != 200:
            body = resp.read(200).decode(errors="replace").strip()
            conn.close()
            raise GatewayError(f"{gw}{target}: HTTP {resp.status} {body}")
        return resp

    def fetch_car(self, gw: str, sub_root: CID) -> None:
        """Fetch the subtree under `sub_root` as one CAR, accepting only blocks it links to."""
        resp = self._request(gw, f"/ipfs/{sub_root}?format=car&dag-scope=all", "application/vnd.ipld.car")
        wanted: set[bytes] = {sub_root.multihash.encode()}
        try:
            reader = CarReader(resp, verify=False)
            for cid, data in reader:
                key = cid.multihash.encode()
                if key not in wanted:
                    raise BadGateway(f"{gw} sent block {cid}, which is not linked from what was fetched")
                try:
                    self.store.put(cid, data)  # hashes the block first: nothing unverified is stored
                except VerificationError as e:
                    raise BadGateway(f"{gw} sent a block that does not match its CID: {e}") from None
                self.result.blocks_fetched += 1
                self.result.bytes_fetched += len(data)
                for link in dag.links(cid, data):
                    wanted.add(link.multihash.encode())
        except (OSError, http.client.HTTPException) as e:
            raise GatewayError(f"{gw}: stream broke or stalled: {type(e).__name__}: {e}") from None
        except FormatError as e:
            if isinstance(e, VerificationError):
                raise
            raise GatewayError(f"{gw}: bad CAR stream: {e}") from None
        finally:
            resp.close()

    def fetch_raw(self, gw: str, cid: CID) -> bytes:
        resp = self._request(gw, f"/ipfs/{cid}?format=raw", "application/vnd.ipld.raw")
        try:
            data = resp.read()
        except (OSError, http.client.HTTPException) as e:
            raise GatewayError(f"{gw}: read of {cid} broke or stalled: {e}") from None
        finally:
            resp.close()
        try:
            self.store.put(cid, data)  # hashes the block; nothing unverified is stored
        except VerificationError as e:
            raise BadGateway(f"{gw} sent a block that does not match its CID: {e}") from None
        self.result.blocks_fetched += 1
        self.result.bytes_fetched += len(data)
        return data


def fetch(
    root: CID | str,
    gateways: list[str],
    dest: Blockstore | str | os.PathLike[str],
    *,
    timeout: float = 10.0,
    retries: int | None = None,
    rounds: int = 3,
    backoff: float = 0.5,
) -> FetchResult:
    """Fetch the whole DAG under `root` into `dest` (a Blockstore, or a directory to open one
    in), verifying every block.

    Each round walks what is already local and asks the gateways (in order) for each missing
    subtree as a CAR, falling back to single raw blocks when a gateway cannot do CARs. Rounds
    repeat while they make progress; `retries` (alias `rounds`) passes that get nothing are
    allowed, with exponential `backoff` between them, before AllGatewaysFailed.
    """
    root = CID.parse(root)
    store = dest if isinstance(dest, Blockstore) else Blockstore(dest)
    if retries is not None:
        rounds = retries
    if rounds < 1:
        raise GatewayError(f"retries must be at least 1, got {rounds}")
    if not gateways:
        raise AllGatewaysFailed(f"no gateways given to fetch {root}")
    with store.deferred_sync():
        return _fetch(root, gateways, store, timeout, rounds, backoff)


def _fetch(root: CID, gateways: list[str], store: Blockstore, timeout: float, rounds: int, backoff: float) -> FetchResult:
    s = _Session(root, list(gateways), store, timeout)
    last: dict[str, str] = {}
    failed_rounds = 0
    first = True
    while True:
        frontier = s.missing()
        if first:
            s.result.blocks_present = s.last_present
            first = False
        if not frontier:
            return s.result
        progressed = False
        for sub in frontier:  # grows while iterating: children of blocks fetched one by one
            if store.has(sub):
                continue
            for gw in s.gateways:
                if gw in s.result.dropped:
                    continue
                try:
                    try:
                        s.fetch_car(gw, sub)
                    except GatewayError as e:
                        if not store.has(sub) and " 406 " not in str(e) and " 400 " not in str(e):
                            raise
                        if not store.has(sub):  # a block-only gateway: one block at a time
                            frontier.extend(dag.links(sub, s.fetch_raw(gw, sub)))
                    progressed = True
                    break
                except BadGateway as e:
                    s.result.dropped[gw] = str(e)
                    log.warning("dropping gateway %s for this fetch: %s", gw, e)
                except GatewayError as e:
                    last[gw] = str(e)
                    s.result.errors.append(str(e))
                    log.info("gateway %s failed, trying the next: %s", gw, e)
                    if store.has(sub):
                        progressed = True  # partial CAR: the next round resumes below it
                        break
        if progressed:
            continue  # only rounds that got nothing count as retries, and only they wait
        failed_rounds += 1
        if failed_rounds >= rounds or all(g in s.result.dropped for g in s.gateways):
            break
        time.sleep(backoff * (2 ** (failed_rounds - 1)))
    reasons = {**last, **s.result.dropped}
    detail = "; ".join(f"{g}: {reasons.get(g, 'no answer')}" for g in s.gateways)
    raise AllGatewaysFailed(f"could not fetch {root} ({len(s.missing())} subtrees missing): {detail}")


def fetch_bytes(
    root: CID | str, gateways: list[str], store: Blockstore | None = None, *, timeout: float = 10.0
) -> Iterator[bytes]:
    """Fetch a UnixFS file (verified, into `store`, by default the default store) and yield
    its bytes. The blocks land in a store first so a re-run resumes instead of starting over."""
    root = CID.parse(root)
    store = store if store is not None else Blockstore()
    fetch(root, gateways, store, timeout=timeout)
    return export_file(root, store.get)


class BlockUnavailable(AllGatewaysFailed):
    """No gateway delivered one block; `liars` says whether any sent bytes that do not match."""

    def __init__(self, cid: CID, reasons: list[str], lied: bool) -> None:
        self.cid, self.reasons, self.lied = cid, reasons, lied
        super().__init__(f"{'hash mismatch' if lied else 'unavailable'}: " + "; ".join(reasons or ["no gateways"]))


def fetch_block(cid: CID, gateways: list[str] | tuple[str, ...], store: Blockstore, *, timeout: float = 10.0,
                max_size: int = 1 << 22, rounds: int = 3, backoff: float = 0.5, user_agent: str = "cidboot") -> bytes:
    """One block by CID (`?format=raw`), gateways in order; only bytes that hash to `cid` are
    kept (in `store`). For the small blocks a boot stage reads alone before anything else (the
    manifest, the flow, the device registry). A gateway that lied is dropped; ones that only
    failed get `rounds` passes with doubling `backoff` between them, so a LAN hiccup does not
    cost a whole boot. Raises BlockUnavailable naming what each gateway did."""
    if store.has(cid):
        return store.get(cid)
    liars: set[str] = set()
    why: list[str] = []
    for n in range(rounds):
        if n:
            time.sleep(backoff * 2 ** (n - 1))
        data, why = _fetch_block_once(cid, [g for g in gateways if g not in liars], store, timeout, max_size, liars,
                                      user_agent)
        if data is not None:
            return data
        if len(liars) == len(gateways):
            break
    raise BlockUnavailable(cid, why, bool(liars))


def _fetch_block_once(cid: CID, gateways: list[str], store: Blockstore, timeout: float, max_size: int,
                      liars: set[str], user_agent: str) -> tuple[bytes | None, list[str]]:
    why = [f"{g}: sent bytes that do not match the CID" for g in sorted(liars)]
    for gw in gateways:
        try:
            conn, prefix = _connect(gw, timeout)
        except GatewayError as e:
            why.append(str(e))
            continue
        try:
            conn.request("GET", f"{prefix}/ipfs/{cid}?format=raw",
                         headers={"Accept": "application/vnd.ipld.raw", "User-Agent": user_agent})
            resp = conn.getresponse()
            if resp.status != 200:
                why.append(f"{gw}: HTTP {resp.status}")
                continue
            data = resp.read(max_size + 1)
        except (OSError, http.client.HTTPException) as e:
            why.append(f"{gw}: {type(e).__name__}: {e}")
            continue
        finally:
            conn.close()
        if len(data) > max_size:
            why.append(f"{gw}: more than {max_size} bytes")
            continue
        try:
            store.put(cid, data)
        except VerificationError:
            liars.add(gw)
            why.append(f"{gw}: sent bytes that do not match the CID")
            continue
        return data, why
    return None, why
