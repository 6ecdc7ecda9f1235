"""The lease database: a bounded address pool, persisted in a journal, with per-client rate limits.

Bounded on purpose: a flood of DISCOVERs from random MACs (starvation) can take at most the
pool, and no MAC or the whole server can allocate faster than the configured rates.

Durable on purpose, and cheap: the lease file is an append-only journal (`LeaseJournal`), one
checksummed line per binding or release, so a binding costs one small append and an `fsync`
that the DHCP server shares among every binding of a batch of packets (group commit), where a
whole rewrite per binding capped it at the disk's fsync rate. The journal is compacted (rewritten
atomically: temporary file, fsync, rename, fsync of the directory) on start and when it grows
past a bound. A crash leaves a journal whose last record may be cut at any byte: that torn
record is ignored with a log line (its reply was never sent: replies wait for the fsync). A
damaged file (empty, a corrupt record before the last, not our format) never stops the server
from starting: it is logged, moved aside as `leases.json.damaged-<time>` for inspection, and
the server starts with no leases (clients keep their addresses by asking again:
REQUEST/INIT-REBOOT). A lease file of the old format (one JSON list) is read and compacted into
a journal.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import os
import tempfile
import threading
import time
import weakref
import zlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from cidboot.errors import FormatError

log = logging.getLogger("bootstrap.leases")
TMP_PREFIX = ".leases-"
MAGIC = b"cidboot-lease-journal 1\n"  # the journal's first line
COMPACT_MIN = 4096  # appended records before the journal is compacted (or twice the live leases, if more)


class LeaseError(FormatError):
    """The address range or lease file is invalid."""


@dataclass
class Lease:
    mac: str
    ip: str
    expires: float
    bound: bool = False


# A journal record: a lease as bound (or offered, in a compacted snapshot), or the MAC of a released one.
Record = Lease | str


def _check_lease(d: object, what: str) -> Lease:
    """A lease from its JSON map, or LeaseError naming `what` is wrong with it."""
    if not isinstance(d, dict) or set(d) != {"mac", "ip", "expires", "bound"}:
        raise LeaseError(f"{what}: not a map of mac, ip, expires, bound")
    mac, ip, expires, bound = d["mac"], d["ip"], d["expires"], d["bound"]
    if not isinstance(mac, str) or not isinstance(ip, str) or not isinstance(bound, bool) \
            or isinstance(expires, bool) or not isinstance(expires, (int, float)):
        raise LeaseError(f"{what}: wrong types")
    try:
        ipaddress.IPv4Address(ip)
    except ValueError as e:
        raise LeaseError(f"{what}: {e}") from None
    return Lease(mac, ip, float(expires), bound)


def encode_record(rec: Record) -> bytes:
    """One journal line: the CRC-32 of the JSON body (8 hex digits), a space, the body, a newline."""
    doc = {"mac": rec, "released": True} if isinstance(rec, str) else vars(rec)
    body = json.dumps(doc, separators=(",", ":")).encode()
    return b"%08x %s\n" % (zlib.crc32(body), body)


def _decode_record(line: bytes, n: int) -> Record:
    what = f"record {n}"
    if len(line) < 10 or line[8:9] != b" ":
        raise LeaseError(f"{what}: not a checksummed record")
    try:
        crc = int(line[:8], 16)
    except ValueError:
        raise LeaseError(f"{what}: not a checksummed record") from None
    body = line[9:]
    if zlib.crc32(body) != crc:
        raise LeaseError(f"{what}: checksum mismatch")
    try:
        doc = json.loads(body)
    except (ValueError, UnicodeDecodeError) as e:
        raise LeaseError(f"{what}: not JSON: {e}") from None
    if isinstance(doc, dict) and doc.keys() == {"mac", "released"}:
        if not isinstance(doc["mac"], str) or doc["released"] is not True:
            raise LeaseError(f"{what}: wrong types")
        return str(doc["mac"])
    return _check_lease(doc, what)


def parse_lease_file(raw: bytes, where: str = "lease file") -> list[Record]:
    """The records of a lease journal (or the leases of an old-format JSON list), in order.

    A last record without its newline is what a crash during an append leaves: it is dropped
    with a log line (its binding was never acknowledged). Anything else that is wrong (a bad
    checksum or record before the end, an empty file, not our format) is a LeaseError.
    """
    if not raw.strip():
        raise LeaseError("empty")
    if not raw.startswith(MAGIC):
        return list(_parse_legacy(raw))
    lines = raw[len(MAGIC):].split(b"\n")
    torn = lines.pop()  # what follows the last newline: empty unless the last append was cut short
    if torn:
        log.warning("lease journal %s: ignoring a torn last record (%d bytes, an append a crash cut short)",
                    where, len(torn), extra={"path": where, "bytes": len(torn)})
    return [_decode_record(line, n) for n, line in enumerate(lines, 1)]


def _parse_legacy(raw: bytes) -> list[Lease]:
    """The leases of a lease file of the old format (one JSON list, rewritten whole per binding)."""
    try:
        doc = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise LeaseError(f"not JSON: {e}") from None
    if not isinstance(doc, list):
        raise LeaseError(f"a list of leases expected, got {type(doc).__name__}")
    return [_check_lease(d, f"lease {i}") for i, d in enumerate(doc)]


class LeaseJournal:
    """The lease file as an append-only journal: `append` writes a record (no fsync), `sync`
    makes every appended record durable with one fsync (group commit), `compact` replaces the
    file atomically with one record per live lease.

    A failed write or fsync leaves the journal `broken`: the next write compacts instead of
    appending after what may be a partial record, which would otherwise sit in the middle of
    the file and make the next start move it aside.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.broken = False
        self._fd: int | None = None  # open for appending once the file is ours (after a compaction)
        self._closer: Callable[[], object] | None = None
        self._appended = 0  # records appended since the last compaction
        self._unsynced = False

    def read(self) -> list[Record]:
        return parse_lease_file(self.path.read_bytes(), str(self.path))

    def due(self, live: int) -> bool:
        """Whether the next write must be a compaction: no journal opened yet (start, or the file
        was moved aside), a failed write, more appended records than the bound, or our file was
        replaced under us (another LeaseDB on the same path compacted it on its start: appending
        to the unlinked old file would lose the record)."""
        return self._fd is None or self.broken or self._appended >= max(COMPACT_MIN, 2 * live) \
            or os.fstat(self._fd).st_nlink == 0

    def append(self, rec: Record) -> None:
        assert self._fd is not None, "compact() opens the journal"
        line = encode_record(rec)
        if os.write(self._fd, line) != len(line):
            raise OSError(f"short write to {self.path}")
        self._appended += 1
        self._unsynced = True

    def sync(self) -> None:
        if self._unsynced and self._fd is not None:
            os.fsync(self._fd)
            self._unsynced = False

    def compact(self, leases: Iterable[Lease]) -> None:
        """Replace the file atomically and durably (temporary file, fsync, rename, fsync of the
        directory): the old or the new journal survives a crash."""
        raw = MAGIC + b"".join(encode_record(lease) for lease in sorted(leases, key=lambda x: x.ip))
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=TMP_PREFIX)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(raw)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        dfd = os.open(self.path.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dfd)  # the rename itself is durable
        finally:
            os.close(dfd)
        self.close()
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC)
        self._closer = weakref.finalize(self, os.close, self._fd)  # a dropped LeaseDB does not leak its fd
        self._appended, self._unsynced, self.broken = 0, False, False

    def close(self) -> None:
        if self._closer is not None:
            self._closer()  # closes the fd once, however often it is called
        self._fd, self._closer = None, None


