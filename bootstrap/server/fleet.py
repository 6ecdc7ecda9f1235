"""The fleet view of `bootstrap serve` (docs/boot-server.md, "Fleet"): what each device is doing,
from the stage events the devices post (cidboot.stage.events), and whether it is trustworthy,
from the boot server's own appraisals of each ready device.

- `POST /api/events`: one stage event. A signed one (`{"sign1", "chain"}`) must carry a DICE
  chain that verifies, whose root is a registered device root (the signed device registry of
  `--device-registry`, or the roots given), with exactly as many layers as the stage owns
  (firmware 1, bootstrap 2, agent 3), and whose leaf key signed the event. A TPM device's event
  (`{"sign1", "chain", "tpm"}`: no L0, the chain starts at L1's key, bootstrap 0 and agent 1
  certificates) is identified as appraisal identifies it: `tpm` is a quote by an AK of the
  registry's TPM entries (DeviceRoots.tpm) binding the chain's L1 key
  (cidboot.trust.tpm.evidence.KeyBinding), and its device id is the AK's. Anything else is
  *rejected* and recorded as such (the timeline shows the attempt, the device's state does not
  move). An unsigned one (`{"event"}`) is recorded as *unsigned*, unless it claims a measured
  boot or its MAC belongs to a device that signs its events: then it is rejected too.
- Replays: a signed event carries `boot`, a session nonce this server issued (`POST
  /api/events/session`), and `seq`. The first key that signs with a session owns it, and each
  (session, seq) is accepted once, in increasing order; an event without a session, with one
  this server does not know (never issued, or forgotten: at most MAX_SESSIONS are kept), with
  another key's session or with a seq not above the last accepted one is rejected (recorded,
  moves nothing). So a captured event posted again never counts.
- Device state in SQLite (stdlib), bounded: the last MAX_EVENTS events per device (a ring) and
  at most MAX_DEVICES devices (the least recently seen go first); it survives restarts.
- Appraisal: each ready device's agent (`GET /attestation?nonce=`, at the address the events
  came from) is challenged with a fresh nonce and appraised with cidboot.trust.appraisal against
  the registry and the device's manifest: when it becomes ready, every APPRAISE_EVERY seconds,
  and on demand (`POST /api/devices/<id>/appraise`).
- The JSON API under /api/ (devices, device, events, events/session, results, provenance, node), the live stream
  `/api/stream` (server-sent events) and the web view at `/` (bootstrap/server/web/).
"""

from __future__ import annotations

import contextlib
import hmac
import http.client
import json
import logging
import os
import queue
import re
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

from cidboot.errors import CidbootError, FormatError
from cidboot.httpd import BoundedHandler
from cidboot.ipld import dagcbor
from cidboot.ipld.cid import CID
from cidboot.store.blockstore import Blockstore
from cidboot.trust import cose
from cidboot.trust.appraisal import CONTRAINDICATED, NONE, AppraisalResult, DeviceRoots, appraise
from cidboot.trust.cose_key import raw_public_bytes
from cidboot.trust.dice.chain import verify_chain
from cidboot.trust.dice.derive import DiceMode
from cidboot.trust.manifest.model import Manifest

log = logging.getLogger("bootstrap.fleet")

MAX_EVENTS = 200  # per device: a ring, the oldest go first
MAX_DEVICES = 1024
APPRAISE_EVERY = 60.0  # seconds between scheduled appraisals of the ready devices
AGENT_TIMEOUT = 5.0
NONCE_BYTES = 32
MAX_SUBSCRIBERS = 32  # live /api/stream clients at once
KEEPALIVE = 15.0
MAX_GRAPH_NODES = 256
MAX_SESSIONS = 4 * MAX_DEVICES  # event sessions kept (the least recently used go first; unused ones before)
SESSION_BYTES = 16
EVENTS_PATH = "/api/events"  # where the stages post (the boot config's `events` URL)
STAGE_LAYERS = {"firmware": 1, "bootstrap": 2, "agent": 3}  # DICE certificates the stage's own key ends
KIND_RX = re.compile(r"^[a-z][a-z0-9_-]{0,31}$")
MAC_RX = re.compile(r"^(?:[0-9a-f]{2}:){5}[0-9a-f]{2}$")
CID_RX = re.compile(r"\b(baf[a-z2-7]{50,})\b")
VERIFIED, UNSIGNED, REJECTED = "verified", "unsigned", "rejected"
LIFECYCLE = ("start", "handover", "ready", "refused", "fatal")  # a stage's own progress (the rest: the agent's flow)
#: the page runs only its own script and talks only to this server: device-supplied text that
#: slipped into markup could still not run or load anything
CSP = "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self' data:"
WEB = Path(__file__).parent / "web"
STATIC = {"/": ("index.html", "text/html; charset=utf-8"), "/app.js": ("app.js", "text/javascript; charset=utf-8"),
          "/app.css": ("app.css", "text/css; charset=utf-8")}


class EventFormatError(FormatError):
    """A POST /api/events body that is not an event at all (no device can be named): 400."""


class NodeUnavailable(CidbootError):
    """A provenance block is neither cached here nor served by any ready agent: 404."""


