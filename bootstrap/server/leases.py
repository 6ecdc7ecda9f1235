"""The lease database: a bounded address pool, persisted, with per-client rate limits.

Bounded on purpose: a flood of DISCOVERs from random MACs (starvation) can take at most the
pool, and no MAC or the whole server can allocate faster than the configured rates.

Durable on purpose: the lease file is replaced atomically (temporary file, fsync, rename, fsync
of the directory), so a crash leaves the old or the new file, never a torn one; and a damaged
file (empty, truncated, not our format) never stops the server from starting: it is logged,
moved aside as `leases.json.damaged-<time>` for inspection, and the server starts with no
leases (clients keep their addresses by asking again: REQUEST/INIT-REBOOT).
"""

from __future__ import annotations

import ipaddress
import json
import logging
import os
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from cidboot.errors import FormatError

log = logging.getLogger("bootstrap.leases")
TMP_PREFIX = ".leases-"


class LeaseError(FormatError):
    """The address range or lease file is invalid."""


@dataclass
class Lease:
    mac: str
    ip: str
    expires: float
    bound: bool = False


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
        self._new_rate, self._mac_rate = new_per_second, per_mac_per_second
        self._new_tokens, self._new_t = new_per_second, time.monotonic()
        self._mac_seen: dict[str, tuple[float, float]] = {}  # mac -> (tokens, last time)
        self.recovered: Path | None = None  # where a damaged lease file was moved on start
        if path:
            for stale in path.parent.glob(TMP_PREFIX + "*"):  # a save interrupted by a crash
                stale.unlink(missing_ok=True)
            if path.exists():
                self._load(path)

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

    def _load(self, path: Path) -> None:
        """Read the lease file; a damaged one is moved aside and we start with no leases."""
        try:
            leases = self._parse(path.read_bytes())
        except LeaseError as e:
            aside = path.with_name(f"{path.name}.damaged-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}")
            os.replace(path, aside)
            self.recovered = aside
            log.error("damaged lease file %s (%s): moved to %s, starting with no leases", path, e, aside,
                      extra={"path": str(path), "error": str(e), "moved_to": str(aside)})
            return
        for lease in leases:
            if lease.ip in self.pool:  # the range may have changed since
                self.by_mac[lease.mac] = lease

    @staticmethod
    def _parse(raw: bytes) -> list[Lease]:
        """The leases in a lease file, or LeaseError saying what is wrong with it."""
        if not raw.strip():
            raise LeaseError("empty")
        try:
            doc = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as e:
            raise LeaseError(f"not JSON: {e}") from None
        if not isinstance(doc, list):
            raise LeaseError(f"a list of leases expected, got {type(doc).__name__}")
        out = []
        for i, d in enumerate(doc):
            if not isinstance(d, dict) or set(d) != {"mac", "ip", "expires", "bound"}:
                raise LeaseError(f"lease {i}: not a map of mac, ip, expires, bound")
            mac, ip, expires, bound = d["mac"], d["ip"], d["expires"], d["bound"]
            if not isinstance(mac, str) or not isinstance(ip, str) or not isinstance(bound, bool) \
                    or isinstance(expires, bool) or not isinstance(expires, (int, float)):
                raise LeaseError(f"lease {i}: wrong types")
            try:
                ipaddress.IPv4Address(ip)
            except ValueError as e:
                raise LeaseError(f"lease {i}: {e}") from None
            out.append(Lease(mac, ip, float(expires), bound))
        return out

    def save(self) -> None:
        """Replace the lease file atomically and durably: the old or the new one survives a crash."""
        if not self.path:
            return
        with self._lock:
            doc = [vars(lease).copy() for lease in sorted(self.by_mac.values(), key=lambda x: x.ip)]
        raw = json.dumps(doc, separators=(",", ":")).encode()  # dumps: the C encoder
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

    def bind(self, mac: str, ip: str) -> bool:
        with self._lock:
            lease = self.by_mac.get(mac)
            if not lease or lease.ip != ip:
                return False
            lease.expires, lease.bound = time.time() + self.lease_seconds, True
        self.save()
        return True

    def release(self, mac: str) -> None:
        with self._lock:
            self.by_mac.pop(mac, None)
        self.save()

    def active(self) -> int:
        now = time.time()
        return sum(1 for lease in self.by_mac.values() if lease.bound and lease.expires > now)
