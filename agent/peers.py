"""Exchanging flow inputs between agents, each side attested to the other with a fresh nonce.

An input crosses devices only between two agents that have just proven, with DICE evidence
appraised against the registered device roots and the signed manifest, that they run the
released image on a registered device. The sender S and the receiver R:

    1. S -> R  POST /peer/session   {"nonce": HEX Ns}            (Ns fresh, S's challenge)
       R -> S  201 {"session": ID, "nonce": HEX Nr, "expires": t, "evidence": HEX EAT(R, Ns)}
    2. S appraises EAT(R, Ns): affirming, and R's role is the one the inputs are for;
       otherwise S sends nothing (PeerRefused).
    3. S -> R  POST /peer/inputs/ID  CBOR {"evidence": EAT(S, Nb), "blocks": [[CID bytes, block], ...]}
       where Nb = SHA-256("cidboot-peer-inputs" 0x00 || Nr || CID_1 || CID_2 ...) binds the
       evidence to this challenge *and* these blocks (CIDs are self-delimiting, and each block
       must hash to its CID), so evidence cannot be lifted onto other inputs in transit.
       R spends session ID (single use, 60 s), appraises EAT(S, Nb); not affirming -> 403 with
       the appraisal's reasons, and nothing is accepted. Affirming: R registers S (alias key ->
       role, appraisal) and hands the blocks to `accept`; 200 {"received": n, "admitted": [CID]
       (what `accept` returned, or null), "status": "affirming"}.

Blocks are opaque here: what they mean (signed provenance nodes) is the orchestrator's
business, and it validates them again (agent.validate). Discovery is static: the boot
config's `peers` maps a role to the agents' base URLs.
"""

from __future__ import annotations

import asyncio
import hashlib
import http.client
import inspect
import json
import logging
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import cbor2

from agent.attestation_api import (
    CBOR_TYPE,
    AgentServer,
    Attester,
    HttpError,
    Request,
    Response,
    Route,
    nonce_from_hex,
)
from agent.verifier import Challenges, Verifier
from cidboot.appraisal import AppraisalResult
from cidboot.cid import CID
from cidboot.errors import CidbootError, FormatError, VerificationError

log = logging.getLogger("agent.peers")

Block = tuple[CID, bytes]
Accept = Callable[[list[Block], AppraisalResult], Any]  # may return an awaitable (the orchestrator's loop)
Register = Callable[[AppraisalResult], None]
Refused = Callable[[str, AppraisalResult], Any]  # (client address, appraisal): the audit log's hook
TIMEOUT = 10.0


class PeerError(CidbootError):
    """A peer could not be reached or answered nonsense (names the URL)."""


class PeerUnavailable(PeerError):
    """The peer cannot be reached or is not ready yet (HTTP 503): worth retrying, unlike a refusal."""


class PeerRefused(VerificationError):
    """Attestation failed in either direction; `result` holds the appraisal that said no."""

    def __init__(self, message: str, result: Mapping[str, Any] | None = None) -> None:
        super().__init__(message)
        self.result = dict(result or {})


def reasons(obj: Mapping[str, Any]) -> str:
    """The failing checks of an appraisal object, as one line."""
    bad = [f"{c['check']}: {c['reason']}" for c in obj.get("checks", []) if c.get("status") != "affirming"]
    return "; ".join(bad) or str(obj.get("status", "no appraisal"))


def binding_nonce(challenge: bytes, blocks: Sequence[Block]) -> bytes:
    """Nb of step 3: the receiver's challenge bound to the exact blocks sent with the evidence."""
    h = hashlib.sha256(b"cidboot-peer-inputs\x00" + challenge)
    for cid, _ in blocks:
        h.update(bytes(cid))
    return h.digest()


def encode_exchange(evidence: bytes, blocks: Sequence[Block]) -> bytes:
    return cbor2.dumps({"evidence": evidence, "blocks": [[bytes(c), d] for c, d in blocks]})


