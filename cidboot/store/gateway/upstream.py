"""The boot server's store as a bounded, verifying cache in front of upstream gateways.

A boot server at a new site starts with an empty store and `--upstream URL`s (the Kubo
gateways of cluster members, or other boot servers). `CachingStore` is a `Blockstore` whose
`get` fetches a missing block from the upstreams, so everything built on `get` (the gateway's
raw, CAR and path answers, the boot-file build, the fleet view) works unchanged on an empty
store. Why each rule:

- Every block is hashed against its CID before it is written (`Blockstore.put` verifies), so
  an upstream cannot plant anything: a mismatch drops that upstream for that block and the next
  one is asked; nothing unverified is cached or served.
- Concurrent requests for the same missing block share one upstream fetch (single flight): N
  devices booting at once pull each block from upstream once.
- An upstream that times out or refuses connections is marked down for `down_for` seconds, so
  a dead cluster peer costs one timeout, not one per block. When every upstream is down they
  are all tried anyway (a dead link must not fail the server closed forever).
- The cache is bounded: unpinned blocks beyond `max_bytes` are evicted least recently used
  first; blocks reachable from a pin are never evicted (nor counted against the bound).
- Read-ahead: when a block with links is read, its children missing here are queued for
  `readahead` background fetchers (through the same single flight), so a CAR walk over a cold
  cache costs about one upstream round trip per `readahead` blocks instead of one per block.
  The queue is bounded (skipped when full: the walk fetches those itself).
- `has` answers for the local store only: `Cache-Control: only-if-cached` means "do not go
  upstream", and the verifying client's resume logic must not trigger fetches.
"""

from __future__ import annotations

import fcntl
import logging
import os
import queue
import threading
import time
from collections import OrderedDict
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

from cidboot.errors import CidbootError, VerificationError
from cidboot.ipld import dag
from cidboot.ipld.cid import CID, RAW
from cidboot.ipld.multihash import Multihash
from cidboot.store.blockstore import MAX_BLOCK, BlockNotFound, Blockstore, Buffer
from cidboot.store.gateway.client import (
    BadGateway,
    GatewayError,
    GatewayTimeout,
    GatewayUnreachable,
    _get_block,
)

log = logging.getLogger("cidboot.store.gateway.upstream")

USER_AGENT = "cidboot-bootserver"
#: most blocks queued for read-ahead (CIDs only; each fetched block is on disk, under the cache bound)
READAHEAD_QUEUE = 256


class UpstreamUnavailable(BlockNotFound):
    """A block is neither in the local store nor delivered (verified) by any upstream; `causes`
    holds what each upstream did (GatewayError or BadGateway)."""

    def __init__(self, cid: CID, causes: Sequence[CidbootError]) -> None:
        why = "; ".join(str(c) for c in causes) or "no upstream gateways"
        super().__init__(f"block {cid} is not in the local store and no upstream delivered it: {why}")
        self.cid = cid
        self.causes = list(causes)


@dataclass
class UpstreamStats:
    """What the boot server exports on /metrics about its upstreams and its cache."""

    blocks: int = 0  # blocks pulled from upstream (verified, cached)
    bytes: int = 0  # their bytes: each block once however many devices asked
    failures: int = 0  # upstream requests that failed (timeouts, refusals, 404s)
    rejected: int = 0  # upstream answers that did not hash to the CID (that upstream dropped for that block)
    coalesced: int = 0  # requests that waited for another request's fetch of the same block
    marked_down: int = 0  # times an upstream was marked down after a timeout or refused connection
    read_ahead: int = 0  # blocks fetched ahead of the reader (children of a block just read)
    evictions: int = 0
    evicted_bytes: int = 0
    by_upstream: dict[str, int] = field(default_factory=dict)  # upstream -> bytes pulled from it


class _Flight:
    """One in-progress upstream fetch of one block, which other requests for it wait on."""

    def __init__(self) -> None:
        self.done = threading.Event()
        self.data: bytes | None = None
        self.error: BaseException | None = None


