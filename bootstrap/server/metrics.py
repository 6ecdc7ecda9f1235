"""Counters for /metrics, in the Prometheus text format.

`request_failed` is what every server loop calls when one request raised something it did not
expect: the request is dropped, the failure logged (with its traceback and the peer) and counted
as `cidboot_request_exceptions_total{server=...,exception=...}`, and the loop goes on serving.
"""

from __future__ import annotations

import logging
import threading


class Metrics:
    def __init__(self) -> None:
        self._c: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
        self._gauges: dict[str, float] = {}
        self._lock = threading.Lock()

    def inc(self, name: str, n: float = 1, **labels: str) -> None:
        with self._lock:
            key = (name, tuple(sorted(labels.items())))
            self._c[key] = self._c.get(key, 0) + n

    def gauge(self, name: str, value: float) -> None:
        with self._lock:
            self._gauges[name] = value

    def request_failed(self, server: str, exc: BaseException, peer: str, log: logging.Logger) -> None:
        """One request of `server` raised `exc`: log it (structured, with traceback) and count it."""
        self.inc("request_exceptions_total", server=server, exception=type(exc).__name__)
        log.error("%s: request from %s failed: %s: %s", server, peer, type(exc).__name__, exc, exc_info=exc,
                  extra={"peer": peer, "server": server, "exception": type(exc).__name__, "error": str(exc)})

    def get(self, name: str, **labels: str) -> float:
        return self._c.get((name, tuple(sorted(labels.items()))), 0)

    def render(self) -> str:
        lines = []
        with self._lock:
            for (name, labels), v in sorted(self._c.items()):
                lab = ",".join(f'{k}="{val}"' for k, val in labels)
                lines.append(f"cidboot_{name}{{{lab}}} {v}" if lab else f"cidboot_{name} {v}")
            for name, v in sorted(self._gauges.items()):
                lines.append(f"cidboot_{name} {v}")
        return "\n".join(lines) + "\n"