def decode_exchange(body: bytes) -> tuple[bytes, list[Block]]:
    """Parse step 3's body; every block is checked against its CID here (nothing unverified passes)."""
    try:
        obj = cbor2.loads(body)
    except Exception as e:  # cbor2 raises several types on garbage
        raise HttpError(400, f"body is not CBOR: {type(e).__name__}: {e}") from None
    if not isinstance(obj, dict) or set(obj) != {"evidence", "blocks"}:
        raise HttpError(400, "body must be the CBOR map {evidence, blocks}")
    ev, raw = obj["evidence"], obj["blocks"]
    if not isinstance(ev, bytes) or not isinstance(raw, list):
        raise HttpError(400, "evidence must be bytes and blocks a list")
    blocks: list[Block] = []
    for i, item in enumerate(raw):
        if not (isinstance(item, list) and len(item) == 2 and isinstance(item[0], bytes) and isinstance(item[1], bytes)):
            raise HttpError(400, f"block {i} must be [CID bytes, block bytes]")
        try:
            cid = CID.decode(item[0])
            cid.verify(item[1])
        except (FormatError, VerificationError) as e:
            raise HttpError(400, f"block {i}: {e}") from None
        blocks.append((cid, item[1]))
    return ev, blocks


def _http(method: str, url: str, path: str, body: bytes | None, ctype: str, timeout: float) -> tuple[int, bytes]:
    u = urlsplit(url)
    if u.scheme not in ("http", "https") or not u.hostname:
        raise PeerError(f"peer URL must be http(s)://HOST[:PORT], got {url!r}")
    cls = http.client.HTTPSConnection if u.scheme == "https" else http.client.HTTPConnection
    conn = cls(u.hostname, u.port, timeout=timeout)
    try:
        conn.request(method, u.path.rstrip("/") + path, body=body, headers={"Content-Type": ctype, "User-Agent": "cidboot-agent"})
        resp = conn.getresponse()
        return resp.status, resp.read()
    except (OSError, http.client.HTTPException) as e:
        raise PeerUnavailable(f"{url}: {type(e).__name__}: {e}") from None
    finally:
        conn.close()


@dataclass
class PeerService:
    """The receiving side (step 1 and 3), mounted on the agent's server."""

    attester: Attester
    verifier: Verifier  # roots + manifest the sender is appraised against
    accept: Accept
    register: Register = lambda _r: None
    refused: Refused = lambda _c, _r: None
    loop: asyncio.AbstractEventLoop | None = None  # where an async `accept` runs
    challenges: Challenges = field(default_factory=Challenges)

    def routes(self) -> list[Route]:
        return [Route("POST", "/peer/session", self._session), Route("POST", "/peer/inputs/", self._inputs)]

    def _session(self, req: Request) -> Response:
        try:
            doc = json.loads(req.body or b"null")
        except ValueError as e:
            raise HttpError(400, f"body is not JSON: {e}") from None
        if not isinstance(doc, dict) or set(doc) != {"nonce"} or not isinstance(doc["nonce"], str):
            raise HttpError(400, 'body must be {"nonce": HEX}')
        their = nonce_from_hex(doc["nonce"])
        c = self.challenges.new()
        return Response.json({**c.to_obj(), "evidence": self.attester.evidence(their).hex()}, 201)

    def _inputs(self, req: Request) -> Response:
        session = req.path[len("/peer/inputs/"):]
        evidence, blocks = decode_exchange(req.body)
        nonce = self.challenges.take(session)  # spent even when what follows refuses
        res = self.verifier.appraise(evidence, binding_nonce(nonce, blocks))
        if not res.affirming:
            log.warning("refused inputs from %s: %s", req.client, reasons(res.to_obj()))
            self.refused(req.client, res)
            raise HttpError(403, f"sender not affirming: {reasons(res.to_obj())}", res.to_obj())
        self.register(res)
        out = self.accept(blocks, res)
        if inspect.isawaitable(out):
            if self.loop is None:
                raise HttpError(500, "accept is async but no event loop was given")
            out = asyncio.run_coroutine_threadsafe(_awaited(out), self.loop).result(TIMEOUT)
        # the orchestrator answers with the inputs it admitted (validated, consumed here): say so,
        # so a sender's operator sees "received 3, admitted 0" rather than a bare OK
        admitted = [str(c) for c in out] if isinstance(out, list) else None
        return Response.json({"received": len(blocks), "admitted": admitted, "status": res.status})