@dataclass
class Verdict:
    """What the server makes of one posted event."""

    trust: str  # verified | unsigned | rejected
    reason: str
    event: dict[str, Any]
    device_id: str | None = None
    key: str | None = None  # the signing key (hex), for a verified event: whose session it uses


def _event_fields(raw: Any) -> dict[str, Any]:
    """The event map, checked field by field (the message names the field)."""
    try:
        ev = dagcbor.decode(raw) if isinstance(raw, bytes) else raw
    except FormatError as e:
        raise EventFormatError(f"event: not DAG-CBOR: {e}") from None
    if not isinstance(ev, dict):
        raise EventFormatError("event: must be a map")
    if ev.get("v") != 1:
        raise EventFormatError("event: v must be 1")
    if ev.get("stage") not in STAGE_LAYERS:
        raise EventFormatError(f"event: stage must be one of {sorted(STAGE_LAYERS)}")
    if not isinstance(ev.get("kind"), str) or not KIND_RX.match(ev["kind"]):
        raise EventFormatError("event: kind must be a short lower-case word")
    mac = ev.get("mac", "")
    if not isinstance(mac, str) or (mac and not MAC_RX.match(mac)):
        raise EventFormatError("event: mac must be aa:bb:cc:dd:ee:ff or empty")
    for k in ("seq", "t"):
        if not isinstance(ev.get(k), int) or ev[k] < 0:
            raise EventFormatError(f"event: {k} must be a non-negative integer")
    if ev.get("boot_mode") not in ("measured", "unmeasured"):
        raise EventFormatError("event: boot_mode must be measured or unmeasured")
    detail = ev.get("detail", {})
    if not isinstance(detail, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in detail.items()):
        raise EventFormatError("event: detail must map text to text")
    if len(detail) > 32:
        raise EventFormatError("event: more than 32 detail fields")
    arch = ev.get("arch", "")
    if not isinstance(arch, str) or len(arch) > 32:
        raise EventFormatError("event: arch must be short text")
    boot = ev.get("boot", "")
    if not isinstance(boot, str) or len(boot) > 64:
        raise EventFormatError("event: boot must be a session nonce (short text)")
    return {"stage": ev["stage"], "kind": ev["kind"], "mac": mac, "seq": ev["seq"], "t": ev["t"],
            "boot_mode": ev["boot_mode"], "arch": arch, "boot": boot,
            "detail": {k: v[:2048] for k, v in detail.items()}}


def verify_event(body: bytes, roots: DeviceRoots | None, bound: Callable[[str], str | None] = lambda _m: None) -> Verdict:
    """Judge one POST /api/events body. Raises EventFormatError when no event can be read at all;
    otherwise returns the verdict, rejected ones included (they are recorded, not dropped).
    `bound(mac)` is the device id a MAC has signed verified events with before, if any."""
    try:
        doc = dagcbor.decode(body)
    except FormatError as e:
        raise EventFormatError(f"body: not DAG-CBOR: {e}") from None
    if not isinstance(doc, dict):
        raise EventFormatError("body: must be a map")
    if set(doc) == {"event"} and isinstance(doc["event"], bytes):
        ev = _event_fields(doc["event"])
        if ev["boot_mode"] == "measured":
            return Verdict(REJECTED, "unsigned event claims a measured boot: a measured stage signs its events", ev)
        owner = bound(ev["mac"]) if ev["mac"] else None
        if owner:
            return Verdict(REJECTED, f"unsigned event for the MAC of device {owner}, which signs its events", ev)
        return Verdict(UNSIGNED, "unmeasured boot: no key to sign with", ev)
    if set(doc) - {"tpm"} != {"sign1", "chain"} or not isinstance(doc["sign1"], bytes) \
            or not isinstance(doc["chain"], bytes) or not isinstance(doc.get("tpm", b""), bytes):
        raise EventFormatError("body: must be {event} (unsigned) or {sign1, chain, tpm?} (signed)")
    try:
        s1 = cose.decode_sign1(doc["sign1"])
    except FormatError as e:
        raise EventFormatError(f"sign1: {e}") from None
    if s1.payload is None:
        raise EventFormatError("sign1: the event must be the attached payload")
    ev = _event_fields(s1.payload)  # read before it is verified: to record a rejection under its device
    try:
        chain = verify_chain(doc["chain"], allow_debug=True)
    except CidbootError as e:
        return Verdict(REJECTED, f"broken DICE chain: {e}", ev)
    if "tpm" in doc:
        return _verify_tpm_event(s1, chain, doc["tpm"], ev, roots)
    did = chain.root_id
    want = STAGE_LAYERS[ev["stage"]]
    if len(chain.entries) != want:
        return Verdict(REJECTED, f"a {ev['stage']} event must be signed at DICE layer {want}, the chain has "
                                 f"{len(chain.entries)} certificate(s)", ev, did)
    if roots is None or not roots.keys:
        return Verdict(REJECTED, "the boot server has no device registry to check the DICE root against "
                                 "(--device-registry)", ev, did)
    known = roots.keys.get(did)
    if known is None or raw_public_bytes(known) != raw_public_bytes(chain.root_public_key):
        return Verdict(REJECTED, f"DICE root {did[:16]}... is not in the device registry", ev, did)
    try:
        cose.verify1_attached(s1, chain.leaf_public_key)
    except CidbootError as e:
        return Verdict(REJECTED, f"forged: not signed by the chain's layer-{want} key: {e}", ev, did)
    debug = [i + 1 for i, c in enumerate(chain.entries) if c.mode == DiceMode.DEBUG]
    name = roots.names.get(did) or did[:16]
    return Verdict(VERIFIED, f"signed by {name}'s {ev['stage']} key" + (f" (debug layers {debug})" if debug else ""),
                   ev, did, raw_public_bytes(chain.leaf_public_key).hex())


