"""A stdlib-only TFTP read client: RFC 1350 (RRQ, octet), options RFC 2347 with blksize (2348),
tsize and timeout (2349), and RFC 7440 windowsize. It runs inside the minimal guest images, so it
imports nothing outside the standard library, cidboot.errors and cidboot.netboot.tftp (the one TFTP
codec, shared with the boot server: every packet is parsed strictly there).

Recovery is driven by the receiver, which is what makes a lossy boot network bearable:

- it ACKs the last in-order block at the end of each window, and at once when a block arrives
  ahead of the one it expects (a gap), so a go-back-N server (ours, RFC 7440) restarts the window
  from there without waiting for its own timeout. One such ACK per gap: the rest of the damaged
  window is still in flight and must not trigger more (each would make the server resend a window);
- blocks it already has (a window the server re-sent) are ignored, never ACKed: ACKing them is the
  sorcerer's-apprentice loop in which every window goes out twice;
- its retransmission timeout adapts to the measured round trip (Jacobson/Karels, starting at
  `timeout`, floor MIN_RTO), doubles on each timeout in a row up to MAX_RTO; after `retries`
  timeouts in a row without progress the transfer fails, naming the file, block and retries.

Options the server does not answer fall back to RFC 1350 (512-byte lock-step); an ERROR 8
(options refused) is answered by one plain retry. A malformed packet (short, wrong opcode, block
outside the window, oversized, from another port) is ignored, never trusted; when a transfer
then fails, the last one is named in the error.
"""

from __future__ import annotations

import socket
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from cidboot.errors import CidbootError
from cidboot.netboot import tftp
from cidboot.netboot.tftp import ACK as ACK
from cidboot.netboot.tftp import BLKSIZE_RANGE as BLKSIZE_RANGE
from cidboot.netboot.tftp import DATA as DATA
from cidboot.netboot.tftp import DEFAULT_BLKSIZE as DEFAULT_BLKSIZE
from cidboot.netboot.tftp import ERR_OPTIONS as ERR_OPTIONS
from cidboot.netboot.tftp import ERR_UNKNOWN_TID as ERR_UNKNOWN_TID
from cidboot.netboot.tftp import ERROR as ERROR
from cidboot.netboot.tftp import OACK as OACK
from cidboot.netboot.tftp import RRQ as RRQ
from cidboot.netboot.tftp import WINDOW_RANGE as WINDOW_RANGE
from cidboot.netboot.tftp import TftpFormatError

MIN_RTO = 0.01  # a boot LAN answers in under a millisecond; a spurious timeout costs one re-sent window
MAX_RTO = 1.0  # the timeout we ask the server for: waiting longer than it would gain nothing
# A server without windowsize may ignore duplicate ACKs (RFC 1350 forbids answering them: the
# sorcerer's apprentice) and re-arm its own timer on every packet, so ACKs re-sent faster than its
# retransmission timer (1 s asked) would starve it. Against such a server: this floor, and a
# duplicate DATA (our ACK was lost) is ACKed again at once.
PLAIN_MIN_RTO = 1.5
FINAL_ACKS = 3  # the last ACK is sent this many times instead of lingering for a re-sent last block

Progress = Callable[[int, int | None], None]  # (bytes so far, tsize if the server gave one)


class TftpError(CidbootError):
    """A TFTP read failed; the message names the file (tftp://server/name) and why."""

    def __init__(self, message: str, *, filename: str = "", block: int | None = None) -> None:
        super().__init__(message)
        self.filename = filename
        self.block = block


class TftpServerError(TftpError):
    """The server sent an ERROR packet: `code` and `server_message` are its content."""

    def __init__(self, message: str, *, filename: str, code: int, server_message: str) -> None:
        super().__init__(message, filename=filename)
        self.code = code
        self.server_message = server_message


class TftpTimeoutError(TftpError):
    """No progress after every retry."""


class TftpProtocolError(TftpError):
    """The server broke the protocol in a way the transfer cannot survive (bad OACK, wrong size)."""


