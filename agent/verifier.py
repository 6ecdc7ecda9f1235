"""The verifier side of remote attestation, over HTTP: challenge sessions and appraisal.

    POST /attestation/session        -> {"session": ID, "nonce": HEX (32 bytes), "expires": unix s}
    POST /attestation/session/{ID}   body: EAT evidence -> appraisal JSON (AppraisalResult.to_obj())

A session's nonce can be used once and only within `ttl` seconds: whatever happens to the
first evidence posted to it, the session is spent, so captured evidence cannot be replayed
(409, contraindicated) and a slow attester cannot stretch a challenge (410). `Challenges` is
shared with agent.peers, whose receivers challenge senders the same way.
"""

from __future__ import annotations

import os
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from agent.attestation_api import AgentServer, HttpError, Request, Response, Route
from cidboot.appraisal import CONTRAINDICATED, AppraisalResult, DeviceRoots, appraise
from cidboot.cid import CID
from cidboot.manifest.model import Manifest

NONCE_BYTES = 32
TTL = 60.0
MAX_SESSIONS = 4096  # outstanding challenges; the oldest are dropped first


def refusal(check: str, reason: str) -> dict[str, object]:
    """An appraisal-shaped JSON body for a refusal that happens before appraisal (replay, expiry)."""
    return {"status": CONTRAINDICATED, "checks": [{"check": check, "status": CONTRAINDICATED, "reason": reason}]}


@dataclass
class Challenge:
    session: str
    nonce: bytes
    expires: float

    def to_obj(self) -> dict[str, object]:
        return {"session": self.session, "nonce": self.nonce.hex(), "expires": int(self.expires)}


@dataclass
class Challenges:
    """Outstanding single-use nonces. `take` hands a nonce out once, then forgets it (but
    remembers that it was used, so a replay is told apart from an unknown session)."""

    ttl: float = TTL
    clock: Callable[[], float] = time.time
    _open: dict[str, Challenge] = field(default_factory=dict)
    _spent: dict[str, float] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def new(self) -> Challenge:
        now = self.clock()
        c = Challenge(secrets.token_hex(16), os.urandom(NONCE_BYTES), now + self.ttl)
        with self._lock:
            self._expire(now)
            while len(self._open) >= MAX_SESSIONS:
                self._open.pop(next(iter(self._open)))
            self._open[c.session] = c
        return c

    def take(self, session: str) -> bytes:
        """The session's nonce, spending it; HttpError 409 (used), 410 (expired) or 404 (unknown)."""
        now = self.clock()
        with self._lock:
            c = self._open.pop(session, None)
            if c is None:
                if session in self._spent:
                    raise HttpError(409, f"session {session} was already used: replayed evidence",
                                    refusal("session", "session already used: replayed evidence"))
                raise HttpError(404, f"no such session {session}", refusal("session", "unknown session"))
            self._spent[session] = c.expires
            if c.expires <= now:
                raise HttpError(410, f"session {session} expired {now - c.expires:.0f} s ago",
                                refusal("session", "challenge expired"))
            self._expire(now)
            return c.nonce

    def _expire(self, now: float) -> None:
        for s in [s for s, c in self._open.items() if c.expires <= now]:
            self._spent[s] = self._open.pop(s).expires
        for s in [s for s, exp in self._spent.items() if exp + self.ttl <= now]:
            del self._spent[s]  # a spent id is kept one more ttl: ids are random, never reissued


@dataclass
class Verifier:
    """Appraises evidence against registered device roots and, when given, the signed manifest."""

    roots: DeviceRoots
    manifest: Manifest | None = None
    manifest_cid: CID | None = None
    allow_unmeasured: bool = False
    challenges: Challenges = field(default_factory=Challenges)

    def appraise(self, evidence: bytes, nonce: bytes) -> AppraisalResult:
        return appraise(evidence, expected_nonce=nonce, roots=self.roots, manifest=self.manifest,
                        manifest_cid=self.manifest_cid, allow_unmeasured=self.allow_unmeasured)

    def routes(self) -> list[Route]:
        return [Route("POST", "/attestation/session", self._new_session),
                Route("POST", "/attestation/session/", self._appraise)]

    def _new_session(self, req: Request) -> Response:
        return Response.json(self.challenges.new().to_obj(), 201)

    def _appraise(self, req: Request) -> Response:
        session = req.path[len("/attestation/session/"):]
        if not session or "/" in session:
            raise HttpError(400, "session id must be one path segment")
        if not req.body:
            raise HttpError(400, "empty body: POST the EAT evidence (application/eat+cwt)")
        nonce = self.challenges.take(session)
        return Response.json(self.appraise(req.body, nonce).to_obj())


def serve_verifier(verifier: Verifier, host: str = "127.0.0.1", port: int = 0) -> AgentServer:
    """A verifier alone (no attester of its own): the session endpoints and /results (empty)."""
    srv = AgentServer((host, port), attester=None)
    srv.mount(*verifier.routes())
    return srv
