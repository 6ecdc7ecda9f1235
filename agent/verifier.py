"""The verifier side of remote attestation, over HTTP: challenge sessions and appraisal.

    POST /attestation/session        -> {"session": ID, "nonce": HEX (32 bytes), "expires": unix s}
    POST /attestation/session/{ID}   body: EAT evidence -> appraisal JSON (AppraisalResult.to_obj())

A session's nonce can be used once and only within `ttl` seconds: whatever happens to the
first evidence posted to it, the session is spent, so captured evidence cannot be replayed
(409, contraindicated) and a slow attester cannot stretch a challenge (410). `Challenges` is
shared with agent.peers, whose receivers challenge senders the same way.

Sessions are stateless (issue 11 #12): the ID *is* the nonce and its expiry, authenticated by
an HMAC under a key that lives only in this process. Issuing a challenge stores nothing, so no
number of unauthenticated `POST /attestation/session` can evict a pending one (a table of open
sessions, bounded or per client, can always be filled or spread over many addresses). The only
state is the set of spent sessions, needed for single use: it grows only when a session is
*used*, each entry is dropped when its session expires, and when it is full (`MAX_SPENT` uses
within one ttl) a use is refused with 503 (retry) rather than an entry forgotten early, so a
replay is never accepted. A restart changes the key, which invalidates every outstanding
session (404), also fail closed.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import struct
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from agent.attestation_api import AgentServer, HttpError, Request, Response, Route
from cidboot.ipld.cid import CID
from cidboot.trust.appraisal import (
    CONTRAINDICATED,
    AppraisalResult,
    DeviceRoots,
    appraise,
    with_bootstrap_events_all,
)
from cidboot.trust.manifest.model import Manifest

if TYPE_CHECKING:
    from cidboot.trust.tpm.appraise import References

NONCE_BYTES = 32
TTL = 60.0
MAX_SPENT = 65536  # sessions used within one ttl; beyond that a use is refused (503), never forgotten
TAG_BYTES = 16  # HMAC-SHA-256 truncated: forging a session takes 2^128 guesses
_SESSION_BYTES = NONCE_BYTES + 8 + TAG_BYTES
_DOMAIN = b"cidboot-attestation-session\x00"


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
    """Single-use, expiring challenges with no per-challenge state until one is used.

    `new` returns a session whose ID is hex(nonce || expiry in ms || HMAC(key, nonce || expiry)):
    only this process can make one, so a client cannot choose its nonce (and bring evidence it
    captured earlier). `take` checks the MAC and expiry and spends the session: a second `take`
    is a replay (409). See the module docstring for why this and not a table of open sessions."""

    ttl: float = TTL
    clock: Callable[[], float] = time.time
    max_spent: int = MAX_SPENT
    _key: bytes = field(default_factory=lambda: os.urandom(32), repr=False)
    _spent: OrderedDict[bytes, float] = field(default_factory=OrderedDict)  # tag -> expiry, in order of use
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def _tag(self, nonce: bytes, expires_ms: int) -> bytes:
        msg = _DOMAIN + nonce + struct.pack(">Q", expires_ms)
        return hmac.new(self._key, msg, hashlib.sha256).digest()[:TAG_BYTES]

    def new(self) -> Challenge:
        nonce = os.urandom(NONCE_BYTES)
        expires_ms = int((self.clock() + self.ttl) * 1000)
        session = (nonce + struct.pack(">Q", expires_ms) + self._tag(nonce, expires_ms)).hex()
        return Challenge(session, nonce, expires_ms / 1000)

    def take(self, session: str) -> bytes:
        """The session's nonce, spending it; HttpError 409 (used), 410 (expired), 404 (not one
        of ours) or 503 (too many sessions used within one ttl: retry)."""
        try:
            raw = bytes.fromhex(session)
        except ValueError:
            raw = b""
        if len(raw) != _SESSION_BYTES:
            raise HttpError(404, f"no such session {session[:80]}", refusal("session", "unknown session"))
        nonce, exp, tag = raw[:NONCE_BYTES], raw[NONCE_BYTES:NONCE_BYTES + 8], raw[NONCE_BYTES + 8:]
        expires_ms = struct.unpack(">Q", exp)[0]
        if not hmac.compare_digest(tag, self._tag(nonce, expires_ms)):
            raise HttpError(404, f"no such session {session[:80]}: not issued by this process",
                            refusal("session", "unknown session"))
        now = self.clock()
        expires = expires_ms / 1000
        with self._lock:
            self._expire(now)
            if tag in self._spent:
                raise HttpError(409, f"session {session[:16]}... was already used: replayed evidence",
                                refusal("session", "session already used: replayed evidence"))
            if expires <= now:  # no need to remember it: it can never be taken again
                raise HttpError(410, f"session {session[:16]}... expired {now - expires:.0f} s ago",
                                refusal("session", "challenge expired"))
            if len(self._spent) >= self.max_spent:
                raise HttpError(503, f"more than {self.max_spent} sessions used in the last {self.ttl:.0f} s: retry",
                                refusal("session", "verifier busy: retry"))
            self._spent[tag] = expires
            return nonce

    @property
    def spent(self) -> int:
        """Sessions used and not yet expired (what the replay check remembers)."""
        with self._lock:
            return len(self._spent)

    def _expire(self, now: float) -> None:
        # every session has the same ttl, so use order is nearly expiry order: drop from the front
        # while expired, and let an odd out-of-order entry wait for its neighbours (bounded anyway)
        while self._spent:
            tag, exp = next(iter(self._spent.items()))
            if exp > now:
                break
            del self._spent[tag]


@dataclass
class Verifier:
    """Appraises evidence against registered device roots and, when given, the signed manifest.

    DICE- and TPM-rooted evidence alike (cidboot.trust.appraisal.appraise dispatches on the EAT):
    peers and `agent serve --verifier` accept a TPM device exactly as a DICE one. For a TPM
    device's PCR 4/11 the verifier needs `tpm_references`, derived from the bootstrap UKI
    (`TpmReferences.for_uki`); without them those checks are a warning (never affirming)."""

    roots: DeviceRoots
    manifest: Manifest | None = None
    manifest_cid: CID | None = None
    allow_unmeasured: bool = False
    challenges: Challenges = field(default_factory=Challenges)
    tpm_references: References | None = None  # one set, or one per architecture (a signed registry's)

    def __post_init__(self) -> None:
        # the manifest's PCR 15 events, derived once rather than per appraisal
        if self.tpm_references is not None:
            self.tpm_references = with_bootstrap_events_all(self.tpm_references, self.manifest, self.manifest_cid)

    def appraise(self, evidence: bytes, nonce: bytes) -> AppraisalResult:
        return appraise(evidence, expected_nonce=nonce, roots=self.roots, manifest=self.manifest,
                        manifest_cid=self.manifest_cid, allow_unmeasured=self.allow_unmeasured,
                        tpm_references=self.tpm_references)

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