def parse_oack(payload: bytes) -> dict[str, str]:
    """OACK body (after the opcode) -> {lowercase name: value}; TftpFormatError (a ValueError) on junk."""
    p = tftp.parse(struct.pack(">H", OACK) + payload)
    assert isinstance(p, tftp.OAck)
    return p.options


class _Rto:
    """Retransmission timeout from measured round trips (RFC 6298 arithmetic), with backoff."""

    def __init__(self, initial: float, floor: float = MIN_RTO, cap: float = MAX_RTO) -> None:
        self.floor, self.cap = min(floor, initial), max(cap, initial)
        self.value = initial
        self.srtt: float | None = None
        self.rttvar = 0.0

    def plain(self) -> None:
        """The server has no windowsize: never re-send faster than its own timer."""
        self.floor = max(self.floor, PLAIN_MIN_RTO)
        self.cap = max(self.cap, 2 * self.floor)
        self.value = max(self.value, self.floor)

    def sample(self, rtt: float) -> None:
        if self.srtt is None:
            self.srtt, self.rttvar = rtt, rtt / 2
        else:
            self.rttvar = 0.75 * self.rttvar + 0.25 * abs(self.srtt - rtt)
            self.srtt = 0.875 * self.srtt + 0.125 * rtt
        self.restore()

    def backoff(self) -> None:
        self.value = min(self.cap, self.value * 2)

    def restore(self) -> None:
        """Undo the backoff once the path works again (progress after a timeout)."""
        if self.srtt is not None:
            self.value = min(self.cap, max(self.floor, self.srtt + 4 * self.rttvar))


def get(server: str, filename: str, *, port: int = 69, blksize: int = 1468, windowsize: int = 16,
        timeout: float = 0.3, retries: int = 10, progress: Progress | None = None,
        max_size: int | None = None, options: bool = True, min_timeout: float = MIN_RTO,
        stats: dict[str, int] | None = None) -> bytes:
    """Read `filename` from `server` into memory.

    `blksize` and `windowsize` are what we ask for (the OACK decides; no OACK means 512 and 1);
    `timeout` is the first retransmission timeout in seconds (it then follows the measured round
    trip, never below `min_timeout`), `retries` the timeouts in a row without progress before
    giving up. The server's own timeout option is set to its minimum (1 s): this client drives
    recovery. `progress(bytes, tsize)` is called at every window and at the end. `options=False`
    sends a plain RFC 1350 request. `stats`, if given, is filled with counters (timeouts, gap_acks,
    window_acks, ignored...) and `srtt_us`, the smoothed round trip measured (0 if none): a good
    `timeout` for the next transfer from the same server is a few times that. Raises TftpError
    (TftpServerError for an ERROR packet).
    """
    if not BLKSIZE_RANGE[0] <= blksize <= BLKSIZE_RANGE[1]:
        raise ValueError(f"blksize {blksize} outside {BLKSIZE_RANGE}")
    if not WINDOW_RANGE[0] <= windowsize <= WINDOW_RANGE[1]:
        raise ValueError(f"windowsize {windowsize} outside {WINDOW_RANGE}")
    where = f"tftp://{server}{'' if port == 69 else f':{port}'}/{filename}"
    try:
        return _Transfer(server, filename, where, port, blksize, windowsize, timeout, min_timeout, retries,
                         progress, max_size, stats).run(options)
    except _RetryPlain:
        return _Transfer(server, filename, where, port, DEFAULT_BLKSIZE, 1, timeout, min_timeout, retries,
                         progress, max_size, stats).run(False)


def parse_url(url: str) -> tuple[str, int, str]:
    """(host, port, path) of tftp://HOST[:PORT]/PATH (the `cidboot.config=` form); anything else
    is a TftpError."""
    try:
        u = urlsplit(url)
        host, port = u.hostname, u.port or 69
    except ValueError as e:
        raise TftpError(f"bad tftp URL {url!r}: {e}") from None
    if u.scheme != "tftp" or not host or not u.path.strip("/"):
        raise TftpError(f"only tftp://HOST/PATH URLs are supported, got {url!r}")
    return host, port, u.path.lstrip("/")


