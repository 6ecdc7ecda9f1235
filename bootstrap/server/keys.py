"""The key broker over HTTP (docs/privacy.md, "The key broker"): `bootstrap keys --listen`.

    POST /keys/challenge  -> 200 {"challenge": HEX, "ttl": seconds}
    POST /keys/request    body: KeyRequest JSON {challenge, ephemeral, evidence}
                          -> 200 {"release": KeyRelease JSON, "check": "released", "reason": ...}
                          -> 403 {"refused": CHECK, "reason": ..., "status": ..., "checks": [...]}
                          -> 400 {"error": ...} (malformed request; the challenge is not spent)

`KeyService` is an `App` (cidboot.store.gateway.server): the boot server can mount it beside its
fleet view, and `serve_keys` runs it alone on the bounded HTTP server, which is where it belongs
when the boot server should not hold flow secrets (docs/privacy.md, "Threat model").
"""

from __future__ import annotations

import json
import logging
from typing import Any
from urllib.parse import urlsplit

from cidboot.httpd import BoundedHandler, BoundedHTTPServer, Limits
from cidboot.trust.private.broker import (
    CHALLENGE_BYTES,
    MAX_EVIDENCE,
    KeyBroker,
    KeyRequest,
    KeyRequestFormatError,
)

log = logging.getLogger("bootstrap.keys")

PATHS = ("/keys/challenge", "/keys/request")
# a request carries hex evidence (TPM evidence holds the firmware event log) plus JSON
LIMITS = Limits(max_body=2 * MAX_EVIDENCE + 4 * CHALLENGE_BYTES + 1024, body_budget=64 << 20, max_workers=128)


def _json(h: BoundedHandler, status: int, obj: Any) -> None:
    body = (json.dumps(obj, sort_keys=True) + "\n").encode()
    h.send_response(status)
    h.send_header("Content-Type", "application/json")
    h.send_header("Content-Length", str(len(body)))
    h.send_header("Cache-Control", "no-store")
    h.send_header("X-Content-Type-Options", "nosniff")
    h.end_headers()
    h.wfile.write(body)


class KeyService:
    """Answers /keys/*; anything else is not ours (False)."""

    def __init__(self, broker: KeyBroker) -> None:
        self.broker = broker

    def __call__(self, h: BoundedHandler) -> bool:
        path = urlsplit(h.path).path
        if path not in PATHS:
            return False
        if h.command != "POST":
            _json(h, 405, {"error": f"{path}: POST only"})
            return True
        if path == "/keys/challenge":
            _json(h, 200, {"challenge": self.broker.challenge().hex(), "ttl": self.broker.challenges.ttl})
            return True
        try:
            req = KeyRequest.from_json(json.loads(h.body))
        except (ValueError, KeyRequestFormatError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
            _json(h, 400, {"error": f"not a key request: {e}"})
            return True
        d = self.broker.request(req)
        a = d.appraisal
        log.info("key %s", "release" if d.released else "refusal",
                 extra={"check": d.check, "reason": d.reason, "manifest": d.manifest_cid,
                        "device_id": a.device_id if a else None})
        if d.released and d.release is not None:
            _json(h, 200, {"release": d.release.to_json(), "check": d.check, "reason": d.reason})
        else:
            _json(h, 403, {"refused": d.check, "reason": d.reason, "status": a.status if a else None,
                           "checks": [c.to_obj() for c in a.checks] if a else []})
        return True


class KeyServer(BoundedHTTPServer):
    service: KeyService

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host!s}:{port}" if isinstance(host, str) else f"http://{host.decode()}:{port}"


class _Handler(BoundedHandler):
    server: KeyServer

    def log_message(self, format: str, *args: object) -> None:
        log.debug("%s " + format, self.client_address[0], *args)

    def _answer(self) -> None:
        if not self.server.service(self):
            _json(self, 404, {"error": f"no such endpoint {urlsplit(self.path).path}"})

    do_GET = do_POST = do_PUT = do_DELETE = _answer


def serve_keys(broker: KeyBroker, host: str, port: int, limits: Limits | None = None) -> KeyServer:
    """Bind the key broker (port 0 picks one); call `.serve_forever()` to run it."""
    server = KeyServer((host, port), _Handler, limits or LIMITS)
    server.service = KeyService(broker)
    return server
