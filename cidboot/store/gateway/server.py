"""Trustless gateway server (IPFS Trustless Gateway spec) over a `Blockstore`.

Serves `GET`/`HEAD /ipfs/{cid}[/path]` as raw blocks or CARv1 streams; never deserialised
content. CAR responses are streamed block by block with chunked transfer encoding, so memory
stays bounded whatever the DAG size. The HTTP front (backlog, worker bound, timeouts, body
limit, one send per small response) is `cidboot.httpd`'s bounded server.
"""

from __future__ import annotations

import hashlib
import logging
import queue
import threading
from collections import deque
from collections.abc import Callable, Generator, Iterator, Mapping
from contextlib import closing
from dataclasses import replace
from typing import TYPE_CHECKING

from cidboot.errors import CidbootError, NotFoundError, VerificationError
from cidboot.httpd import BoundedHandler, BoundedHTTPServer, Limits
from cidboot.ipld import dag, dagpb
from cidboot.ipld.car import encode_header, section_head
from cidboot.ipld.cid import CID, DAG_PB, RAW
from cidboot.ipld.unixfs import data as ufsdata
from cidboot.ipld.unixfs.exporter import file_size, iter_file_blocks
from cidboot.request_metrics import RequestMetrics
from cidboot.store.blockstore import BlockNotFound, Blockstore

if TYPE_CHECKING:
    from cidboot.store.gateway.pathing import Resolved
    from cidboot.store.gateway.request import GatewayRequest
# the request parser, the path resolver and the caching store (with the upstream client) are imported
# by the first /ipfs/ request (`_Handler._handle`), not with this module: the agent serves its
# attestation API through this handler, and under TCG every module and dataclass created before
# `agent ready` costs its boot time (docs/images.md, "What an image carries, and start-up")

log = logging.getLogger("cidboot.store.gateway")

IMMUTABLE = "public, max-age=29030400, immutable"
#: A `dups=y` CAR repeats a block each time the DAG reaches it again: a diamond-shaped DAG of 41
#: blocks is 2^41 visits. Beyond these budgets of repeats (per request) a CAR is served with
#: dups=n instead (the Content-Type says so, as the spec allows), or, where the repeats cannot
#: be counted ahead (entity-bytes ranges, HAMT shards), the stream is cut.
MAX_DUP_VISITS = 8192
MAX_DUP_BYTES = 64 * 1024 * 1024
Route = Callable[[], tuple[int, str, bytes]]
#: An application mounted beside /ipfs/ (the boot server's fleet view): called with the handler
#: for every request outside /ipfs/ (any method); returns True when it answered.
App = Callable[["BoundedHandler"], bool]

#: Browsers (a web UI, verified-fetch) read this gateway cross-origin. The path gateway spec says
#: nothing beyond 412; these are the headers the reference gateway (boxo, Kubo) sends: anyone may
#: read (the content is public and verifiable), with the headers a verifying client needs.
CORS_HEADERS = (
    ("Access-Control-Allow-Origin", "*"),
    ("Access-Control-Allow-Methods", "GET, HEAD, OPTIONS"),
    ("Access-Control-Allow-Headers", "Content-Type, Range, User-Agent, X-Requested-With, Cache-Control, If-None-Match"),
    ("Access-Control-Expose-Headers", "Content-Length, Content-Range, Content-Type, ETag, X-Ipfs-Path, X-Ipfs-Roots, "
                                      "X-Content-Type-Options"),
)
PREFLIGHT_MAX_AGE = 86400


class _BlockCache:
    """A request's reads of the store, remembered up to `limit` bytes: a walk that comes back to
    the same blocks (duplicates, up to the budgets) reads and hashes each once."""

    def __init__(self, get: Callable[[CID], bytes], limit: int = 16 * 1024 * 1024) -> None:
        self._get, self._limit, self._used = get, limit, 0
        self._blocks: dict[bytes, bytes] = {}

    def __call__(self, cid: CID) -> bytes:
        key = cid.multihash.encode()
        block = self._blocks.get(key)
        if block is None:
            block = self._get(cid)
            while self._blocks and self._used + len(block) > self._limit:  # oldest first
                self._used -= len(self._blocks.pop(next(iter(self._blocks))))
            if len(block) <= self._limit:
                self._blocks[key] = block
                self._used += len(block)
        return block


