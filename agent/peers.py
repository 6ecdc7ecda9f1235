"""Exchanging flow inputs between agents, each side attested to the other with a fresh nonce.

An input crosses devices only between two agents that have just proven, with evidence (DICE- or
TPM-rooted: `Verifier.appraise` dispatches, and everything after it is the same) appraised
against the registered device roots and the signed manifest, that they run the
released image on a registered device, and only from the agent that holds the attested alias
key. The sender S and the receiver R:

    1. S -> R  POST /peer/session   {"nonce": HEX Ns}            (Ns fresh, S's challenge)
       R -> S  201 {"session": ID, "nonce": HEX Nr, "expires": t, "evidence": HEX EAT(R, Ns)}
    2. S appraises EAT(R, Ns): affirming, and R's role is the one the inputs are for;
       otherwise S sends nothing (PeerRefused).
    3. S -> R  POST /peer/inputs/ID  CBOR {"evidence": EAT(S, Nr), "signature": SIG,
                                           "blocks": [[CID bytes, block], ...]}
       SIG = S's alias-key signature over the statement
             "cidboot-peer-inputs/2" 0x00 || SHA-256(ID) || SHA-256(Nr) || SHA-256(evidence)
             || SHA-256(for each block: len(CID) u16 || CID || len(block) u32 || block)
       R checks the body's shape and bounds (400/413), spends session ID (single use, 60 s),
       appraises EAT(S, Nr) and checks SIG with the alias key of that evidence's DICE chain
       over the statement it derives from exactly what it received (a `sender-signature`
       check of the appraisal). Not affirming -> 403 with the reasons; nothing is accepted
       and the refusal is audited. Affirming: R registers S (alias key -> role, appraisal)
       and hands the blocks to `accept`; 200 {"received": n, "admitted": [CID] (what
       `accept` returned, or null), "status": "affirming"}.

Why a signature beside the evidence (issue 11 #4): any agent signs evidence for any nonce a
caller asks for (`GET /attestation?nonce=`, that is what attestation is), so evidence alone
proves "this device is in this state now", never "this device sends these blocks". Protocol 1
bound the blocks into the evidence's nonce, and an unattested client computed that nonce, had a
real sensor sign evidence for it and sent its own blocks as the sensor's. SIG is made only by
the agent's own peer client: the alias key signs nothing else outside COSE (whose signed bytes
start with the CBOR array head 0x84, never with this statement's ASCII prefix), so no
endpoint can be made to produce it.

Blocks are opaque here: what they mean (signed provenance nodes) is the orchestrator's
business, and it validates them again (agent.validate). Bounds: at most `max_blocks` blocks,
each at most `max_block` bytes, `max_bytes` in all per exchange, and `max_concurrent`
exchanges decoded at once (503 beyond: the sender retries). Refusals before appraisal (bounds,
malformed bodies) go to the `refused_request` hook, and every refusal hook is rate limited per
client (`AuditBudget`) so a flood cannot fill the audit log either. Discovery is static: the
boot config's `peers` maps a role to the agents' base URLs.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import logging
import os
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import cbor2

from agent import httpclient

if TYPE_CHECKING:  # asyncio is imported where used: after `agent ready`, by the flow run
    import asyncio

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
from cidboot.errors import CidbootError, FormatError, VerificationError
from cidboot.ipld.cid import CID
from cidboot.trust import cose
from cidboot.trust.appraisal import AFFIRMING, CONTRAINDICATED, AppraisalResult
from cidboot.trust.cose import PrivateKey

log = logging.getLogger("agent.peers")

Block = tuple[CID, bytes]
Accept = Callable[[list[Block], AppraisalResult], Any]  # may return an awaitable (the orchestrator's loop)
Register = Callable[[AppraisalResult], None]
Refused = Callable[[str, AppraisalResult], Any]  # (client address, appraisal): the audit log's hook
RefusedRequest = Callable[[str, str], Any]  # (client address, reason): refused before any appraisal
TIMEOUT = 10.0
STATEMENT = b"cidboot-peer-inputs/2\x00"
MAX_BLOCKS = 4096  # blocks in one exchange (a provenance closure is one node per ancestor)
MAX_BLOCK = 1 << 20  # bytes of one block: cidboot.dataflow.provenance.MAX_NODE
MAX_BYTES = 4 << 20  # bytes of all blocks of one exchange
MAX_CONCURRENT = 4  # exchanges decoded and appraised at once; 503 beyond (the sender retries)
AUDIT_PER_CLIENT, AUDIT_TOTAL, AUDIT_WINDOW = 16, 128, 60.0  # audited refusals per window


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


def blocks_digest(blocks: Sequence[Block]) -> bytes:
    """SHA-256 over exactly the blocks sent, in order, each CID and block length-prefixed."""
    h = hashlib.sha256(b"cidboot-peer-blocks\x00")
    for cid, data in blocks:
        c = bytes(cid)
        h.update(len(c).to_bytes(2, "big") + c + len(data).to_bytes(4, "big"))
        h.update(data)
    return h.digest()


def exchange_statement(session: str, challenge: bytes, evidence: bytes, blocks: Sequence[Block]) -> bytes:
    """What the sender's alias key signs in step 3: this session, the receiver's challenge, the
    evidence sent beside it and exactly these blocks (fixed-size fields: no ambiguity)."""
    return (STATEMENT + hashlib.sha256(session.encode()).digest() + hashlib.sha256(challenge).digest()
            + hashlib.sha256(evidence).digest() + blocks_digest(blocks))


def sign_exchange(key: PrivateKey, session: str, challenge: bytes, evidence: bytes, blocks: Sequence[Block]) -> bytes:
    return cose.raw_signature(key, exchange_statement(session, challenge, evidence, blocks))


def check_exchange_signature(res: AppraisalResult, signature: bytes, session: str, challenge: bytes, evidence: bytes,
                             blocks: Sequence[Block]) -> None:
    """Add the `sender-signature` check to the sender's appraisal: SIG by the alias key of the
    evidence's chain over the statement derived from what was received. No key (the evidence
    did not verify) is a failure too: nothing to compare against does not pass."""
    key = res.leaf_public_key
    if key is None:
        res.add("sender-signature", CONTRAINDICATED, "no attested alias key to check the blocks' signature with")
        return
    try:
        cose.verify_raw_signature(key, cose.alg_for_key(key), signature,
                                  exchange_statement(session, challenge, evidence, blocks))
    except VerificationError as e:
        res.add("sender-signature", CONTRAINDICATED,
                f"the blocks are not signed by the attested alias key for this session: {e}")
        return
    res.add("sender-signature", AFFIRMING, "blocks signed by the attested alias key for this session")


def encode_exchange(evidence: bytes, signature: bytes, blocks: Sequence[Block]) -> bytes:
    return cbor2.dumps({"evidence": evidence, "signature": signature, "blocks": [[bytes(c), d] for c, d in blocks]})


@dataclass(frozen=True)
class Limits:
    """What one exchange may carry (see the module docstring)."""

    max_blocks: int = MAX_BLOCKS
    max_block: int = MAX_BLOCK
    max_bytes: int = MAX_BYTES


def decode_exchange(body: bytes, limits: Limits = Limits()) -> tuple[bytes, bytes, list[Block]]:
    """Parse step 3's body; every block is checked against its CID here (nothing unverified
    passes) and against the limits (413), before anything is kept."""
    try:
        obj = cbor2.loads(body)
    except Exception as e:  # cbor2 raises several types on garbage (RecursionError on deep nesting too)
        raise HttpError(400, f"body is not CBOR: {type(e).__name__}: {str(e)[:200]}") from None
    if not isinstance(obj, dict) or set(obj) != {"evidence", "signature", "blocks"}:
        raise HttpError(400, "body must be the CBOR map {evidence, signature, blocks}")
    ev, sig, raw = obj["evidence"], obj["signature"], obj["blocks"]
    if not isinstance(ev, bytes) or not isinstance(sig, bytes) or not isinstance(raw, list):
        raise HttpError(400, "evidence and signature must be bytes and blocks a list")
    if len(raw) > limits.max_blocks:
        raise HttpError(413, f"{len(raw)} blocks in one exchange, more than {limits.max_blocks}")
    blocks: list[Block] = []
    total = 0
    for i, item in enumerate(raw):
        if not (isinstance(item, list) and len(item) == 2 and isinstance(item[0], bytes) and isinstance(item[1], bytes)):
            raise HttpError(400, f"block {i} must be [CID bytes, block bytes]")
        if len(item[1]) > limits.max_block:
            raise HttpError(413, f"block {i}: {len(item[1])} bytes, more than {limits.max_block}")
        total += len(item[1])
        if total > limits.max_bytes:
            raise HttpError(413, f"blocks of more than {limits.max_bytes} bytes in one exchange")
        try:
            cid = CID.decode(item[0])
            cid.verify(item[1])
        except (FormatError, VerificationError) as e:
            raise HttpError(400, f"block {i}: {e}") from None
        blocks.append((cid, item[1]))
    return ev, sig, blocks


class AuditBudget:
    """How many refusals per `window` seconds reach the audit log: `per_client` per address and
    `total` in all. Refusals beyond are counted (`suppressed`) and the next recorded one says how
    many, so an unauthenticated flood costs log lines, not an unbounded signed audit log."""

    def __init__(self, per_client: int = AUDIT_PER_CLIENT, total: int = AUDIT_TOTAL, window: float = AUDIT_WINDOW,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.per_client, self.total, self.window, self.clock = per_client, total, window, clock
        self._start, self._used = clock(), 0
        self._counts: dict[str, int] = {}
        self.suppressed = 0
        self._lock = threading.Lock()

    def allow(self, client: str) -> tuple[bool, int]:
        """(record this one?, refusals suppressed since the last recorded one)."""
        with self._lock:
            now = self.clock()
            if now - self._start >= self.window:
                self._start, self._used, self._counts = now, 0, {}
            if self._used >= self.total or self._counts.get(client, 0) >= self.per_client:
                self.suppressed += 1
                return False, 0
            self._used += 1
            self._counts[client] = self._counts.get(client, 0) + 1
            n, self.suppressed = self.suppressed, 0
            return True, n


def _http(method: str, url: str, path: str, body: bytes | None, ctype: str, timeout: float) -> tuple[int, bytes]:
    """agent.httpclient.request, its failures as peer errors (PeerUnavailable is retried)."""
    try:
        return httpclient.request(method, url, path, body=body, ctype=ctype, timeout=timeout)
    except httpclient.BadAgentURL as e:
        raise PeerError(f"peer {e}") from None
    except httpclient.AgentUnreachable as e:
        raise PeerUnavailable(str(e)) from None


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
    refused_request: RefusedRequest = lambda _c, _m: None
    limits: Limits = field(default_factory=Limits)
    max_concurrent: int = MAX_CONCURRENT
    budget: AuditBudget = field(default_factory=AuditBudget)

    def __post_init__(self) -> None:
        self._slots = threading.BoundedSemaphore(self.max_concurrent)

    def routes(self) -> list[Route]:
        return [Route("POST", "/peer/session", self._session), Route("POST", "/peer/inputs/", self._inputs)]

    def _session(self, req: Request) -> Response:
        try:
            doc = json.loads(req.body or b"null")
        except (ValueError, RecursionError) as e:
            raise HttpError(400, f"body is not JSON: {e}") from None
        if not isinstance(doc, dict) or set(doc) != {"nonce"} or not isinstance(doc["nonce"], str):
            raise HttpError(400, 'body must be {"nonce": HEX}')
        their = nonce_from_hex(doc["nonce"])
        c = self.challenges.new()
        return Response.json({**c.to_obj(), "evidence": self.attester.evidence(their).hex()}, 201)

    def _audit_request(self, client: str, reason: str) -> None:
        ok, suppressed = self.budget.allow(client)
        if ok:
            self.refused_request(client, reason + (f" ({suppressed} more refusals not recorded)" if suppressed else ""))

    def _audit_appraisal(self, client: str, res: AppraisalResult) -> None:
        ok, suppressed = self.budget.allow(client)
        if ok:
            if suppressed:
                res.add("audit", AFFIRMING, f"{suppressed} earlier refusals not recorded (rate limited)")
            self.refused(client, res)

    def _inputs(self, req: Request) -> Response:
        if not self._slots.acquire(blocking=False):
            raise HttpError(503, f"{self.max_concurrent} exchanges in progress: retry")
        try:
            return self._exchange(req)
        finally:
            self._slots.release()

    def _exchange(self, req: Request) -> Response:
        session = req.path[len("/peer/inputs/"):]
        try:
            evidence, signature, blocks = decode_exchange(req.body, self.limits)
        except HttpError as e:
            log.warning("refused inputs from %s: %s", req.client, e)
            self._audit_request(req.client, f"HTTP {e.status}: {e}")
            raise
        try:
            nonce = self.challenges.take(session)  # spent even when what follows refuses
        except HttpError as e:  # unknown, replayed, expired (or too many in flight: 503)
            self._audit_request(req.client, f"HTTP {e.status}: {e}")
            raise
        res = self.verifier.appraise(evidence, nonce)
        check_exchange_signature(res, signature, session, nonce, evidence, blocks)
        if not res.affirming:
            log.warning("refused inputs from %s: %s", req.client, reasons(res.to_obj()))
            self._audit_appraisal(req.client, res)
            raise HttpError(403, f"sender not affirming: {reasons(res.to_obj())}", res.to_obj())
        self.register(res)
        out = self.accept(blocks, res)
        if inspect.isawaitable(out):
            if self.loop is None:
                raise HttpError(500, "accept is async but no event loop was given")
            import asyncio

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
        mine_ev = self.attester.evidence(theirs)
        sig = sign_exchange(self.attester.leaf_key, session, theirs, mine_ev, blocks)
        status, body = _http("POST", url, f"/peer/inputs/{session}", encode_exchange(mine_ev, sig, blocks),
                             CBOR_TYPE, self.timeout)
        if status in (403, 413):
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
        import asyncio

        return await asyncio.to_thread(self.send, role, blocks)


def mount_peers(server: AgentServer, service: PeerService) -> None:
    server.mount(*service.routes())