def get_url(url: str, **kw: object) -> bytes:
    """`get` for a tftp://HOST[:PORT]/PATH URL; keyword arguments as for `get`."""
    host, port, path = parse_url(url)
    return get(host, path, port=port, **kw)  # type: ignore[arg-type]


class _RetryPlain(Exception):
    """The server refused our options with ERROR 8 before the transfer began: ask again without."""


def num_abs(num: int, expect: int) -> int:
    """The absolute block number of 16-bit `num` at or after `expect`."""
    return expect + (num - expect) % 65536


@dataclass
class _Receive:
    """One transfer's receiving state between packets."""

    sock: socket.socket
    rrq: bytes
    opts: dict[str, str]
    bs: int = DEFAULT_BLKSIZE
    win: int = 1
    tsize: int | None = None
    peer: tuple[str, int] | None = None
    started: bool = False  # an OACK or DATA has been accepted
    chunks: list[bytes] = field(default_factory=list)
    got: int = 0  # bytes received
    expect: int = 1  # absolute number of the next block we need
    since_ack: int = 0  # in-order blocks since our last ACK (the server's window is counted from it)
    recovering: bool = False  # a gap ACK went out since the last in-order block
    last_ahead: int = 0  # the last block seen ahead of `expect` since then
    misses: int = 0  # timeouts in a row without progress
    # For an RTT sample: when our last ACK went out, cleared by anything but the in-order answer
    # arriving first (Karn: never across a retransmission, nor a block the server re-sent late).
    ack_sent_at: float | None = None

    def ack(self, n: int) -> None:
        assert self.peer is not None
        self.sock.sendto(tftp.ack(n), self.peer)
        self.since_ack, self.ack_sent_at = 0, time.monotonic()

    def send_rrq(self, dest: tuple[str, int]) -> None:
        self.sock.sendto(self.rrq, dest)
        self.ack_sent_at = time.monotonic()


