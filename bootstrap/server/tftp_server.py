"""Read-only TFTP server for PXE: RFC 1350 with options (RFC 2347), blksize (2348), tsize and
timeout (2349) and windowsize (7440).

Packets are read and written by cidboot.netboot.tftp, the one strict TFTP codec (the guests' client
uses it too; tftpy's encoder, used here before, could not encode an ERROR with code 0 and once
killed the server on its first "server busy"). Each transfer runs on its own socket
(its TID, connected to the client) and thread, so one slow or hostile client never holds up the
others. Lock-step transfers (no windowsize, what PXE ROMs do) are paced by the server's work
between an ACK and the next DATA, so that is kept to a read, a compare and a write of a packet
already in place: in C when `_tftp_lockstep` is built (one call per transfer, the GIL released,
`lockstep_impl` picks), else in Python (`_send_lockstep`; file blocks are read by preadv straight
into ready-made packets, `_Source.runs`; anything unusual goes to `_recover`). Paths are
confined to the root after resolving symlinks; `..`, writes and unknown opcodes are refused
with a TFTP error packet and logged.

Every resource a client can ask for is bounded (docs/boot-server.md, "Limits"):
- transfers: `max_transfers` in all and `max_per_client` per client address; beyond that the
  client gets ERROR 0 "server busy" and the server goes on serving;
- the timeout option: values above `max_timeout` are declined (left out of the OACK, RFC 2347),
  so a client cannot make a stalled transfer hold its slot for 255 s x retries;
- windowsize: negotiated down to `max_window` blocks and 1 MiB in the OACK (RFC 7440 allows it);
  blocks are cut from a bounded read buffer (READ_CHUNK) when sent, never a window held in memory;
- retransmissions: a stalled client gets `retries` timeouts; duplicate ACKs (the client's "I
  lost the next block") make at most 2 early resends until the transfer progresses,
  later ones are ignored (Sorcerer's Apprentice, RFC 1123 4.2.3.1); and every transfer has a
  budget of re-sent blocks (`resend_factor` times its size plus `retries` windows): spent, the
  transfer ends with an ERROR, so 4-byte ACKs cannot make the server send without bound.
Any exception one request raises is logged, counted in /metrics and survived.
"""

from __future__ import annotations

import functools
import logging
import os
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from bootstrap.server.metrics import Metrics
from cidboot.errors import CidbootError
from cidboot.httpd_lite import StopBell
from cidboot.netboot import tftp
from cidboot.netboot.tftp import (
    BLKSIZE_RANGE,
    DEFAULT_BLKSIZE,
    ERR_ACCESS,
    ERR_ILLEGAL_OP,
    ERR_NOT_FOUND,
    ERR_OPTIONS,
    ERR_UNDEFINED,
    TIMEOUT_RANGE,
    WINDOW_RANGE,
    TftpFormatError,
)

log = logging.getLogger("bootstrap.tftp")

DEFAULT_TIMEOUT = 2.0
MAX_WINDOW = 64  # blocks in flight per transfer; more only feeds a stalled or hostile client
MAX_TIMEOUT = 10  # seconds: the largest timeout option we honour
MAX_WINDOW_BYTES = 1 << 20  # and at most this many bytes in flight (windowsize x blksize)
RESEND_FACTOR = 8  # a transfer may re-send this many times its blocks (plus `retries` windows), no more
MAX_DUP_RESENDS = 2  # early resends on duplicate ACKs until the transfer progresses; then the timeout decides
MAX_PER_CLIENT = 8  # concurrent transfers per client address (a PXE client needs one)
READ_CHUNK = 64 * 1024  # bytes a file transfer reads per syscall (its blocks are sliced from it)
LOCKSTEP_CHUNK = 32 * 1024  # bytes a lock-step transfer reads per preadv, into one of its two packet buffers (64 KiB in all, as READ_CHUNK)
MAX_IOV = 512  # blocks per preadv (below IOV_MAX, 1024; blksize 8 would otherwise ask for 8192)
_DATA_HEADER = struct.Struct(">HH").pack  # opcode, block number
RECV_MAX = 2048  # what a transfer reads of a client datagram: an ACK is 4 bytes, an ERROR a few dozen (longer: cut, ignored)
FAST_READ = 512 - 33  # what the lock-step loop reads per ACK: as bytes, within CPython's small-object allocator (a cut ERROR still ends the transfer)
NOTHING_YET = -2  # `_Channel.decide`: no datagram received yet (just resent)
WAIT_SLACK = 0.01  # seconds an ACK wait may overrun its deadline before the receive timeout is shortened

