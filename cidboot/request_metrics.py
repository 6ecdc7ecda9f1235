"""Request counters a server exports on /metrics (the boot server's gateway, the agent's API).

One class for both: the agent serves /ipfs/ through the gateway's own handler, which records into
the agent's counters. A plain class, not a dataclass: the agent creates it before `agent ready`,
and a dataclass's generated methods are compiled at import (docs/images.md, "Start-up")."""

from __future__ import annotations

import threading


class RequestMetrics:
    """Requests, bytes sent and errors (status >= 400), and answers by status."""

    def __init__(self) -> None:
        self.requests = self.bytes_sent = self.errors = 0
        self.by_status: dict[int, int] = {}
        self.lock = threading.Lock()

    def record(self, status: int, nbytes: int) -> None:
        with self.lock:
            self.requests += 1
            self.bytes_sent += nbytes
            self.by_status[status] = self.by_status.get(status, 0) + 1
            if status >= 400:
                self.errors += 1