async def _awaited(x: Any) -> Any:
    return await x


@dataclass
class PeerClient:
    """The sending side: `send(role, blocks)` to every agent of `role` the boot config lists."""

    attester: Attester
    verifier: Verifier  # roots + manifest the receiver is appraised against
    peers: Mapping[str, Sequence[str]]
    timeout: float = TIMEOUT
    patience: float = 0.0  # seconds to keep retrying a peer that is unreachable or not ready (devices boot apart)

    def send_to(self, url: str, blocks: Sequence[Block], *, role: str | None = None) -> AppraisalResult:
        """Steps 1-3 with one agent; returns the receiver's appraisal. Raises PeerRefused or PeerError.

        Only PeerUnavailable is retried (each attempt with fresh nonces and a new session),
        with backoff, for up to `patience` seconds; a refusal is final."""
        deadline, delay = time.monotonic() + self.patience, 0.2
        while True:
            try:
                return self._exchange(url, blocks, role)
            except PeerUnavailable as e:
                if time.monotonic() + delay > deadline:
                    raise
                log.info("peer %s not available, retrying in %.1f s: %s", url, delay, e)
                time.sleep(delay)
                delay = min(delay * 2, 5.0)

    def _exchange(self, url: str, blocks: Sequence[Block], role: str | None) -> AppraisalResult:
        mine = os.urandom(32)
        status, body = _http("POST", url, "/peer/session", json.dumps({"nonce": mine.hex()}).encode(),
                             "application/json", self.timeout)
        if status == 503:
            raise PeerUnavailable(f"{url}/peer/session: not ready: {body[:200].decode(errors='replace').strip()}")
        if status != 201:
            raise PeerError(f"{url}/peer/session: HTTP {status}: {body[:200].decode(errors='replace').strip()}")
        try:
            doc = json.loads(body)
            session, theirs, evidence = str(doc["session"]), bytes.fromhex(doc["nonce"]), bytes.fromhex(doc["evidence"])
        except (ValueError, KeyError, TypeError) as e:
            raise PeerError(f"{url}/peer/session: malformed answer: {e}") from None
        res = self.verifier.appraise(evidence, mine)
        if not res.affirming:
            raise PeerRefused(f"{url} is not affirming, nothing sent: {reasons(res.to_obj())}", res.to_obj())
        if role is not None and res.role != role:
            raise PeerRefused(f"{url} attests role {res.role!r}, not {role!r}: nothing sent", res.to_obj())
        status, body = _http("POST", url, f"/peer/inputs/{session}", encode_exchange(self.attester.evidence(binding_nonce(theirs, blocks)), blocks),
                             CBOR_TYPE, self.timeout)
        if status == 403:
            try:
                obj = json.loads(body)
            except ValueError:
                obj = {}
            raise PeerRefused(f"{url} refused our inputs: {reasons(obj) if obj else body[:200]!r}", obj)
        if status == 503:
            raise PeerUnavailable(f"{url}/peer/inputs: not ready: {body[:200].decode(errors='replace').strip()}")
        if status != 200:
            raise PeerError(f"{url}/peer/inputs: HTTP {status}: {body[:200].decode(errors='replace').strip()}")
        return res

    def send(self, role: str, blocks: Sequence[Block]) -> list[AppraisalResult]:
        """To every agent of `role`; no agent listed for it is an error, not a silent drop."""
        urls = self.peers.get(role)
        if not urls:
            raise PeerError(f"no peers known for role {role!r} (boot config 'peers')")
        return [self.send_to(u, blocks, role=role) for u in urls]

    async def asend(self, role: str, blocks: Sequence[Block]) -> list[AppraisalResult]:
        """`send` off the event loop, for the orchestrator's async `send` callback."""
        return await asyncio.to_thread(self.send, role, blocks)


def mount_peers(server: AgentServer, service: PeerService) -> None:
    server.mount(*service.routes())