class CachingStore(Blockstore):
    """A Blockstore that fetches missing blocks from `upstreams` (verified) and keeps at most
    `max_bytes` of unpinned blocks (None: unbounded)."""

    def __init__(self, path: str | os.PathLike[str] | None, upstreams: Iterable[str], *,
                 max_bytes: int | None = None, timeout: float = 10.0, down_for: float = 30.0,
                 readahead: int = 8) -> None:
        super().__init__(path)
        self.upstreams = tuple(upstreams)
        if max_bytes is not None and max_bytes < 0:
            raise ValueError(f"cache size must be >= 0, got {max_bytes}")
        self.max_bytes, self.timeout, self.down_for = max_bytes, timeout, down_for
        self.stats = UpstreamStats()
        self._flights: dict[bytes, _Flight] = {}
        self._down: dict[str, float] = {}  # upstream -> monotonic time it may be tried again
        self._mu = threading.Lock()  # guards the LRU, the flights, the stats and the down map
        self._lru: OrderedDict[bytes, int] = OrderedDict()  # unpinned block multihash -> size, oldest first
        self._cached = 0  # sum of the LRU's sizes
        self._pinned: set[bytes] = set()
        self._pins_stamp: int | None = -1  # pins.json mtime the pinned set was computed for
        self._held = threading.local()  # this thread's depth in the pin lock
        self._evicting = threading.Lock()
        self.readahead = readahead if self.upstreams else 0
        self._ahead: queue.Queue[CID] = queue.Queue(maxsize=READAHEAD_QUEUE)
        self._ahead_threads: list[threading.Thread] = []
        self._load()

    # -- accounting ---------------------------------------------------------------------
    @contextmanager
    def _pins_locked(self) -> Iterator[None]:
        """Re-entrant per thread: a put inside `pin()` (which fetches the blocks it walks) may
        evict, and eviction takes the pin lock; a second flock from the same process would wait
        for itself."""
        if getattr(self._held, "depth", 0):
            self._held.depth += 1
            try:
                yield
            finally:
                self._held.depth -= 1
            return
        with super()._pins_locked():
            self._held.depth = 1
            try:
                yield
            finally:
                self._held.depth = 0

    @contextmanager
    def _pins_try_locked(self) -> Iterator[bool]:
        """The pin lock if it is free now (yields False if not): eviction must not wait for it.
        A read-ahead fetch evicting while `pin()` walks would otherwise wait for the pin, and
        the pin's walk for that fetch's block."""
        if getattr(self._held, "depth", 0):
            with self._pins_locked():
                yield True
            return
        if not self._lock.acquire(blocking=False):
            yield False
            return
        try:
            fd = os.open(self._pins_lock_file, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    yield False
                    return
                self._held.depth = 1
                try:
                    yield True
                finally:
                    self._held.depth = 0
            finally:
                os.close(fd)  # releases the flock
        finally:
            self._lock.release()

    def _load(self) -> None:
        """Account for what is already in the store, oldest (by mtime) first."""
        found: list[tuple[int, bytes, int]] = []
        for mh in self.multihashes():
            try:
                st = self._file(CID(1, RAW, mh)).stat()
            except FileNotFoundError:
                continue
            found.append((st.st_mtime_ns, mh.encode(), st.st_size))
        with self._pins_locked():
            pinned = self._refresh_pins()
        with self._mu:
            for _, key, size in sorted(found):
                if key not in pinned:
                    self._lru[key] = size
                    self._cached += size
        self._evict()  # a smaller --cache-size than last time applies at once

    @property
    def cached_bytes(self) -> int:
        """Bytes of unpinned blocks held (what the bound applies to)."""
        return self._cached

    def _pins_mtime(self) -> int | None:
        try:
            return self._pins_file.stat().st_mtime_ns
        except FileNotFoundError:
            return None

    def _refresh_pins(self) -> set[bytes]:
        """The multihashes reachable from the pins, recomputed when pins.json changed (another
        process may pin). Walks local blocks only: a pin whose DAG is incomplete here protects
        what is here. Pinned blocks leave the LRU. Call with the pin lock held."""
        stamp = self._pins_mtime()
        if stamp == self._pins_stamp:
            return self._pinned
        pinned: set[bytes] = set()
        stack = list(self.pins())
        while stack:
            cid = stack.pop()
            key = cid.multihash.encode()
            if key in pinned:
                continue
            try:
                block = Blockstore.get(self, cid)
            except (BlockNotFound, VerificationError):
                continue
            pinned.add(key)
            try:
                stack.extend(dag.links(cid, block))
            except CidbootError:
                continue
        with self._mu:
            for key in pinned:
                size = self._lru.pop(key, None)
                if size is not None:
                    self._cached -= size
            self._pinned, self._pins_stamp = pinned, stamp
        return pinned

    def _touch(self, cid: CID, size: int | None = None) -> None:
        """Mark `cid` most recently used (adding it when `size` is given and it is not pinned)."""
        key = cid.multihash.encode()
        with self._mu:
            if key in self._lru:
                self._lru.move_to_end(key)
            elif size is not None and key not in self._pinned and not cid.is_identity:
                self._lru[key] = size
                self._cached += size

    def _evict(self) -> None:
        """Drop least recently used unpinned blocks until the cache fits its bound."""
        if self.max_bytes is None or self._cached <= self.max_bytes or getattr(self._held, "pinning", False):
            return
        with self._evicting, self._pins_try_locked() as locked:  # evictions one at a time; a pin being
            if not locked:  # added cannot lose blocks to one
                return  # a pin or gc holds the pin set: a later put (or the pin's end) evicts
            pinned = self._refresh_pins()
            victims: list[tuple[bytes, int]] = []
            with self._mu:
                for key in list(self._lru):
                    if self._cached <= self.max_bytes:
                        break
                    size = self._lru.pop(key)
                    self._cached -= size
                    if key in pinned:
                        continue
                    victims.append((key, size))
                    self.stats.evictions += 1
                    self.stats.evicted_bytes += size
            for key, _ in victims:
                self.delete(CID(1, RAW, Multihash.decode(key)))
        if victims:
            log.info("cache over %d bytes: evicted %d unpinned blocks (%d bytes)", self.max_bytes, len(victims),
                     sum(s for _, s in victims))

    # -- the Blockstore interface -------------------------------------------------------
    def put(self, cid: CID, data: Buffer) -> None:
        super().put(cid, data)  # verifies first: a block that does not hash to its CID never lands
        self._touch(cid, len(data))
        self._evict()

    def get(self, cid: CID) -> bytes:
        """The block, from the local store or (verified, then cached) from an upstream.
        Raises UpstreamUnavailable (a BlockNotFound) when neither has it."""
        try:
            data = super().get(cid)
        except (BlockNotFound, VerificationError):  # absent, or a damaged copy: fetch it again
            if not self.upstreams:
                raise
            data = self._fetch_once(cid)
        else:
            self._touch(cid)
        if self.readahead and cid.codec != RAW:
            self._read_ahead(cid, data)
        return data

    def _read_ahead(self, cid: CID, data: bytes) -> None:
        """Queue the children of `cid` that are not here for the background fetchers."""
        try:
            links = dag.links(cid, data)
        except CidbootError:
            return
        for link in links:
            if link.is_identity or self.has(link):
                continue
            if not self._ahead_threads:
                with self._mu:
                    while len(self._ahead_threads) < self.readahead:
                        t = threading.Thread(target=self._ahead_worker, name="upstream-readahead", daemon=True)
                        t.start()
                        self._ahead_threads.append(t)
            try:
                self._ahead.put_nowait(link)
            except queue.Full:
                return  # the walk fetches the rest itself

    def _ahead_worker(self) -> None:
        while True:
            cid = self._ahead.get()
            if self.has(cid):
                continue
            try:
                self._fetch_once(cid)
                with self._mu:
                    self.stats.read_ahead += 1
            except CidbootError as e:  # the walk will ask again and report it
                log.debug("read-ahead of %s failed: %s", cid, e)

    def get_local(self, cid: CID) -> bytes:
        """The block from the local store only (never upstream): for `only-if-cached`."""
        return super().get(cid)

    def pin(self, root: CID) -> None:
        """Pin `root`, fetching what is missing; nothing is evicted while the walk runs (its
        blocks are not pinned until the walk ends, and must not be evicted under it)."""
        with self._pins_locked():
            self._held.pinning = True
            try:
                super().pin(root)
            finally:
                self._held.pinning = False
            self._refresh_pins()
        self._evict()

    def unpin(self, root: CID) -> None:
        """Unpin; blocks that were pinned join the cache (and its bound) again."""
        super().unpin(root)
        with self._pins_locked():
            before = self._pinned
            pinned = self._refresh_pins()
        for key in before - pinned:
            cid = CID(1, RAW, Multihash.decode(key))
            try:
                self._touch(cid, self.size(cid))
            except BlockNotFound:
                pass
        self._evict()

    # -- upstream fetches ---------------------------------------------------------------
    def _fetch_once(self, cid: CID) -> bytes:
        """Single flight: the first request for a missing block fetches it, the others wait
        for that fetch and get its bytes (or its error)."""
        key = cid.multihash.encode()
        with self._mu:
            flight = self._flights.get(key)
            leader = flight is None
            if flight is None:
                flight = self._flights[key] = _Flight()
            else:
                self.stats.coalesced += 1
        if not leader:
            flight.done.wait()
            if flight.error is not None:
                raise flight.error
            assert flight.data is not None
            return flight.data
        try:
            try:  # a flight that ended between our miss and our lead may have brought it
                flight.data = Blockstore.get(self, cid)
                self._touch(cid)
            except (BlockNotFound, VerificationError):
                flight.data = self._pull(cid)
            return flight.data
        except BaseException as e:
            flight.error = e
            raise
        finally:
            with self._mu:
                del self._flights[key]
            flight.done.set()

    def _order(self) -> list[str]:
        """Upstreams to ask, in order, skipping those marked down (all of them if all are)."""
        now = time.monotonic()
        with self._mu:
            up = [u for u in self.upstreams if self._down.get(u, 0.0) <= now]
        return up or list(self.upstreams)

    def _pull(self, cid: CID) -> bytes:
        causes: list[CidbootError] = []
        for up in self._order():
            try:
                data = _get_block(up, cid, self, self.timeout, MAX_BLOCK, USER_AGENT)  # verified by put
            except BadGateway as e:
                with self._mu:
                    self.stats.rejected += 1
                log.warning("upstream %s sent a block that does not verify: dropped for this block: %s", up, e)
                causes.append(e)
                continue
            except GatewayError as e:
                with self._mu:
                    self.stats.failures += 1
                    if isinstance(e, GatewayTimeout | GatewayUnreachable):
                        self._down[up] = time.monotonic() + self.down_for
                        self.stats.marked_down += 1
                log.info("upstream %s failed for %s: %s", up, cid, e)
                causes.append(e)
                continue
            with self._mu:
                self._down.pop(up, None)
                self.stats.blocks += 1
                self.stats.bytes += len(data)
                self.stats.by_upstream[up] = self.stats.by_upstream.get(up, 0) + len(data)
            return data
        raise UpstreamUnavailable(cid, causes)


def parse_size(text: str) -> int:
    """"512M", "4G", "1.5GiB", "1000" -> bytes (K/M/G/T are powers of 1024)."""
    t = text.strip().upper().removesuffix("IB").removesuffix("B")
    mult = 1
    for i, unit in enumerate("KMGT", start=1):
        if t.endswith(unit):
            t, mult = t[:-1], 1024 ** i
            break
    try:
        value = float(t)
    except ValueError:
        raise ValueError(f"not a size: {text!r} (like 512M, 4G, 1000000)") from None
    if value < 0:
        raise ValueError(f"a size cannot be negative: {text!r}")
    return int(value * mult)