def _verify_tpm_event(s1: Any, chain: Any, binding: bytes, ev: dict[str, Any], roots: DeviceRoots | None) -> Verdict:
    """A TPM device's signed event: the key binding's AK must be a registered TPM device's, its
    quote must verify with that AK over qualifying_data(EVENTS_NONCE, the chain's L1 key), the
    chain must have the stage's certificates (a TPM boot has no L0: one fewer than DICE's
    layer count less L1's own key), and the chain's leaf must have signed the event."""
    from cidboot.trust.tpm import quote
    from cidboot.trust.tpm.evidence import EVENTS_NONCE, KeyBinding, qualifying_data
    from cidboot.trust.tpm.evidence import device_id as tpm_device_id

    try:
        kb = KeyBinding.decode(binding)
        ak = quote.parse_public(kb.ak_public)
    except FormatError as e:
        return Verdict(REJECTED, f"malformed TPM key binding: {e}", ev)
    did = tpm_device_id(ak.name)
    want = STAGE_LAYERS[ev["stage"]] - 2  # firmware: none (UEFI), bootstrap: [L1], agent: [L1, L2 cert]
    if want < 0 or len(chain.entries) != want:
        return Verdict(REJECTED, f"a {ev['stage']} event of a TPM device must be signed at DICE layer "
                                 f"{want + 2} (L1 key + {max(want, 0)} certificate(s)), the chain has "
                                 f"{len(chain.entries)} certificate(s)", ev, did)
    if roots is None or not roots.tpm:
        return Verdict(REJECTED, "the boot server has no device registry with TPM devices to check the AK "
                                 "against (--device-registry)", ev, did)
    device = roots.tpm.get(did)
    if device is None:
        return Verdict(REJECTED, f"TPM device {did[:16]}... (its AK) is not in the device registry", ev, did)
    try:
        quote.verify_quote(kb.quote, kb.signature, ak, nonce=qualifying_data(EVENTS_NONCE, chain.root_public_key),
                           enrolled=frozenset({device.ak_name}))
    except CidbootError as e:
        return Verdict(REJECTED, f"forged: the AK's quote does not bind this chain's L1 key: {e}", ev, did)
    try:
        cose.verify1_attached(s1, chain.leaf_public_key)
    except CidbootError as e:
        return Verdict(REJECTED, f"forged: not signed by the chain's layer-{want + 1} key: {e}", ev, did)
    name = roots.names.get(did) or did[:16]
    return Verdict(VERIFIED, f"signed by {name}'s {ev['stage']} key (TPM: AK-bound L1 key)", ev, did)


# -- the SQLite store -------------------------------------------------------------------------

SCHEMA = """
CREATE TABLE IF NOT EXISTS devices (
    mac TEXT PRIMARY KEY, device_id TEXT, arch TEXT, firmware TEXT, stage TEXT, kind TEXT, reason TEXT,
    last_seen REAL, source TEXT, agent_port INTEGER, manifest TEXT, role TEXT, boot_mode TEXT, trust TEXT,
    appraisal TEXT, appraised REAL);
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY AUTOINCREMENT, mac TEXT NOT NULL, received REAL, t INTEGER, seq INTEGER, stage TEXT,
    kind TEXT, trust TEXT, trust_reason TEXT, device_id TEXT, source TEXT, detail TEXT);
CREATE INDEX IF NOT EXISTS events_mac ON events (mac, id);
CREATE TABLE IF NOT EXISTS sessions (
    session TEXT PRIMARY KEY, issued REAL, used REAL, key TEXT, seq INTEGER);
"""


