"""The lease database: a bounded address pool, persisted, with per-client rate limits.

Bounded on purpose: a flood of DISCOVERs from random MACs (starvation) can take at most the
pool, and no MAC or the whole server can allocate faster than the configured rates.
"""

from __future__ import annotations

import ipaddress
import json
import os
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from cidboot.errors import FormatError


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
        if path and path.exists():
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
        try:
            for d in json.loads(path.read_text()):
                if d["ip"] in self.pool:
                    self.by_mac[d["mac"]] = Lease(d["mac"], d["ip"], float(d["expires"]), bool(d["bound"]))
        except (ValueError, KeyError, TypeError) as e:
            raise LeaseError(f"{path}: damaged lease file: {e}") from None

    def save(self) -> None:
        if not self.path:
            return
        doc = [vars(lease) for lease in sorted(self.by_mac.values(), key=lambda x: x.ip)]
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".leases-")
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(doc, separators=(",", ":")))  # dumps: the C encoder (dump with a file is pure Python)
        os.replace(tmp, self.path)

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
