"""The one HTTP/1.1 exchange the verifying client makes: a GET, and the answer's body read as
it streams (de-chunked straight into the caller's buffer).

Why not http.client: it parses headers with the email package and imports ssl, together ~60 ms
of instructions of the bootstrap's start-up under TCG, for a GET whose answer is checked block
by block anyway. Here ssl is imported only to talk to an https:// gateway. What the answer
may do is bounded as http.client bounds it (a header line, the number of headers, a chunk-size
line); a broken or cut framing is a `ResponseError` (like http.client's HTTPException and
IncompleteRead), a transport failure an OSError, a stall the socket's TimeoutError.
"""

from __future__ import annotations

import socket
from typing import TYPE_CHECKING

from cidboot.errors import FormatError

if TYPE_CHECKING:
    from io import BufferedReader

MAX_LINE = 65536  # a status, header or chunk-size line (http.client's _MAXLINE)
MAX_HEADERS = 100  # http.client's _MAXHEADERS


class ResponseError(FormatError):
    """The answer is not HTTP/1.x as framed (status line, headers, chunks), or its body was cut
    before the length it announced."""


class Connection:
    """One connection to one gateway for one GET (`Connection: close`)."""

    def __init__(self, host: str, port: int | None, *, tls: bool, timeout: float) -> None:
        self.host, self.tls, self.timeout = host, tls, timeout
        self.port = port if port is not None else (443 if tls else 80)
        self.sock: socket.socket | None = None
        self._fp: BufferedReader | None = None

    def connect(self) -> None:
        sock = socket.create_connection((self.host, self.port), self.timeout)
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if self.tls:
                import ssl  # only for an https:// gateway

                sock = ssl.create_default_context().wrap_socket(sock, server_hostname=self.host)
        except BaseException:
            sock.close()
            raise
        self.sock = sock

    def request(self, target: str, headers: dict[str, str]) -> None:
        """Send `GET target` with `headers` (plus Host, Accept-Encoding: identity, Connection: close)."""
        if self.sock is None:
            self.connect()
        assert self.sock is not None
        if any(c in target for c in " \r\n") or any(c in v for v in headers.values() for c in "\r\n"):
            raise ResponseError(f"refusing to send a request target or header with a space or line break: {target!r}")
        host = f"[{self.host}]" if ":" in self.host else self.host
        if self.port != (443 if self.tls else 80):
            host = f"{host}:{self.port}"
        lines = [f"GET {target} HTTP/1.1", f"Host: {host}", "Accept-Encoding: identity", "Connection: close",
                 *(f"{k}: {v}" for k, v in headers.items())]
        self.sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))

    def getresponse(self) -> Response:
        """Read the status line and headers (skipping 1xx answers); the body is read from the
        returned Response as it streams."""
        assert self.sock is not None
        if self._fp is None:
            self._fp = self.sock.makefile("rb")
        while True:
            resp = Response(self._fp)
            if not 100 <= resp.status < 200:
                return resp

    def close(self) -> None:
        fp, sock, self._fp, self.sock = self._fp, self.sock, None, None
        if fp is not None:
            fp.close()
        if sock is not None:
            sock.close()


def _line(fp: BufferedReader, what: str) -> bytes:
    line = fp.readline(MAX_LINE + 1)
    if len(line) > MAX_LINE:
        raise ResponseError(f"{what} longer than {MAX_LINE} bytes")
    return line