#: Blocks a CAR response from a caching store reads (and verifies) ahead of the one it is
#: sending, on a thread of its own: a block its upstreams must deliver is waited for while the
#: one before it is sent. At most this many blocks wait, each at most MAX_BLOCK (4 MiB): a bound
#: per response, like the walk's cache. A plain store's CAR needs no such thread (`_send_car`).
CAR_READ_AHEAD = 2
_END = object()


class _Raised:
    """An exception the read-ahead thread hit, handed to the sender in its place in the order."""

    def __init__(self, exc: BaseException) -> None:
        self.exc = exc


def _read_ahead(items: Iterator[tuple[CID, bytes | memoryview]],
                depth: int = CAR_READ_AHEAD) -> Generator[tuple[CID, bytes | memoryview], None, None]:
    """`items` (a walk that reads and verifies each block) run on a thread up to `depth` blocks
    ahead of the caller. Order and errors are kept: a block that fails to read or verify raises
    here after every block before it, so a damaged block is never sent and the stream is cut at
    the same place as without read-ahead. When the caller stops early (the client went away)
    the thread stops at its next block."""
    q: queue.Queue[object] = queue.Queue(maxsize=max(1, depth))
    stop = threading.Event()

    def hand(item: object) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.5)
                return True
            except queue.Full:
                continue
        return False

    def run() -> None:
        try:
            for item in items:
                if not hand(item):
                    return
            hand(_END)
        except BaseException as e:  # handed over in order (after the blocks before it); raised in the sender's thread
            hand(_Raised(e))

    worker = threading.Thread(target=run, name="car-read-ahead", daemon=True)
    worker.start()
    try:
        while True:
            got = q.get()
            if got is _END:
                return
            if isinstance(got, _Raised):
                raise got.exc
            yield got  # type: ignore[misc]
    finally:
        stop.set()


class _Buffers:
    """The read buffers of one CAR response: the walk reads each block into one it takes
    (Blockstore.get_into), the sender gives it back once the block is on the socket. Never
    more exist than are in use at once: the walk and the send take turns on one thread, so one
    buffer of the largest block serves the whole response, with no allocation (nor fresh pages)
    per block. A taker never waits: an empty pool makes a buffer."""

    def __init__(self) -> None:
        self._free: deque[bytearray] = deque()

    def take(self) -> bytearray:
        try:
            return self._free.pop()
        except IndexError:
            return bytearray(256 * 1024)

    def give(self, block: object) -> None:
        """Give back the buffer under `block` if it is one of ours (a view of a bytearray; a
        path block or an identity digest is bytes and is dropped)."""
        if isinstance(block, memoryview) and isinstance(block.obj, bytearray):
            self._free.append(block.obj)


def _walk_into(store: Blockstore, root: CID, buffers: _Buffers) -> Iterator[tuple[CID, bytes | memoryview]]:
    """`dag.walk(root, store.get)` (depth-first, links in order, each block once), each block
    read into a buffer from `buffers` and verified there (Blockstore.get_into), its links read
    before it is handed on: the sender sends the very bytes that were hashed, then gives the
    buffer back. For a plain Blockstore (no upstream to fetch from)."""
    seen: set[bytes] = set()
    stack = [root]
    while stack:
        cid = stack.pop()
        key = cid.multihash.encode()
        if key in seen:
            continue
        seen.add(key)
        if cid.is_identity:
            yield cid, cid.multihash.digest
            continue
        block = store.get_into(cid, buffers.take())
        links = [] if cid.codec == RAW else dag.links(cid, bytes(block))
        yield cid, block
        stack.extend(reversed(links))


class _AbortStream(Exception):
    """A block went missing, or the walk went over its budget, after the 200 was sent: the
    stream must be cut, not completed."""


class GatewayServer(BoundedHTTPServer):
    def __init__(self, store: Blockstore, address: tuple[str, int], extra_routes: Mapping[str, Route] | None = None,
                 limits: Limits | None = None, app: App | None = None):
        self.store = store
        self.metrics = RequestMetrics()
        self.extra_routes = dict(extra_routes or {})
        self.app = app
        super().__init__(address, _Handler, limits)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host!s}:{port}" if isinstance(host, str) else f"http://{host.decode()}:{port}"


