"""One bounded HTTP/1.1 server for every cidboot HTTP endpoint (gateway, boot server, agent).

The stdlib `ThreadingHTTPServer` is a fine parser but a poor front door: a listen backlog of 5
(bursts of connections are dropped and the clients wait out SYN retries), a thread per
connection with no bound, no timeout (a client that sends nothing, or one byte at a time,
holds its thread forever), request bodies read in full whatever their size, and headers and
body written in two sends (Nagle + delayed ACK: ~40 ms per keep-alive request). This module
keeps the stdlib parser (stdlib only: it runs in the guests too) and bounds everything else:

- backlog `Limits.backlog` (1024): bursts wait in the kernel instead of being dropped;
- at most `Limits.max_workers` connections are served at once; one more waits up to
  `Limits.queue_wait` seconds for a slot, then gets `503` and is closed;
- a wall-clock deadline per phase, not per read: the request line and headers must arrive within
  `Limits.header_timeout` of the connection (or of the previous response on keep-alive), the
  body within `Limits.body_timeout`; a slow drip cannot stretch either;
- a request body above `Limits.max_body` is refused unread (`413`), chunked request bodies are
  refused (`411`), and all bodies being held at once share `Limits.body_budget` bytes
  (a request that does not fit waits, then gets `503`): N clients cannot make N x max_body;
- the body is read by the server before the handler runs (the handler sees it in `self.rfile`
  as before, and `self.body`): a handler that ignores a body cannot desynchronise keep-alive;
- TCP_NODELAY, and the status line and headers go out in the same send as the first body bytes;
- any exception in a handler is a `500` (when nothing was sent yet), a log line with the
  traceback and a counter (`HttpStats.internal_errors`); the server keeps serving. A client
  that resets or goes away is logged at debug level, without a traceback.

`Limits`, `HttpStats` and the body budget are defined in cidboot.httpd_lite, whose small server
reads the agent's API requests without `http.server`; a connection it started parsing can be
handed to a `BoundedHandler` here with `PrefixedSocket` (the agent's `/ipfs/` requests).
"""

from __future__ import annotations

import io
import logging
import socket
import time
from collections.abc import Sequence
from http.server import BaseHTTPRequestHandler, HTTPServer
from typing import Any

# the bounds themselves live in cidboot.httpd_lite, which the agent's API uses without http.server
from cidboot.httpd_lite import GONE, HttpStats, Limits, ThreadedServer

__all__ = ["BoundedHTTPServer", "BoundedHandler", "HttpStats", "Limits", "PrefixedSocket", "sendmsg_all"]

log = logging.getLogger("cidboot.httpd")


class PrefixedSocket:
    """A connection whose first bytes were already read (by cidboot.httpd_lite): reads return
    them first, everything else is the socket's. Lets a `BoundedHandler` take over a
    connection another server started parsing."""

    def __init__(self, sock: socket.socket, prefix: bytes) -> None:
        self._sock, self._prefix = sock, prefix

    def recv_into(self, b: Any, n: int = 0) -> int:
        if self._prefix:
            k = min(len(b), n or len(b), len(self._prefix))
            b[:k] = self._prefix[:k]
            self._prefix = self._prefix[k:]
            return k
        return self._sock.recv_into(b, n)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._sock, name)


