"""The bounds every cidboot HTTP server shares (`Limits`, `HttpStats`, the body budget), and a
small HTTP/1.1 front door on sockets and threads (`LiteHTTPServer`) for the agent's start.

cidboot.httpd bounds the stdlib `http.server` for the gateway, the boot server and the agent's
`/ipfs/` connections. Importing `http.server` costs a device more than its parser is worth to
the agent's own API (`html`, `shutil`, `socketserver`, `mimetypes`: ~20 M guest instructions
under TCG, ~0.08 s of every agent's start), so the agent's API reads its requests here: the same
`Limits` (backlog, worker slots with 503 beyond them, a wall-clock deadline for the request line
and headers and another for the body, bodies above `max_body` refused unread with 413, chunked
bodies with 411, all bodies held at once within `body_budget`), TCP_NODELAY and one send per
response. A subclass implements `handle_connection`; `read_request` gives it one parsed request
at a time. This module imports only what the agent's start has loaded anyway.

The accept loop and worker threads of both HTTP servers (`ThreadedServer`, which cidboot.httpd's
`BoundedHTTPServer` inherits too) and the wake-up every cidboot serve loop sleeps on instead of
polling (`StopBell`: the HTTP servers, TFTP and DHCP) live here for the same reason: one more
module would be one more import in the agent's start.
"""

from __future__ import annotations

import logging
import selectors
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, cast

log = logging.getLogger("cidboot.httpd")

GONE = (ConnectionResetError, BrokenPipeError, ConnectionAbortedError)
MAX_HEADERS = 100  # header lines per request (http.client's bound): more is 431


@dataclass(frozen=True)
class Limits:
    """What one server may spend; the defaults suit the boot server, the gateway and the agent."""

    backlog: int = 1024
    max_workers: int = 512  # connections served at once (each a thread)
    queue_wait: float = 1.0  # seconds a connection beyond max_workers waits for a slot before 503
    header_timeout: float = 10.0  # request line + headers (also the keep-alive idle time)
    body_timeout: float = 60.0  # the whole request body
    write_timeout: float = 30.0  # each write of the response (a client that stops reading)
    max_body: int = 64 * 1024  # bytes per request body
    body_budget: int = 32 * 1024 * 1024  # bytes of bodies held at once, all connections together
    max_header_line: int = 65536


@dataclass
class HttpStats:
    """Counters the servers export on /metrics (read without the lock: they only grow)."""

    connections: int = 0
    requests: int = 0
    busy_rejected: int = 0  # 503: no worker slot / no body budget in time
    timeouts: int = 0  # headers or body did not arrive in time, or a write stalled
    bodies_refused: int = 0  # 413 / 411
    internal_errors: int = 0  # a handler raised: 500
    client_gone: int = 0  # resets and broken pipes
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def bump(self, name: str) -> None:
        with self.lock:
            setattr(self, name, getattr(self, name) + 1)


class Budget:
    """Bytes that may be held at once; `take` waits up to `timeout` for room."""

    def __init__(self, total: int) -> None:
        self.total, self.used = total, 0
        self._cond = threading.Condition()

    def take(self, n: int, timeout: float) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: self.used + n <= self.total, timeout) and self._grab(n)

    def _grab(self, n: int) -> bool:
        self.used += n
        return True

    def give(self, n: int) -> None:
        with self._cond:
            self.used -= n
            self._cond.notify_all()


_MMAP_THRESHOLD_SET = False


def large_allocations_return_to_os() -> None:
    """Fix glibc's mmap threshold at 1 MiB (best effort, once per process).

    The body budget bounds the bodies alive at once, but glibc raises its mmap threshold after
    the first large free, so each worker thread's arena then keeps its freed 8 MiB bodies: 30
    bodies read by 30 threads left the agent at 177 MiB although at most 32 MiB were ever live.
    With a fixed threshold every large buffer is its own mapping and goes back on free.
    Elsewhere (musl, other libcs) large allocations are mapped anyway: nothing to do."""
    global _MMAP_THRESHOLD_SET
    if _MMAP_THRESHOLD_SET:
        return
    _MMAP_THRESHOLD_SET = True
    try:
        import ctypes

        libc = ctypes.CDLL(None)
        mallopt = libc.mallopt
    except (ImportError, OSError, AttributeError):
        return
    mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD


