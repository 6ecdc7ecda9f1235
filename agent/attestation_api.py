"""The device-side HTTP API: attestation evidence, results and the agent's blocks.

Runs on the L2 image: requests are read by cidboot.httpd_lite (sockets and threads, the bounds
of cidboot.httpd, without importing `http.server` before `agent ready`); a connection that asks
for `/ipfs/` goes to the trustless gateway's own handler (agent.api_gateway, imported then). One
`AgentServer` carries a small route table so the verifier
(agent.verifier) and the peer protocol (agent.peers) mount their endpoints on the same
port. Every bad request gets a 4xx with a one-line reason and the server keeps serving.

    GET /attestation?nonce=HEX   EAT evidence for this nonce (application/eat+cwt)
    GET /results                 JSON: the results this agent produced, with provenance CIDs,
                                 and the head CID of its audit log
    GET /ipfs/{cid}[?format=raw|car]  the agent's blocks (results, provenance, audit log, fetched
                                 manifest and flow) as an IPFS trustless gateway: this is
                                 cidboot.store.gateway.server's handler, so a result's whole provenance
                                 DAG comes as one CAR (`?format=car`), verified by the client
    GET /metrics                 Prometheus text: requests, responses by status, internal errors

Evidence for a caller's nonce authorises nothing by itself: anyone may ask any agent for it
(that is what a challenge is), so the peer protocol (agent.peers) never takes evidence as
proof that its holder sent something; the sender's alias key signs what it sends. A request
that hits a bug costs that request only: 500 with the exception's type name, logged with its
traceback, counted (`cidboot_agent_internal_errors_total`).
"""

from __future__ import annotations

import json
import logging
import socket
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, urlsplit

from cidboot.errors import CidbootError
from cidboot.httpd_lite import Connection, HttpRefusal, Limits, LiteHTTPServer, RawRequest, response_bytes
from cidboot.ipld.cid import CID
from cidboot.request_metrics import RequestMetrics
from cidboot.trust.attester import LAYERS, Attester  # noqa: F401  (moved to cidboot; imported from here)
from cidboot.trust.eat import NONCE_MAX, NONCE_MIN

if TYPE_CHECKING:
    from cidboot.store.blockstore import Blockstore

log = logging.getLogger("agent.api")

EAT_TYPE = "application/eat+cwt"
CBOR_TYPE = "application/cbor"
JSON_TYPE = "application/json"
MAX_BODY = 8 * 1024 * 1024  # bytes: input blocks of one exchange; more is refused unread


class HttpError(CidbootError):
    """Raised by a route to answer `status` with a precise reason (and an optional JSON body)."""

    def __init__(self, status: int, message: str, obj: Mapping[str, Any] | None = None) -> None:
        super().__init__(message)
        self.status, self.obj = status, obj


# Request, Response, Route and Result are plain (not frozen) dataclasses: a frozen one costs twice
# the generated code at import, ~2.5 M guest instructions each under TCG before `agent ready`, and
# nothing holds these as keys or shares them between threads to mutate.
@dataclass
class Request:
    """One parsed request as a route's handler sees it (the body already read, within MAX_BODY)."""

    method: str
    path: str
    query: dict[str, list[str]]
    headers: Mapping[str, str]
    body: bytes
    client: str


@dataclass
class Response:
    """What a route answers: status, content type and the whole body."""

    status: int
    content_type: str
    body: bytes

    @classmethod
    def json(cls, obj: Any, status: int = 200) -> Response:
        return cls(status, JSON_TYPE, (json.dumps(obj, sort_keys=True, default=str) + "\n").encode())


Handler = Callable[[Request], Response]


@dataclass
class Route:
    """`path` matches exactly, or as a prefix when it ends with "/" (the rest is an argument)."""

    method: str
    path: str
    handler: Handler

    def matches(self, path: str) -> bool:
        if self.path.endswith("/"):
            return path.startswith(self.path) and len(path) > len(self.path)
        return path == self.path


def deferred_route(method: str, path: str, load: Callable[[], Sequence[Route]]) -> Route:
    """A route mounted now whose handler is found at its first request: `load()` imports and
    builds what serves it (agent.device mounts the peer endpoints this way, so agent.peers and
    appraisal are not imported before `agent ready`) and returns its routes; the one with this
    method and path answers. `load` caches what it builds. A load that fails (an import error in
    a broken image) fails that request loudly: 500, logged with its traceback, counted as an
    internal error; it is tried again on the next request, and no check is ever skipped."""

    def handle(req: Request) -> Response:
        for r in load():
            if r.method == method and r.path == path:
                return r.handler(req)
        raise LookupError(f"{method} {path}: the deferred routes do not serve it")  # a bug: 500

    return Route(method, path, handle)