class _DeadlineReader(io.RawIOBase):
    """The socket as a raw stream whose reads fail once `deadline` (monotonic) has passed.

    A per-read timeout lets a client dripping one byte per (timeout - 1) s hold a connection
    forever; this one bounds the whole phase."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.deadline = time.monotonic() + 10.0

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("request not received in time")
        self.sock.settimeout(left)
        return self.sock.recv_into(b)


def sendmsg_all(sock: socket.socket, parts: Sequence[bytes | memoryview]) -> None:
    """`sendall` of the parts joined, without joining them: sendmsg until every byte is out
    (a send may take only part, on a timeout socket or a signal)."""
    views = [memoryview(p) for p in parts if len(p)]
    while views:
        sent = sock.sendmsg(views)
        while sent:
            first = views[0]
            if sent >= len(first):
                sent -= len(first)
                views.pop(0)
            else:
                views[0] = first[sent:]
                sent = 0


class _Writer(io.BufferedIOBase):
    """Writes to the socket, sending any pending status line and headers with the first bytes."""

    def __init__(self, handler: BoundedHandler) -> None:
        self.h = handler

    def writable(self) -> bool:
        return True

    def write(self, b: Any) -> int:
        data = bytes(b)
        self.h._send(data)
        return len(data)

    def flush(self) -> None:
        if self.h._pending:
            self.h._send(b"")


class BoundedHandler(BaseHTTPRequestHandler):
    """A `BaseHTTPRequestHandler` that the `BoundedHTTPServer` bounds; handlers subclass this
    and write `do_GET` etc. as usual (the request body, if any, is already in `self.body`)."""

    server: BoundedHTTPServer
    protocol_version = "HTTP/1.1"
    sys_version = ""
    body: bytes = b""

    def setup(self) -> None:
        self.connection = self.request
        try:
            self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:  # not TCP (a unix socket in a test): nothing to disable
            pass
        self._reader = _DeadlineReader(self.connection)
        self._net_rfile = io.BufferedReader(self._reader, 65536)
        self.rfile = self._net_rfile
        self.wfile = _Writer(self)
        self._pending = b""
        self._sent_any = False
        self.server.stats.bump("connections")

    def finish(self) -> None:
        try:
            self.wfile.flush()
        except (OSError, TimeoutError):
            pass
        self._net_rfile.close()

    def handle_expect_100(self) -> bool:
        """Send `100 Continue` now (not with the response), and only for a body we would accept."""
        length = self.headers.get("Content-Length", "")
        if length.strip().isdigit() and int(length) > self.server.limits.max_body:
            return True  # _read_body answers 413 without reading
        self.send_response_only(100)
        self.end_headers()
        self.wfile.flush()
        return True

    # -- writing ------------------------------------------------------------------------
    def flush_headers(self) -> None:
        """Keep the status line and headers until the first body bytes (one send, not two)."""
        buf = getattr(self, "_headers_buffer", [])
        self._pending += b"".join(buf)
        self._headers_buffer: list[bytes] = []

    def _send(self, data: bytes) -> None:
        out = self._pending + data if self._pending else data
        self._pending = b""
        if not out:
            return
        self.connection.settimeout(self.server.limits.write_timeout)
        self._sent_any = True
        self.connection.sendall(out)

    def send_parts(self, parts: Sequence[bytes | memoryview]) -> None:
        """Write `parts` with one gathering send (sendmsg), any pending status line and headers
        in front: a large body part (a block) goes to the socket as it is, not first copied into
        a joined bytes. Same write timeout as every other write."""
        if self._pending:
            parts = [self._pending, *parts]
            self._pending = b""
        self.connection.settimeout(self.server.limits.write_timeout)
        self._sent_any = True
        sendmsg_all(self.connection, parts)

    def _quick_error(self, status: int, message: str, stat: str | None = None) -> None:
        """Answer `status` and close: for requests refused before their handler runs."""
        if stat:
            self.server.stats.bump(stat)
        self.close_connection = True
        try:
            self.send_error(status, message)
            self.wfile.flush()
        except (OSError, TimeoutError):
            pass

    # -- one request ---------------------------------------------------------------------
    default_request_version = "HTTP/1.0"

    def parse_request(self) -> bool:
        """The stdlib's, minus HTTP/0.9: a two-word request line ("GET /x") would be answered
        with a bare body and no status line, which no client of ours can tell from garbage."""
        ok = super().parse_request()  # with default_request_version HTTP/1.0: errors get a status line
        if ok and len(self.requestline.split()) == 2:
            self.send_error(400, "HTTP/0.9 requests are not supported")
            return False
        return ok

    def handle_one_request(self) -> None:
        lim = self.server.limits
        self._pending, self._sent_any, self.body = b"", False, b""
        self._headers_buffer = []
        self._reader.deadline = time.monotonic() + lim.header_timeout
        try:
            self.raw_requestline = self.rfile.readline(lim.max_header_line + 1)
            if len(self.raw_requestline) > lim.max_header_line:
                self.requestline = self.request_version = self.command = ""
                self._quick_error(414, "request line too long")
                return
            if not self.raw_requestline:
                self.close_connection = True
                return
            if not self.parse_request():  # it answered 400 / 431 itself
                self.wfile.flush()
                return
        except TimeoutError:
            self.server.stats.bump("timeouts")
            self.close_connection = True
            return
        except GONE + (OSError,) as e:
            self._gone(e)
            return
        self.server.stats.bump("requests")
        mname = "do_" + self.command
        if not hasattr(self, mname):
            self._quick_error(501, f"unsupported method {self.command!r}")
            return
        reserved = self._read_body()
        if reserved is None:
            return
        try:
            getattr(self, mname)()
            self.wfile.flush()
        except TimeoutError:
            self.server.stats.bump("timeouts")
            self.close_connection = True
        except GONE as e:
            self._gone(e)
        except Exception as e:  # a bug costs one request, never the server
            self.server.stats.bump("internal_errors")
            log.exception("internal error on %s %s", self.command, self.path)
            self.close_connection = True
            if not self._sent_any:
                self._pending, self._headers_buffer = b"", []
                try:
                    self.send_error(500, f"internal error: {type(e).__name__}")
                    self.wfile.flush()
                except (OSError, TimeoutError):
                    pass
        finally:
            self.rfile = self._net_rfile
            if reserved:
                self.server.body_budget.give(reserved)

    def _gone(self, e: BaseException) -> None:
        self.server.stats.bump("client_gone")
        self.close_connection = True
        log.debug("client %s went away: %s", self.client_address[0], type(e).__name__)

    def _read_body(self) -> int | None:
        """Read the body (within the limits) into `self.body`; return the bytes reserved from
        the budget (0 for none), or None when the request was answered and must not run."""
        lim = self.server.limits
        if self.headers.get("Transfer-Encoding") is not None:
            self._quick_error(411, "chunked request bodies are not accepted: send Content-Length", "bodies_refused")
            return None
        length = self.headers.get("Content-Length")
        if length is None:
            return 0
        n = int(length) if length.strip().isdigit() and len(length) < 20 else -1
        if n < 0:
            self._quick_error(400, f"bad Content-Length {length[:40]!r}")
            return None
        if n > lim.max_body:
            self._quick_error(413, f"request body of {n} bytes exceeds the {lim.max_body}-byte limit", "bodies_refused")
            return None
        if n == 0:
            return 0
        if not self.server.body_budget.take(n, lim.queue_wait):
            self._quick_error(503, "server busy: too many request bodies in flight", "busy_rejected")
            return None
        self._reader.deadline = time.monotonic() + lim.body_timeout
        try:
            body = self.rfile.read(n)
        except TimeoutError:
            body = None
            self.server.stats.bump("timeouts")
        except OSError as e:
            body = None
            self._gone(e)
        if body is None or len(body) != n:
            self.server.body_budget.give(n)
            self.close_connection = True
            return None
        self.body = body
        self.rfile = io.BytesIO(body)  # handlers read it as before (shares `body`: no copy)
        return n


class BoundedHTTPServer(ThreadedServer, HTTPServer):
    """`HTTPServer` with a 1024 backlog, a bounded number of worker threads, and the handler
    bounds of `BoundedHandler`; use with a `BoundedHandler` subclass. The accept loop, the
    worker threads and `shutdown` are cidboot.httpd_lite's `ThreadedServer`, shared with the
    agent's API server; socketserver's own `serve_forever` polls every 0.5 s for a shutdown."""

    allow_reuse_address = True
    daemon_threads = True

    def __init__(self, address: tuple[str, int], handler: type[BoundedHandler], limits: Limits | None = None) -> None:
        self._init_front(limits)
        self.request_queue_size = self.limits.backlog
        super().__init__(address, handler)  # a failed bind calls server_close: the bell is closed too

    def serve_connection(self, conn: socket.socket, addr: Any) -> None:
        self.finish_request(conn, addr)  # the handler: TCP_NODELAY, the stats, the requests

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        host = host if isinstance(host, str) else host.decode()
        return f"http://{'127.0.0.1' if host == '0.0.0.0' else host}:{port}"