def serve_gateway(
    store: Blockstore, host: str, port: int, *, extra_routes: Mapping[str, Route] | None = None,
    limits: Limits | None = None, app: App | None = None,
) -> GatewayServer:
    """Bind a gateway (port 0 picks a free one); call `.serve_forever()` to run it. `app` answers
    every request outside /ipfs/ it wants (the boot server mounts its fleet API and web view)."""
    return GatewayServer(store, (host, port), extra_routes, limits, app)


def _is_unixfs_file(cid: CID, block: bytes) -> bool:
    if cid.codec == RAW:
        return True
    if cid.codec != DAG_PB:
        return False
    try:
        t = ufsdata.UnixFSData.decode(dagpb.decode(block).data).type
    except CidbootError:
        return False
    return t in (ufsdata.FILE, ufsdata.RAW)


def _single_range(header: str | None, size: int) -> tuple[int, int] | str | None:
    """The one byte range of a `Range: bytes=...` header as (first, last), "unsatisfiable", or
    None to answer with the whole block (no header, a malformed one, or several ranges: HTTP
    lets a server ignore Range, and a raw block is small)."""
    if not header or not header.startswith("bytes=") or "," in header:
        return None
    lo, sep, hi = header[6:].strip().partition("-")
    if not sep or not (lo.isdigit() or hi.isdigit()) or (lo and not lo.isdigit()) or (hi and not hi.isdigit()):
        return None
    if not lo:  # suffix: the last N bytes
        n = int(hi)
        return (max(size - n, 0), size - 1) if n and size else "unsatisfiable"
    first = int(lo)
    last = size - 1 if not hi else min(int(hi), size - 1)
    if first >= size or (hi and int(hi) < first):
        return "unsatisfiable" if first >= size else None
    return first, last