def nonce_from_hex(value: str | None, what: str = "nonce") -> bytes:
    """A challenge nonce from hex text, with the reason it is refused (missing, not hex, length)."""
    if value is None or value == "":
        raise HttpError(400, f"{what} missing: give ?{what}=HEX ({NONCE_MIN} to {NONCE_MAX} bytes)")
    try:
        nonce = bytes.fromhex(value)
    except ValueError:
        raise HttpError(400, f"{what} is not hex: {value[:80]!r}") from None
    if not NONCE_MIN <= len(nonce) <= NONCE_MAX:
        raise HttpError(400, f"{what} must be {NONCE_MIN} to {NONCE_MAX} bytes, got {len(nonce)}")
    return nonce


@dataclass
class Result:
    """One result of the flow as /results shows it, with its provenance CID."""

    definition: str
    value: Any
    provenance: CID | None = None

    def to_obj(self) -> dict[str, Any]:
        return {"definition": self.definition, "value": self.value,
                "provenance": str(self.provenance) if self.provenance else None}


class ResultLog:
    """The results this agent produced, in order (thread-safe: the flow appends, HTTP reads)."""

    def __init__(self) -> None:
        self._items: list[Result] = []
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)

    def add(self, result: Result) -> None:
        with self._changed:
            self._items.append(result)
            self._changed.notify_all()

    def all(self) -> list[Result]:
        with self._lock:
            return list(self._items)

    def wait_for(self, definition: str, timeout: float) -> Result | None:
        """Block until a result for `definition` exists (tests and the CLI wait on outputs)."""
        with self._changed:
            self._changed.wait_for(lambda: any(r.definition == definition for r in self._items), timeout)
            return next((r for r in self._items if r.definition == definition), None)