# A file source for generated content (per-device boot configs) or for boot files kept outside the
# root (the boot-file cache): name -> bytes, a file to send, or None (look in the root).
Generator = Callable[[str, tuple[str, int]], bytes | Path | None]


class TftpRequestError(CidbootError):
    """A request we refuse; `code` is the TFTP error code sent back."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass
class TransferOptions:
    blksize: int = DEFAULT_BLKSIZE
    windowsize: int = 1
    timeout: float = DEFAULT_TIMEOUT
    tsize: bool = False


def negotiate(options: dict[str, str], *, max_window: int = MAX_WINDOW,
              max_timeout: int = MAX_TIMEOUT) -> tuple[TransferOptions, dict[str, str]]:
    """Accepted options and the OACK to send; values outside their RFC range are an error (code 8).

    windowsize is negotiated down to `max_window` blocks and `MAX_WINDOW_BYTES` (the OACK says
    so); a timeout above
    `max_timeout` is declined (RFC 2349 lets the server only echo the client's value or leave the
    option out), so the transfer keeps our default timeout.
    """
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
            if name == "timeout":
                if n > max_timeout:
                    continue  # declined: not in the OACK, our default applies
                t.timeout = float(n)
            elif name == "windowsize":
                t.windowsize = min(n, max_window)
            else:
                t.blksize = n
            oack[name] = str(n)
        elif name == "tsize":
            t.tsize = True
    t.windowsize = min(t.windowsize, max(1, MAX_WINDOW_BYTES // t.blksize))
    if "windowsize" in oack:
        oack["windowsize"] = str(t.windowsize)  # RFC 7440: the server may answer a smaller window
    return t, oack


@dataclass
class _Source:
    """What one transfer sends: an open file or generated bytes.

    A file is read with one pread of up to READ_CHUNK bytes and the blocks are sliced from that
    buffer: one syscall per ~44 blocks of 1468 bytes instead of a seek and a read per block (in
    lock-step the server's per-block work is the transfer's speed). The buffer is bounded (not a
    window, not the file), so `max_transfers` bounds the memory all transfers can hold.
    """

    file: BinaryIO | None
    content: bytes | None
    size: int
    _buf: bytes = b""
    _buf_off: int = 0
    sent: int = 0  # data bytes in the lock-step runs handed out so far (`runs`)

    def block(self, n: int, bs: int) -> bytes:
        """Block `n` (counting from 1, no wrap-around) of `bs` bytes; short at the end."""
        off = (n - 1) * bs
        if self.content is not None:
            return self.content[off : off + bs]
        rel, buf = off - self._buf_off, self._buf
        if rel < 0 or (rel + bs > len(buf) and self._buf_off + len(buf) < self.size):
            assert self.file is not None
            buf = self._buf = os.pread(self.file.fileno(), max(bs, READ_CHUNK - READ_CHUNK % bs), off)
            self._buf_off, rel = off, 0
        return buf[rel : rel + bs]

    def runs(self, bs: int) -> Iterator[tuple[list[bytes | memoryview], memoryview]]:
        """The lock-step DATA packets, block 1 onwards, in runs of up to k (one read each), each
        run with the ACK words its packets wait for (`_ack_words`); the last packet is short
        (header only when the size is a multiple of `bs`); block numbers wrap at 65535. Runs, not
        packets, so the loop walks a list (`for`), not a generator resumed per block.

        A file is read with one preadv per LOCKSTEP_CHUNK bytes straight into the data part of
        ready-made packets (header written in place), so no block is copied or concatenated in
        Python: the loop sends memoryviews. Two buffers alternate, so a run stays intact while
        the caller holds it and the next one (the lock-step loop reads the next run while the
        client works on this run's last block, which it may still have to resend); it must not
        hold older ones. The transfer ends at the size the file had when opened (what tsize
        announced), even if it grows. `self.sent` counts the data bytes in the runs so far.
        """
        numbers, words = _block_numbers(), _ack_words()
        if self.content is not None or self.file is None:
            content = self.content or b""
            k = max(1, min(MAX_IOV, LOCKSTEP_CHUNK // bs))
            last = len(content) // bs  # index of the short block
            for first in range(0, last + 1, k):  # `first`: index of the run's first block
                idx = range(first, min(first + k, last + 1))
                self.sent = min(len(content), (idx[-1] + 1) * bs)
                yield ([_DATA_HEADER(tftp.DATA, (i + 1) & 0xFFFF) + content[i * bs : (i + 1) * bs] for i in idx],
                       words[(first + 1) & 0xFFFF : ((first + 1) & 0xFFFF) + len(idx)])
            return
        fd, stride = self.file.fileno(), bs + 4
        k = max(1, min(MAX_IOV, LOCKSTEP_CHUNK // bs))  # blocks per read
        rings = []
        for _ in range(2):
            buf = bytearray(stride * k)
            view = memoryview(buf)
            for i in range(k):
                buf[i * stride : i * stride + 2] = b"\0\3"  # DATA
            whole: list[bytes | memoryview] = [view[i * stride : (i + 1) * stride] for i in range(k)]
            rings.append((buf, [view[i * stride + 4 : (i + 1) * stride] for i in range(k)], whole))
        first, which = 1, 0
        while True:
            buf, iov, pkts = rings[which]
            off = (first - 1) * bs
            got = min(os.preadv(fd, iov, off) if off < self.size else 0, self.size - off)
            full, rest = divmod(got, bs)
            at = 2 * (first & 0xFFFF)  # the k block numbers from `first`, high and low bytes in place
            buf[2 : 2 + k * stride : stride] = numbers[at : at + 2 * k : 2]
            buf[3 : 3 + k * stride : stride] = numbers[at + 1 : at + 2 * k : 2]
            self.sent = off + got
            if full == k:
                yield pkts, words[first & 0xFFFF : (first & 0xFFFF) + k]
                first, which = first + k, which ^ 1
                continue
            yield pkts[:full] + [pkts[full][: 4 + rest]], words[first & 0xFFFF : (first & 0xFFFF) + full + 1]
            return

    def close(self) -> None:
        if self.file is not None:
            self.file.close()


class _Channel:
    """One transfer's socket (its TID), connected to the client.

    Connected, as tftpd-hpa's: the kernel drops datagrams from any other address or port before
    they reach us (RFC 1350 suggests answering them with ERROR 5; we do not, so a spoofed source
    cannot make a transfer reflect packets at a third party), and each send skips the route
    lookup and each receive the source address. The socket is blocking with SO_RCVTIMEO for the
    ACK wait, not a Python socket timeout: with a timeout CPython polls before every send and
    receive and a settimeout is an ioctl, so a lock-step block cost six syscalls; now it costs
    a write and a read (`_send_lockstep`). The receive timeout is only changed when a deadline needs a shorter one
    (by more than WAIT_SLACK).
    """

    def __init__(self, sock: socket.socket, peer: tuple[str, int], timeout: float) -> None:
        self.sock, self.peer, self.timeout = sock, peer, timeout
        sock.connect(peer)
        sock.settimeout(None)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, _timeval(timeout))  # a full send buffer ends the transfer
        self.send = sock.send
        self._buf = bytearray(RECV_MAX)
        self._wait = 0.0
        self._set_wait(timeout)

    def _set_wait(self, seconds: float) -> None:
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, _timeval(seconds))
        self._wait = seconds

    def recv_ack(self, deadline: float | None = None) -> int | None:
        """The next ACK's block number from the client, or None once `deadline` (monotonic;
        default: one transfer timeout from now) has passed. A deadline, not a timeout per packet:
        a client that keeps re-sending an ACK the caller ignores must not keep the timeout from
        ever firing (it did: a 20%-loss transfer stalled until the client gave up). An ERROR from
        the client ends the transfer; anything else is ignored."""
        end = time.monotonic() + self.timeout if deadline is None else deadline
        recv_into, buf = self.sock.recv_into, self._buf
        while True:
            left = end - time.monotonic()
            if left <= 0:
                return None
            if self._wait > left + WAIT_SLACK:
                self._set_wait(left)
            try:
                n = recv_into(buf)  # no 64 KiB buffer allocated (and shrunk) per ACK
            except (BlockingIOError, TimeoutError):  # SO_RCVTIMEO ran out (EAGAIN)
                left = end - time.monotonic()
                if left <= 0:
                    return None
                self._set_wait(left)  # the wait was shorter than this deadline: wait the rest
                continue
            except ConnectionRefusedError:  # ICMP port unreachable: the client is gone
                raise _GiveUp.port_closed() from None
            if n == 4 and buf[1] == tftp.ACK and buf[0] == 0:
                return (buf[2] << 8) | buf[3]  # the common case, without building a packet object
            try:
                pkt = tftp.parse(bytes(buf[:n]))
            except TftpFormatError:
                continue
            if isinstance(pkt, tftp.Ack):
                return pkt.block
            if isinstance(pkt, tftp.Error):
                raise _GiveUp.aborted(pkt.code, pkt.message)

    def decide(self, got: int, want: int, prev: int, deadline: float, dup_ok: bool) -> int | None:
        """The lock-step loop's slow path, after its first receive returned `got` bytes in the
        buffer that were not the ACK of `want` (-1: it timed out; NOTHING_YET: no receive yet): the ACK that decides what to
        send next. `want` (the block arrived), `prev` when `dup_ok` (the client lost `want`:
        resend it early), or None once `deadline` has passed (resend on timeout). Anything else
        (a stray ACK, a duplicate beyond the early resends, a malformed datagram) is ignored;
        an ERROR ends the transfer."""
        acked: int | None
        if got >= 0:
            acked = self._ack_in_buffer(got)
        elif got == NOTHING_YET or time.monotonic() < deadline:
            acked = -1  # wait on
        else:
            acked = None
        while acked != want and acked is not None and not (acked == prev and dup_ok):
            acked = self.recv_ack(deadline)
        if self._wait < self.timeout:
            self._set_wait(self.timeout)  # the fast path's receive waits a whole timeout
        return acked

    def _ack_in_buffer(self, n: int) -> int:
        """The block number of the ACK in the receive buffer's first `n` bytes, or -1 if it is
        no ACK (ignored); an ERROR ends the transfer."""
        buf = self._buf
        if n == 4 and buf[1] == tftp.ACK and buf[0] == 0:
            return (buf[2] << 8) | buf[3]
        try:
            pkt = tftp.parse(bytes(buf[:n]))
        except TftpFormatError:
            if n == FAST_READ and buf[1] == tftp.ERROR and buf[0] == 0:  # an ERROR the lock-step loop cut
                raise _GiveUp.aborted((buf[2] << 8) | buf[3], bytes(buf[4:84]).decode("utf-8", "replace")) from None
            return -1
        if isinstance(pkt, tftp.Ack):
            return pkt.block
        if isinstance(pkt, tftp.Error):
            raise _GiveUp.aborted(pkt.code, pkt.message)
        return -1


@functools.cache
def _block_numbers() -> bytes:
    """Every 16-bit block number big-endian, twice (a chunk's run may wrap past 65535): a
    chunk's headers are two strided copies from here, not a pack per block. 256 KiB, built once."""
    return struct.pack(">65536H", *range(65536)) * 2


@functools.cache
def _ack_words() -> memoryview:
    """Every ACK packet, blocks 0..65535 twice (a run may wrap past 65535), as native-order
    words: a run's ACKs are a slice of this table (`_Source.runs`), which the lock-step loop
    turns into the run's ACK packets in wire order (`tobytes`) once per run, so the check per
    block is one bytes compare with the datagram it read. 512 KiB, built once."""
    return memoryview(struct.pack(">131072I", *(0x40000 | (i & 0xFFFF) for i in range(131072)))).cast("I")


def _timeval(seconds: float) -> bytes:
    """A struct timeval for SO_RCVTIMEO/SO_SNDTIMEO; never zero (zero means wait forever)."""
    sec = int(seconds)
    usec = max(1, int((seconds - sec) * 1_000_000)) if sec == 0 else int((seconds - sec) * 1_000_000)
    return struct.pack("@ll", sec, usec)


class _GiveUp(Exception):
    """The transfer ends (client gone, aborted, or over its retransmission budget)."""

    @classmethod
    def aborted(cls, code: int, message: str) -> _GiveUp:
        """The client sent an ERROR (both lock-step loops and the windowed one say it alike)."""
        return cls(f"client aborted with error {code}: {message[:80]}")

    @classmethod
    def port_closed(cls) -> _GiveUp:
        return cls("the client's port is closed (ICMP port unreachable)")


class TftpConfigError(CidbootError):
    """The server was asked for a lock-step implementation it does not have."""


@functools.cache
def lockstep_impl() -> Callable[..., tuple[str, int, int, int, bytes]] | None:
    """The native lock-step loop (`_tftp_lockstep.send`, built from _tftp_lockstep.c by
    `pip install -e .`) or None when it is not built, or built from an older source (it might
    not follow the rules the source now says): then the Python loop runs. The one place that
    picks; it says once in the log which one this process uses."""
    try:
        from bootstrap.server import _tftp_lockstep
    except ImportError as e:
        log.info("TFTP lock-step loop: Python (the C module is not built: %s)", e)
        return None
    built = Path(_tftp_lockstep.__file__ or "")
    if is_stale(built, Path(__file__).with_name("_tftp_lockstep.c")):
        log.warning("TFTP lock-step loop: Python (the C module %s is older than its source: rebuild it, "
                    "`python3 -m pip install -e .`)", built)
        return None
    log.info("TFTP lock-step loop: C (%s)", built)
    return _tftp_lockstep.send


def is_stale(built: Path, source: Path) -> bool:
    """The compiled module is older than its source (changed since by a checkout or an edit).
    No source beside it (an installed wheel ships the module alone): not stale."""
    try:
        return source.stat().st_mtime > built.stat().st_mtime
    except FileNotFoundError:
        return False


class TftpServer:
    def __init__(self, root: Path, host: str = "0.0.0.0", port: int = 69, *, metrics: Metrics | None = None,
                 generator: Generator | None = None, max_transfers: int = 512, max_per_client: int = MAX_PER_CLIENT,
                 retries: int = 5, resend_factor: int = RESEND_FACTOR, max_window: int = MAX_WINDOW,
                 max_timeout: int = MAX_TIMEOUT, native: bool | None = None) -> None:
        """`native`: the lock-step loop in C (True: required, TftpConfigError if it is not
        built), in Python (False), or C when it is built (None, the default)."""
        impl = lockstep_impl() if native is not False else None
        if native and impl is None:
            raise TftpConfigError("the native lock-step loop (bootstrap/server/_tftp_lockstep.c) is not built, "
                                  "or is older than its source: "
                                  "run `python3 -m pip install -e .` (docs/boot-server.md, TFTP)")
        self._native = impl
        self.root = Path(os.path.realpath(root))
        self.metrics = metrics or Metrics()
        self.generator = generator
        self.retries, self.resend_factor = retries, resend_factor
        self.max_transfers, self.max_per_client = max_transfers, max_per_client
        self.max_window, self.max_timeout = max_window, max_timeout
        self._active: dict[str, int] = {}  # client address -> transfers running
        self._lock = threading.Lock()
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, port))
        self.host = host
        self.port = self.sock.getsockname()[1]
        self._bell = StopBell(wait_for_start=False)

    def serve_forever(self) -> None:
        """Answer requests until `shutdown`, asleep in select() while none come (`StopBell`:
        no timeout to poll a stop flag with, so an idle server never wakes). An OSError reading
        the request port (none a client can cause) ends it, raised."""
        self._bell.serve([self.sock], self._next_request)

    def _next_request(self, ready: list[socket.socket]) -> None:
        try:
            data, peer = self.sock.recvfrom(65536, socket.MSG_DONTWAIT)
        except BlockingIOError:  # gone meanwhile
            return
        try:
            self.handle_request(data, peer)
        except Exception as e:  # one request never stops TFTP for everyone
            self.metrics.request_failed("tftp", e, peer[0], log)

    def shutdown(self) -> None:
        """Stop answering requests and close the request port: returns once a running
        `serve_forever` has returned, at once when none runs (one that starts later returns at
        once). Transfers in flight go on to their end, each on its own socket and thread."""
        self._bell.stop()
        self.sock.close()
        self._bell.close()

    @property
    def active(self) -> int:
        with self._lock:
            return sum(self._active.values())

    def handle_request(self, data: bytes, peer: tuple[str, int]) -> None:
        """One datagram on the request port: refuse it, or start a transfer on its own thread."""
        try:
            pkt = tftp.parse(data)
        except TftpFormatError as e:
            self._refuse(peer, ERR_ILLEGAL_OP, f"malformed TFTP packet: {e}")
            return
        if isinstance(pkt, tftp.Request) and pkt.opcode == tftp.WRQ:
            self._refuse(peer, ERR_ACCESS, "this server is read-only")
        elif isinstance(pkt, tftp.Request):
            self._start(pkt, peer)
        else:
            self._refuse(peer, ERR_ILLEGAL_OP, f"unexpected {type(pkt).__name__.upper()} on the request port")

    def _take_slot(self, client: str) -> str | None:
        """Reserve a transfer slot for `client`; None if taken, else why not."""
        with self._lock:
            if self._active.get(client, 0) >= self.max_per_client:
                return f"server busy: {self.max_per_client} transfers already running for {client}"
            if sum(self._active.values()) >= self.max_transfers:
                return "server busy, try again"
            self._active[client] = self._active.get(client, 0) + 1
            return None

    def _free_slot(self, client: str) -> None:
        with self._lock:
            left = self._active.get(client, 0) - 1
            if left > 0:
                self._active[client] = left
            else:
                self._active.pop(client, None)

    def _start(self, req: tftp.Request, peer: tuple[str, int]) -> None:
        busy = self._take_slot(peer[0])
        if busy is not None:
            self.metrics.inc("tftp_busy_total")
            self._refuse(peer, ERR_UNDEFINED, busy)
            return
        try:
            try:
                opts, oack = negotiate(req.options, max_window=self.max_window, max_timeout=self.max_timeout)
                src = self.open(req.filename, peer)
            except TftpRequestError as e:
                self._refuse(peer, e.code, f"{req.filename}: {e}")
                self._free_slot(peer[0])
                return
            threading.Thread(target=self._transfer, args=(req.filename, src, opts, oack, peer), daemon=True).start()
        except BaseException:
            self._free_slot(peer[0])
            raise

    def _refuse(self, peer: tuple[str, int], code: int, msg: str) -> None:
        self.metrics.inc("tftp_errors_total", code=str(code))
        log.warning("TFTP %s:%d refused: %s", peer[0], peer[1], msg, extra={"peer": peer[0], "error": msg})
        try:
            self.sock.sendto(tftp.error(code, msg), peer)
        except OSError:
            pass

    def open(self, name: str, peer: tuple[str, int]) -> _Source:
        """Resolve a requested name inside the root (or from the generator)."""
        if "\0" in name or any(part == ".." for part in name.replace("\\", "/").split("/")):
            raise TftpRequestError(ERR_ACCESS, f"path {name!r} leaves the TFTP root")
        rel = name.lstrip("/")
        if self.generator is not None:
            content = self.generator(rel, peer)
            if isinstance(content, Path):
                try:
                    f = open(content, "rb")
                except OSError as e:
                    raise TftpRequestError(ERR_NOT_FOUND, f"{name}: {e.strerror}") from None
                return _Source(f, None, os.fstat(f.fileno()).st_size)
            if content is not None:
                return _Source(None, content, len(content))
        try:
            path = os.path.realpath(self.root / rel)
        except (OSError, ValueError) as e:
            raise TftpRequestError(ERR_ACCESS, f"path {name!r}: {e}") from None
        if path != str(self.root) and not path.startswith(str(self.root) + os.sep):
            raise TftpRequestError(ERR_ACCESS, f"path {name!r} resolves outside the TFTP root")
        if not os.path.isfile(path):
            raise TftpRequestError(ERR_NOT_FOUND, f"{name}: no such file")
        try:
            f = open(path, "rb")
        except OSError as e:
            raise TftpRequestError(ERR_ACCESS, f"{name}: {e.strerror}") from None
        return _Source(f, None, os.fstat(f.fileno()).st_size)

    def _transfer(self, name: str, src: _Source, opts: TransferOptions, oack: dict[str, str],
                  peer: tuple[str, int]) -> None:
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            s.bind((self.host if self.host != "0.0.0.0" else "", 0))
            if opts.tsize:
                oack["tsize"] = str(src.size)
            ch = _Channel(s, peer, opts.timeout)
            if oack:
                self._send_oack(ch, tftp.oack(oack))
            sent = self._send_file(ch, src, opts)
            self.metrics.inc("tftp_transfers_total")
            self.metrics.inc("tftp_bytes_total", sent)
            log.info("TFTP sent %s (%d bytes) to %s", name, sent, peer[0],
                     extra={"peer": peer[0], "file": name, "bytes": sent, "blksize": opts.blksize,
                            "windowsize": opts.windowsize})
        except _GiveUp as e:
            log.warning("TFTP transfer of %s to %s ended: %s", name, peer[0], e,
                        extra={"peer": peer[0], "file": name, "error": str(e)})
        except OSError as e:
            self.metrics.inc("tftp_errors_total", code="io")
            log.warning("TFTP transfer to %s failed: %s", peer[0], e, extra={"peer": peer[0], "file": name, "error": str(e)})
        except Exception as e:  # a bug in one transfer is counted, never silent
            self.metrics.request_failed("tftp", e, peer[0], log)
        finally:
            src.close()
            s.close()
            self._free_slot(peer[0])

    def _timed_out(self, timeouts: int, peer: tuple[str, int]) -> None:
        if timeouts > self.retries:
            self.metrics.inc("tftp_errors_total", code="timeout")
            raise _GiveUp(f"client stopped answering ({self.retries} retries)")

    def _send_oack(self, ch: _Channel, pkt: bytes) -> None:
        """Send the OACK until the client acknowledges it (ACK 0)."""
        timeouts = 0
        ch.send(pkt)
        while True:
            acked = ch.recv_ack()
            if acked == 0:
                return
            if acked is None:
                timeouts += 1
                self._timed_out(timeouts, ch.peer)
                ch.send(pkt)

    def _spend(self, ch: _Channel, budget: int) -> int:
        """Count one re-sent block against the transfer's budget; spent, the transfer ends with an ERROR."""
        budget -= 1
        if budget < 0:
            self._budget_spent(ch)
        self.metrics.inc("tftp_retransmitted_blocks_total")
        return budget

    def _budget_spent(self, ch: _Channel) -> None:
        self.metrics.inc("tftp_errors_total", code="retransmit_budget")
        ch.send(tftp.error(ERR_UNDEFINED, "too many retransmissions"))
        raise _GiveUp("retransmission budget spent")

    def _send_lockstep_native(self, ch: _Channel, src: _Source, bs: int, budget: int) -> int:
        """`_send_lockstep` by the C loop (`lockstep_impl`): one call runs the whole transfer
        with the GIL released and the same rules; what it reports is logged and counted here
        exactly as the Python loop does (the metrics, the ERROR when the budget is spent, the
        _GiveUp messages, OSError for a failing syscall). Returns the data bytes sent."""
        assert self._native is not None
        if ch._wait < ch.timeout:
            ch._set_wait(ch.timeout)  # the OACK's wait may have shortened it
        fd = src.file.fileno() if src.content is None and src.file is not None else -1
        reason, sent, resends, code, message = self._native(
            ch.sock.fileno(), fd, src.content or b"", src.size, bs, ch.timeout, self.retries, budget, MAX_DUP_RESENDS)
        if resends:
            self.metrics.inc("tftp_retransmitted_blocks_total", resends)
        src.sent = sent
        if reason == "done":
            return sent
        if reason == "error":
            raise _GiveUp.aborted(code, message.decode("utf-8", "replace"))
        if reason == "timeout":
            self._timed_out(self.retries + 1, ch.peer)
        if reason == "budget":
            self._budget_spent(ch)
        if reason == "refused":
            raise _GiveUp.port_closed()
        assert reason == "oserror", reason
        raise OSError(code, os.strerror(code))

    def _send_lockstep(self, ch: _Channel, src: _Source, bs: int, budget: int) -> int:
        """`_send_file` for a window of one block (RFC 1350 lock-step: every PXE ROM, and what
        tftpd-hpa does), with the same rules. In lock-step the server's work between an ACK and
        the next DATA is the transfer's speed, so the loop is the common case only, and ordered so
        that the least possible runs between the ACK's arrival and the next DATA's send:
        - `read(fd, most)` (FAST_READ bytes): the blocking socket waits with SO_RCVTIMEO (`_Channel`), no
          poll; `os.read`, not `recv_into`: a call without keyword parsing and the datagram as a
          small bytes object;
        - `got != want`: compared with the ACK this block waits for (a bytes object of the run,
          built from `_ack_words` before its first send): one bytes compare, no packet object;
        - `write(fd, pkt)`: a packet already in place (`_Source.runs`), a memoryview into a buffer
          the block was read into; nothing built per block.
        Everything else happens after the send, while the client works: the next packet and its
        ACK (`for`), the deadline (`sent = mono()`: the ACK wait ends at `sent + timeout`, which
        ignored ACKs must not move; added only on the slow path), and after a run's last send
        the next run's read (one preadv). This matters most when every wake-up of the server
        costs a VM exit and finds its caches cold (the client on another vCPU): then the
        interpreter's work per block costs several times what it does warm, and only what
        sits between the receive and the send delays the next block.
        Anything else (a timeout, a stray or duplicate ACK, an ERROR, a malformed datagram) goes
        to `_recover`, which resends by the rules. Returns the data bytes sent."""
        fd, read, write, most = ch.sock.fileno(), os.read, os.write, FAST_READ
        mono, timeout = time.monotonic, ch.timeout
        if ch._wait < timeout:
            ch._set_wait(timeout)  # the OACK's wait may have shortened it
        prev: bytes | memoryview | None = None  # the packet sent last, waiting for its ACK `want`
        want, sent = b"", 0.0
        for packets, acks in src.runs(bs):  # the next run is read right after the last send of this one
            wire = acks.tobytes()  # this run's ACK packets as they come off the wire
            for pkt, ack in zip(packets, [wire[i : i + 4] for i in range(0, len(wire), 4)], strict=True):
                if prev is not None:
                    try:
                        got = read(fd, most)
                    except (BlockingIOError, TimeoutError):  # SO_RCVTIMEO ran out
                        got = None
                    except ConnectionRefusedError:  # ICMP port unreachable: the client is gone
                        raise _GiveUp.port_closed() from None
                    if got != want:
                        budget = self._recover_from(ch, prev, got, sent + timeout, budget)
                write(fd, pkt)
                sent = mono()
                prev, want = pkt, ack
        if prev is not None:  # the final block's ACK
            try:
                got = read(fd, most)
            except (BlockingIOError, TimeoutError):
                got = None
            except ConnectionRefusedError:
                raise _GiveUp.port_closed() from None
            if got != want:
                self._recover_from(ch, prev, got, sent + timeout, budget)
        return src.sent

    def _recover_from(self, ch: _Channel, pkt: bytes | memoryview, got: bytes | None, deadline: float,
                      budget: int) -> int:
        """`_recover` for what the lock-step loop read (None: the wait ran out)."""
        n = -1
        if got is not None:
            n = len(got)
            ch._buf[:n] = got
        return self._recover(ch, pkt, n, deadline, budget)

    def _recover(self, ch: _Channel, pkt: bytes | memoryview, got: int, deadline: float, budget: int) -> int:
        """The lock-step loop's slow path for the block in `pkt`, after its first receive got
        something other than the block's ACK (`got` bytes in the buffer; -1: the wait ran out):
        resend on a timeout (at most `retries` in a row) or on a duplicate ACK of the block
        before (at most MAX_DUP_RESENDS), ignore anything else, until the ACK arrives. Returns
        what is left of the resend budget (spent: ERROR and the transfer ends)."""
        want = (pkt[2] << 8) | pkt[3]  # the block number in the packet's header
        prev = (want - 1) & 0xFFFF
        timeouts = dup_resends = 0
        acked = ch.decide(got, want, prev, deadline, True)
        while acked != want:
            if acked is None:
                timeouts += 1
                self._timed_out(timeouts, ch.peer)
            else:
                dup_resends += 1  # the client lost this block: resend it early
            budget = self._spend(ch, budget)
            ch.send(pkt)
            deadline = time.monotonic() + ch.timeout
            acked = ch.decide(NOTHING_YET, want, prev, deadline, dup_resends < MAX_DUP_RESENDS)
        return budget

    def _send_file(self, ch: _Channel, src: _Source, opts: TransferOptions) -> int:
        """Send the file in windows (RFC 7440); return the bytes sent (without retransmissions).

        Resends happen on a timeout (at most `retries` in a row), on an ACK inside the window
        (the client lost what follows it), and on a duplicate ACK of the window's predecessor
        (at most MAX_DUP_RESENDS without progress); all of them draw on one budget of re-sent blocks.
        """
        bs, win, send, recv_ack = opts.blksize, opts.windowsize, ch.send, ch.recv_ack
        nblocks = src.size // bs + 1
        budget = self.resend_factor * nblocks + self.retries * win  # re-sent blocks this transfer may spend
        if win == 1:
            if self._native is not None:
                return self._send_lockstep_native(ch, src, bs, budget)
            return self._send_lockstep(ch, src, bs, budget)
        base, highest, timeouts, dup_resends = 1, 0, 0, 0
        ahead, ahead_data, ahead_pkt = 0, b"", b""  # the next window's first block, built while the client works
        while True:
            last = base + win - 1
            final, final_len = None, 0  # the short block that ends the file, if it is in this window
            for n in range(base, base + win):
                if n == ahead:
                    data, pkt = ahead_data, ahead_pkt
                else:
                    data = src.block(n, bs)
                    pkt = _DATA_HEADER(tftp.DATA, n & 0xFFFF) + data
                if n <= highest:
                    budget = self._spend(ch, budget)
                else:
                    highest = n
                send(pkt)
                if len(data) < bs:
                    last, final, final_len = n, n, len(data)
                    break
            if final is None:
                # In lock-step the ACK is the critical path: build the next packet before waiting
                # for it, so only a recvfrom and a sendto stand between the ACK and the next block.
                ahead = last + 1
                ahead_data = src.block(ahead, bs)
                ahead_pkt = _DATA_HEADER(tftp.DATA, ahead & 0xFFFF) + ahead_data
            deadline = time.monotonic() + ch.timeout  # ignored ACKs do not move it
            while True:
                acked = recv_ack(deadline)
                if acked is None:
                    timeouts += 1
                    self._timed_out(timeouts, ch.peer)
                    break  # resend the window
                # map the 16-bit ACK into [base - 1, last]
                if acked == last & 0xFFFF:
                    k: int | None = last  # the whole window arrived (lock-step: every block)
                else:
                    k = next((m for m in range(last - 1, base - 2, -1) if m & 0xFFFF == acked), None)
                if k is None:
                    continue  # stray ACK (an old window's): ignored
                if k == base - 1:
                    if dup_resends >= MAX_DUP_RESENDS:
                        continue  # no more early resends without progress: the timeout decides
                    dup_resends += 1
                    break
                timeouts, dup_resends = 0, 0
                if k == final:
                    return (k - 1) * bs + final_len
                base = k + 1
                break
