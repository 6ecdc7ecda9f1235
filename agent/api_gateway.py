"""The agent's connections that ask for `/ipfs/`: the trustless gateway's own handler
(cidboot.store.gateway.server, on cidboot.httpd's bounded `http.server`), with the agent's
routes on the same connection.

Imported by the first `/ipfs/` request (agent.attestation_api.AgentServer hands the connection
over, with the bytes it already read): the gateway's server and `http.server` are not part of
the agent's start.
"""

from __future__ import annotations

import logging
import socket
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, urlsplit

from agent.attestation_api import MAX_BODY, HttpError, Request, Response
from cidboot.errors import CidbootError
from cidboot.httpd import PrefixedSocket
from cidboot.store.gateway.server import (
    _Handler as _GatewayHandler,  # /ipfs/ is served by the gateway's own code
)

if TYPE_CHECKING:
    from agent.attestation_api import AgentServer

log = logging.getLogger("agent.api")


def serve_connection(server: AgentServer, conn: socket.socket, addr: Any, prefix: bytes) -> None:
    """Serve the rest of `conn` (whose first `prefix` bytes were already read) with the gateway's
    handler; the connection stays with it until it closes."""
    _Handler(PrefixedSocket(conn, prefix), addr, server)  # type: ignore[arg-type]


class _Handler(_GatewayHandler):
    """The agent's routes; `/ipfs/` (GET, HEAD) goes to the trustless gateway's handler."""

    server: AgentServer  # type: ignore[assignment]  # has the gateway server's store/metrics/extra_routes/limits
    protocol_version = "HTTP/1.1"
    server_version = "cidboot-agent"
    sys_version = ""

    def log_message(self, format: str, *args: object) -> None:
        log.debug("%s " + format, self.address_string(), *args)

    def _gateway(self) -> bool:
        return self.server.store is not None and self.path.startswith("/ipfs/")

    _responded = False  # a status line went out for the current request (then a 500 cannot follow)

    def send_response(self, code: int, message: str | None = None) -> None:
        self._responded = True
        super().send_response(code, message)

    def do_GET(self) -> None:
        if self._gateway():
            self._guarded_gateway()
        else:
            self._agent()

    def do_HEAD(self) -> None:
        if self._gateway():
            self._guarded_gateway()
        else:
            self._agent()

    def _guarded_gateway(self) -> None:
        """The gateway's handler, with the agent's rule: a bug costs one request (500, logged,
        counted), never the connection thread's silent death or the server."""
        self._responded = False
        try:
            super()._handle()
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True
        except Exception as e:
            log.exception("internal error on %s %s", self.command, self.path)
            if self._responded:  # part of a response is out: the connection cannot carry a 500
                self.close_connection = True
                self.server.metrics.record(500, 0)
                return
            self._send_error(500, f"internal error: {type(e).__name__}")

    def do_POST(self) -> None:
        self._agent()

    def _agent(self) -> None:
        self._responded = False
        try:
            resp = self.server.dispatch(self._request())
        except HttpError as e:
            obj = dict(e.obj) if e.obj is not None else None
            resp = (Response.json({**obj, "error": str(e)}, e.status) if obj is not None else
                    Response(e.status, "text/plain; charset=utf-8", (str(e) + "\n").encode()))
            log.info("%s %s -> %d: %s", self.command, self.path, e.status, e)
        except CidbootError as e:
            resp = Response(400, "text/plain; charset=utf-8", (f"{e}\n").encode())
        except Exception as e:  # a bug must cost one request, not the server (RecursionError, MemoryError...)
            log.exception("internal error on %s %s", self.command, self.path)
            resp = Response(500, "text/plain; charset=utf-8", f"internal error: {type(e).__name__}\n".encode())
            self.close_connection = True  # the body may not have been read: do not parse it as a request
        self.server.metrics.record(resp.status, len(resp.body) if self.command != "HEAD" else 0)
        try:
            self.send_response(resp.status)
            self.send_header("Content-Type", resp.content_type)
            self.send_header("Content-Length", str(len(resp.body)))
            self.send_header("Cache-Control", "no-store")
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(resp.body)
        except OSError:  # the client went away: nothing to answer
            self.close_connection = True

    def _request(self) -> Request:
        u = urlsplit(self.path)
        try:
            query = parse_qs(u.query, keep_blank_values=True, strict_parsing=False, max_num_fields=32)
        except ValueError as e:
            raise HttpError(400, f"bad query string: {e}") from None
        body = b""
        if self.command == "POST":
            length = self.headers.get("Content-Length")
            if length is None:
                self.close_connection = True
                raise HttpError(411, "Content-Length required")
            try:
                n = int(length)
            except ValueError:
                self.close_connection = True
                raise HttpError(400, f"bad Content-Length {length!r}") from None
            if not 0 <= n <= MAX_BODY:
                self.close_connection = True
                raise HttpError(413, f"body of {n} bytes exceeds {MAX_BODY}")
            body = self.rfile.read(n)
        return Request(self.command, u.path, query, dict(self.headers.items()), body, self.client_address[0])