class AgentServer(LiteHTTPServer):
    """The agent's one HTTP port: the attestation API plus any routes mounted with `mount`.

    Requests are read by cidboot.httpd_lite (not `http.server`: its imports were ~0.08 s of the
    agent's start under TCG), with the same bounds: a body above MAX_BODY is refused unread (413)
    and all bodies held at once share `Limits.body_budget`, so 30 clients posting 8 MiB cannot
    make 240 MiB. A connection that asks for `/ipfs/` is handed to the trustless gateway's own
    handler (agent.api_gateway, imported then), which serves it to the end."""

    server_version = "cidboot-agent"

    def __init__(self, address: tuple[str, int], *, attester: Attester | None, store: Blockstore | None = None,
                 results: ResultLog | None = None, limits: Limits | None = None) -> None:
        self.attester, self.store = attester, store
        self.results = results if results is not None else ResultLog()
        self.audit_head: Callable[[], CID | None] = lambda: None  # the audit log's head, shown on /results
        self.routes: list[Route] = []
        self.metrics = RequestMetrics()
        self.extra_routes: dict[str, Any] = {}  # what the gateway's handler expects of its server
        if attester is not None:
            self.mount(Route("GET", "/attestation", self._attestation))
        self.mount(Route("GET", "/results", self._results))
        self.mount(Route("GET", "/metrics", self._metrics))
        super().__init__(address, limits or Limits(max_body=MAX_BODY, body_budget=4 * MAX_BODY))

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        host = host if isinstance(host, str) else host.decode()
        return f"http://{'127.0.0.1' if host == '0.0.0.0' else host}:{port}"

    def mount(self, *routes: Route) -> None:
        self.routes.extend(routes)

    def start(self) -> threading.Thread:
        """Serve on a daemon thread (the caller keeps the main thread for the flow)."""
        t = threading.Thread(target=self.serve_forever, name="agent-http", daemon=True)
        t.start()
        return t

    def dispatch(self, req: Request) -> Response:
        known = [r for r in self.routes if r.matches(req.path)]
        for r in known:
            if r.method == req.method:
                return r.handler(req)
        if known:
            raise HttpError(405, f"{req.method} not allowed on {req.path}; use {', '.join(sorted({r.method for r in known}))}")
        raise HttpError(404, f"not found: {req.path}")

    def handle_connection(self, conn: socket.socket, addr: Any) -> None:
        """Requests on one connection until it closes; `/ipfs/` hands the connection over."""
        c = Connection(conn, self.limits)
        while True:
            raw = self.read_request(c)
            if raw is None:
                return
            if self.store is not None and raw.method in ("GET", "HEAD") and raw.target.startswith("/ipfs/"):
                self.done(raw)
                from agent.api_gateway import serve_connection

                serve_connection(self, conn, addr, raw.head + raw.body + c.buf)
                return
            self.stats.bump("requests")
            try:
                keep = self._answer(c, raw, addr)
            finally:
                self.done(raw)
            if not keep:
                return

    def _answer(self, c: Connection, raw: RawRequest, addr: Any) -> bool:
        """One request: route it, answer it; False when the connection must close."""
        keep = raw.keep_alive
        if raw.method not in ("GET", "HEAD", "POST"):
            self.refuse(c, HttpRefusal(501, f"unsupported method {raw.method!r}"))
            return False
        try:
            resp = self.dispatch(self._request(raw, addr))
        except HttpError as e:
            obj = dict(e.obj) if e.obj is not None else None
            resp = (Response.json({**obj, "error": str(e)}, e.status) if obj is not None else
                    Response(e.status, "text/plain; charset=utf-8", (str(e) + "\n").encode()))
            log.info("%s %s -> %d: %s", raw.method, raw.target, e.status, e)
            if e.status in (411, 413) or (e.status == 400 and str(e).startswith("bad Content-Length")):
                keep = False
        except CidbootError as e:
            resp = Response(400, "text/plain; charset=utf-8", (f"{e}\n").encode())
        except Exception as e:  # a bug must cost one request, not the server (RecursionError, MemoryError...)
            log.exception("internal error on %s %s", raw.method, raw.target)
            self.stats.bump("internal_errors")
            resp = Response(500, "text/plain; charset=utf-8", f"internal error: {type(e).__name__}\n".encode())
            keep = False
        head_only = raw.method == "HEAD"
        self.metrics.record(resp.status, 0 if head_only else len(resp.body))
        headers = [("Content-Type", resp.content_type), ("Content-Length", str(len(resp.body))),
                   ("Cache-Control", "no-store")]
        if not keep:
            headers.append(("Connection", "close"))
        try:
            self._send(c, response_bytes(resp.status, headers, b"" if head_only else resp.body, self.server_version))
        except TimeoutError:
            self.stats.bump("timeouts")
            return False
        except OSError:  # the client went away: nothing to answer
            self.stats.bump("client_gone")
            return False
        return keep

    @staticmethod
    def _request(raw: RawRequest, addr: Any) -> Request:
        u = urlsplit(raw.target)
        try:
            query = parse_qs(u.query, keep_blank_values=True, strict_parsing=False, max_num_fields=32)
        except ValueError as e:
            raise HttpError(400, f"bad query string: {e}") from None
        if raw.method == "POST" and "content-length" not in raw.lower:
            raise HttpError(411, "Content-Length required")
        return Request(raw.method, u.path, query, raw.headers, raw.body, addr[0] if addr else "")

    # -- the attestation API ------------------------------------------------------------------
    def _attestation(self, req: Request) -> Response:
        vals = req.query.get("nonce")
        if vals is not None and len(vals) > 1:
            raise HttpError(400, "nonce given more than once")
        nonce = nonce_from_hex(vals[0] if vals else None)
        assert self.attester is not None
        return Response(200, EAT_TYPE, self.attester.evidence(nonce))

    def _results(self, req: Request) -> Response:
        head = self.audit_head()
        return Response.json({"results": [r.to_obj() for r in self.results.all()], "audit": str(head) if head else None})

    def _metrics(self, req: Request) -> Response:
        """Prometheus text: responses by status; `internal_errors` are the requests a bug cost (500)."""
        m = self.metrics
        with m.lock:
            by_status, requests, sent = dict(m.by_status), m.requests, m.bytes_sent
        lines = [f"cidboot_agent_requests_total {requests}", f"cidboot_agent_bytes_sent_total {sent}",
                 f"cidboot_agent_internal_errors_total {by_status.get(500, 0)}"]
        lines += [f'cidboot_agent_responses_total{{status="{k}"}} {v}' for k, v in sorted(by_status.items())]
        return Response(200, "text/plain; version=0.0.4", ("\n".join(lines) + "\n").encode())


def serve_api(attester: Attester | None, host: str = "0.0.0.0", port: int = 8000, *, store: Blockstore | None = None,
              results: ResultLog | None = None) -> AgentServer:
    """Bind the agent API (port 0 picks a free one); `.start()` or `.serve_forever()` runs it."""
    return AgentServer((host, port), attester=attester, store=store, results=results)