class HttpRefusal(Exception):
    """A request refused before its handler runs: answer `status` with `reason`, then close."""

    def __init__(self, status: int, reason: str, stat: str | None = None) -> None:
        super().__init__(reason)
        self.status, self.stat = status, stat


class RawRequest:
    """One request as read off the connection: the head parsed, the body read (within limits).
    (A plain class: a dataclass is generated code, created at every agent start.)"""

    __slots__ = ("method", "target", "version", "headers", "lower", "head", "body", "keep_alive", "reserved")

    def __init__(self, method: str, target: str, version: str, headers: dict[str, str], lower: dict[str, str],
                 head: bytes, *, keep_alive: bool = True) -> None:
        self.method, self.target, self.version = method, target, version
        self.headers = headers  # names as sent (the last of repeated ones)
        self.lower = lower  # names lower-cased, for lookups
        self.head = head  # the request line and headers as received (to hand the connection on)
        self.body = b""
        self.keep_alive = keep_alive
        self.reserved = 0  # bytes of the body budget this request holds until `LiteHTTPServer.done`


class Connection:
    """One client connection: buffered reads that fail once the phase's `deadline` has passed
    (a per-read timeout would let a client dripping a byte at a time hold it forever)."""

    def __init__(self, sock: socket.socket, limits: Limits) -> None:
        self.sock, self.limits = sock, limits
        self.buf = b""
        self.deadline = time.monotonic() + limits.header_timeout

    def _fill(self) -> bool:
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("request not received in time")
        self.sock.settimeout(left)
        data = self.sock.recv(65536)
        self.buf += data
        return bool(data)

    def read_head(self) -> bytes | None:
        """The request line and headers up to the blank line; None when the client closed
        before sending a byte of a new request."""
        lim = self.limits.max_header_line
        while True:
            end = self.buf.find(b"\r\n\r\n")
            first = self.buf.find(b"\n")
            if end >= 0 and first <= lim:
                head, self.buf = self.buf[:end + 4], self.buf[end + 4:]
                return head
            if (first < 0 and len(self.buf) > lim) or first > lim:
                raise HttpRefusal(414, "request line too long")
            if len(self.buf) > lim * 4:
                raise HttpRefusal(431, "request headers too large")
            if not self._fill():
                if self.buf.strip():
                    raise HttpRefusal(400, "connection closed in the middle of the request headers")
                return None

    def read_exact(self, n: int) -> bytes | None:
        """`n` body bytes, or None when the client closed first."""
        while len(self.buf) < n:
            if not self._fill():
                return None
        body, self.buf = self.buf[:n], self.buf[n:]
        return body


def parse_head(head: bytes, max_line: int) -> RawRequest:
    """The request line and headers, as `http.server` reads them, minus HTTP/0.9 (a two-word
    request line would be answered with a bare body no client of ours can tell from garbage)."""
    lines = head.decode("iso-8859-1").split("\r\n")[:-2]
    words = lines[0].split() if lines else []
    if len(words) == 2:
        raise HttpRefusal(400, "HTTP/0.9 requests are not supported")
    if len(words) != 3:
        raise HttpRefusal(400, f"bad request syntax {lines[0][:80]!r}" if lines else "empty request")
    method, target, version = words
    try:
        if not version.startswith("HTTP/"):
            raise ValueError
        major, minor = (int(x) for x in version[5:].split(".", 1))
    except ValueError:
        raise HttpRefusal(400, f"bad request version {version[:20]!r}") from None
    if major != 1:
        raise HttpRefusal(505, f"HTTP version {version[:20]} not supported")
    if target.startswith("//"):  # as http.server: never a scheme-relative URL
        target = "/" + target.lstrip("/")
    if len(lines) - 1 > MAX_HEADERS:
        raise HttpRefusal(431, f"more than {MAX_HEADERS} header lines")
    headers: dict[str, str] = {}
    lower: dict[str, str] = {}
    last = ""
    for line in lines[1:]:
        if len(line) > max_line:
            raise HttpRefusal(431, "header line too long")
        if line[:1] in (" ", "\t") and last:  # obsolete line folding: part of the previous value
            headers[last] += " " + line.strip()
            lower[last.lower()] = headers[last]
            continue
        name, sep, value = line.partition(":")
        if not sep or not name or name != name.strip():
            raise HttpRefusal(400, f"malformed header line {line[:80]!r}")
        key = name.lower()
        if key in ("content-length", "transfer-encoding") and key in lower:  # which one frames the body?
            raise HttpRefusal(400, f"{name} given more than once")
        headers[name] = lower[key] = value.strip()
        last = name
    conn = lower.get("connection", "").lower()
    keep = conn != "close" and (minor >= 1 or conn == "keep-alive")
    return RawRequest(method, target, version, headers, lower, head, keep_alive=keep)