class _Handler(BoundedHandler):
    server: GatewayServer
    protocol_version = "HTTP/1.1"
    server_version = "cidboot-gateway"
    sys_version = ""

    def log_message(self, format: str, *args: object) -> None:
        log.debug("%s " + format, self.address_string(), *args)

    # -- plumbing ------------------------------------------------------------------------
    def _send_error(self, status: int, message: str) -> None:
        body = (message + "\n").encode()
        self.server.metrics.record(status, len(body))  # before it goes out: a client that saw it sees it counted
        self.send_response(status)
        self.send_header("Content-Type", "text/plain; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("X-Content-Type-Options", "nosniff")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)
        log.info("gateway %s %s -> %d: %s", self.command, self.path, status, message,
                 extra={"status": status, "path": self.path})

    def end_headers(self) -> None:
        if getattr(self, "path", "").startswith("/ipfs/"):  # every /ipfs/ answer, errors included: a browser must read why
            for name, value in CORS_HEADERS:
                self.send_header(name, value)
        super().end_headers()

    def do_GET(self) -> None:
        self._handle()

    def do_HEAD(self) -> None:
        self._handle()

    def do_POST(self) -> None:
        if not self._app():
            self._send_error(405 if self.path.startswith("/ipfs/") else 404,
                             f"{self.command} {self.path.split('?')[0]}: this gateway is read-only")

    def do_OPTIONS(self) -> None:
        """CORS preflight (and plain OPTIONS): what a browser may do with /ipfs/, no body."""
        if not self.path.startswith("/ipfs/") and self._app():
            return
        self.send_response(204)
        self.send_header("Allow", "GET, HEAD, OPTIONS")
        self.send_header("Access-Control-Max-Age", str(PREFLIGHT_MAX_AGE))
        self.send_header("Content-Length", "0")
        self.end_headers()
        self.server.metrics.record(204, 0)

    def _app(self) -> bool:
        app = getattr(self.server, "app", None)  # servers reusing this handler (the agent) may have none
        return app is not None and not self.path.startswith("/ipfs/") and app(self)

    def _only_if_cached(self) -> bool:
        return "only-if-cached" in self.headers.get("Cache-Control", "").lower()

    def _precondition_failed(self, why: str) -> None:
        """`Cache-Control: only-if-cached` and the block is not here: 412, no payload (path
        gateway spec, "412 Precondition Failed"), so a client probing gateways moves on."""
        self.send_response(412)
        self.send_header("Content-Length", "0")
        self.end_headers()
        self.server.metrics.record(412, 0)
        log.info("gateway %s %s -> 412: %s", self.command, self.path, why, extra={"status": 412, "path": self.path})

    def _handle(self) -> None:
        if self._app():
            return
        route = self.server.extra_routes.get(self.path.split("?")[0])
        if route is not None:
            status, ctype, body = route()
            self.send_response(status)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)
            self.server.metrics.record(status, len(body))
            return
        if not self.path.startswith("/ipfs/"):
            self._send_error(404, "not found: this gateway serves /ipfs/{cid} only")
            return
        from cidboot.store.gateway.request import BadRequest, NotAcceptable, parse
        from cidboot.store.gateway.upstream import UpstreamUnavailable

        try:
            req = parse(self.path, self.headers.get("Accept", ""))
        except BadRequest as e:
            self._send_error(400, str(e))
            return
        except NotAcceptable as e:
            self._send_error(406, str(e))
            return
        if self._only_if_cached() and not self.server.store.has(req.cid):
            self._precondition_failed(f"root block {req.cid} not in the store (only-if-cached)")
            return
        try:
            res = self._resolve(req)
        except UpstreamUnavailable as e:
            self._send_error(502, str(e))  # not "absent": the upstreams failed (or lied) this time
            return
        except (BlockNotFound, NotFoundError) as e:
            if self._only_if_cached() and isinstance(e, BlockNotFound):
                self._precondition_failed(f"{e} (only-if-cached)")
                return
            self._send_error(404, str(e))
            return
        except VerificationError as e:
            log.error("store corruption: %s", e)
            self._send_error(500, f"block failed verification in the store: {e}")
            return
        except CidbootError as e:
            self._send_error(400, f"cannot resolve path: {e}")
            return
        if req.format == "raw":
            self._send_raw(req, res)
        else:
            self._send_car(req, res)

    def _getter(self) -> Callable[[CID], bytes]:
        """How this request reads blocks: through the store (a caching store fetches what it
        lacks from its upstreams), or from local blocks only under `only-if-cached`."""
        from cidboot.store.gateway.upstream import CachingStore

        store = self.server.store
        if self._only_if_cached() and isinstance(store, CachingStore):
            return store.get_local
        return store.get

    def _resolve(self, req: GatewayRequest) -> Resolved:
        from cidboot.store.gateway.pathing import resolve
        from cidboot.store.gateway.upstream import UpstreamUnavailable

        store = self.server.store
        r = resolve(req.cid, req.path, self._getter())
        if not store.has(r.terminal):
            if self._only_if_cached():
                raise BlockNotFound(f"block {r.terminal} is not in this gateway's store")
            try:
                store.get(r.terminal)  # a caching store fetches it from its upstreams (verified)
            except UpstreamUnavailable:
                raise
            except BlockNotFound:
                raise BlockNotFound(f"block {r.terminal} is not in this gateway's store") from None
        return r

    def _common_headers(self, req: GatewayRequest, res: Resolved) -> None:
        path = "/ipfs/" + str(req.cid) + "".join("/" + p for p in req.path)
        self.send_header("X-Ipfs-Path", path)
        self.send_header("X-Ipfs-Roots", ",".join(str(c) for c in res.roots))
        self.send_header("Cache-Control", IMMUTABLE)
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("Vary", "Accept")

    def _send_raw(self, req: GatewayRequest, res: Resolved) -> None:
        cid = res.terminal
        try:
            block = self.server.store.get(cid)
        except BlockNotFound as e:
            self._send_error(404, str(e))
            return
        except VerificationError as e:  # the file on disk no longer hashes to its CID: say so
            log.error("store corruption: %s", e)
            self._send_error(500, f"block failed verification in the store: {e}")
            return
        etag = f'"{cid}.raw"'
        if self._not_modified(etag):
            return
        span = _single_range(self.headers.get("Range"), len(block))
        if span == "unsatisfiable":
            self.send_response(416)
            self.send_header("Content-Range", f"bytes */{len(block)}")
            self.send_header("Content-Length", "0")
            self.end_headers()
            self.server.metrics.record(416, 0)
            return
        body: bytes | memoryview = block
        if isinstance(span, tuple):
            body = memoryview(block)[span[0] : span[1] + 1]
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {span[0]}-{span[1]}/{len(block)}")
        else:
            self.send_response(200)
        from cidboot.store.gateway.request import RAW_TYPE

        self.send_header("Content-Type", RAW_TYPE)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("ETag", etag)
        self.send_header("Content-Disposition", f'attachment; filename="{req.filename or f"{cid}.bin"}"')
        self._common_headers(req, res)
        self.end_headers()
        sent = 0
        if self.command != "HEAD":
            self.send_parts((body,))  # with the headers, without joining them to the block
            sent = len(body)
        self.server.metrics.record(206 if isinstance(span, tuple) else 200, sent)

    def _plain_store(self) -> Blockstore | None:
        """The store when reading a block is only reading it (a Blockstore, not a caching store
        that fetches what it lacks): then a CAR walk reads into reused buffers (`_walk_into`)."""
        store = getattr(self.server, "store", None)
        return store if isinstance(store, Blockstore) and type(store).get is Blockstore.get else None

    def _car_blocks(self, req: GatewayRequest, terminal: CID, path_blocks: list[tuple[CID, bytes]],
                    buffers: _Buffers) -> Generator[tuple[CID, bytes | memoryview], None, None]:
        yield from path_blocks
        plain = self._plain_store() if not req.car_dups else None
        if req.dag_scope == "all" and plain is not None:  # the common case: a whole DAG, each block once
            yield from _walk_into(plain, terminal, buffers)
            return
        get = _BlockCache(self._getter())
        if req.dag_scope == "all":
            yield from dag.walk(terminal, get, skip_dups=not req.car_dups)
            return
        block = get(terminal)
        if req.dag_scope == "block":
            yield terminal, block
            return
        # entity
        if _is_unixfs_file(terminal, block):
            if req.entity_bytes is None:  # the whole file is its whole DAG: same order, each block once
                if plain is not None:
                    yield from _walk_into(plain, terminal, buffers)
                else:
                    yield from dag.walk(terminal, get, skip_dups=not req.car_dups)
                return
            start, end = 0, None
            if req.entity_bytes is not None:
                size = file_size(terminal, get)
                lo, hi = req.entity_bytes
                start = max(size + lo, 0) if lo < 0 else lo
                end = size if hi is None else (max(size + hi, 0) + 1 if hi < 0 else min(hi, size - 1) + 1)
                if start >= size:
                    yield terminal, block
                    return
            for cid, blk, _ in iter_file_blocks(terminal, get, start, end):
                yield cid, blk
            return
        yield terminal, block
        if terminal.codec == DAG_PB:
            try:
                node = dagpb.decode(block)
                ufs = ufsdata.UnixFSData.decode(node.data)
            except CidbootError:
                return
            if ufs.type == ufsdata.HAMT_SHARD:
                # the shard's internal nodes belong to the directory entity; entries do not.
                # Depth-first, links in order, like every other CAR this gateway writes.
                width = len(f"{(ufs.fanout or 256) - 1:X}")
                stack = [lk.cid for lk in reversed(node.links) if len(lk.name or "") == width]
                while stack:
                    c = stack.pop()
                    b = get(c)
                    yield c, b
                    stack.extend(lk.cid for lk in reversed(dagpb.decode(b).links) if len(lk.name or "") == width)

    def _not_modified(self, etag: str) -> bool:
        """Answer 304 when the client already holds this response (blocks never change)."""
        if self.headers.get("If-None-Match") not in (etag, "*"):
            return False
        self.send_response(304)
        self.send_header("ETag", etag)
        self.end_headers()
        self.server.metrics.record(304, 0)
        return True

    def _dups_within_budget(self, req: GatewayRequest, terminal: CID) -> bool:
        """Whether a `dups=y` CAR of this request stays within the duplicate budgets, measured
        before the 200 without walking the duplicates (dag.walk_cost). Where the walk's shape
        is not the terminal's whole DAG (block scope, ranges, directories) the stream's own
        counters bound it instead."""
        if req.dag_scope == "block" or req.entity_bytes is not None:
            return True
        get = self.server.store.get
        if req.dag_scope == "entity" and not _is_unixfs_file(terminal, get(terminal)):
            return True
        cost = dag.walk_cost(terminal, get)
        if cost.duplicate_visits <= MAX_DUP_VISITS and cost.duplicate_bytes <= MAX_DUP_BYTES:
            return True
        log.warning("dups=y for %s would repeat %d blocks (%d bytes): serving dups=n", terminal,
                    cost.duplicate_visits, cost.duplicate_bytes)
        return False

    def _send_car(self, req: GatewayRequest, res: Resolved) -> None:
        if req.car_dups and not self._dups_within_budget(req, res.terminal):
            req = replace(req, car_dups=False)
        params = f"{req.dag_scope}.{req.entity_bytes}.{req.car_dups}"
        etag = f'W/"{req.cid}.car.{hashlib.sha256((self.path.split("?")[0] + params).encode()).hexdigest()[:16]}"'
        if self._not_modified(etag):
            return
        self.send_response(200)
        from cidboot.store.gateway.request import CAR_TYPE

        self.send_header("Content-Type", f"{CAR_TYPE}; version=1; order=dfs; dups={'y' if req.car_dups else 'n'}")
        self.send_header("ETag", etag)
        self.send_header("Content-Disposition", f'attachment; filename="{req.filename or f"{req.cid}.car"}"')
        self.send_header("Accept-Ranges", "none")
        self._common_headers(req, res)
        if self.command == "HEAD":
            self.end_headers()
            self.server.metrics.record(200, 0)
            return
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        sent = 0
        seen: set[bytes] = set()
        repeats = repeat_bytes = 0
        try:
            sent += self._chunk(encode_header([req.cid]))
            buffers = _Buffers()
            blocks = self._car_blocks(req, res.terminal, res.path_blocks, buffers)
            if self._plain_store() is None:  # a caching store's reads may wait on an upstream: read ahead
                blocks = _read_ahead(blocks)
            # A plain store's reads are quick: the walk reads and hashes a block, the send hands it
            # to the socket, on this one thread, and the socket's buffer keeps the two overlapping
            # with the client's work. A read-ahead thread cost ~0.05 s of CPU per 256 MiB in
            # hand-overs and wake-ups, and on cores the client shares there is no idle CPU for it.
            with closing(blocks):
                for cid, block in blocks:
                    key = cid.multihash.encode()
                    if key in seen:
                        # a repeat, emitted (dups=y) or skipped: either way the walk is bounded
                        repeats += 1
                        repeat_bytes += len(block)
                        if repeats > MAX_DUP_VISITS or repeat_bytes > MAX_DUP_BYTES:
                            raise _AbortStream(f"walk repeats more than {MAX_DUP_VISITS} blocks / {MAX_DUP_BYTES} bytes")
                        if not req.car_dups:
                            buffers.give(block)
                            continue
                    seen.add(key)
                    if not cid.is_identity:
                        # one chunk per section, its block sent from the buffer it was read and
                        # verified in: no joined copy
                        sent += self._chunk(section_head(cid, len(block)), block)
                    buffers.give(block)  # on the socket (copied by the kernel): the walk may reuse it
            self.wfile.write(b"0\r\n\r\n")
        except (BlockNotFound, VerificationError, _AbortStream) as e:
            # Headers are gone: the only honest signal left is a cut stream (no final chunk).
            log.warning("CAR stream for %s cut: %s", req.cid, e)
            self.server.metrics.record(200, sent)
            with self.server.metrics.lock:
                self.server.metrics.errors += 1
            self.close_connection = True
            return
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True
        self.server.metrics.record(200, sent)

    def _chunk(self, head: bytes, body: bytes | memoryview = b"") -> int:
        """One chunk of a chunked body holding `head` then `body`, sent with one gathering send
        (the body, a block, is not copied into a joined bytes); returns the payload size."""
        size = len(head) + len(body)
        self.send_parts((b"%x\r\n" % size + head, body, b"\r\n"))
        return size