class FleetStore:
    """Device rows and their event rings in one SQLite file (":memory:" for tests)."""

    def __init__(self, path: str | os.PathLike[str], *, max_events: int = MAX_EVENTS,
                 max_devices: int = MAX_DEVICES, max_sessions: int = MAX_SESSIONS) -> None:
        self.max_events, self.max_devices, self.max_sessions = max_events, max_devices, max_sessions
        self._db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
        self._db.row_factory = sqlite3.Row
        self._lock = threading.Lock()
        with self._lock:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.executescript(SCHEMA)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    @contextlib.contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise

    def issue_session(self, *, now: float | None = None) -> str:
        """A fresh session nonce for one stage's events; the oldest beyond max_sessions go
        (sessions never used first, so a flood of requests cannot push out those in use)."""
        s = os.urandom(SESSION_BYTES).hex()
        with self._tx() as db:
            db.execute("INSERT INTO sessions (session, issued) VALUES (?, ?)", (s, time.time() if now is None else now))
            n = db.execute("SELECT COUNT(*) FROM sessions").fetchone()[0]
            if n > self.max_sessions:
                db.execute("DELETE FROM sessions WHERE session IN (SELECT session FROM sessions ORDER BY "
                           "(key IS NOT NULL) ASC, COALESCE(used, issued) ASC LIMIT ?)", (n - self.max_sessions,))
        return s

    def use_session(self, session: str, key: str, seq: int, *, now: float | None = None) -> str | None:
        """Accept (session, seq) for `key` once: None when it is fresh (and now used), else why
        not. An unknown session's reason starts with "unknown session" (the server answers 409:
        a stage whose session was forgotten asks for a new one)."""
        if not session:
            return "replayable: a signed event without a session (boot) from POST /api/events/session"
        with self._tx() as db:
            row = db.execute("SELECT key, seq FROM sessions WHERE session=?", (session,)).fetchone()
            if row is None:
                return f"unknown session {session[:12]}...: never issued here, or forgotten (a replay of an old event?)"
            if row["key"] is not None and not hmac.compare_digest(row["key"], key):
                return f"replay: session {session[:12]}... belongs to another key"
            if row["seq"] is not None and seq <= row["seq"]:
                return f"replay: seq {seq} of session {session[:12]}... is not above the last accepted ({row['seq']})"
            db.execute("UPDATE sessions SET key=?, seq=?, used=? WHERE session=?",
                       (key, seq, time.time() if now is None else now, session))
        return None

    def bound_id(self, mac: str) -> str | None:
        with self._lock:
            row = self._db.execute("SELECT device_id FROM devices WHERE mac=? AND trust=?", (mac, VERIFIED)).fetchone()
        return row["device_id"] if row else None

    def record(self, v: Verdict, source: str, *, now: float | None = None) -> int:
        """Store one event (any verdict) in its device's ring; move the device's state unless
        the event was rejected. Returns the event's row id."""
        now = time.time() if now is None else now
        ev = v.event
        mac = ev["mac"] or f"ip:{source}"
        d = ev["detail"]
        with self._tx() as db:
            cur = db.execute("INSERT INTO events (mac, received, t, seq, stage, kind, trust, trust_reason, device_id, "
                             "source, detail) VALUES (?,?,?,?,?,?,?,?,?,?,?)",
                             (mac, now, ev["t"], ev["seq"], ev["stage"], ev["kind"], v.trust, v.reason, v.device_id,
                              source, json.dumps(d, sort_keys=True)))
            eid = int(cur.lastrowid or 0)
            db.execute("DELETE FROM events WHERE mac=? AND id <= (SELECT id FROM events WHERE mac=? "
                       "ORDER BY id DESC LIMIT 1 OFFSET ?)", (mac, mac, self.max_events))
            row = db.execute("SELECT * FROM devices WHERE mac=?", (mac,)).fetchone()
            if row is None:
                db.execute("INSERT INTO devices (mac, last_seen, trust, stage, kind) VALUES (?,?,?,?,?)",
                           (mac, now, v.trust, "", ""))
                n = db.execute("SELECT COUNT(*) FROM devices").fetchone()[0]
                if n > self.max_devices:
                    # unverified rows go first: a flood of unsigned or forged MACs cannot push out the fleet
                    for old in db.execute("SELECT mac FROM devices ORDER BY (trust = 'verified') ASC, last_seen ASC "
                                          "LIMIT ?",
                                          (n - self.max_devices,)).fetchall():
                        db.execute("DELETE FROM events WHERE mac=?", (old["mac"],))
                        db.execute("DELETE FROM devices WHERE mac=?", (old["mac"],))
            if v.trust == REJECTED:  # recorded in the ring; the device row does not move
                return eid
            sets: dict[str, Any] = {"stage": ev["stage"], "kind": ev["kind"], "last_seen": now, "source": source,
                                    "boot_mode": ev["boot_mode"], "trust": v.trust,
                                    "reason": d.get("reason") or d.get("definition") or ""}
            if v.device_id:
                sets["device_id"] = v.device_id
            if ev["arch"]:
                sets["arch"] = ev["arch"]
            if ev["stage"] == "firmware":
                sets["firmware"] = "cidboot (measured)" if ev["boot_mode"] == "measured" else "cidboot"
            elif ev["stage"] == "bootstrap" and ev["kind"] == "start" and d.get("mode") == "unmeasured":
                # no L0 of ours: the machine's own network boot (what the bootstrap saw: UEFI or not)
                sets["firmware"] = "UEFI PXE/HTTP Boot (unmeasured)" if d.get("firmware") == "uefi" \
                    else "PXE ROM (unmeasured)"
            if ev["stage"] == "bootstrap" and ev["kind"] == "start":  # a new boot: the old appraisal is stale
                sets["appraisal"], sets["appraised"] = None, None
            if ev["kind"] == "ready" and d.get("port", "").isdigit():
                sets["agent_port"] = int(d["port"])
            for k in ("manifest", "role"):
                if d.get(k):
                    sets[k] = d[k]
            db.execute(f"UPDATE devices SET {', '.join(k + '=?' for k in sets)} WHERE mac=?",  # column names are ours, values bound
                       (*sets.values(), mac))
        return eid

    def set_appraisal(self, mac: str, obj: dict[str, Any], *, now: float | None = None) -> None:
        with self._tx() as db:
            db.execute("UPDATE devices SET appraisal=?, appraised=? WHERE mac=?",
                       (json.dumps(obj, sort_keys=True, default=str), time.time() if now is None else now, mac))

    def _device(self, row: sqlite3.Row) -> dict[str, Any]:
        d = dict(row)
        d["appraisal"] = json.loads(d["appraisal"]) if d["appraisal"] else None
        return d

    def devices(self) -> list[dict[str, Any]]:
        with self._lock:
            rows = self._db.execute("SELECT * FROM devices ORDER BY mac").fetchall()
        return [self._device(r) for r in rows]

    def device(self, mac: str) -> dict[str, Any] | None:
        with self._lock:
            row = self._db.execute("SELECT * FROM devices WHERE mac=?", (mac,)).fetchone()
        return self._device(row) if row else None

    def events(self, mac: str | None = None, *, limit: int = 100, kinds: tuple[str, ...] = (),
               trust: str | None = None) -> list[dict[str, Any]]:
        q, args = "SELECT * FROM events WHERE 1=1", list[Any]()
        if mac is not None:
            q += " AND mac=?"
            args.append(mac)
        if kinds:
            q += f" AND kind IN ({','.join('?' * len(kinds))})"
            args.extend(kinds)
        if trust:
            q += " AND trust=?"
            args.append(trust)
        q += " ORDER BY id DESC LIMIT ?"
        args.append(max(1, min(limit, 1000)))
        with self._lock:
            rows = self._db.execute(q, args).fetchall()
        out = []
        for r in reversed(rows):
            e = dict(r)
            e["detail"] = json.loads(e["detail"] or "{}")
            out.append(e)
        return out