class Response:
    """An answer's status, headers (names lower-cased; repeats joined with ", ") and body."""

    def __init__(self, fp: BufferedReader) -> None:
        self._fp = fp
        line = _line(fp, "status line")
        if not line:
            raise ConnectionResetError("the gateway closed the connection without an answer")
        parts = line.decode("latin-1").rstrip("\r\n").split(None, 2)
        if len(parts) < 2 or not parts[0].startswith("HTTP/1.") or not (parts[1].isdigit() and len(parts[1]) == 3):
            raise ResponseError(f"not an HTTP/1.x status line: {line[:80]!r}")
        self.status = int(parts[1])
        self.reason = parts[2] if len(parts) > 2 else ""
        self.headers: dict[str, str] = {}
        for _ in range(MAX_HEADERS + 1):
            h = _line(fp, "header line")
            if h in (b"\r\n", b"\n"):
                break
            if not h:
                raise ResponseError("the answer ended inside its headers")
            name, sep, value = h.decode("latin-1").partition(":")
            if not sep:
                raise ResponseError(f"not a header line: {h[:80]!r}")
            key, value = name.strip().lower(), value.strip()
            self.headers[key] = f"{self.headers[key]}, {value}" if key in self.headers else value
        else:
            raise ResponseError(f"more than {MAX_HEADERS} headers")
        self.chunked = self.headers.get("transfer-encoding", "").lower() == "chunked"
        length = self.headers.get("content-length")
        self._left: int | None = None  # body bytes left (None: to the end of the connection)
        if not self.chunked and length is not None:
            if not length.strip().isdigit():
                raise ResponseError(f"bad Content-Length {length!r}")
            self._left = int(length)
        if self.status in (204, 304) or 100 <= self.status < 200:
            self._left = 0
        self._chunk_left = 0  # bytes left in the current chunk
        self._in_chunk = False  # its data started: a CRLF follows it
        self._done = False  # the last chunk (and trailers) read

    def getheader(self, name: str, default: str | None = None) -> str | None:
        return self.headers.get(name.lower(), default)

    def _next_chunk(self) -> bool:
        """Move to the next chunk's data; False at the last chunk (its trailers are read)."""
        if self._done:
            return False
        if self._in_chunk and len(self._fp.read(2)) != 2:  # the CRLF after a chunk's data
            raise ResponseError("the body was cut after a chunk")
        line = _line(self._fp, "chunk-size line")
        if not line:
            raise ResponseError("the body was cut before its last chunk")
        try:
            size = int(line.split(b";", 1)[0].strip(), 16)
        except ValueError:
            raise ResponseError(f"bad chunk-size line {line[:40]!r}") from None
        if size < 0:
            raise ResponseError(f"bad chunk size {size}")
        if size == 0:
            for _ in range(MAX_HEADERS + 1):  # trailers, then the blank line
                t = _line(self._fp, "trailer line")
                if t in (b"\r\n", b"\n", b""):
                    break
            self._done = True
            self._in_chunk = False
            return False
        self._chunk_left, self._in_chunk = size, True
        return True

    def readinto(self, b: bytearray | memoryview) -> int:
        """Fill `b` from the body; fewer bytes only at its end (0: it ended). Chunks are read
        straight into `b`, with no copy in between."""
        view = memoryview(b).cast("B")
        if not self.chunked:
            want = len(view) if self._left is None else min(len(view), self._left)
            if not want:
                return 0
            n = self._fp.readinto(view[:want]) or 0
            if self._left is not None:
                if n < want:
                    raise ResponseError(f"the body was cut {self._left - n} bytes before its Content-Length")
                self._left -= n
            return n
        total = 0
        while total < len(view):
            if not self._chunk_left and not self._next_chunk():
                break
            want = min(self._chunk_left, len(view) - total)
            n = self._fp.readinto(view[total : total + want]) or 0
            if n < want:
                raise ResponseError("the body was cut inside a chunk")
            total += n
            self._chunk_left -= n
        return total

    def read(self, n: int) -> bytes:
        """Up to `n` bytes of the body, fewer only at its end (a Content-Length body cut short
        gives what came, as http.client's read(n) does; the caller checks the bytes)."""
        if not self.chunked:
            if self._left is not None:
                n = min(n, self._left)
            data = self._fp.read(n) if n else b""
            if self._left is not None:
                self._left -= len(data)
            return data
        parts: list[bytes] = []
        got = 0
        while got < n:
            if not self._chunk_left and not self._next_chunk():
                break
            piece = self._fp.read(min(self._chunk_left, n - got))
            if not piece:
                raise ResponseError("the body was cut inside a chunk")
            parts.append(piece)
            got += len(piece)
            self._chunk_left -= len(piece)
        return parts[0] if len(parts) == 1 else b"".join(parts)
