"""Read-only TFTP server for PXE: RFC 1350 with options (RFC 2347), blksize (2348), tsize and
timeout (2349) and windowsize (7440).

tftpy provides the wire format (its packet classes parse and encode every TFTP packet); the
transfer engine is ours because tftpy 0.8.7 has no windowsize and resolves paths without
following symlinks. Each transfer runs on its own socket (its TID) and thread, so one slow or
hostile client never holds up the others. Paths are confined to the root after resolving
symlinks; `..`, writes and unknown opcodes are refused with a TFTP error packet and logged.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from tftpy.TftpPacketFactory import TftpPacketFactory
from tftpy.TftpPacketTypes import (
    TftpPacketACK,
    TftpPacketDAT,
    TftpPacketERR,
    TftpPacketOACK,
    TftpPacketRRQ,
    TftpPacketWRQ,
)

from bootstrap.server.metrics import Metrics

log = logging.getLogger("bootstrap.tftp")

ERR_UNDEFINED, ERR_NOT_FOUND, ERR_ACCESS, ERR_ILLEGAL_OP, ERR_UNKNOWN_TID, ERR_OPTIONS = 0, 1, 2, 4, 5, 8
BLKSIZE_RANGE = (8, 65464)  # RFC 2348
WINDOW_RANGE = (1, 65535)  # RFC 7440
TIMEOUT_RANGE = (1, 255)  # RFC 2349
DEFAULT_BLKSIZE = 512

# A file source for generated content (per-device boot configs): name -> bytes or None.
Generator = Callable[[str, tuple[str, int]], bytes | None]


class TftpRequestError(Exception):
    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass
class TransferOptions:
    blksize: int = DEFAULT_BLKSIZE
    windowsize: int = 1
    timeout: float = 2.0
    tsize: bool = False


def _err(code: int, msg: str) -> bytes:
    p = TftpPacketERR()
    p.errorcode = code
    p.errmsg = msg.encode("ascii", "replace")[:200] if code == ERR_UNDEFINED else None
    return bytes(p.encode().buffer)


def negotiate(options: dict[str, str]) -> tuple[TransferOptions, dict[str, str]]:
    """Accepted options and the OACK to send; absurd values are an error (code 8)."""
    t = TransferOptions()
    oack: dict[str, str] = {}
    for raw_name, value in options.items():
        name = raw_name.lower()
        if name in ("blksize", "windowsize", "timeout"):
            try:
                n = int(value)
            except ValueError:
                raise TftpRequestError(ERR_OPTIONS, f"option {name}={value!r} is not a number") from None
            lo, hi = {"blksize": BLKSIZE_RANGE, "windowsize": WINDOW_RANGE, "timeout": TIMEOUT_RANGE}[name]
            if not lo <= n <= hi:
                raise TftpRequestError(ERR_OPTIONS, f"option {name}={n} outside {lo}..{hi}")
            setattr(t, name, float(n) if name == "timeout" else n)
            oack[name] = str(n)
        elif name == "tsize":
            t.tsize = True
    return t, oack


class TftpServer:
    def __init__(self, root: Path, host: str = "0.0.0.0", port: int = 69, *, metrics: Metrics | None = None,
                 generator: Generator | None = None, max_transfers: int = 512, retries: int = 5) -> None:
        self.root = Path(os.path.realpath(root))
        self.metrics = metrics or Metrics()
        self.generator = generator
        self.retries = retries
        self._slots = threading.BoundedSemaphore(max_transfers)
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, port))
        self.host = host
        self.port = self.sock.getsockname()[1]
        self._stop = threading.Event()

    def serve_forever(self) -> None:
        self.sock.settimeout(0.5)
        factory = TftpPacketFactory()
        while not self._stop.is_set():
            try:
                data, peer = self.sock.recvfrom(65536)
            except TimeoutError:
                continue
            except OSError:
                return
            try:
                pkt = factory.parse(data)
            except Exception as e:
                self._refuse(peer, ERR_ILLEGAL_OP, f"malformed or unknown TFTP packet: {e}")
                continue
            if isinstance(pkt, TftpPacketWRQ):
                self._refuse(peer, ERR_ACCESS, "this server is read-only")
            elif isinstance(pkt, TftpPacketRRQ):
                if not self._slots.acquire(blocking=False):
                    self._refuse(peer, ERR_UNDEFINED, "server busy, try again")
                    continue
                threading.Thread(target=self._transfer, args=(pkt, peer), daemon=True).start()
            else:
                self._refuse(peer, ERR_ILLEGAL_OP, f"unexpected {type(pkt).__name__} on the request port")

    def shutdown(self) -> None:
        self._stop.set()
        self.sock.close()

    def _refuse(self, peer: tuple[str, int], code: int, msg: str) -> None:
        self.metrics.inc("tftp_errors_total", code=str(code))
        log.warning("TFTP %s:%d refused: %s", peer[0], peer[1], msg, extra={"peer": peer[0], "error": msg})
        try:
            self.sock.sendto(_err(code, msg), peer)
        except OSError:
            pass

    def open(self, name: str, peer: tuple[str, int]) -> tuple[BinaryIO | None, bytes | None, int]:
        """Resolve a requested name inside the root (or from the generator)."""
        if "\0" in name or any(part == ".." for part in name.replace("\\", "/").split("/")):
            raise TftpRequestError(ERR_ACCESS, f"path {name!r} leaves the TFTP root")
        rel = name.lstrip("/")
        if self.generator is not None:
            content = self.generator(rel, peer)
            if content is not None:
                return None, content, len(content)
        path = os.path.realpath(self.root / rel)
        if path != str(self.root) and not path.startswith(str(self.root) + os.sep):
            raise TftpRequestError(ERR_ACCESS, f"path {name!r} resolves outside the TFTP root")
        if not os.path.isfile(path):
            raise TftpRequestError(ERR_NOT_FOUND, f"{name}: no such file")
        f = open(path, "rb")
        return f, None, os.fstat(f.fileno()).st_size

    def _transfer(self, req: TftpPacketRRQ, peer: tuple[str, int]) -> None:
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        f: BinaryIO | None = None
        try:
            s.bind((self.host if self.host != "0.0.0.0" else "", 0))
            try:
                opts, oack = negotiate(req.options or {})
                f, content, size = self.open(req.filename, peer)
            except TftpRequestError as e:
                self.metrics.inc("tftp_errors_total", code=str(e.code))
                log.warning("TFTP %s from %s refused: %s", req.filename, peer[0], e, extra={"peer": peer[0], "file": req.filename})
                s.sendto(_err(e.code, str(e)), peer)
                return
            if opts.tsize:
                oack["tsize"] = str(size)
            s.settimeout(opts.timeout)
            if oack:
                p = TftpPacketOACK()
                p.options = oack
                if self._send_until_ack(s, peer, [bytes(p.encode().buffer)], 0) != 0:
                    return  # client gone, or it did not accept our options
            sent = self._send_file(s, peer, f, content, opts)
            if sent is not None:
                self.metrics.inc("tftp_transfers_total")
                self.metrics.inc("tftp_bytes_total", sent)
                log.info("TFTP sent %s (%d bytes) to %s", req.filename, sent, peer[0],
                         extra={"peer": peer[0], "file": req.filename, "bytes": sent, "blksize": opts.blksize,
                                "windowsize": opts.windowsize})
        except OSError as e:
            self.metrics.inc("tftp_errors_total", code="io")
            log.warning("TFTP transfer to %s failed: %s", peer[0], e)
        finally:
            if f is not None:
                f.close()
            s.close()
            self._slots.release()

    def _send_until_ack(self, s: socket.socket, peer: tuple[str, int], packets: list[bytes], last_block: int) -> int | None:
        """Send `packets` (a window ending in block `last_block`), wait for an ACK; return the
        acknowledged block number (the window is resent on timeout), or None if the client is gone."""
        for _ in range(self.retries + 1):
            for pkt in packets:
                s.sendto(pkt, peer)
            while True:
                try:
                    data, src = s.recvfrom(65536)
                except TimeoutError:
                    break
                if src != peer:
                    s.sendto(_err(ERR_UNKNOWN_TID, "unknown transfer ID"), src)
                    continue
                try:
                    pkt = TftpPacketFactory().parse(data)
                except Exception:
                    continue
                if isinstance(pkt, TftpPacketERR):
                    log.info("TFTP client %s aborted: error %s", peer[0], pkt.errorcode)
                    return None
                if isinstance(pkt, TftpPacketACK):
                    return int(pkt.blocknumber)
        log.warning("TFTP client %s stopped answering", peer[0])
        self.metrics.inc("tftp_errors_total", code="timeout")
        return None

    def _send_file(self, s: socket.socket, peer: tuple[str, int], f: BinaryIO | None, content: bytes | None,
                   opts: TransferOptions) -> int | None:
        bs, win = opts.blksize, opts.windowsize

        def block(n: int) -> bytes:  # n counts from 1, without wrap-around
            off = (n - 1) * bs
            if content is not None:
                return content[off : off + bs]
            assert f is not None
            f.seek(off)
            return f.read(bs)

        base, total, done = 1, 0, False  # base: first block of the current window
        while not done:
            window, last_len = [], bs
            for n in range(base, base + win):
                data = block(n)
                p = TftpPacketDAT()
                p.blocknumber, p.data = n % 65536, data
                window.append(bytes(p.encode().buffer))
                last_len = len(data)
                if last_len < bs:
                    break
            acked = self._send_until_ack(s, peer, window, base + len(window) - 1)
            if acked is None:
                return None
            # map the 16-bit ACK back into this window; an ACK for an earlier block resends from there
            last = base + len(window) - 1
            for n in range(last, base - 2, -1):
                if n % 65536 == acked:
                    break
            else:
                continue  # stray ACK: resend the window
            if n == last and last_len < bs:
                done = True
            total = n * bs if not done else (n - 1) * bs + last_len
            base = n + 1
        return total