_DAYS = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")
_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")


def http_date(t: float | None = None) -> str:
    """RFC 9110's IMF-fixdate, independent of the locale."""
    g = time.gmtime(t)
    return (f"{_DAYS[g.tm_wday]}, {g.tm_mday:02d} {_MONTHS[g.tm_mon - 1]} {g.tm_year} "
            f"{g.tm_hour:02d}:{g.tm_min:02d}:{g.tm_sec:02d} GMT")


_REASONS = {100: "Continue", 200: "OK", 201: "Created", 204: "No Content", 400: "Bad Request", 403: "Forbidden",
            404: "Not Found", 405: "Method Not Allowed", 409: "Conflict", 410: "Gone", 411: "Length Required",
            413: "Content Too Large", 414: "URI Too Long", 431: "Request Header Fields Too Large",
            500: "Internal Server Error", 501: "Not Implemented", 503: "Service Unavailable",
            505: "HTTP Version Not Supported"}


def response_bytes(status: int, headers: list[tuple[str, str]], body: bytes, server: str) -> bytes:
    """Status line, headers and body as one buffer: one send, so Nagle and delayed ACK never
    hold a response back."""
    head = [f"HTTP/1.1 {status} {_REASONS.get(status, 'Status')}", f"Server: {server}", f"Date: {http_date()}"]
    head += [f"{k}: {v}" for k, v in headers]
    return ("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + body


_Socket = socket.socket  # in ThreadedServer, `socket` is the listening socket


class StopBell:
    """How `shutdown` stops a serve loop that sleeps in select() with no timeout, so an idle
    server makes no wake-ups and a shutdown takes effect at once (a loop that polled every 0.5 s
    for its stop flag woke 2 times a second for nothing, and made each shutdown wait up to 0.5 s:
    paid by every test that starts and stops a server).

    `serve` is the loop (each server gives its sockets and what to do when they are readable): it
    watches `fileno()` beside the sockets; `stop()` sets `asked` and, when a loop is running,
    writes a byte to a socketpair that makes `fileno()` readable (the self-pipe trick: closing
    or shutting down the loop's own socket from another thread wakes nothing reliably).
    A stop asked before any loop ran is taken by the next one to `enter`, which returns at once;
    a stop asked after the loop returned is kept for the next one too (as socketserver's).

    `wait_for_start`: `stop` waits for a loop to have run and returned even when none has started
    yet (socketserver's `shutdown`, which the HTTP servers keep: the caller's serving thread may
    not have got there yet); without it `stop` waits only for a loop that is running (the UDP
    servers, whose callers may never have run one)."""

    def __init__(self, *, wait_for_start: bool) -> None:
        self._r, self._w = socket.socketpair()
        self._r.setblocking(False)
        self._w.setblocking(False)
        self._lock = threading.Lock()
        self.asked = False  # a stop was asked that no loop has taken yet
        self._running = self._close_on_leave = False
        self._idle = threading.Event()  # no loop running (socketserver's __is_shut_down)
        if not wait_for_start:
            self._idle.set()

    def fileno(self) -> int:
        return self._r.fileno()

    def enter(self) -> bool:
        """A serve loop starts: False when a stop was asked before (taken: return at once)."""
        with self._lock:
            if self.asked:
                self.asked = False
                self._idle.set()
                return False
            self._running = True
            self._idle.clear()
            return True

    def leave(self) -> None:
        """The serve loop returns (whatever the reason): the stop it took is spent."""
        with self._lock:
            self.asked = self._running = False
            try:
                while self._r.recv(64):
                    pass
            except OSError:  # BlockingIOError: drained; or closed
                pass
            if self._close_on_leave:
                self._r.close()
                self._w.close()
            self._idle.set()

    def serve(self, socks: list[_Socket], on_ready: Callable[[list[_Socket]], None]) -> None:
        """The serve loop: asleep until some of `socks` are readable, then `on_ready(those)`,
        until `stop`. What `on_ready` raises ends the loop (it catches what one request raises)."""
        if not self.enter():  # stopped before this thread got here
            return
        try:
            with selectors.DefaultSelector() as sel:
                for s in socks:
                    sel.register(s, selectors.EVENT_READ)
                sel.register(self, selectors.EVENT_READ)
                while True:
                    ready = sel.select()
                    if self.asked:
                        return
                    on_ready([cast(_Socket, key.fileobj) for key, _ in ready if key.fileobj is not self])
        finally:
            self.leave()

    def stop(self) -> None:
        """Ask the loop to return and wait until no loop runs (see `wait_for_start`)."""
        with self._lock:
            self.asked = True
            if self._running:
                try:
                    self._w.send(b"\0")
                except OSError:  # BlockingIOError: full of bytes, readable already
                    pass
        self._idle.wait()

    def close(self) -> None:
        """Close the socketpair; while a loop runs (a `server_close` before the `shutdown`), only
        once it has returned: the shutdown must still be able to ring."""
        with self._lock:
            self._close_on_leave = self._running
            if self._running:
                return
        self._r.close()
        self._w.close()


class ThreadedServer:
    """The accept loop and worker threads both cidboot HTTP servers share (this module's
    `LiteHTTPServer` and cidboot.httpd's `BoundedHTTPServer`, which also inherits socketserver's
    `HTTPServer`): a connection is served on its own thread, at most `Limits.max_workers` at once
    (one more waits `queue_wait` for a slot, then gets 503 and is closed); the subclass's
    `serve_connection` serves one connection, and whatever it raises is logged and counted, never
    the server's end. `serve_forever`, `shutdown` and `server_close` behave as socketserver's,
    except that an idle server sleeps (`StopBell`)."""

    socket: _Socket  # the listening socket (an attribute named as socketserver names it)

    def _init_front(self, limits: Limits | None) -> None:
        self.limits = limits or Limits()
        self.stats = HttpStats()
        self.body_budget = Budget(self.limits.body_budget)
        self._slots = threading.BoundedSemaphore(self.limits.max_workers)
        self._bell = StopBell(wait_for_start=True)
        if self.limits.max_body >= 1 << 20:
            large_allocations_return_to_os()

    @property
    def busy(self) -> int:
        """Connections being served right now."""
        return self.limits.max_workers - self._slots._value

    def serve_forever(self, poll_interval: float | None = None) -> None:
        """Accept connections until `shutdown`. `poll_interval` is accepted for socketserver's
        callers and ignored: nothing is polled."""
        self._bell.serve([self.socket], self._accept)

    def _accept(self, ready: list[_Socket]) -> None:
        try:
            conn, addr = self.get_request()
        except OSError:  # the client gave up already, or out of descriptors: keep serving
            return
        try:
            self.process_request(conn, addr)
        except Exception:  # as socketserver: never the end of the server
            self.stats.bump("internal_errors")
            log.exception("connection from %s failed", addr)
            self._close(conn)

    def get_request(self) -> tuple[_Socket, Any]:
        """The next connection (socketserver's hook, which tests override to spy on one)."""
        return self.socket.accept()

    def shutdown(self) -> None:
        """Stop `serve_forever` and wait until it has returned: called before the serving thread
        got there, it returns once that thread has started and stopped (as socketserver's; and
        as there, never call it without a `serve_forever` running or about to run)."""
        self._bell.stop()

    def server_close(self) -> None:
        self.socket.close()
        self._bell.close()

    def process_request(self, conn: Any, addr: Any) -> None:  # Any: as socketserver's
        if not self._slots.acquire(timeout=self.limits.queue_wait):
            self.stats.bump("busy_rejected")
            try:
                conn.settimeout(1.0)
                conn.sendall(b"HTTP/1.1 503 Service Unavailable\r\nRetry-After: 1\r\nContent-Length: 0\r\n"
                             b"Connection: close\r\n\r\n")
            except OSError:
                pass
            self._close(conn)
            return
        try:
            threading.Thread(target=self._work, args=(conn, addr), daemon=True, name="httpd-worker").start()
        except RuntimeError:  # cannot start a thread: shed the connection, keep serving
            self._slots.release()
            self._close(conn)

    def _work(self, conn: _Socket, addr: Any) -> None:
        try:
            self.serve_connection(conn, addr)
        except GONE:
            self.stats.bump("client_gone")
        except Exception:
            self.stats.bump("internal_errors")
            log.exception("connection from %s failed", addr)
        finally:
            self._close(conn)
            self._slots.release()

    @staticmethod
    def _close(conn: _Socket) -> None:
        try:
            conn.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        conn.close()

    def serve_connection(self, conn: _Socket, addr: Any) -> None:
        """Serve one accepted connection, on its worker thread (closed after it returns)."""
        raise NotImplementedError


class LiteHTTPServer(ThreadedServer):
    """Serves each connection with the subclass's `handle_connection` (`ThreadedServer`)."""

    server_version = "cidboot"

    def __init__(self, address: tuple[str, int], limits: Limits | None = None) -> None:
        self._init_front(limits)
        self.socket = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            self.socket.bind(address)
            self.socket.listen(self.limits.backlog)
        except OSError:
            self.socket.close()
            self._bell.close()
            raise
        self.server_address: tuple[str, int] = self.socket.getsockname()

    def fileno(self) -> int:
        return self.socket.fileno()

    def serve_connection(self, conn: socket.socket, addr: Any) -> None:
        self.stats.bump("connections")
        try:
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            pass
        self.handle_connection(conn, addr)

    def handle_connection(self, conn: socket.socket, addr: Any) -> None:
        raise NotImplementedError

    def read_request(self, c: Connection) -> RawRequest | None:
        """The next request on `c` with its body, within the limits; None when the connection is
        done (closed by the client, timed out, or refused: the refusal was answered)."""
        lim = self.limits
        c.deadline = time.monotonic() + lim.header_timeout
        try:
            head = c.read_head()
            if head is None:
                return None
            req = parse_head(head, lim.max_header_line)
        except HttpRefusal as e:
            self.refuse(c, e)
            return None
        except TimeoutError:
            self.stats.bump("timeouts")
            return None
        except GONE:
            self.stats.bump("client_gone")
            return None
        except OSError:
            return None
        try:
            req.body = self._read_body(c, req)
        except HttpRefusal as e:
            self.refuse(c, e)
            return None
        req.reserved = len(req.body)
        return req

    def done(self, req: RawRequest) -> None:
        """The request was answered: its body's share of the budget is free again."""
        if req.reserved:
            self.body_budget.give(req.reserved)
            req.reserved = 0

    def _read_body(self, c: Connection, req: RawRequest) -> bytes:
        """The body, read before any handler runs (a handler that ignores it cannot
        desynchronise keep-alive); it holds its bytes of the budget until `done`."""
        lim = self.limits
        if "transfer-encoding" in req.lower:
            raise HttpRefusal(411, "chunked request bodies are not accepted: send Content-Length", "bodies_refused")
        length = req.lower.get("content-length")
        if length is None:
            return b""
        n = int(length) if length.isdigit() and len(length) < 20 else -1
        if n < 0:
            raise HttpRefusal(400, f"bad Content-Length {length[:40]!r}")
        if n > lim.max_body:
            raise HttpRefusal(413, f"request body of {n} bytes exceeds the {lim.max_body}-byte limit", "bodies_refused")
        if n == 0:
            return b""
        if req.lower.get("expect", "").lower() == "100-continue" and req.version == "HTTP/1.1":
            self._send(c, b"HTTP/1.1 100 Continue\r\n\r\n")
        if not self.body_budget.take(n, lim.queue_wait):
            raise HttpRefusal(503, "server busy: too many request bodies in flight", "busy_rejected")
        try:
            c.deadline = time.monotonic() + lim.body_timeout
            body = c.read_exact(n)
        except TimeoutError:
            self.stats.bump("timeouts")
            body = None
        except OSError:
            body = None
        if body is None:
            self.body_budget.give(n)
            raise _Dropped()
        return body

    def refuse(self, c: Connection, e: HttpRefusal) -> None:
        """Answer a refusal and let the connection close."""
        if isinstance(e, _Dropped):
            return
        if e.stat:
            self.stats.bump(e.stat)
        body = (str(e) + "\n").encode()
        try:
            self._send(c, response_bytes(e.status, [("Content-Type", "text/plain; charset=utf-8"),
                                                    ("Content-Length", str(len(body))), ("Connection", "close")],
                                         body, self.server_version))
        except OSError:
            pass

    def _send(self, c: Connection, data: bytes) -> None:
        c.sock.settimeout(self.limits.write_timeout)
        c.sock.sendall(data)


class _Dropped(HttpRefusal):
    """The body did not arrive (timeout, client gone): nothing to answer."""

    def __init__(self) -> None:
        super().__init__(0, "request body not received")