class LeaseDB:
    def __init__(self, first: str, last: str, *, lease_seconds: int = 3600, path: Path | None = None,
                 new_per_second: float = 50.0, per_mac_per_second: float = 5.0,
                 reservations: dict[str, str] | None = None) -> None:
        try:
            lo, hi = ipaddress.IPv4Address(first), ipaddress.IPv4Address(last)
        except ValueError as e:
            raise LeaseError(f"bad DHCP range: {e}") from None
        if hi < lo or int(hi) - int(lo) > 65535:
            raise LeaseError(f"DHCP range {first}-{last} is empty or larger than 65536 addresses")
        self.pool = [str(ipaddress.IPv4Address(i)) for i in range(int(lo), int(hi) + 1)]
        self.reservations = self._check_reservations(reservations or {})
        self.lease_seconds, self.path = lease_seconds, path
        self.by_mac: dict[str, Lease] = {}
        self._lock = threading.Lock()
        self._io_lock = threading.Lock()  # one journal writer at a time
        self._new_rate, self._mac_rate = new_per_second, per_mac_per_second
        self._new_tokens, self._new_t = new_per_second, time.monotonic()
        self._mac_seen: dict[str, tuple[float, float]] = {}  # mac -> (tokens, last time)
        self.recovered: Path | None = None  # where a damaged lease file was moved on start
        self.journal = LeaseJournal(path) if path else None
        if path:
            for stale in path.parent.glob(TMP_PREFIX + "*"):  # a compaction interrupted by a crash
                stale.unlink(missing_ok=True)
            if path.exists() and self._load(path):
                self.save()  # compacted on start: superseded records and a torn tail go

    @staticmethod
    def _check_reservations(res: dict[str, str]) -> dict[str, str]:
        """MAC -> fixed address (devices.yaml `ip:`): peers find each other at known addresses."""
        out: dict[str, str] = {}
        for mac, ip in res.items():
            try:
                ipaddress.IPv4Address(ip)
            except ValueError as e:
                raise LeaseError(f"reservation for {mac}: {e}") from None
            if ip in out.values():
                raise LeaseError(f"reservation for {mac}: {ip} is reserved twice")
            out[mac.lower()] = ip
        return out

    def _load(self, path: Path) -> bool:
        """Replay the lease file; a damaged one is moved aside and we start with no leases (False)."""
        assert self.journal is not None
        try:
            records = self.journal.read()
        except LeaseError as e:
            aside = path.with_name(f"{path.name}.damaged-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}")
            os.replace(path, aside)
            self.recovered = aside
            log.error("damaged lease file %s (%s): moved to %s, starting with no leases", path, e, aside,
                      extra={"path": str(path), "error": str(e), "moved_to": str(aside)})
            return False
        by_ip: dict[str, str] = {}  # an address has one holder: a later binding of it supersedes an earlier one
        for rec in records:
            if isinstance(rec, str):
                gone = self.by_mac.pop(rec, None)
                if gone is not None:
                    by_ip.pop(gone.ip, None)
                continue
            old = self.by_mac.get(rec.mac)
            if old is not None:
                by_ip.pop(old.ip, None)
            holder = by_ip.get(rec.ip)
            if holder is not None and holder != rec.mac:
                del self.by_mac[holder]
            self.by_mac[rec.mac], by_ip[rec.ip] = rec, rec.mac
        pool = set(self.pool)
        for mac in [m for m, lease in self.by_mac.items() if lease.ip not in pool]:
            del self.by_mac[mac]  # the range may have changed since
        return True

    def save(self) -> None:
        """Compact the lease file now: one record per lease, replaced atomically and durably."""
        if self.journal is None:
            return
        with self._io_lock:
            with self._lock:
                leases = [Lease(**vars(lease)) for lease in self.by_mac.values()]
            try:
                self.journal.compact(leases)
            except BaseException:
                self.journal.broken = True
                raise

    def _record(self, rec: Record, sync: bool) -> None:
        """Journal one change (memory already has it): an append, or a compaction when one is due;
        with `sync`, durable on return. A failed write breaks the journal (the next one compacts)."""
        j = self.journal
        if j is None:
            return
        with self._io_lock:
            with self._lock:
                due = j.due(len(self.by_mac))
                snapshot = [Lease(**vars(lease)) for lease in self.by_mac.values()] if due else []
            try:
                if due:
                    j.compact(snapshot)
                else:
                    j.append(rec)
                    if sync:
                        j.sync()
            except BaseException:
                j.broken = True
                raise

    def sync(self) -> None:
        """Make every binding and release recorded with `sync=False` durable (one fsync: the DHCP
        server calls it once per batch of packets, before it sends their replies)."""
        if self.journal is None:
            return
        with self._io_lock:
            try:
                self.journal.sync()
            except BaseException:
                self.journal.broken = True
                raise

    def allow(self, mac: str) -> bool:
        """Per-MAC token bucket: a client that floats more than the rate is ignored for a while."""
        now = time.monotonic()
        with self._lock:
            tokens, last = self._mac_seen.get(mac, (self._mac_rate * 2, now))
            tokens = min(self._mac_rate * 2, tokens + (now - last) * self._mac_rate)
            if len(self._mac_seen) > 4 * len(self.pool) + 1024:
                self._mac_seen.clear()  # bounded memory under a MAC flood
            if tokens < 1:
                self._mac_seen[mac] = (tokens, now)
                return False
            self._mac_seen[mac] = (tokens - 1, now)
            return True

    def offer(self, mac: str, requested: str | None = None) -> str | None:
        """An address for `mac` (its existing lease if any), or None when the pool or the new-lease
        rate is exhausted."""
        now = time.time()
        with self._lock:
            lease = self.by_mac.get(mac)
            fixed = self.reservations.get(mac)
            if fixed and (not lease or lease.ip != fixed):
                lease = self.by_mac[mac] = Lease(mac, fixed, now + 60)
            if lease:
                lease.expires = max(lease.expires, now + 60)
                return lease.ip
            mono = time.monotonic()
            self._new_tokens = min(self._new_rate, self._new_tokens + (mono - self._new_t) * self._new_rate)
            self._new_t = mono
            if self._new_tokens < 1:
                return None
            used = {lease.ip for lease in self.by_mac.values() if lease.expires > now} | set(self.reservations.values())
            candidates = ([requested] if requested in self.pool and requested not in used else []) + self.pool
            for ip in candidates:
                if ip not in used:
                    for m, old in list(self.by_mac.items()):
                        if old.ip == ip:
                            del self.by_mac[m]  # an expired lease is reused
                    self.by_mac[mac] = Lease(mac, ip, now + 60)
                    self._new_tokens -= 1
                    return ip
            return None

    def bind(self, mac: str, ip: str, *, sync: bool = True) -> bool:
        """Bind `mac`'s offered address for `lease_seconds`. Journaled; durable on return unless
        `sync` is False (then `sync()` makes it durable, before its ACK is sent)."""
        with self._lock:
            lease = self.by_mac.get(mac)
            if not lease or lease.ip != ip:
                return False
            lease.expires, lease.bound = time.time() + self.lease_seconds, True
            rec = Lease(**vars(lease))
        self._record(rec, sync)
        return True

    def release(self, mac: str, *, sync: bool = True) -> None:
        with self._lock:
            gone = self.by_mac.pop(mac, None)
        if gone is not None:
            self._record(mac, sync)

    def active(self) -> int:
        now = time.time()
        return sum(1 for lease in self.by_mac.values() if lease.bound and lease.expires > now)
