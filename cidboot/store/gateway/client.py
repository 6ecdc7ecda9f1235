"""Verifying fetch client: get a whole DAG by CID from untrusted trustless gateways.

Trust comes only from the CID: every block is hashed and checked before it is stored, and
only blocks reachable from the root being fetched are accepted. Gateways are tried in order;
one that sends a wrong or unrequested block is dropped for the rest of the fetch, one that
stalls (no bytes for `timeout` seconds) or fails is skipped until the next round. Blocks land
in a local `Blockstore`, so an interrupted fetch resumes where it stopped.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from cidboot.errors import CidbootError, VerificationError
from cidboot.ipld import dag
from cidboot.ipld.car import CarReader
from cidboot.ipld.cid import CID, RAW
from cidboot.ipld.unixfs.exporter import export_file
from cidboot.store.blockstore import MAX_BLOCK, AnyStore, Blockstore, Buffer, MemoryBlockstore
from cidboot.store.gateway.wire import Connection, ResponseError
from cidboot.store.packs import FLATFS_FIRST


class _Log:
    """`logging.getLogger("cidboot.store.gateway.client")`, imported on the first message: a
    boot stage that fetches without a warning never imports logging (~15 ms of instructions
    of the bootstrap's start-up under TCG)."""

    @staticmethod
    def _emit(level: str, msg: str, *args: object) -> None:
        import logging

        getattr(logging.getLogger("cidboot.store.gateway.client"), level)(msg, *args, stacklevel=3)

    def warning(self, msg: str, *args: object) -> None:
        self._emit("warning", msg, *args)

    def info(self, msg: str, *args: object) -> None:
        self._emit("info", msg, *args)


log = _Log()

#: HTTP statuses that mean "this gateway does not do CARs", so its raw blocks are tried instead
CAR_REFUSED = (400, 406, 501)


class GatewayError(CidbootError):
    """One gateway failed one request (HTTP error, timeout, cut stream, too much data).

    `gateway` is the gateway's URL ("" when none is involved), `status` the HTTP status when
    the gateway answered one; code reacts to these, never to the message text."""

    def __init__(self, message: str, *, gateway: str = "", status: int | None = None) -> None:
        super().__init__(f"{gateway}: {message}" if gateway else message)
        self.gateway, self.status = gateway, status


class GatewayTimeout(GatewayError):
    """The gateway did not deliver one block within the per-block deadline (however it dripped)."""


class GatewayUnreachable(GatewayError):
    """The transport failed (refused, reset, cut before an answer): the gateway is likely down,
    not merely missing a block, so it is skipped for the rest of the fetch."""


class ResponseTooLarge(GatewayError):
    """The gateway sent (or announced) more bytes than the CID asked for can have."""


class BadGateway(VerificationError):
    """A gateway sent bytes that do not verify or that were not asked for."""

    def __init__(self, message: str, *, gateway: str = "") -> None:
        super().__init__(f"{gateway} {message}" if gateway else message)
        self.gateway = gateway


class AllGatewaysFailed(CidbootError):
    """No gateway could deliver the DAG; the message lists each gateway and why, `causes` holds
    the last error of each gateway (GatewayError or BadGateway) for code to look at."""

    def __init__(self, message: str, causes: list[CidbootError] | None = None) -> None:
        super().__init__(message)
        self.causes: list[CidbootError] = list(causes or [])

    @property
    def lied(self) -> bool:
        """Whether any gateway sent bytes that do not match what was asked for."""
        return any(isinstance(c, BadGateway) for c in self.causes)


@dataclass
class FetchResult:
    """What one fetch did: blocks and bytes it pulled, what was already local, and which gateways
    it dropped or found down and why (the CLI's summary and the bootstrap's console line)."""

    root: CID
    blocks_fetched: int = 0
    bytes_fetched: int = 0
    blocks_present: int = 0  # already in the local store when the fetch started (resumed)
    dropped: dict[str, str] = field(default_factory=dict)  # gateway -> why it was dropped
    down: dict[str, str] = field(default_factory=dict)  # gateway -> why it was last marked down (timeout, refused)
    errors: list[str] = field(default_factory=list)


def block_size_limit(cid: CID, max_size: int = MAX_BLOCK) -> int:
    """The most bytes a gateway may send for `cid`: what an identity CID carries, else the block
    size limit (no store accepts more, and a gateway may not make us read more)."""
    if cid.is_identity:
        return len(cid.multihash.digest)
    return min(max_size, MAX_BLOCK)


def _connect(base: str, timeout: float) -> tuple[Connection, str]:
    u = urlsplit(base)
    try:
        port = u.port
    except ValueError:
        port = -1
    if u.scheme not in ("http", "https") or not u.hostname or port == -1:
        raise GatewayError(f"gateway URL must be http(s)://host[:port][/prefix], got {base!r}", gateway=base)
    return Connection(u.hostname, port, tls=u.scheme == "https", timeout=timeout), u.path.rstrip("/")


class _Watchdog:
    """A wall-clock deadline on one connection: when it passes, the socket is shut down, so a
    read blocked on a gateway that drips a byte just inside the per-read timeout returns.

    `arm(seconds)` (re)starts the deadline: once per block, so a CAR of many blocks may take as
    long as it needs while each block must arrive within `seconds`."""

    def __init__(self) -> None:
        self.sock: socket.socket | None = None  # set once connected (the connection forgets it
        self.expired = False  # when it hands an HTTP/1.0 body to the response)
        self._deadline: float | None = None
        self._stop = False
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._run, name="gateway-deadline", daemon=True)
        self._thread.start()

    def arm(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        with self._cond:
            # A later deadline needs no wake-up: the thread, waking at the old one, sees the new
            # one and sleeps on. Waking it per block of a CAR cost a thread switch per block.
            earlier = self._deadline is None or deadline < self._deadline
            self._deadline = deadline
            if earlier:
                self._cond.notify()

    def close(self) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify()

    def _run(self) -> None:
        with self._cond:
            while not self._stop:
                if self._deadline is None:
                    self._cond.wait()
                    continue
                left = self._deadline - time.monotonic()
                if left > 0:
                    self._cond.wait(left)
                    continue
                self.expired = True
                sock = self.sock
                if sock is not None:
                    try:
                        sock.shutdown(socket.SHUT_RDWR)
                    except OSError:
                        pass
                return


class _Request:
    """One GET to one gateway under a watchdog; every failure is a GatewayError with `status`."""

    def __init__(self, gw: str, target: str, accept: str, timeout: float, user_agent: str) -> None:
        self.gw, self.target, self.timeout = gw, target, timeout
        self.conn, prefix = _connect(gw, timeout)
        self.watchdog = _Watchdog()
        self.watchdog.arm(timeout)
        try:
            self.conn.connect()
            self.watchdog.sock = self.conn.sock
            if self.watchdog.expired:
                raise TimeoutError("connect took the whole deadline")
            self.conn.request(prefix + target, {"Accept": accept, "User-Agent": user_agent})
            self.resp = self.conn.getresponse()
        except (OSError, ResponseError) as e:
            self.close()
            raise self.failure(e) from None
        if self.resp.status != 200:
            try:
                body = self.resp.read(200).decode(errors="replace").strip()
            except (OSError, ResponseError):
                body = ""
            status = self.resp.status
            self.close()
            raise GatewayError(f"{target}: HTTP {status} {body}", gateway=gw, status=status)
        # The body is read with no socket timeout: the watchdog bounds every block (it shuts the
        # socket down, and the blocked read returns), and a socket with a timeout makes CPython
        # poll() before every recv, one more system call per read (~2,000 per 256 MiB).
        sock = self.conn.sock
        if sock is not None:
            sock.settimeout(None)

    def failure(self, e: BaseException) -> GatewayError:
        """What went wrong, typed: the deadline, or the transport. Until the answer's headers are
        in, the socket's own timeout is the same length as the deadline, so whichever fires first
        (under load the watchdog's thread may wake after the read timed out) it is the same
        stall; the body is bounded by the watchdog alone (see __init__)."""
        if self.watchdog.expired or isinstance(e, TimeoutError):
            return GatewayTimeout(f"{self.target}: stalled: no block within {self.timeout} s (deadline per block)",
                                  gateway=self.gw)
        return GatewayUnreachable(f"{self.target}: {type(e).__name__}: {e}", gateway=self.gw)

    def read_block(self, limit: int) -> bytes:
        """The whole body, at most `limit` bytes (more, announced or sent, is ResponseTooLarge)."""
        length = self.resp.getheader("Content-Length")
        if length is not None and length.strip().isdigit() and int(length) > limit:
            raise ResponseTooLarge(f"{self.target}: announces {int(length)} bytes, the CID allows at most {limit}",
                                   gateway=self.gw)
        try:
            data = self.resp.read(limit + 1)
        except (OSError, ResponseError) as e:
            raise self.failure(e) from None
        if self.watchdog.expired:
            raise self.failure(TimeoutError())
        if len(data) > limit:
            raise ResponseTooLarge(f"{self.target}: more than {limit} bytes, the most the CID allows",
                                   gateway=self.gw)
        return data

    def close(self) -> None:
        self.watchdog.close()
        self.conn.close()


def _store_verified(store: AnyStore, gw: str, cid: CID, data: Buffer, key: bytes | None = None) -> None:
    """Put `data` under `cid` (the store hashes it first): a mismatch is the gateway lying.
    `key`: the CID's encoded multihash, for a batch writer (one encoding per block)."""
    try:
        batch = store._batch if isinstance(store, Blockstore) else None
        if batch is not None:
            batch.put(cid, data, key)
        else:
            store.put(cid, data)
    except VerificationError as e:
        raise BadGateway(f"sent a block that does not match its CID: {e}", gateway=gw) from None
    except CidbootError as e:
        raise GatewayError(f"block {cid} refused by the store: {e}", gateway=gw) from None


def _check(gw: str, cid: CID, data: Buffer) -> None:
    """`data` hashes to `cid`, or the gateway lied."""
    try:
        cid.verify(data)
    except VerificationError as e:
        raise BadGateway(f"sent a block that does not match its CID: {e}", gateway=gw) from None


def _intact(store: AnyStore, cid: CID) -> bytes | None:
    """The local copy of `cid` if present and verifying; a damaged copy counts as missing (the
    fetch that follows overwrites it)."""
    if not store.has(cid):
        return None
    try:
        return store.get(cid)
    except VerificationError:
        log.warning("local copy of %s is damaged: fetching it again", cid)
        return None
    except FileNotFoundError:
        return None


class _Session:
    """One fetch of one root: the wanted set, the dropped gateways, the counters, and what this
    fetch has already verified: each block is hashed once (as it arrives, or when first read
    back from the store on a resumed fetch) and its links kept, so later walks of the DAG read
    neither the block nor its hash again."""

    def __init__(self, root: CID, gateways: list[str], store: AnyStore, timeout: float) -> None:
        self.root, self.gateways, self.store, self.timeout = root, gateways, store, timeout
        self.known: dict[bytes, list[CID]] = {}  # multihash -> links, for blocks verified in this fetch
        self.result = FetchResult(root)
        self.last_present = 0
        self.down: set[str] = set()  # marked down (timeout, refused): skipped while another gateway is left

    def live(self) -> list[str]:
        """The gateways to ask, in order: neither dropped (lied) nor marked down. When every one
        left is down they all get another chance (a lone gateway on a lossy link must not fail
        the fetch on its first timeout)."""
        live = [g for g in self.gateways if g not in self.result.dropped and g not in self.down]
        if not live:
            self.down.clear()
            live = [g for g in self.gateways if g not in self.result.dropped]
        return live

    def missing(self) -> list[CID]:
        """Walk what is local (verifying it); return the frontier of CIDs not yet present or
        damaged (in DAG order)."""
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
            if not self.intact(cid):
                out.append(cid)
                continue
            present += 1
            stack.extend(reversed(self.known[key]))
        self.last_present = present
        return out

    def intact(self, cid: CID) -> bool:
        """Whether `cid` is verified in this fetch or intact in the store (verified once, then
        its links are remembered)."""
        key = cid.multihash.encode()
        if key in self.known:
            return True
        block = _intact(self.store, cid)
        if block is None:
            return False
        self.known[key] = dag.links(cid, block)
        return True

    def accept(self, gw: str, cid: CID, data: Buffer, key: bytes | None = None) -> list[CID]:
        """Verify `data` as `cid` (once), store it, remember its links; return them. `data` may
        be a view of the CAR reader's buffer: the store copies or writes it before returning,
        and the links are read before the next block overwrites it. `key`: the CID's encoded
        multihash when the caller has it."""
        if key is None:
            key = cid.multihash.encode()
        if key in self.known:  # sent again (the root of a whole-DAG CAR): verify it, store nothing new
            _check(gw, cid, data)
            return self.known[key]
        _store_verified(self.store, gw, cid, data, key)  # nothing unverified is stored (hashed by put)
        # after put: a lent buffer stays as it is until the next block is read into it (this thread)
        links = [] if cid.codec == RAW else dag.links(cid, bytes(data))
        self.known[key] = links
        self.result.blocks_fetched += 1
        self.result.bytes_fetched += len(data)
        return links

    def fetch_car(self, gw: str, sub_root: CID) -> None:
        """Fetch the subtree under `sub_root` as one CAR, accepting only blocks it links to,
        each new, each within the block size limit and the per-block deadline."""
        req = _Request(gw, f"/ipfs/{sub_root}?format=car&dag-scope=all", "application/vnd.ipld.car",
                       self.timeout, "cidboot")
        wanted: set[bytes] = {sub_root.multihash.encode()}
        got: set[bytes] = set()
        try:
            reader = CarReader(req.resp, verify=False, max_block_size=MAX_BLOCK)
            batch = self.store._batch if isinstance(self.store, Blockstore) else None
            arm, timeout = req.watchdog.arm, self.timeout
            # each block read into a buffer the store's batch writer lends (and takes back, written),
            # or into one reused buffer (a memory store copies what it keeps); hashed by put
            for cid, data in reader.views(batch.buffer if batch is not None else None):
                key = cid.multihash.encode()
                if key not in wanted:
                    raise BadGateway(f"sent block {cid}, which is not linked from what was fetched", gateway=gw)
                if key in got:
                    raise GatewayError(f"sent block {cid} twice in one CAR", gateway=gw)
                got.add(key)
                links = self.accept(gw, cid, data, key)
                if links:
                    wanted.update(link.multihash.encode() for link in links)
                    if batch is not None and len(wanted) > FLATFS_FIRST:  # more blocks coming than go to
                        batch.expect_many()  # flatfs files: the rest straight to the pack
                arm(timeout)  # the next block gets its own deadline
            if req.watchdog.expired:
                raise req.failure(TimeoutError())
        except (OSError, ResponseError) as e:
            raise req.failure(e) from None
        except (BadGateway, GatewayError):
            raise
        except CidbootError as e:
            if req.watchdog.expired:
                raise req.failure(e) from None
            raise GatewayError(f"bad CAR stream: {type(e).__name__}: {e}", gateway=gw) from None
        finally:
            req.close()

    def fetch_raw(self, gw: str, cid: CID) -> list[CID]:
        """`cid` alone from a gateway that does not do CARs; returns its links."""
        req = _Request(gw, f"/ipfs/{cid}?format=raw", "application/vnd.ipld.raw", self.timeout, "cidboot")
        try:
            data = req.read_block(block_size_limit(cid, MAX_BLOCK))
        finally:
            req.close()
        return self.accept(gw, cid, data)


def _get_block(gw: str, cid: CID, store: AnyStore, timeout: float, max_size: int, user_agent: str) -> bytes:
    """One block as `?format=raw` from one gateway, bounded in size and wall-clock time, verified
    and stored. Raises GatewayError (any failure) or BadGateway (bytes that do not match)."""
    req = _Request(gw, f"/ipfs/{cid}?format=raw", "application/vnd.ipld.raw", timeout, user_agent)
    try:
        data = req.read_block(block_size_limit(cid, max_size))
    finally:
        req.close()
    _store_verified(store, gw, cid, data)
    return data


def fetch(
    root: CID | str,
    gateways: list[str],
    dest: AnyStore | str | os.PathLike[str],
    *,
    timeout: float = 10.0,
    retries: int | None = None,
    rounds: int = 3,
    backoff: float = 0.5,
) -> FetchResult:
    """Fetch the whole DAG under `root` into `dest` (a Blockstore, or a directory to open one
    in, or a MemoryBlockstore), verifying every block exactly once: a CAR is read as it
    streams, each block into a buffer the store's BatchWriter lends (`CarReader.views`),
    hashed there and queued to the writer's thread, which writes it from there while the next
    block is read, then lends the buffer again (a memory store copies what it keeps); one sync
    at the end.

    Each round walks what is already local and asks the gateways (in order) for each missing
    subtree as a CAR, falling back to single raw blocks when a gateway cannot do CARs. A gateway
    that times out or cannot be reached is marked down and skipped for the rest of the fetch
    while another gateway is left, so one that dies mid-fetch costs one timeout. Rounds
    repeat while they make progress; `retries` (alias `rounds`) passes that get nothing are
    allowed, with exponential `backoff` between them, before AllGatewaysFailed.
    """
    root = CID.parse(root)
    store = dest if isinstance(dest, (Blockstore, MemoryBlockstore)) else Blockstore(dest)
    if retries is not None:
        rounds = retries
    if rounds < 1:
        raise GatewayError(f"retries must be at least 1, got {rounds}")
    if not gateways:
        raise AllGatewaysFailed(f"no gateways given to fetch {root}")
    with store.writer():
        return _fetch(root, gateways, store, timeout, rounds, backoff)


def _fetch(root: CID, gateways: list[str], store: AnyStore, timeout: float, rounds: int, backoff: float) -> FetchResult:
    s = _Session(root, list(gateways), store, timeout)
    last: dict[str, CidbootError] = {}
    failed_rounds = 0
    first = True
    while True:
        frontier = s.missing()
        if first:
            s.result.blocks_present = s.last_present
            first = False
            if len(frontier) > 1 and s.last_present == 1:
                _whole_dag(s, last)
                continue
        if not frontier:
            return s.result
        progressed = False
        for sub in frontier:  # grows while iterating: children of blocks fetched one by one
            if _intact(store, sub) is not None:
                continue
            for gw in s.live():
                try:
                    frontier.extend(_fetch_subtree(s, gw, sub))
                    progressed = True
                    break
                except BadGateway as e:
                    last[gw] = e
                    s.result.dropped[gw] = str(e)
                    log.warning("dropping gateway %s for this fetch: %s", gw, e)
                except GatewayError as e:  # every other failure: the next gateway
                    last[gw] = e
                    s.result.errors.append(str(e))
                    log.info("gateway %s failed, trying the next: %s", gw, e)
                    if isinstance(e, GatewayTimeout | GatewayUnreachable):
                        # dead or stalled, not just missing a block: one timeout, not one per block
                        s.down.add(gw)
                        s.result.down[gw] = str(e)
                        log.warning("gateway %s marked down for this fetch: %s", gw, e)
                    if _intact(store, sub) is not None:
                        progressed = True  # partial CAR: the next round resumes below it
                        break
        if progressed:
            continue  # only rounds that got nothing count as retries, and only they wait
        failed_rounds += 1
        if failed_rounds >= rounds or all(g in s.result.dropped for g in s.gateways):
            break
        time.sleep(backoff * (2 ** (failed_rounds - 1)))
    detail = "; ".join(str(last[g]) if g in last else f"{g}: no answer" for g in s.gateways)
    raise AllGatewaysFailed(f"could not fetch {root} ({len(s.missing())} subtrees missing): {detail}",
                            [last[g] for g in s.gateways if g in last])


def _whole_dag(s: _Session, last: dict[str, CidbootError]) -> None:
    """Only the root is local (a boot stage fetched it alone first, to check the size it declares
    before anything else): ask for the root's CAR, one request for the whole DAG, rather than one
    CAR per child of the root. The root comes again (one block, verified, not counted); a gateway
    that lies is dropped, any other failure leaves what arrived for the rounds that follow."""
    for gw in s.gateways:
        if gw in s.result.dropped:
            continue
        try:
            s.fetch_car(gw, s.root)
            return
        except BadGateway as e:
            last[gw] = e
            s.result.dropped[gw] = str(e)
            log.warning("dropping gateway %s for this fetch: %s", gw, e)
        except GatewayError as e:
            last[gw] = e
            s.result.errors.append(str(e))
            if e.status in CAR_REFUSED or s.result.blocks_fetched:
                return  # a block-only gateway, or a partial CAR: the rounds take it from here
        except (CidbootError, OSError, ResponseError) as e:
            last[gw] = GatewayError(f"{type(e).__name__}: {e}", gateway=gw)
            s.result.errors.append(str(last[gw]))


def _fetch_subtree(s: _Session, gw: str, sub: CID) -> list[CID]:
    """`sub`'s subtree from `gw` as a CAR; from a gateway that does not do CARs (its status says
    so), the block alone: then its links are returned for the caller to fetch one by one.
    Anything that goes wrong is a GatewayError or a BadGateway, never something else."""
    try:
        try:
            s.fetch_car(gw, sub)
            return []
        except GatewayError as e:
            if s.intact(sub) or e.status not in CAR_REFUSED:
                raise
        return s.fetch_raw(gw, sub)  # a block-only gateway: one block at a time
    except (GatewayError, BadGateway):
        raise
    except (CidbootError, OSError, ResponseError) as e:
        raise GatewayError(f"{type(e).__name__}: {e}", gateway=gw) from None


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
    """No gateway delivered one block; `causes` says what each did, `lied` whether any sent
    bytes that do not match (`reasons` is the same as text)."""

    def __init__(self, cid: CID, causes: list[CidbootError]) -> None:
        self.cid = cid
        self.reasons = [str(c) for c in causes]
        super().__init__(f"{'hash mismatch' if any(isinstance(c, BadGateway) for c in causes) else 'unavailable'}: "
                         + "; ".join(self.reasons or ["no gateways"]), causes)


def fetch_block(cid: CID, gateways: list[str] | tuple[str, ...], store: AnyStore, *, timeout: float = 10.0,
                max_size: int = 1 << 22, rounds: int = 3, backoff: float = 0.5, user_agent: str = "cidboot") -> bytes:
    """One block by CID (`?format=raw`), gateways in order; only bytes that hash to `cid` are
    kept (in `store`). For the small blocks a boot stage reads alone before anything else (the
    manifest, the flow, the device registry). `timeout` is a wall-clock deadline per gateway
    request, and no gateway can make us read more than `max_size` bytes (nor more than the
    CID allows). A gateway that lied is dropped; any other failure moves on to the next
    gateway, and all get `rounds` passes with doubling `backoff` between them, so a LAN hiccup
    does not cost a whole boot. A damaged local copy is fetched again (and overwritten).
    Raises BlockUnavailable naming what each gateway did."""
    local = _intact(store, cid)
    if local is not None:
        return local
    liars: dict[str, BadGateway] = {}
    down: dict[str, GatewayError] = {}  # timed out or unreachable: skipped while another may answer
    causes: list[CidbootError] = []
    for n in range(rounds):
        if n:
            time.sleep(backoff * 2 ** (n - 1))
        causes = list(liars.values()) + list(down.values())
        live = [gw for gw in gateways if gw not in liars and gw not in down]
        if not live:  # everyone left is down: give them another chance rather than fail at once
            down.clear()
            causes = list(liars.values())
            live = [gw for gw in gateways if gw not in liars]
        for gw in live:
            try:
                return _get_block(gw, cid, store, timeout, max_size, user_agent)
            except BadGateway as e:
                liars[gw] = e
                causes.append(e)
            except GatewayError as e:
                causes.append(e)
                if isinstance(e, GatewayTimeout | GatewayUnreachable):
                    down[gw] = e
        if len(liars) == len(gateways):
            break
    raise BlockUnavailable(cid, causes)