# -- the application -------------------------------------------------------------------------

@dataclass
class Fleet:
    """The fleet API, stream and web view, mounted on the boot server's HTTP gateway (`app=`)."""

    store: FleetStore
    blocks: Blockstore  # where provenance blocks fetched from the agents are kept (verified by CID)
    roots: Callable[[], DeviceRoots | None] = lambda: None
    manifest_for: Callable[[str], tuple[Manifest, CID] | None] = lambda _mac: None
    role_for: Callable[[str], str | None] = lambda _mac: None
    tpm_references: Callable[[], Any] = lambda: None  # the registry's bootstrap UKI PCR 4/11 references (TpmReferences)
    appraise_every: float = APPRAISE_EVERY
    agent_timeout: float = AGENT_TIMEOUT
    _subscribers: list[queue.Queue[str]] = field(default_factory=list)
    _sub_lock: threading.Lock = field(default_factory=threading.Lock)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None
    _kick: threading.Event = field(default_factory=threading.Event)

    # -- lifecycle --
    def start(self) -> None:
        self._thread = threading.Thread(target=self._schedule, daemon=True, name="fleet-appraiser")
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._kick.set()

    def _schedule(self) -> None:
        last = 0.0
        while not self._stop.is_set():
            self._kick.wait(timeout=max(0.5, min(self.appraise_every, 5.0)))
            self._kick.clear()
            if self._stop.is_set():
                return
            due = time.monotonic() - last >= self.appraise_every
            for d in self.store.devices():
                if self.ready(d) and (due or d["appraised"] is None):
                    try:
                        self.appraise(d["mac"])
                    except Exception:  # one device's trouble never stops the schedule
                        log.exception("appraisal of %s failed", d["mac"])
            if due:
                last = time.monotonic()

    @staticmethod
    def ready(d: dict[str, Any]) -> bool:
        return bool(d.get("agent_port")) and d.get("stage") == "agent" and d.get("kind") != "fatal"

    # -- live updates --
    def publish(self, what: str, **obj: Any) -> None:
        msg = json.dumps({"type": what, **obj}, sort_keys=True, default=str)
        with self._sub_lock:
            for q in self._subscribers:
                with contextlib.suppress(queue.Full):
                    q.put_nowait(msg)

    # -- events --
    def post_event(self, body: bytes, source: str) -> tuple[int, dict[str, Any]]:
        try:
            v = verify_event(body, self.roots(), self.store.bound_id)
        except EventFormatError as e:
            return 400, {"error": str(e)}
        status = 201
        if v.trust == VERIFIED:  # a genuine signature is not enough: it must not be a replay
            why = self.store.use_session(v.event["boot"], v.key or "", v.event["seq"])
            if why is not None:
                v = Verdict(REJECTED, why, v.event, v.device_id, v.key)
                status = 409 if why.startswith("unknown session") else 403
        elif v.trust == REJECTED:
            status = 403
        eid = self.store.record(v, source)
        mac = v.event["mac"] or f"ip:{source}"
        if v.trust == REJECTED:
            log.warning("stage event from %s (%s) rejected: %s", source, mac, v.reason)
        self.publish("event", mac=mac, id=eid, trust=v.trust)
        if v.trust != REJECTED and v.event["kind"] == "ready":
            self._kick.set()  # appraise it now, not at the next round
        return status, {"id": eid, "device": mac, "trust": v.trust, "reason": v.reason}

    # -- appraisal --
    def appraise(self, mac: str) -> dict[str, Any]:
        """Challenge the device's agent with a fresh nonce; appraise; store and return the result."""
        d = self.store.device(mac)
        if d is None:
            raise KeyError(mac)
        started = time.time()
        out: dict[str, Any]
        if not self.ready(d):
            out = {"status": NONE, "checks": [{"check": "agent", "status": NONE,
                                               "reason": "no agent ready: nothing to challenge"}]}
        else:
            url = f"http://{d['source']}:{d['agent_port']}"
            nonce = os.urandom(NONCE_BYTES)
            try:
                evidence = get_evidence(url, nonce, self.agent_timeout)
            except CidbootError as e:
                out = {"status": CONTRAINDICATED, "url": url,
                       "checks": [{"check": "agent", "status": CONTRAINDICATED, "reason": f"no evidence: {e}"}]}
            else:
                mf = self.manifest_for(mac)
                res = appraise(evidence, expected_nonce=nonce, roots=self.roots() or DeviceRoots(),
                               manifest=mf[0] if mf else None, manifest_cid=mf[1] if mf else None,
                               tpm_references=self.tpm_references())
                out = appraisal_obj(res, url)
                if d.get("device_id") and res.device_id and not hmac.compare_digest(d["device_id"], res.device_id):
                    out["checks"].append({"check": "identity", "status": CONTRAINDICATED,
                                          "reason": f"the agent's DICE root {res.device_id[:16]}... is not the one "
                                                    f"its stage events were signed by ({d['device_id'][:16]}...)"})
                    out["status"] = CONTRAINDICATED
        out["time"] = started
        self.store.set_appraisal(mac, out)
        self.publish("appraisal", mac=mac, status=out["status"])
        return out

    # -- provenance --
    def _block(self, cid: CID) -> bytes:
        if self.blocks.has(cid):
            return self.blocks.get(cid)
        from cidboot.store.gateway import client as gateway_client

        agents = [f"http://{d['source']}:{d['agent_port']}" for d in self.store.devices() if self.ready(d)]
        if not agents:
            raise NodeUnavailable(f"block {cid} is not here and no agent is ready to ask")
        try:
            return gateway_client.fetch_block(cid, agents, self.blocks, timeout=self.agent_timeout, rounds=1,
                                              user_agent="cidboot-bootserver")
        except gateway_client.BlockUnavailable as e:
            raise NodeUnavailable(str(e)) from None

    def node(self, cid: CID) -> dict[str, Any]:
        """One provenance node, decoded, with its signature checked against its producer."""
        from cidboot.dataflow.provenance import decode, verify_signature

        block = self._block(cid)
        n = decode(block, cid)
        try:
            verify_signature(n)
            sig = {"status": VERIFIED, "reason": "signed by its producer"}
        except CidbootError as e:
            sig = {"status": REJECTED, "reason": str(e)}
        producer = raw_public_bytes(n.producer_key()).hex()
        return {"cid": str(cid), "definition": n.definition, "operation": n.operation, "output": n.output,
                "origin": "seed" if n.operation is None else f"{n.operation}:{n.output}",
                "value": json.loads(json.dumps(n.value, default=str)), "flow": str(n.flow),
                "parents": [str(p) for p in n.parents], "producer": producer,
                "producer_device": self._producer_device(producer), "signature": sig,
                "sig_cose": n.sig.hex(), "raw": f"/ipfs/{cid}?format=raw"}

    def _producer_device(self, producer_hex: str) -> str | None:
        """Who a producer key is: a device (its agent's attested leaf key), or the flow's signer
        (a manifest root-of-trust key: seeds are signed by the flow authority)."""
        devices = self.store.devices()
        for d in devices:
            a = d.get("appraisal") or {}
            if a.get("leaf_key") == producer_hex:
                return str(d["mac"])
        for d in devices:
            mf = self.manifest_for(d["mac"])
            if mf is not None and any(raw_public_bytes(k).hex() == producer_hex
                                      for k in mf[0].root.public_keys().values()):
                return "flow signer"
        return None

    def provenance(self, root: CID, max_nodes: int = MAX_GRAPH_NODES) -> dict[str, Any]:
        """The result's provenance DAG: nodes (inputs with producer and operation) and parent
        edges, breadth first from `root`; the flow block a seed points at ends the walk."""
        nodes: dict[str, dict[str, Any]] = {}
        edges: list[dict[str, str]] = []
        todo, seen = [root], {str(root)}
        flows: set[str] = set()
        errors: dict[str, str] = {}
        while todo and len(nodes) < max_nodes:
            cid = todo.pop(0)
            try:
                n = self.node(cid)
            except CidbootError as e:
                errors[str(cid)] = str(e)
                continue
            nodes[n["cid"]] = n
            flows.add(n["flow"])
            for p in n["parents"]:
                edges.append({"from": p, "to": n["cid"]})
                if p not in seen and p not in flows:
                    seen.add(p)
                    todo.append(CID.parse(p))
        for f in flows:
            errors.pop(f, None)
            nodes.setdefault(f, {"cid": f, "definition": "flow", "operation": None, "origin": "flow",
                                 "parents": [], "producer": None, "signature": None})
        return {"root": str(root), "nodes": list(nodes.values()), "edges": edges, "errors": errors,
                "truncated": bool(todo)}

    def results(self, limit: int = 200) -> list[dict[str, Any]]:
        out = []
        for e in self.store.events(kinds=("result",), limit=limit):
            if e["trust"] == REJECTED:
                continue
            out.append({"device": e["mac"], "definition": e["detail"].get("definition"),
                        "value": e["detail"].get("value"), "cid": e["detail"].get("cid"), "received": e["received"],
                        "trust": e["trust"]})
        return out

    def summary(self, d: dict[str, Any]) -> dict[str, Any]:
        """A device row for the API and the table: state, appraisal, results and problems."""
        ev = self.store.events(d["mac"], limit=MAX_EVENTS)
        problems = [{"kind": e["kind"], "stage": e["stage"], "reason": e["detail"].get("reason", ""),
                     "cid": e["detail"].get("cid") or _cid_in(e["detail"].get("reason", "")),
                     "operation": e["detail"].get("operation"), "received": e["received"], "trust": e["trust"]}
                    for e in ev if e["kind"] in ("refused", "veto", "error", "fatal") and e["trust"] != REJECTED]
        rejected = [{"reason": e["trust_reason"], "received": e["received"], "kind": e["kind"], "stage": e["stage"]}
                    for e in ev if e["trust"] == REJECTED]
        results = [{"definition": e["detail"].get("definition"), "value": e["detail"].get("value"),
                    "cid": e["detail"].get("cid")} for e in ev if e["kind"] == "result" and e["trust"] != REJECTED]
        last = next((e for e in reversed(ev) if e["trust"] != REJECTED), None)
        # where the boot is (start / handover / ready / refused / fatal), not the agent's last result or veto:
        # a running agent that refused a peer's input or vetoed a run is still ready
        phase = next((e["kind"] for e in reversed(ev) if e["trust"] != REJECTED and e["stage"] == d.get("stage")
                      and e["kind"] in LIFECYCLE and not (e["stage"] == "agent" and e["kind"] == "refused")), None)
        # the role the registry gives (appraisal), else devices.yaml's, else what the device claims
        registered = (d.get("appraisal") or {}).get("registered_role")
        return {**d, "role": registered or self.role_for(d["mac"]) or d.get("role"), "claimed_role": d.get("role"),
                "ready": self.ready(d),
                "last_event": f"{last['stage']} {last['kind']}" if last else None, "phase": phase or d.get("kind"),
                "results": results, "problems": problems, "rejected": rejected}

    # -- HTTP --
    def __call__(self, h: BoundedHandler) -> bool:
        """Answer the request if it is ours (the web view, /api/...); False to let the gateway go on."""
        u = urlsplit(h.path)
        path = u.path
        if not (path in STATIC or path.startswith("/api/") or path == "/api"):
            return False
        try:
            self._route(h, h.command, path, parse_qs(u.query))
        except KeyError as e:
            _json(h, 404, {"error": f"unknown device {e.args[0]!r}" if e.args else "not found"})
        except (FormatError, ValueError) as e:
            _json(h, 400, {"error": str(e)})
        return True

    def _route(self, h: BoundedHandler, method: str, path: str, q: dict[str, list[str]]) -> None:
        if path in STATIC and method in ("GET", "HEAD"):
            name, ctype = STATIC[path]
            _send(h, 200, ctype, (WEB / name).read_bytes(), extra=(("Cache-Control", "no-cache"), ("Content-Security-Policy", CSP)))
            return
        if method == "OPTIONS":
            _send(h, 204, "text/plain", b"", extra=(("Allow", "GET, HEAD, POST, OPTIONS"),))
            return
        if path == EVENTS_PATH + "/session" and method == "POST":
            _json(h, 201, {"session": self.store.issue_session()})
            return
        if path == EVENTS_PATH and method == "POST":
            status, obj = self.post_event(h.body, str(h.client_address[0]))
            _json(h, status, obj)
            return
        if path == "/api/stream" and method == "GET":
            self._stream(h)
            return
        parts = [unquote(p) for p in path.split("/")[2:] if p]
        if method == "POST" and len(parts) == 3 and parts[0] == "devices" and parts[2] == "appraise":
            _json(h, 200, self.appraise(parts[1]))
            return
        if method not in ("GET", "HEAD"):
            _json(h, 405, {"error": f"{method} {path}: not allowed"})
            return
        limit = int(q.get("limit", ["100"])[0])
        if parts == ["devices"]:
            _json(h, 200, {"devices": [self.summary(d) for d in self.store.devices()]})
        elif len(parts) == 2 and parts[0] == "devices":
            d = self.store.device(parts[1])
            if d is None:
                raise KeyError(parts[1])
            _json(h, 200, {**self.summary(d), "events": self.store.events(parts[1], limit=limit)})
        elif parts == ["events"]:
            mac = q.get("device", [None])[0]
            _json(h, 200, {"events": self.store.events(mac, limit=limit, trust=q.get("trust", [None])[0])})
        elif parts == ["results"]:
            _json(h, 200, {"results": self.results(limit)})
        elif len(parts) == 2 and parts[0] == "provenance":
            _json(h, 200, self.provenance(CID.parse(parts[1])))
        elif len(parts) == 2 and parts[0] == "node":
            try:
                _json(h, 200, self.node(CID.parse(parts[1])))
            except NodeUnavailable as e:
                _json(h, 404, {"error": str(e)})
            except CidbootError as e:  # here but not a provenance node (or not a valid one)
                _json(h, 422, {"error": str(e)})
        else:
            _json(h, 404, {"error": f"no API at {path}"})

    def _stream(self, h: BoundedHandler) -> None:
        """Server-sent events: one `data:` line per change; the page refetches what changed."""
        q: queue.Queue[str] = queue.Queue(maxsize=256)
        with self._sub_lock:
            if len(self._subscribers) >= MAX_SUBSCRIBERS:
                _json(h, 503, {"error": "too many live views: retry later"})
                return
            self._subscribers.append(q)
        try:
            h.close_connection = True
            h.send_response(200)
            h.send_header("Content-Type", "text/event-stream")
            h.send_header("Cache-Control", "no-cache")
            h.send_header("X-Accel-Buffering", "no")
            h.end_headers()
            h.wfile.write(b"retry: 2000\n\n")
            while not self._stop.is_set():
                try:
                    msg = q.get(timeout=KEEPALIVE)
                    h.wfile.write(f"data: {msg}\n\n".encode())
                except queue.Empty:
                    h.wfile.write(b": keep-alive\n\n")
        finally:
            with self._sub_lock:
                self._subscribers.remove(q)