class _Transfer:
    def __init__(self, server: str, filename: str, where: str, port: int, blksize: int, windowsize: int,
                 timeout: float, min_timeout: float, retries: int, progress: Progress | None,
                 max_size: int | None, stats: dict[str, int] | None) -> None:
        self.filename, self.where = filename, where
        self.want_bs, self.want_win = blksize, windowsize
        self.retries, self.progress, self.max_size = retries, progress, max_size
        self.rto = _Rto(timeout, min_timeout)
        try:
            self.dest = (socket.gethostbyname(server), port)
        except OSError as e:
            raise TftpError(f"{where}: cannot resolve {server!r}: {e}", filename=filename) from None
        self.last_bad = ""  # the last malformed packet ignored, for the error message
        self.stats = stats if stats is not None else {}
        for k in ("timeouts", "gap_acks", "window_acks", "behind", "ahead_ignored", "malformed"):
            self.stats.setdefault(k, 0)

    def _count(self, what: str) -> None:
        self.stats[what] += 1

    def _fail(self, cls: type[TftpError], why: str, block: int | None = None) -> TftpError:
        return cls(f"{self.where}: {why}", filename=self.filename, block=block)

    def _bad(self, why: str) -> None:
        self.last_bad = why
        self._count("malformed")

    def run(self, with_options: bool) -> bytes:
        opts: dict[str, str] = {}
        if with_options:
            opts = {"tsize": "0", "timeout": "1"}
            if self.want_bs != DEFAULT_BLKSIZE:
                opts["blksize"] = str(self.want_bs)
            opts["windowsize"] = str(self.want_win)  # even 1: an RFC 7440 server answers dup ACKs
        rrq = tftp.rrq(self.filename, opts)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            try:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
            except OSError:
                pass
            s.bind(("", 0))
            return self._loop(s, rrq, opts)

    def _loop(self, s: socket.socket, rrq: bytes, opts: dict[str, str]) -> bytes:
        """Receive until the last block: each packet is screened (`_screen`), then handled by the
        step for its kind; `_Receive` holds the transfer's state between packets."""
        st = _Receive(s, rrq, opts)
        st.send_rrq(self.dest)
        while True:
            s.settimeout(self.rto.value)
            try:
                pkt, src = s.recvfrom(65536 + 4)
            except TimeoutError:
                self._on_timeout(st)
                continue
            p = self._screen(st, pkt, src)
            if isinstance(p, tftp.Error):
                if p.code == ERR_OPTIONS and opts and not st.started:
                    raise _RetryPlain
                raise TftpServerError(f"{self.where}: server error {p.code}: {p.message}", filename=self.filename,
                                      code=p.code, server_message=p.message)
            if isinstance(p, tftp.OAck):
                self._on_oack(st, p, src)
            elif isinstance(p, tftp.Data):
                done = self._on_data(st, p, src)
                if done is not None:
                    return done
            elif p is not None:
                self._bad(f"a {type(p).__name__.upper()} from the server")

    def _on_timeout(self, st: _Receive) -> None:
        st.misses += 1
        if st.misses > self.retries:
            what = f"no DATA for block {st.expect}" if st.started else "no answer to the read request"
            extra = f"; last malformed packet ignored: {self.last_bad}" if self.last_bad else ""
            raise self._fail(TftpTimeoutError, f"{what} after {self.retries} retries "
                             f"(timeout reached {self.rto.value:.2f} s){extra}", st.expect) from None
        self.rto.backoff()
        self._count("timeouts")
        if st.started:
            st.ack(st.expect - 1)  # the server restarts its window after the last in-order block
        else:
            st.send_rrq(self.dest)
        st.recovering, st.ack_sent_at = False, None  # Karn: no RTT sample across a retransmission

    def _screen(self, st: _Receive, pkt: bytes, src: tuple[str, int]) -> tftp.Packet | None:
        """The parsed packet if it is from our server and transfer ID and well formed, else None
        (counted; a packet from another transfer ID gets ERROR 5 as RFC 1350 says)."""
        if src[0] != self.dest[0]:
            self._bad(f"packet from another host {src[0]}")
            return None
        if st.peer is not None and src != st.peer:
            # another transfer ID (e.g. a second answer to a re-sent RRQ)
            if pkt[:2] != struct.pack(">H", ERROR):
                st.sock.sendto(tftp.error(ERR_UNKNOWN_TID, "unknown transfer ID"), src)
            return None
        try:
            return tftp.parse(pkt)
        except TftpFormatError as e:
            self._bad(str(e))
            return None

    def _on_oack(self, st: _Receive, p: tftp.OAck, src: tuple[str, int]) -> None:
        if st.started:
            if st.peer == src and st.expect == 1:
                st.ack(0)  # our ACK of the OACK was lost
            return
        if not st.opts:
            self._bad("OACK to a request without options")
            return
        st.peer = src
        try:
            st.bs, st.win, st.tsize = self._accept_oack(p.options, st.opts)
        except ValueError as e:
            st.sock.sendto(tftp.error(ERR_OPTIONS, str(e)), src)
            raise self._fail(TftpProtocolError, f"unacceptable OACK: {e}") from None
        st.started, st.misses = True, 0
        if "windowsize" not in st.opts or "windowsize" not in p.options:
            self.rto.plain()
        if st.ack_sent_at is not None:
            self.rto.sample(time.monotonic() - st.ack_sent_at)
        st.ack(0)

    def _on_data(self, st: _Receive, p: tftp.Data, src: tuple[str, int]) -> bytes | None:
        """A DATA packet: the file when it was the last block, else None."""
        num, data = p.block, p.data
        if len(data) > st.bs:
            self._bad(f"DATA block {num} of {len(data)} bytes, blksize {st.bs}")
            return None
        if not st.started:  # DATA without OACK: the server ignored our options (RFC 1350 defaults)
            st.peer, st.started = src, True
            self.rto.plain()
        ahead = (num - st.expect) % 65536
        if ahead:
            self._out_of_order(st, num, ahead)
            return None
        return self._in_order(st, data, src)

    def _out_of_order(self, st: _Receive, num: int, ahead: int) -> None:
        st.ack_sent_at = None
        if ahead < st.win and (not st.recovering or num_abs(num, st.expect) <= st.last_ahead):
            # a gap: ACK the last in-order block at once. Once per server window: the rest of this
            # one is still in flight; but a block numbered at or below the last one seen ahead
            # means the server restarted its window and lost `expect` again.
            st.recovering, st.last_ahead = True, num_abs(num, st.expect)
            st.ack(st.expect - 1)
            self._count("gap_acks")
        elif ahead < st.win:
            st.last_ahead = num_abs(num, st.expect)
            self._count("ahead_ignored")
        elif ahead < 65536 - st.win * 2:
            self._bad(f"DATA block {num} outside the window (expecting {st.expect % 65536})")
        else:  # behind: a window we already have, re-sent; never ACKed (see above)
            self._count("behind")
            if self.rto.floor >= PLAIN_MIN_RTO and ahead == 65535:
                st.ack(st.expect - 1)  # lock-step server re-sent the last block: our ACK was lost

    def _in_order(self, st: _Receive, data: bytes, src: tuple[str, int]) -> bytes | None:
        if st.ack_sent_at is not None:
            self.rto.sample(time.monotonic() - st.ack_sent_at)
            st.ack_sent_at = None
        st.chunks.append(data)
        st.got += len(data)
        if st.tsize is not None and st.got > st.tsize:
            raise self._fail(TftpProtocolError, f"more than the announced tsize {st.tsize} bytes", st.expect)
        if self.max_size is not None and st.got > self.max_size:
            raise self._fail(TftpProtocolError, f"more than {self.max_size} bytes", st.expect)
        if st.misses:
            self.rto.restore()
        st.misses, st.recovering = 0, False
        st.since_ack += 1
        if len(data) < st.bs:  # the last block
            self.stats["srtt_us"] = int((self.rto.srtt or 0.0) * 1e6)
            for _ in range(FINAL_ACKS):
                st.sock.sendto(tftp.ack(st.expect), src)
            if st.tsize is not None and st.got != st.tsize:
                raise self._fail(TftpProtocolError, f"got {st.got} bytes, the server announced tsize {st.tsize}")
            if self.progress:
                self.progress(st.got, st.tsize)
            return b"".join(st.chunks)
        if st.since_ack >= st.win:
            st.ack(st.expect)
            self._count("window_acks")
            if self.progress:
                self.progress(st.got, st.tsize)
        st.expect += 1
        return None

    def _accept_oack(self, got: dict[str, str], asked: dict[str, str]) -> tuple[int, int, int | None]:
        unknown = set(got) - set(asked)
        if unknown:
            raise ValueError(f"options we did not ask for: {', '.join(sorted(unknown))}")
        bs, win, tsize = DEFAULT_BLKSIZE, 1, None
        try:
            if "blksize" in got:
                bs = int(got["blksize"])
                if not BLKSIZE_RANGE[0] <= bs <= self.want_bs:
                    raise ValueError(f"blksize {bs} not in {BLKSIZE_RANGE[0]}..{self.want_bs}")
            if "windowsize" in got:
                win = int(got["windowsize"])
                if not WINDOW_RANGE[0] <= win <= self.want_win:
                    raise ValueError(f"windowsize {win} not in 1..{self.want_win}")
            if "tsize" in got:
                tsize = int(got["tsize"])
                if tsize < 0:
                    raise ValueError(f"tsize {tsize}")
                if self.max_size is not None and tsize > self.max_size:
                    raise ValueError(f"tsize {tsize} is more than {self.max_size} bytes")
            if "timeout" in got:
                int(got["timeout"])
        except ValueError as e:
            raise ValueError(str(e)) from None
        return bs, win, tsize