def _cid_in(text: str) -> str | None:
    m = CID_RX.search(text or "")
    return m.group(1) if m else None


def appraisal_obj(res: AppraisalResult, url: str) -> dict[str, Any]:
    obj = res.to_obj()
    obj["url"] = url
    obj["registered_role"] = res.role
    if res.leaf_public_key is not None:
        obj["leaf_key"] = raw_public_bytes(res.leaf_public_key).hex()
    return obj


def get_evidence(url: str, nonce: bytes, timeout: float) -> bytes:
    """The agent's evidence for `nonce` (`GET /attestation?nonce=`, as `agent attest` asks)."""
    u = urlsplit(url)
    conn = http.client.HTTPConnection(u.hostname or "", u.port, timeout=timeout)
    try:
        conn.request("GET", f"/attestation?nonce={nonce.hex()}", headers={"Accept": "application/eat+cwt"})
        resp = conn.getresponse()
        body = resp.read(1 << 20)
    except (OSError, http.client.HTTPException) as e:
        raise CidbootError(f"{url}: {type(e).__name__}: {e}") from None
    finally:
        conn.close()
    if resp.status != 200:
        raise CidbootError(f"{url}/attestation: HTTP {resp.status}")
    return body


def _send(h: BoundedHandler, status: int, ctype: str, body: bytes, *, extra: tuple[tuple[str, str], ...] = ()) -> None:
    h.send_response(status)
    h.send_header("Content-Type", ctype)
    h.send_header("Content-Length", str(len(body)))
    h.send_header("X-Content-Type-Options", "nosniff")
    for k, v in extra:
        h.send_header(k, v)
    h.end_headers()
    if h.command != "HEAD":
        h.wfile.write(body)


def _json(h: BoundedHandler, status: int, obj: Any) -> None:
    _send(h, status, "application/json", (json.dumps(obj, sort_keys=True, default=str) + "\n").encode(),
          extra=(("Cache-Control", "no-store"),))


def from_serve_config(cfg: Any, blocks: Blockstore, devices: Any) -> Fleet:
    """The fleet of a `bootstrap serve` (bootstrap.server.serve.ServeConfig): state in
    STATE_DIR/fleet.sqlite (in memory without --state-dir), roots from the signed device registry
    (verified under the manifest's root of trust), each device's manifest from devices.yaml."""
    from cidboot.trust.manifest import SignedManifest

    db = (Path(cfg.state_dir) / "fleet.sqlite") if cfg.state_dir else ":memory:"
    cache = Blockstore(Path(cfg.state_dir) / "fleet-blocks") if cfg.state_dir else blocks
    roots_cache: dict[str, Any] = {}

    def manifest(cid: CID) -> Manifest | None:
        try:
            return SignedManifest.decode(blocks.get(cid)).manifest
        except CidbootError as e:
            log.warning("manifest %s: %s", cid, e)
            return None

    def roots() -> DeviceRoots | None:
        if "r" not in roots_cache:
            roots_cache["r"] = None
            m = manifest(cfg.manifest)
            if cfg.device_registry is not None and m is not None:
                from cidboot.trust.registry import verify_signed_registry

                try:
                    reg = verify_signed_registry(blocks.get(cfg.device_registry), m.root)
                    roots_cache["r"], roots_cache["tpm"] = reg.roots, reg.tpm_references
                except CidbootError as e:
                    log.error("device registry %s: %s: signed events cannot be verified", cfg.device_registry, e)
        return roots_cache["r"]

    def tpm_references() -> Any:
        roots()
        return roots_cache.get("tpm")

    def manifest_for(mac: str) -> tuple[Manifest, CID] | None:
        pol = devices.lookup(mac, None)
        cid = CID.parse(pol.manifest) if pol.manifest else cfg.manifest
        m = manifest(cid)
        return (m, cid) if m is not None else None

    def role_for(mac: str) -> str | None:
        pol = devices.by_mac.get(mac)
        return pol.role if pol is not None else None

    return Fleet(FleetStore(db), cache, roots, manifest_for, role_for, tpm_references)
